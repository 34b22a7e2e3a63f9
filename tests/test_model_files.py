"""Model files one can trust (issue 15): no code runs from any model file or checkpoint, flipped bytes are
named, old pickles are refused with the way to convert them, and an exported folder round-trips.

Every loading path gets the same crafted payload: an object whose ``__reduce__`` would create a marker
file when unpickled. Each test first proves the payload is live (a plain ``torch.load`` runs it), then
that the path raises a named error and the marker never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from brainfoundry import cli
from brainfoundry.checkpoint import load_checkpoint
from brainfoundry.errors import InputError
from brainfoundry.evaluate.table import COLUMNS
from brainfoundry.models import ModelChecksumError, UnsafeModelFileError, build_model, load_model, read_model_file
from brainfoundry.models.export import export_model
from brainfoundry.models.files import convert_model, read_model_metadata
from brainfoundry.testing import write_synthetic_shards
from brainfoundry.train import TrainConfig, train

torch.set_num_threads(1)
WINDOW = 40
BRAINLM = dict(window=WINDOW, patch_size=20, dim=32, depth=1, heads=4, decoder_dim=16, decoder_depth=1,
               decoder_heads=2, mask_ratio=0.5, future_prob=0.0)
BRAINMASS = dict(dim=32, depth=1, heads=4, proj_dim=16, proj_hidden=32)
# The evaluation's windows fit the synthetic shards' 60-point runs.
EVAL_OPTIONS = json.dumps({"window": WINDOW, "patch": 20, "context": 20, "horizon": 20, "max_windows_per_run": 1})
LCM = dict(dim=32, depth=1, heads=4)


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted(path: Path, marker: Path, kind: str = "model", plain: bool = False) -> Path:
    """A file shaped like a model file (or a checkpoint) of the old format, carrying the payload."""
    content = {"format_version": 1, "family": "brainlm", "config": {"n_parcels": 16, **BRAINLM},
               "state_dict": {"w": torch.zeros(2)}, "parcel_names": Payload(marker)}
    if kind == "checkpoint":
        content.update(kind="checkpoint", step=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plain:
        path.write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, path)
    return path


def assert_live(path: Path, marker: Path) -> None:
    """The payload really runs code when unpickled the old way (so the tests below can fail)."""
    data = path.read_bytes()
    torch.load(io.BytesIO(data), weights_only=False) if data[:2] == b"PK" else pickle.loads(data)
    assert marker.exists(), "the crafted payload did not run: the tests would prove nothing"
    marker.unlink()


def config(**changes) -> TrainConfig:
    values = dict(steps=2, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2, window=WINDOW,
                  eval_batches=1, threads=1)
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A real trainer output folder (brainmass, 2 steps): model.safetensors, model.json, checkpoint.pt."""
    out = tmp_path_factory.mktemp("trained")
    train("brainmass", out, shards=shards, model_config=BRAINMASS, train_config=config(), resume="never")
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# -- no code from any model file ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,plain", [("model.pt", False), ("model.safetensors", False), ("model.pkl", True)])
def test_load_model_refuses_a_crafted_pickle(tmp_path, name, plain):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / name, marker, plain=plain)
    assert_live(path, marker)
    if name.endswith(".safetensors"):  # with a sidecar whose checksum even matches the crafted bytes
        import hashlib

        meta = {"format": "brainfoundry-model", "format_version": 2, "family": "brainlm", "config": {},
                "weights": {"file": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
        path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeModelFileError, match="convert-model --trust-pickle"):
        load_model(path)
    with pytest.raises(UnsafeModelFileError):
        read_model_file(path)
    assert not marker.exists()


def test_evaluation_refuses_a_crafted_model_file(shards, tmp_path, capsys):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "models" / "brainlm" / "model.pt", marker)
    assert_live(path, marker)
    rc = cli.main(["evaluate", "--threads", "1", "embed", "--model", "brainlm", "--checkpoint", str(path),
                   "--shards", str(shards), "--options", EVAL_OPTIONS, "--out", str(tmp_path / "emb.npz")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "is a torch.save (pickle) file" in err and "convert-model --trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "emb.npz").exists()


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_train_init_refuses_a_crafted_model_file(shards, tmp_path, mode):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "init.pt", marker)
    assert_live(path, marker)
    family = "lcm" if mode == "finetune" else "brainlm"
    with pytest.raises(UnsafeModelFileError):
        train(family, tmp_path / "out", shards=shards, train_config=config(), mode=mode, init=path)
    assert not marker.exists()
    rc = cli.main(["train", "--family", family, "--mode", mode, "--init", str(path), "--shards", str(shards),
                   "--out", str(tmp_path / "out2"), "--set", "trainer.steps=1",
                   "--set", f"{'trainer' if family == 'lcm' else 'model'}.window={WINDOW}"])  # BrainLM's is its model's
    assert rc == 1 and not marker.exists()


@pytest.mark.parametrize("resume", ["auto", "always", "path"])
@pytest.mark.parametrize("plain", [False, True])
def test_resume_refuses_a_crafted_checkpoint(shards, tmp_path, resume, plain):
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    path = crafted(out / "checkpoint.pt", marker, kind="checkpoint", plain=plain)
    assert_live(path, marker)
    with pytest.raises(UnsafeModelFileError, match="--resume never"):
        train("brainlm", out, shards=shards, model_config=BRAINLM, train_config=config(),
              resume=str(path) if resume == "path" else resume)
    assert not marker.exists()
    with pytest.raises(UnsafeModelFileError):
        load_checkpoint(path)
    assert not marker.exists()


def test_convert_model_needs_trust_for_a_pickle_and_converts_an_honest_one(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "evil.pt", marker)
    assert_live(path, marker)
    assert cli.main(["convert-model", str(path), str(tmp_path / "evil.safetensors")]) == 1
    assert "only for a file you trust" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()

    # A model file as brainfoundry wrote it before format 2 (torch.save of the payload, numpy inside).
    model = build_model("brainmass", {"n_parcels": 16, **BRAINMASS})
    old = {**model.payload(), "format_version": 1, "parcel_names": [f"p{i}" for i in range(16)],
           "norm_stats": "/somewhere/norm_stats.parquet", "pseudo_labels": {"r1": (np.int64(1), np.float32(0.9))}}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(UnsafeModelFileError, match="convert-model --trust-pickle"):
        load_model(tmp_path / "old.pt")
    assert cli.main(["convert-model", str(tmp_path / "old.pt"), str(tmp_path / "new.safetensors")]) == 1
    assert cli.main(["convert-model", "--trust-pickle", str(tmp_path / "old.pt"),
                     str(tmp_path / "new.safetensors")]) == 0
    again = load_model(tmp_path / "new.safetensors")
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again.state_dict()[key], value), key
    meta = read_model_metadata(tmp_path / "new.safetensors")
    assert meta["pseudo_labels"] == {"r1": [1, pytest.approx(0.9)]} and meta["converted_from"]["format_version"] == 1


