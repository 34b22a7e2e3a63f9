"""Model families on synthetic tensors: shapes, masks, losses, EMA, files, FLOPs (LCM specifics: test_lcm.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.io import sha256_file
from brainfoundry.models import FAMILIES, build_model, load_model, read_model_metadata
from brainfoundry.models.base import masked_mean_per_sample, sample_uniform
from brainfoundry.models.lcm import fit_env_stats
from brainfoundry.pfc import pfc_views_torch

torch.set_num_threads(1)
N, T = 12, 40
BRAINLM = dict(n_parcels=N, window=T, patch_size=10, dim=32, depth=2, heads=4, decoder_dim=16, decoder_depth=1,
               decoder_heads=2)
BRAINMASS = dict(n_parcels=N, dim=32, depth=2, heads=4, proj_dim=16, proj_hidden=32)
RECORDS = {"age": [20.0, 30.0, float("nan"), 40.0], "sex": ["F", "M", None, "M"],
           "diagnosis": ["ASD", "TD", "ASD", None], "site": ["A", "B", "A", "A"]}


def coords():
    return torch.from_numpy(np.random.default_rng(0).uniform(-60, 60, (N, 3))).float()


def batch(b=4, seed0=0, pfc=True):
    g = torch.Generator().manual_seed(seed0)
    x = torch.randn(b, T, N, generator=g)
    out = {"x": x, "mask": torch.ones(b, T, dtype=torch.bool), "seed": torch.arange(seed0, seed0 + b),
           "run_id": [f"sub-{i}_task-rest" for i in range(b)], "split": ["train"] * b}
    if pfc:
        out["pfc"] = pfc_views_torch(x, keep_fraction=0.8, n_views=4, generator=g, fisher_z=True).half()
    return out


def lcm():
    env = fit_env_stats(RECORDS, [{"name": "age", "kind": "continuous"}, {"name": "sex", "kind": "categorical"},
                                  {"name": "diagnosis", "kind": "categorical"}, {"name": "site", "kind": "categorical"}])
    return build_model("lcm", dict(n_parcels=N, dim=32, heads=4, depth=2, env=env), coords=coords())


# -- common interface ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["brainlm", "brainmass", "lcm"])
def test_interface_shapes_and_backward(family):
    model = lcm() if family == "lcm" else build_model(family, BRAINLM if family == "brainlm" else BRAINMASS,
                                                      coords=coords())
    b = batch()
    b.update({k: v for k, v in RECORDS.items()})
    loss, metrics = model.loss(b)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert metrics and all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every trainable parameter takes part in the loss (DDP needs it)"
    emb = model.encode(b)
    assert emb["pooled"].shape == (4, model.config.dim)
    assert emb["parcels"].shape == (4, N, model.config.dim)
    n_tokens = N * (T // 10) if family == "brainlm" else N
    assert emb["tokens"].shape == (4, n_tokens, model.config.dim)
    assert model.num_parameters() > 0


def test_loss_is_mean_of_per_sample_losses_so_ddp_splits_agree():
    """With per-sample seeds, a batch's loss is the mean of its halves' losses (what DDP averages)."""
    torch.manual_seed(0)
    for model, b in [(build_model("brainlm", BRAINLM, coords=coords()), batch()),
                     (build_model("brainmass", BRAINMASS, coords=coords()), batch())]:
        full, _ = model.loss(b)
        halves = [model.loss({k: v[s] for k, v in b.items()})[0] for s in (slice(0, 2), slice(2, 4))]
        torch.testing.assert_close(full, sum(halves) / 2, rtol=1e-5, atol=1e-6)


def test_sample_uniform_depends_on_the_sample_seed_only():
    a = sample_uniform({"seed": torch.tensor([5, 6, 7])}, 3, 10)
    b = sample_uniform({"seed": torch.tensor([7])}, 1, 10)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sample_uniform({"seed": torch.tensor([7])}, 1, 10, stream=1), b)
    # Large seeds (the trainer's are up to 2**62) use their high bits too.
    hi = sample_uniform({"seed": torch.tensor([7 + 2**40, 7 + 2**41])}, 2, 10)
    assert not torch.equal(hi[0], b[0]) and not torch.equal(hi[0], hi[1])


def test_sample_uniform_hash_stays_out_of_compiled_graphs():
    """Inductor turns ``arange * 2654435761`` into an int32 Triton index and fails on CUDA (torch 2.11):
    the hash must run eagerly under ``torch.compile``, with the same numbers."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    seeds = torch.tensor([5, 6, 2**40 + 7])
    compiled = torch.compile(lambda s: sample_uniform({"seed": s}, 3, 10) * 2.0, backend=capture)
    torch.testing.assert_close(compiled(seeds), sample_uniform({"seed": seeds}, 3, 10) * 2.0, rtol=0, atol=0)
    assert graphs, "dynamo traced nothing"
    assert not [n for g in graphs for n in g.graph.nodes if n.target is torch.arange]
    torch._dynamo.reset()


