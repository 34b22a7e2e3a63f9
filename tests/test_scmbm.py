"""SC-MBM (MinD-Vis Stage A): wrap padding, patch masking, loss on hidden patches, encode, learning, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.models import build_model, load_model, read_model_file, read_model_metadata
from brainfoundry.models.scmbm import frame_windows, sincos_positions
from brainfoundry.testing import write_synthetic_shards
from brainfoundry.train import train

torch.set_num_threads(1)
N = 40
SMALL = dict(n_parcels=N, patch_size=8, dim=32, depth=2, heads=4, decoder_dim=16, decoder_depth=1, decoder_heads=2,
             frame_points=3, mix_prob=0.0)


def model(**changes):
    torch.manual_seed(0)
    return build_model("scmbm", {**SMALL, **changes})


def batch(b=4, n=N, t=3, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"x": torch.randn(b, t, n, generator=g), "mask": torch.ones(b, t, dtype=torch.bool),
            "seed": torch.arange(seed0, seed0 + b)}


def test_frames_average_valid_points_and_are_z_normalised():
    m = model()
    b = batch()
    b["mask"][0, 2] = False
    f = m.frames(b)
    expect = b["x"][0, :2].mean(0)
    expect = (expect - expect.mean()) / expect.std(unbiased=False)
    assert torch.allclose(f[0], expect, atol=1e-5)
    assert torch.allclose(f.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(f.std(1, unbiased=False), torch.ones(4), atol=1e-4)


def test_wrap_padding_to_a_multiple_of_the_patch_size():
    m = model(n_parcels=21, patch_size=8, mask_ratio=0.5)  # 21 -> 24 values: parcels 0-2 wrap
    frame = torch.arange(21, dtype=torch.float32)[None]
    patches = m.patchify(frame)
    assert patches.shape == (1, 3, 8)
    assert patches.flatten().tolist() == list(range(21)) + [0, 1, 2]
    assert torch.equal(m.unpatchify(patches), frame)
    assert m.value_weight().flatten().tolist() == [True] * 21 + [False] * 3
    assert m.parcel_patch().tolist() == [i // 8 for i in range(21)]
    assert model(n_parcels=24, patch_size=8, mask_ratio=0.5).config.n_patches == 3  # a multiple: nothing added


def test_masking_ratio_and_per_sample_seeds():
    m = model(n_parcels=64, patch_size=4)  # 16 patches: 4 visible at 0.75
    b = batch(n=64)
    hidden, keep = m.draw_masks(b, 4)
    assert hidden.sum(1).tolist() == [12] * 4 and keep.shape == (4, 4)
    assert torch.equal(hidden.gather(1, keep), torch.zeros(4, 4, dtype=torch.bool))
    again, _ = m.draw_masks({"seed": b["seed"][2:]}, 2)
    assert torch.equal(again, hidden[2:]), "a sample's mask depends on its own seed only"
    assert len({tuple(h.tolist()) for h in hidden}) > 1


def test_loss_counts_hidden_patches_only():
    m = model(n_parcels=21, patch_size=8, mask_ratio=0.5)  # 3 patches, 1 visible, 2 hidden
    m.eval()
    b = batch(b=2, n=21)
    frames = m.frames(b)
    hidden, keep = m.draw_masks(b, 2)
    pred = m.decode(m.encode_patches(m.patchify(frames), keep), keep)
    err = (pred - m.patchify(frames)) ** 2
    weight = hidden[..., None] & m.value_weight()[None]
    expect = torch.stack([err[i][weight[i]].mean() for i in range(2)]).mean()
    loss, metrics = m.loss(b)
    assert torch.allclose(loss, expect, atol=1e-6)
    # Changing a visible patch's target values changes nothing in the loss but through the encoder input;
    # changing the prediction on visible patches does not change it at all:
    with torch.no_grad():
        m.head.bias.zero_()
    loss1, _ = m.loss(b)
    hook = m.head.register_forward_hook(lambda mod, inp, out: out + (~hidden)[..., None].float() * 100.0)
    loss2, metrics2 = m.loss(b)
    hook.remove()
    assert torch.allclose(loss1, loss2) and metrics2["mse_visible"] > 1000


def test_encoder_never_sees_hidden_patches():
    m = model()
    m.eval()
    b = batch(b=1)
    hidden, keep = m.draw_masks(b, 1)
    frames = m.frames(b)
    out = m.encode_patches(m.patchify(frames), keep)
    changed = m.patchify(frames).clone()
    changed[hidden] = 99.0
    assert torch.allclose(out, m.encode_patches(changed, keep))


def test_encode_shapes_and_parcel_tokens():
    m = model()
    out = m.encode(batch())
    assert out["pooled"].shape == (4, 32) and out["tokens"].shape == (4, 5, 32) and out["parcels"].shape == (4, N, 32)
    assert torch.equal(out["parcels"][:, 9], out["tokens"][:, 1])
    one = model(patch_size=1).encode(batch())
    assert torch.equal(one["parcels"], one["tokens"]), "patch_size 1: a patch is a parcel"
    assert m.latent(batch()).shape == (4, 6, 32)


def test_sincos_positions_fixed_and_not_saved(tmp_path):
    m = model()
    table = sincos_positions(5, 32)
    assert torch.equal(table[0], torch.zeros(32)) and torch.allclose(m.pos, table)
    assert "pos" not in m.state_dict()
    path = m.save(tmp_path / "m.safetensors")
    meta = read_model_metadata(path)
    assert meta["latent"]["shape"] == [6, 32] and meta["family"] == "scmbm"
    again = load_model(path)
    b = batch()
    assert torch.allclose(again.encode(b)["pooled"], m.encode(b)["pooled"])


def test_mixing_pairs_neighbours_and_depends_on_seeds_only():
    m = model(mix_prob=1.0, mix_ratio=0.5)
    f = torch.randn(5, N)
    mixed = m.mix({"seed": torch.arange(5)}, f)
    assert torch.allclose(mixed[0], 0.5 * (f[0] + f[1])) and torch.allclose(mixed[1], 0.5 * (f[1] + f[0]))
    assert torch.equal(mixed[4], f[4]), "the unpaired last sample stays as it is"
    half = m.mix({"seed": torch.arange(2, 4)}, f[2:4])
    assert torch.allclose(half, mixed[2:4]), "a rank holding samples 2-3 mixes them as one process does"
    assert torch.equal(model(mix_prob=0.0).mix({"seed": torch.arange(5)}, f), f)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="model.patch_size"):
        build_model("scmbm", {**SMALL, "patch_size": 0})
    with pytest.raises(ConfigError, match="model.patch_size"):
        build_model("scmbm", {**SMALL, "patch_size": N + 1})
    with pytest.raises(ConfigError, match="model.mask_ratio.*no visible patch"):
        build_model("scmbm", {**SMALL, "patch_size": 16})  # 3 patches, int(0.75) = 0 visible
    with pytest.raises(ConfigError, match="model.frame_points"):
        build_model("scmbm", {**SMALL, "frame_points": 0})
    with pytest.raises(ConfigError, match="model.heads"):
        build_model("scmbm", {**SMALL, "heads": 5})
    with pytest.raises(InputError, match="parcels"):
        model().loss(batch(n=N + 1))
    with pytest.raises(InputError, match="model.frame_points"):
        frame_windows(np.zeros((2, N)), 3)
    assert frame_windows(np.zeros((7, N)), 3).shape == (2, 3, N)


def test_learns_a_planted_low_rank_signal_better_than_the_mean():
    # Frames from 3 spatial factors: hidden patches are predictable from the visible ones.
    rng = np.random.default_rng(0)
    loadings = rng.normal(size=(3, N))
    m = model(n_parcels=N, patch_size=4, dim=64, decoder_dim=32, mask_ratio=0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)

    def draw(b, step):
        z = rng.normal(size=(b, 1, 3))
        x = z @ loadings + 0.05 * rng.normal(size=(b, 3, N))
        return {"x": torch.from_numpy(x).float(), "seed": torch.arange(b) + 1000 * step}

    m.train()
    for step in range(300):
        loss, _ = m.loss(draw(32, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    test = draw(256, 10**6)
    with torch.no_grad():
        loss, _ = m.loss(test)
    # The mean of z-normalised frames (the parcel-mean predictor) scores ~1 on the hidden values.
    frames = m.frames(test)
    hidden, _ = m.draw_masks(test, 256)
    mean_mse = ((m.patchify(frames) ** 2)[hidden]).mean()
    assert float(loss) < 0.5 * float(mean_mse), f"loss {float(loss):.3f} vs mean predictor {float(mean_mse):.3f}"


# -- the trainer ----------------------------------------------------------------------------------------------
TRAIN_MODEL = dict(patch_size=4, dim=32, depth=1, heads=4, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                   frame_points=4, mix_prob=0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


def test_trainer_resume_is_bitwise_identical(shards, tmp_path):
    from tests.test_train import DyingSource, Killed, config

    cfg = config(steps=10, checkpoint_every=4, window=4)
    whole = train("scmbm", tmp_path / "whole", shards=shards, model_config=TRAIN_MODEL, train_config=cfg,
                  resume="never")
    source = DyingSource(shards, cfg, 4, need_pfc=False, after=6)
    with pytest.raises(Killed):
        train("scmbm", tmp_path / "cut", shards=shards, model_config=TRAIN_MODEL, train_config=cfg, resume="never",
              source=source)
    resumed = train("scmbm", tmp_path / "cut", shards=shards, model_config=TRAIN_MODEL, train_config=cfg,
                    resume="always")
    a = read_model_file(tmp_path / "whole" / "model.safetensors")["state_dict"]
    b = read_model_file(tmp_path / "cut" / "model.safetensors")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["final"]["loss"] == resumed["final"]["loss"]
    meta = read_model_metadata(tmp_path / "whole" / "model.safetensors")
    assert meta["config"]["frame_points"] == 4 and meta["latent"]["shape"] == [1 + 4, 32]


def test_batch_split_in_two_takes_the_same_step():
    # What DDP relies on: the loss of a batch of 8 is the mean of the losses of its two halves (seeds per
    # sample, mixing partners inside pairs), so 2 ranks x 4 average to the same gradient as 1 x 8.
    m = model(mix_prob=0.5)
    m.train()
    b = batch(b=8)
    whole, _ = m.loss(b)
    halves = [m.loss({k: v[s:s + 4] for k, v in b.items()})[0] for s in (0, 4)]
    assert torch.allclose(whole, torch.stack(halves).mean(), atol=1e-6)


def test_evaluation_adapter_averages_frames_of_a_window():
    from brainfoundry.evaluate.families import FRAMES_PER_WINDOW, wrap_model

    m = model()
    adapter = wrap_model(m, "scmbm")
    assert adapter.window == FRAMES_PER_WINDOW * 3 and adapter.min_length == 3
    assert "reconstruct" not in adapter.capabilities and "embed" in adapter.capabilities
    windows = np.random.default_rng(0).normal(size=(2, 7, N)).astype(np.float32)  # 2 frames + 1 point dropped
    pooled, parcels = adapter.embed(windows)
    with torch.no_grad():
        first = m.encode({"x": torch.from_numpy(windows[0, :6].reshape(2, 3, N))})
    assert np.allclose(pooled[0], first["pooled"].mean(0).numpy(), atol=1e-5)
    assert parcels.shape == (2, N, 32)
    tuned = adapter.finetune_encoder()(torch.from_numpy(windows[:, :6]))
    assert torch.allclose(tuned[0], first["pooled"].mean(0), atol=1e-5)
    frames = m.frames({"x": torch.from_numpy(windows[:, :3])}).numpy()
    hidden, _ = m.draw_masks({"seed": torch.arange(2)}, 2)
    assert adapter.reconstruct_frames(frames, hidden.numpy()).shape == (2, N)