def test_a_current_checkpoint_converts_without_trust(trained, tmp_path):
    assert cli.main(["convert-model", str(trained / "checkpoint.pt"), str(tmp_path / "ck.safetensors")]) == 0
    a, b = read_model_file(trained / "model.safetensors"), read_model_file(tmp_path / "ck.safetensors")
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items() if isinstance(v, torch.Tensor))


def test_checkpoint_holds_only_plain_values(trained):
    ckpt = load_checkpoint(trained / "checkpoint.pt")  # weights_only=True, no allowlist needed
    assert isinstance(ckpt["rng"][0]["numpy"]["state"]["key"], list)
    assert ckpt["format_version"] == 2 and ckpt["kind"] == "checkpoint"


# -- corruption named --------------------------------------------------------------------------------------------
def test_flipped_bytes_in_the_weights_are_a_named_error(trained, shards, tmp_path, capsys):
    import shutil

    work = tmp_path / "m"
    shutil.copytree(trained, work)
    weights = work / "model.safetensors"
    meta = json.loads((work / "model.json").read_text())
    assert meta["weights"]["sha256"] == __import__("hashlib").sha256(weights.read_bytes()).hexdigest()
    load_model(weights)  # intact: loads
    flip(weights, weights.stat().st_size - 100)  # inside the last tensor's data
    with pytest.raises(ModelChecksumError, match="sha256 .* differs"):
        load_model(weights)
    with pytest.raises(ModelChecksumError):
        read_model_metadata(work)
    rc = cli.main(["evaluate", "--threads", "1", "embed", "--model", "brainmass", "--checkpoint", str(weights),
                   "--shards", str(shards), "--options", EVAL_OPTIONS, "--out", str(tmp_path / "emb.npz")])
    assert rc == 1 and "corrupt or were changed" in capsys.readouterr().err
    with pytest.raises(ModelChecksumError):
        train("brainmass", tmp_path / "ft", shards=shards, train_config=config(), init=weights)
    flip(weights, weights.stat().st_size - 100)  # flipped back: loads again
    flip(weights, 20)  # in the safetensors header
    with pytest.raises(ModelChecksumError):
        load_model(weights)