def test_sample_uniform_is_uniform_and_independent():
    """A counter-based hash stands in for a generator: check its marginal and pairwise behaviour."""
    from scipy import stats

    u = sample_uniform({"seed": torch.arange(200)}, 200, 500).numpy()
    assert u.dtype == np.float64 and 0 <= u.min() and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01   # neighbouring indices
    assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.01         # neighbouring seeds
    assert len(np.unique(u)) > 0.999 * u.size


# -- BrainLM -------------------------------------------------------------------------------------------------
def test_brainlm_masks_count_and_future():
    model = build_model("brainlm", {**BRAINLM, "mask_ratio": 0.5, "future_patches": 1, "future_prob": 1.0})
    hidden = model.random_mask({"seed": torch.arange(6)}, 6)
    assert hidden.shape == (6, N, T // 10)
    assert (hidden.flatten(1).sum(1) == round(0.5 * N * 4)).all()
    assert hidden[:, :, -1].all(), "forecasting samples hide the last patch of every parcel"
    never = build_model("brainlm", {**BRAINLM, "mask_ratio": 0.5, "future_prob": 0.0}).random_mask(
        {"seed": torch.arange(50)}, 50)
    assert not never[:, :, -1].all(dim=1).all(), "without future masking the last patch is not always hidden"
    frac_last = never[:, :, -1].float().mean()
    assert 0.3 < frac_last < 0.7  # random masking at 0.5


def test_brainlm_encoder_never_sees_hidden_tokens():
    model = build_model("brainlm", BRAINLM, coords=coords()).eval()
    b = batch(pfc=False)
    hidden = model.random_mask(b, 4)
    patches = model.patchify(b["x"])
    latent, keep = model.encode_tokens(patches, hidden)
    changed = patches.clone()
    changed[hidden] += 100.0  # only hidden patches change
    latent2, keep2 = model.encode_tokens(changed, hidden)
    assert torch.equal(keep, keep2)
    torch.testing.assert_close(latent, latent2)
    visible_changed = patches.clone()
    visible_changed[~hidden] += 1.0
    assert not torch.allclose(latent, model.encode_tokens(visible_changed, hidden)[0])


def test_brainlm_sincos_time_embedding_is_fixed_and_rebuilt_on_load(tmp_path):
    model = build_model("brainlm", {**BRAINLM, "temporal_embedding": "sincos"}, coords=coords())
    t = model.temporal
    assert not isinstance(t, torch.nn.Parameter) and t.shape == (T // 10, 32)
    assert torch.allclose(t[0, 0::2], torch.zeros(16)) and torch.allclose(t[0, 1::2], torch.ones(16))
    assert t[1, 0] == pytest.approx(math.sin(1.0)) and model.decoder_temporal.shape == (T // 10, 16)
    assert "temporal" not in model.state_dict() and "temporal" not in dict(model.named_parameters())
    loaded = load_model(model.save(tmp_path / "model.safetensors", parcel_names=[f"p{i}" for i in range(N)]))
    assert torch.equal(loaded.temporal, t)
    b = batch(pfc=False)
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode(b)["pooled"], model.eval().encode(b)["pooled"])
    with pytest.raises(ConfigError, match="temporal_embedding"):
        build_model("brainlm", {**BRAINLM, "temporal_embedding": "rope"})


def test_brainlm_cls_attention_is_the_last_layers_cls_weights():
    model = build_model("brainlm", BRAINLM, coords=coords()).eval()
    x = batch()["x"]
    seen = {}
    last = model.encoder.blocks[-1].attn
    hook = last.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad():
        model.encode({"x": x})
        w = model.cls_attention_weights(x)  # [B, H, 1 + L]
        att = model.cls_attention(x)
    hook.remove()
    b, n_tok = x.shape[0], 1 + N * (T // 10)
    assert w.shape == (b, 4, n_tok) and torch.allclose(w.sum(-1), torch.ones(b, 4), atol=1e-5)
    # The weights reproduce the attention layer's CLS output: proj(sum_j w_j v_j), heads concatenated.
    v = last.qkv(seen["inp"]).view(b, n_tok, 3, 4, -1)[:, :, 2].transpose(1, 2)  # [B, H, L+1, dh]
    cls_out = last.proj((w[..., None] * v).sum(2).reshape(b, -1))
    assert torch.allclose(cls_out, seen["out"][:, 0], atol=1e-5)
    assert att.shape == (b, N) and (att > 0).all()
    expected = w[:, :, 1:].mean(1).view(b, N, T // 10).mean(2)
    assert torch.allclose(att, expected) and torch.allclose(att.sum(1) * (T // 10) + w[:, :, 0].mean(1), torch.ones(b))


def test_brainlm_loss_is_mse_on_hidden_valid_points():
    model = build_model("brainlm", BRAINLM, coords=coords())
    b = batch(pfc=False)
    b["mask"][1, 30:] = False  # padding at the end of sample 1
    loss, _ = model.loss(b)
    hidden = model.random_mask(b, 4)
    pred = model.reconstruct(b["x"], hidden)                        # [B, T, N]
    per_time_hidden = hidden.repeat_interleave(10, dim=2).transpose(1, 2)  # [B, T, N]
    weight = per_time_hidden & b["mask"][:, :, None]
    expected = torch.stack([((pred[i] - b["x"][i]) ** 2)[weight[i]].mean() for i in range(4)]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_masked_mean_per_sample():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weight = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masked_mean_per_sample(values, weight), torch.tensor([2.0, 0.0]))


def test_brainlm_config_errors():
    with pytest.raises(ConfigError, match="patch_size"):
        build_model("brainlm", {**BRAINLM, "patch_size": 7})
    with pytest.raises(ConfigError, match="unknown"):
        build_model("brainlm", {**BRAINLM, "dimm": 3})
    with pytest.raises(ConfigError, match="future_patches"):
        build_model("brainlm", {**BRAINLM, "mask_ratio": 0.1, "future_patches": 2})
    model = build_model("brainlm", BRAINLM)
    with pytest.raises(InputError, match="13 parcels"):
        model.loss({"x": torch.zeros(2, T, N + 1)})
    with pytest.raises(InputError, match="window"):
        model.loss({"x": torch.zeros(2, T + 10, N)})


def test_spatial_embedding_needs_finite_centroids():
    model = build_model("brainlm", BRAINLM)
    bad = coords()
    bad[3, 1] = float("nan")
    with pytest.raises(ConfigError, match="centroids"):
        model.set_coords(bad)
    learned = build_model("brainlm", {**BRAINLM, "spatial_embedding": "learned"})
    learned.set_coords(bad)  # stored, unused: learned embeddings work without centroids
    assert torch.isfinite(learned.loss(batch(pfc=False))[0])


# -- BrainMass -------------------------------------------------------------------------------------------
def test_brainmass_matrix_round_trip():
    model = build_model("brainmass", BRAINMASS)
    upper = torch.randn(3, N * (N - 1) // 2)
    m = model.to_matrix(upper)
    iu = torch.triu_indices(N, N, 1)
    torch.testing.assert_close(m[:, iu[0], iu[1]], upper)
    torch.testing.assert_close(m, m.transpose(1, 2))
    assert (torch.diagonal(m, dim1=1, dim2=2) == 0).all()
    with pytest.raises(InputError, match="13 parcels"):
        model.to_matrix(torch.zeros(1, 13 * 12 // 2))


def test_brainmass_corruption():
    model = build_model("brainmass", {**BRAINMASS, "mask_ratio": 0.5, "swap_fraction": 0.5})
    m = model.to_matrix(torch.randn(8, N * (N - 1) // 2))
    c = model.corrupt({"seed": torch.arange(8)}, m, stream=10)
    assert (c["selected"].sum(1) == 6).all()
    assert torch.equal(c["selected"], c["masked"] | c["swapped"]) and not (c["masked"] & c["swapped"]).any()
    assert c["swapped"].any() and c["masked"].any()
    for i in range(8):
        masked = c["masked"][i]
        assert (c["rows"][i][:, masked] == 0).all(), "masked ROIs' columns are hidden in every row"
        for j in torch.nonzero(c["swapped"][i]).flatten():
            assert not torch.equal(c["rows"][i, j][~masked], m[i, j][~masked]), "a swapped row is another ROI's row"
        untouched = ~c["selected"][i]
        torch.testing.assert_close(c["rows"][i][untouched][:, ~masked], m[i][untouched][:, ~masked])


def test_brainmass_two_different_stored_views():
    model = build_model("brainmass", BRAINMASS)
    b = batch(b=16)
    v1, v2 = model.two_views(b)
    full = model.to_matrix(b["pfc"])                                 # [B, K, N, N]
    for i in range(16):
        idx1 = [k for k in range(4) if torch.equal(full[i, k], v1[i])]
        idx2 = [k for k in range(4) if torch.equal(full[i, k], v2[i])]
        assert idx1 and idx2 and set(idx1).isdisjoint(idx2)


def test_brainmass_on_the_fly_views_match_pfc_function():
    model = build_model("brainmass", {**BRAINMASS, "views": "on_the_fly", "keep_fraction": 0.8})
    b = batch(b=2, pfc=False)
    views = model._window_views(b, b["x"], 2)
    assert views.shape == (2, 2, N * (N - 1) // 2)
    keys = sample_uniform(b, 2, 2 * T, stream=2).view(2, 2, T)
    keep = keys.argsort(dim=-1, stable=True).argsort(dim=-1) < 32
    torch.testing.assert_close(views, pfc_views_torch(b["x"], keep, fisher_z=True))
    loss, _ = model.loss(b)
    assert torch.isfinite(loss)
    # Under bf16 autocast (the trainer's GPU setting) correlations are still computed in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = model._window_views(b, b["x"], 2)
    assert in_autocast.dtype == torch.float32
    torch.testing.assert_close(in_autocast, views, rtol=0, atol=0)


def test_brainmass_ema_target():
    model = build_model("brainmass", {**BRAINMASS, "ema_momentum": 0.5})
    assert not any(p.requires_grad for p in model.target.parameters())
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target.parameters()]
    model.on_step_end(0.0)
    for po, pt, pb in zip(model.online.parameters(), model.target.parameters(), before):
        torch.testing.assert_close(pt, 0.5 * pb + 0.5 * po)
    model.on_step_end(0.5)
    assert math.isclose(model.momentum, 1 - 0.5 * (math.cos(math.pi * 0.5) + 1) / 2)
    again = build_model("brainmass", {**BRAINMASS, "ema_momentum": 0.5})
    again.load_state_dict(model.state_dict())  # the schedule position travels with the weights
    assert again.momentum == model.momentum
    model.on_step_end(1.0)
    assert model.momentum == 1.0


# -- files ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["brainlm", "brainmass", "lcm"])
def test_save_load_round_trip(tmp_path, family):
    model = lcm() if family == "lcm" else build_model(family, BRAINLM if family == "brainlm" else BRAINMASS,
                                                      coords=coords())
    if family == "brainmass":
        model.on_step_end(0.5)  # a non-tensor state (the EMA momentum) that must come back too
    path = model.save(tmp_path / "model.safetensors", parcel_names=[f"p{i}" for i in range(N)])
    assert path == tmp_path / "model.safetensors" and (tmp_path / "model.json").is_file()
    again = load_model(path)
    assert type(again) is type(model) and again.config == model.config
    if family == "brainmass":
        assert again.momentum == model.momentum
    b = batch()
    model.eval(), again.eval()
    torch.testing.assert_close(model.encode(b)["pooled"], again.encode(b)["pooled"], rtol=0, atol=0)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["family"] == family and meta["n_parcels"] == N and meta["n_parameters"] > 0
    assert meta["format"] == "brainfoundry-model" and meta["weights"]["sha256"] == sha256_file(path)
    assert meta["versions"]["torch"] == torch.__version__ and "safetensors" in meta["versions"]
    assert read_model_metadata(tmp_path / "model.json")["parcel_names"][0] == "p0"
    other = "brainmass" if family != "brainmass" else "brainlm"
    with pytest.raises(InputError, match=f"not {other}"):
        load_model(path, family=other)


def test_load_model_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="metadata not found"):
        load_model(tmp_path / "junk.safetensors")
    model = build_model("brainlm", BRAINLM)
    path = model.save(tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1, "weights": {"file": "m.safetensors"}}))
    with pytest.raises(InputError, match="not brainfoundry model metadata"):
        load_model(tmp_path / "other.json")
    (tmp_path / "mismatch.json").write_text(json.dumps({**meta, "config": {**meta["config"], "dim": 64}}))
    with pytest.raises(InputError, match="do not fit"):  # weights of a 32-d model under a 64-d config
        load_model(tmp_path / "mismatch.json")
    (tmp_path / "newer.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(InputError, match="format 99 is newer"):
        load_model(tmp_path / "newer.json")
    with pytest.raises(InputError, match="is named <name>.safetensors"):
        model.save(tmp_path / "model.pt")
    assert load_model(path).config == model.config


def test_registry():
    assert set(FAMILIES) == {"brainlm", "brainmass", "lcm", "scmbm"}
    with pytest.raises(ConfigError, match="unknown model family"):
        build_model("gpt", {})


# -- FLOPs -------------------------------------------------------------------------------------------------------
def test_brainlm_flop_formula_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from brainfoundry.models.flops import brainlm_flops, mfu

    cfg = {**BRAINLM, "spatial_embedding": "learned", "mask_ratio": 0.75}
    model = build_model("brainlm", cfg)
    b = batch(b=3, pfc=False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(b)
    flops = brainlm_flops(model.config)
    assert counter.get_total_flops() == 3 * flops["forward"]
    assert flops["train"] == 3 * flops["forward"]
    assert flops["n_visible"] == N * 4 - round(0.75 * N * 4)
    # The paper's model: 424 parcels x 200 points, 512-d, 4 + 2 layers, mask 0.75.
    paper = brainlm_flops(FAMILIES["brainlm"][0]())
    assert paper["n_tokens"] == 4240 and paper["n_visible"] == 1060
    enc = 4 * (24 * 1061 * 512**2 + 4 * 1061**2 * 512)
    assert paper["encoder"] == enc
    assert mfu(paper["train"], 1000.0, 989.4e12) == pytest.approx(paper["train"] * 1000 / 989.4e12)