def test_flipped_bytes_in_a_checkpoint_are_named(trained, shards, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpt = out / "checkpoint.pt"
    # A byte in the middle of the largest tensor record (torch.save stores the zip members uncompressed).
    import struct
    import zipfile

    member = max(zipfile.ZipFile(ckpt).infolist(), key=lambda i: i.file_size)
    data = ckpt.read_bytes()
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    flip(ckpt, member.header_offset + 30 + name_len + extra_len + member.file_size // 2)
    with pytest.raises(ModelChecksumError, match="CRC-32"):
        load_checkpoint(ckpt)
    with pytest.raises(ModelChecksumError):
        train("brainmass", out, shards=shards, model_config=BRAINMASS, train_config=config(steps=4), resume="always")
    # "auto" says why and starts over instead of resuming from corrupt weights.
    train("brainmass", out, shards=shards, model_config=BRAINMASS, train_config=config(steps=4), resume="auto")
    assert "not resuming" in capsys.readouterr().out and load_checkpoint(ckpt)["step"] == 4


def test_metadata_and_weights_that_do_not_belong_together(trained, tmp_path):
    import shutil

    work = tmp_path / "m"
    shutil.copytree(trained, work)
    other = build_model("brainmass", {"n_parcels": 16, **BRAINMASS}).save(tmp_path / "x.safetensors")
    shutil.copy(other, work / "model.safetensors")  # new weights under old metadata (a crash between the writes)
    with pytest.raises(ModelChecksumError):
        load_model(work / "model.safetensors")
    (work / "model.json").unlink()
    with pytest.raises(InputError, match="metadata not found"):
        load_model(work / "model.safetensors")


# -- sharing a model ---------------------------------------------------------------------------------------------
def _metrics_table(path: Path) -> Path:
    rows = []
    for model, is_base, value in (("brainmass", False, 0.71), ("fc_logreg", True, 0.64)):
        rows.append({"model": model, "method": "linear_probe" if not is_base else "fc", "is_baseline": is_base,
                     "task": "phenotype", "target": "diagnosis", "condition": "", "split": "cv", "fold": "all",
                     "seed": -1, "metric": "auc", "value": value, "ci_low": value - 0.05, "ci_high": value + 0.05,
                     "n": 24, "n_values": 5})
        rows.append({**rows[-1], "metric": "accuracy", "value": 0.5})  # not a headline metric
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(path)
    return path


def test_export_model_round_trip(trained, shards, tmp_path):
    metrics = _metrics_table(tmp_path / "metrics.parquet")
    out = tmp_path / "export"
    assert cli.main(["export-model", str(trained / "model.safetensors"), str(out), "--metrics", str(metrics),
                     "--dataset", "synthetic shards", "--data-license", "CC0-1.0", "--license", "cc-by-4.0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "brainfoundry-brainmass" and config_json["family"] == "brainmass"
    assert len(config_json["norm_stats"]["median"]) == 16 and config_json["versions"]["safetensors"]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # the Hub's marker

    # The same model, read from the folder, its weights file, or after a fresh load.
    original, exported = load_model(trained / "model.safetensors"), load_model(out)
    for key, value in original.state_dict().items():
        same = torch.equal(exported.state_dict()[key], value) if isinstance(value, torch.Tensor) else \
            exported.state_dict()[key] == value
        assert same, key
    assert load_model(out / "model.safetensors").config == original.config

    # The model card: front matter with the data, its fingerprint and licence, the steps; the headline table.
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    info = front["brainfoundry"]
    assert front["license"] == "cc-by-4.0" and front["library_name"] == "brainfoundry"
    assert info["training_data"] == {"name": "synthetic shards", "fingerprint": config_json["data"]["fingerprint"],
                                     "license": "CC0-1.0"}
    assert info["steps"] == 2 and info["weights_sha256"] == config_json["weights"]["sha256"]
    assert "| phenotype | diagnosis |  | cv | brainmass | linear_probe | auc | 0.71 | [0.660, 0.760] |" in card
    assert "fc_logreg" in card and "| accuracy |" not in card and "## Intended use" in card

    # Loadable by the evaluation and by --init (continued pretraining, the checksum verified).
    assert cli.main(["evaluate", "--threads", "1", "embed", "--model", "brainmass", "--checkpoint", str(out),
                     "--shards", str(shards), "--options", EVAL_OPTIONS, "--out", str(tmp_path / "emb.npz")]) == 0
    assert np.load(tmp_path / "emb.npz")["pooled"].shape[1] == 32
    summary = train("brainmass", tmp_path / "cont", shards=shards, train_config=config(), init=out)
    assert summary["steps"] == 2
    assert read_model_metadata(tmp_path / "cont")["data"]["init_sha256"] == config_json["weights"]["sha256"]
    with pytest.raises(InputError, match="holds a brainmass model; this run trains brainlm"):
        train("brainlm", tmp_path / "x", shards=shards, train_config=config(), init=out)
    # Without metrics: the card says so; a model name absent from the table is named.
    export_model(trained / "model.safetensors", tmp_path / "bare")
    assert "No evaluation metrics" in (tmp_path / "bare" / "README.md").read_text()
    with pytest.raises(InputError, match="no rows of model 'lcm'"):
        export_model(trained / "model.safetensors", tmp_path / "x2", metrics=metrics, eval_model="lcm")
    with pytest.raises(InputError, match="folder of its own"):
        export_model(trained / "model.safetensors", trained)


def test_export_of_an_lcm_is_an_init_for_finetuning(shards, tmp_path):
    train("lcm", tmp_path / "pre", shards=shards, model_config=LCM, train_config=config())
    export_model(tmp_path / "pre" / "model.safetensors", tmp_path / "hub")
    train("lcm", tmp_path / "ft", shards=shards, train_config=config(steps=1, threshold=0.0, target="diagnosis"),
          mode="finetune", init=tmp_path / "hub")
    meta = read_model_metadata(tmp_path / "ft" / "model.safetensors")
    assert meta["training"]["mode"] == "finetune"
    assert meta["pseudo_label_round"]["threshold"] == 0.0 and "counts" in meta["pseudo_label_round"]
    assert meta["data"]["init_sha256"] == read_model_metadata(tmp_path / "hub")["weights"]["sha256"]
