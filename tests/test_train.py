"""The trainer on small synthetic shards read by the streaming reader: learning, exact resume, bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainfoundry import cli
from brainfoundry.checkpoint import load_checkpoint
from brainfoundry.errors import ConfigError, InputError
from brainfoundry.models import load_model, read_model_file
from brainfoundry.shards import find_shards, iter_series
from brainfoundry.testing import default_split, write_synthetic_shards
from brainfoundry.train import (NonFiniteLossError, ShardSource, TrainConfig, hidden_label_runs, lr_multiplier,
                                resolve_settings, sample_seeds, train)

torch.set_num_threads(1)
WINDOW = 40
MODELS = {
    "brainlm": dict(window=WINDOW, patch_size=20, dim=32, depth=2, heads=4, decoder_dim=32, decoder_depth=1,
                    decoder_heads=4, mask_ratio=0.5, future_prob=0.0),
    "brainmass": dict(dim=32, depth=2, heads=4, proj_dim=16, proj_hidden=32),
    # The LCM is supervised: on these phenotypes (unrelated to the series) its loss falls by fitting the
    # training runs, which takes a little width.
    "lcm": dict(dim=64, depth=1, heads=4, dropout=0.0),
}


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


def config(**changes) -> TrainConfig:
    values = dict(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=4, window=WINDOW,
                  eval_batches=1, threads=1)
    values.update(changes)
    return TrainConfig(**values)


def history(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# -- learning -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,steps", [("brainlm", 300), ("brainmass", 100), ("lcm", 300)])
def test_loss_falls(shards, tmp_path, family, steps):
    cfg = config(steps=steps, batch_size=16, warmup_steps=20, min_lr_ratio=1.0, log_every=20, checkpoint_every=steps)
    summary = train(family, tmp_path, shards=shards, model_config=MODELS[family], train_config=cfg, resume="never")
    rows = history(tmp_path)
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.7 * first, f"{family}: loss {first:.4f} -> {last:.4f}"
    assert math.isfinite(float(rows[-1]["val_loss"]))
    assert summary["n_parameters"] == load_model(tmp_path / "model.safetensors").num_parameters()
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- exact resume -------------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands in for the process dying between two steps."""


class DyingLoader:
    """Delegates to a real loader and dies after ``after`` batches (state saved until then stays valid)."""

    def __init__(self, loader, after: int):
        self.loader, self.after, self.count = loader, after, 0

    @property
    def epoch(self):
        return self.loader.epoch

    def __iter__(self):
        for item in self.loader:
            if self.count >= self.after:
                raise Killed(f"killed after {self.count} batches")
            self.count += 1
            yield item

    def state_dict(self, gather=False):
        return self.loader.state_dict(gather=gather)

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


class DyingSource(ShardSource):
    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.after = after

    def loader(self, split, rank, world_size, batch_size, train=True):
        inner = super().loader(split, rank, world_size, batch_size, train)
        return DyingLoader(inner, self.after) if split == "train" and train else inner


@pytest.mark.parametrize("family,workers", [("brainlm", 0), ("brainlm", 1), ("brainmass", 0), ("lcm", 0)])
def test_killed_and_resumed_run_is_bitwise_identical(shards, tmp_path, family, workers):
    # 5 steps a batch of 4 on 14 training runs: the stream crosses an epoch boundary (new crops, order).
    cfg = config(steps=10, checkpoint_every=4, num_workers=workers)
    whole = train(family, tmp_path / "whole", shards=shards, model_config=MODELS[family], train_config=cfg,
                  resume="never")
    source = DyingSource(shards, cfg, WINDOW, need_pfc=family != "brainlm", after=6)
    with pytest.raises(Killed):
        train(family, tmp_path / "cut", shards=shards, model_config=MODELS[family], train_config=cfg,
              resume="never", source=source)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train(family, tmp_path / "cut", shards=shards, model_config=MODELS[family], train_config=cfg,
                    resume="always")
    a = read_model_file(tmp_path / "whole" / "model.safetensors")["state_dict"]
    b = read_model_file(tmp_path / "cut" / "model.safetensors")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, f"{key} differs after resume"
    assert whole["final"]["loss"] == resumed["final"]["loss"]
    steps = [int(r["step"]) for r in history(tmp_path / "cut")]
    assert steps == [2, 4, 6, 8, 10], "the resumed run's log continues the saved history without duplicates"


# -- bad input -----------------------------------------------------------------------------------------------
def test_parcel_count_mismatch(shards, tmp_path):
    with pytest.raises(InputError, match="99 parcels but the shards .* have 16"):
        train("brainlm", tmp_path, shards=shards, model_config={**MODELS["brainlm"], "n_parcels": 99},
              train_config=config())


def test_empty_training_split(tmp_path):
    d = write_synthetic_shards(tmp_path / "shards", n_subjects=6, split_of=lambda i, n: "test", manifest=False)
    # Statistics of another shard set of the same atlas (the manifest step refuses a set without training runs).
    stats = write_synthetic_shards(tmp_path / "stats", n_subjects=6) / "norm_stats.parquet"
    (d / "norm_stats.parquet").write_bytes(stats.read_bytes())
    with pytest.raises(InputError, match="split 'train' has no runs"):
        train("brainlm", tmp_path / "out", shards=d, model_config=MODELS["brainlm"], train_config=config())
    short = write_synthetic_shards(tmp_path / "short", n_subjects=4, n_timepoints=30, split_of=lambda i, n: "train")
    with pytest.raises(InputError, match="4 runs shorter than the 40-point window"):
        train("brainlm", tmp_path / "out2", shards=short, model_config=MODELS["brainlm"], train_config=config())


def test_checkpoint_of_another_family_or_config(shards, tmp_path, capsys):
    train("brainmass", tmp_path / "mass", shards=shards, model_config=MODELS["brainmass"], train_config=config(steps=2))
    ckpt = tmp_path / "mass" / "checkpoint.pt"
    with pytest.raises(InputError, match="checkpoint of a brainmass model; this run trains brainlm"):
        train("brainlm", tmp_path / "lm", shards=shards, model_config=MODELS["brainlm"], train_config=config(steps=2),
              resume=str(ckpt))
    with pytest.raises(InputError, match=r"model\.dim: 32 -> 64"):
        train("brainmass", tmp_path / "mass", shards=shards, model_config={**MODELS["brainmass"], "dim": 64},
              train_config=config(steps=2), resume="always")
    with pytest.raises(InputError, match=r"trainer\.lr"):
        train("brainmass", tmp_path / "mass", shards=shards, model_config=MODELS["brainmass"],
              train_config=config(steps=2, lr=1.0), resume="always")
    other = write_synthetic_shards(tmp_path / "other", n_subjects=26)  # two more subjects, same atlas
    with pytest.raises(InputError, match=r"trainer\.data"):
        train("brainmass", tmp_path / "mass", shards=other, model_config=MODELS["brainmass"],
              train_config=config(steps=2), resume="always")
    # "auto" does not resume a mismatching checkpoint: it says why and starts over.
    summary = train("brainmass", tmp_path / "mass", shards=shards, model_config={**MODELS["brainmass"], "dim": 64},
                    train_config=config(steps=2), resume="auto")
    assert "not resuming" in capsys.readouterr().out
    assert summary["steps"] == 2 and load_model(tmp_path / "mass" / "model.safetensors").config.dim == 64
    with pytest.raises(InputError, match="is a model file, not a training checkpoint"):
        train("brainmass", tmp_path / "x", shards=shards, model_config=MODELS["brainmass"],
              train_config=config(steps=2), resume=str(tmp_path / "mass" / "model.safetensors"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"half a file")
    train("brainmass", tmp_path / "junk", shards=shards, model_config=MODELS["brainmass"], train_config=config(steps=1))
    assert "cannot read the checkpoint file" in capsys.readouterr().out
    # Settings that do not change the trajectory may change.
    train("brainmass", tmp_path / "mass", shards=shards, model_config={**MODELS["brainmass"], "dim": 64},
          train_config=config(steps=2, log_every=1), resume="always")


class PoisonLoader(DyingLoader):
    """The ``after``-th batch has a NaN in its series."""

    def __iter__(self):
        for item in self.loader:
            self.count += 1
            if self.count == self.after:
                item["x"][0, 3, 2] = float("nan")
            yield item


class PoisonSource(DyingSource):
    def loader(self, split, rank, world_size, batch_size, train=True):
        inner = ShardSource.loader(self, split, rank, world_size, batch_size, train)
        return PoisonLoader(inner, self.after) if split == "train" and train else inner


@pytest.mark.parametrize("poisoned", [5, 6])
def test_nan_loss_stops_with_step_and_runs_and_keeps_last_good_checkpoint(shards, tmp_path, poisoned):
    # The 5th/6th batch is step 4/5; checkpoints every 2 steps: the last good one is after step 4.
    cfg = config(steps=10, checkpoint_every=2, log_every=2)
    source = PoisonSource(shards, cfg, WINDOW, need_pfc=False, after=poisoned)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {poisoned - 1} \(batch runs \['sub-s0") as err:
        train("brainlm", tmp_path, shards=shards, model_config=MODELS["brainlm"], train_config=cfg, source=source)
    assert "checkpoint.pt" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())
    assert not (tmp_path / "model.safetensors").exists()


def test_config_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        resolve_settings("brainlm", {"pretrain": {"trainer": {"stepz": 3}}})
    with pytest.raises(ConfigError, match="override keys"):
        resolve_settings("brainlm", {}, ["steps=3"])
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="unknown BrainLMConfig keys"):
        train("brainlm", tmp_path, shards=shards, model_config={"dimm": 3}, train_config=config())


def test_resolve_settings_layers():
    section = {"trainer": {"steps": 5, "lr": 0.1}, "brainlm": {"trainer": {"lr": 0.2}, "model": {"dim": 64}}}
    model, cfg = resolve_settings("brainlm", {"pretrain": section}, ["trainer.steps=7", "model.depth=3"])
    assert (cfg.steps, cfg.lr) == (7, 0.2) and model == {"dim": 64, "depth": 3}
    model, _ = resolve_settings("lcm", section, ["model.brain.dim=48"])
    assert model == {"brain": {"dim": 48}}


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)


def test_sample_seeds_distinct_across_steps_and_ranks():
    seen = {int(s) for step in range(50) for rank in range(4) for s in sample_seeds(7, step, rank * 8, 8)}
    assert len(seen) == 50 * 32
    torch.testing.assert_close(sample_seeds(7, 3, 4, 4), sample_seeds(7, 3, 0, 8)[4:])


# -- no leakage ------------------------------------------------------------------------------------------------
def test_normalization_and_env_statistics_come_from_training_runs_only(tmp_path):
    base = dict(n_subjects=12, n_timepoints=48)

    def shifted_pheno(i):  # held-out subjects get absurd phenotypes; training subjects the usual ones
        split = default_split(i, 12)
        return {"age": 20.0 + i if split == "train" else 500.0, "sex": "FM"[i % 2] if split == "train" else "X",
                "diagnosis": ("ASD", "TD")[(i // 2) % 2] if split == "train" else "other"}

    def plain_pheno(i):
        return {"age": 20.0 + i, "sex": "FM"[i % 2], "diagnosis": ("ASD", "TD")[(i // 2) % 2]}

    plain = write_synthetic_shards(tmp_path / "plain", phenotype=plain_pheno, **base)
    shifted = write_synthetic_shards(tmp_path / "shifted", phenotype=shifted_pheno,
                                     offsets=lambda i, split: 0.0 if split == "train" else 1000.0, **base)
    envs = []
    for d in (plain, shifted):
        train("lcm", tmp_path / f"lcm_{d.name}", shards=d, model_config=MODELS["lcm"], train_config=config(steps=1))
        envs.append(load_model(tmp_path / f"lcm_{d.name}" / "model.safetensors").config.env)
    assert envs[0] == envs[1], "held-out phenotypes must not change the environment statistics"
    assert [e["classes"] for e in envs[1] if e["name"] == "sex"] == [["F", "M"]]

    # The windows the trainer sees are scaled with medians/IQRs of the training runs alone.
    raw = {row["run_id"]: series for p in find_shards(shifted) for row, series in
           iter_series(p, ["train"], columns=["run_id"])}
    stacked = np.concatenate(list(raw.values()))
    median = np.median(stacked, axis=0)
    iqr = np.percentile(stacked, 75, axis=0) - np.percentile(stacked, 25, axis=0)
    source = ShardSource(shifted, config(), WINDOW, need_pfc=False)
    batch = next(iter(source.loader("train", 0, 1, 4)))
    for i, run_id in enumerate(batch["run_id"]):
        start = int(batch["start"][i])
        expected = (raw[run_id][start:start + WINDOW] - median) / iqr
        np.testing.assert_allclose(batch["x"][i].numpy(), expected, rtol=1e-4, atol=1e-4)


# -- fine-tuning with pseudo-labels ------------------------------------------------------------------------------
def test_finetune_assigns_pseudo_labels_to_unlabeled_training_runs_only(shards, tmp_path):
    train("lcm", tmp_path / "pre", shards=shards, model_config=MODELS["lcm"], train_config=config(steps=4))
    cfg = config(steps=3, threshold=0.0, target="diagnosis", pseudo_balance="none")
    train("lcm", tmp_path / "ft", shards=shards, train_config=cfg, mode="finetune", init=tmp_path / "pre" / "model.safetensors")
    payload = read_model_file(tmp_path / "ft" / "model.safetensors")
    manifest = ShardSource(shards, cfg, WINDOW, need_pfc=True).manifest()
    unlabeled_train = set(manifest.index[(manifest["split"] == "train") & manifest["diagnosis"].isna()])
    assert unlabeled_train and set(payload["pseudo_labels"]) == unlabeled_train
    record = payload["pseudo_label_round"]
    assert record["threshold"] == 0.0 and record["balance"] == "none"
    assert record["n_unlabelled"] == record["n_confident"] == record["n_assigned"] == len(unlabeled_train)
    assert sum(record["counts"].values()) == len(unlabeled_train)
    # Class balance: as many pseudo-labels per class, the counts recorded.
    train("lcm", tmp_path / "ftb", shards=shards, train_config=config(steps=1, threshold=0.0), mode="finetune",
          init=tmp_path / "pre" / "model.safetensors")
    balanced = read_model_file(tmp_path / "ftb" / "model.safetensors")
    counts = balanced["pseudo_label_round"]["counts"]
    assert balanced["pseudo_label_round"]["balance"] == "equal" and len(set(counts.values())) == 1
    assert len(balanced["pseudo_labels"]) == sum(counts.values()) <= len(unlabeled_train)
    rows = history(tmp_path / "ft")
    assert "ce" in rows[-1] and math.isfinite(float(rows[-1]["val_loss"]))
    # A threshold no prediction reaches: no pseudo-labels at all.
    train("lcm", tmp_path / "ft2", shards=shards, train_config=config(steps=1, threshold=1.0), mode="finetune",
          init=tmp_path / "pre" / "model.safetensors")
    nobody = read_model_file(tmp_path / "ft2" / "model.safetensors")
    assert nobody["pseudo_labels"] == {} and nobody["pseudo_label_round"]["n_assigned"] == 0
    train("brainmass", tmp_path / "pre_m", shards=shards, model_config=MODELS["brainmass"], train_config=config(steps=1))
    with pytest.raises(InputError, match="holds a brainmass model"):
        train("lcm", tmp_path / "ft3", shards=shards, train_config=cfg, mode="finetune",
              init=tmp_path / "pre_m" / "model.safetensors")


def test_label_fraction_hides_some_training_labels_and_they_get_pseudo_labels(shards, tmp_path):
    train("lcm", tmp_path / "pre", shards=shards, model_config=MODELS["lcm"], train_config=config(steps=2))
    cfg = config(steps=1, threshold=0.0, target="diagnosis", label_fraction=0.5, pseudo_balance="none")
    source = ShardSource(shards, cfg, WINDOW, need_pfc=True)
    manifest = source.manifest()
    labelled_train = manifest[(manifest["split"] == "train") & manifest["diagnosis"].notna()]
    seen = source.env_values(list(manifest.index), ["diagnosis", "sex"])
    hidden = {r for r, v in zip(manifest.index, seen["diagnosis"]) if v is None} & set(labelled_train.index)
    # Some labelled training runs lose the label, none outside training, and only the target's label.
    assert 0 < len(hidden) < len(labelled_train)
    assert all(v is not None for r, v in zip(manifest.index, seen["diagnosis"])
               if manifest.loc[r, "split"] != "train" and pd.notna(manifest.loc[r, "diagnosis"]))
    assert [v for v in seen["sex"]] == manifest["sex"].tolist()
    train("lcm", tmp_path / "ft", shards=shards, train_config=cfg, mode="finetune", init=tmp_path / "pre" / "model.safetensors")
    pseudo = set(read_model_file(tmp_path / "ft" / "model.safetensors")["pseudo_labels"])
    assert hidden <= pseudo
    with pytest.raises(ConfigError, match="label_fraction"):
        config(label_fraction=1.5).validate()


def test_hidden_labels_are_drawn_per_subject_from_training_runs_only():
    # The synthetic shards have one run per subject; here subjects have two runs each.
    manifest = pd.DataFrame({"subject": [f"s{i // 2}" for i in range(80)],
                             "split": ["train"] * 60 + ["test"] * 20},
                            index=[f"run{i}" for i in range(80)])
    hidden = hidden_label_runs(manifest, 0.5, seed=3)
    assert hidden <= set(manifest.index[:60])
    hidden_subjects = set(manifest.loc[sorted(hidden), "subject"])
    assert 5 < len(hidden_subjects) < 25  # about half of the 30 training subjects
    assert hidden == set(manifest.index[manifest["subject"].isin(hidden_subjects)])  # both runs of each
    assert hidden_label_runs(manifest, 0.5, seed=3) == hidden and hidden_label_runs(manifest, 0.5, seed=4) != hidden
    assert hidden_label_runs(manifest, 1.0, seed=3) == frozenset()


def test_finetune_of_a_new_target_adds_its_queries_and_keeps_the_pretrained_ones(shards, tmp_path):
    pre = dict(MODELS["lcm"], env=[{"name": "sex", "kind": "categorical"}, {"name": "age", "kind": "continuous"}])
    train("lcm", tmp_path / "pre", shards=shards, model_config=pre, train_config=config(steps=2))
    old = load_model(tmp_path / "pre" / "model.safetensors")
    train("lcm", tmp_path / "ft", shards=shards, train_config=config(steps=1, threshold=0.0, lr=1e-9, warmup_steps=0),
          mode="finetune", init=tmp_path / "pre" / "model.safetensors")
    new = load_model(tmp_path / "ft" / "model.safetensors")
    assert [s.name for s in new.specs] == ["sex", "age", "diagnosis"]
    assert new.layout[:len(old.layout)] == old.layout and new.layout[len(old.layout):][0][0] == "diagnosis"
    # lr ~0: the pretrained queries come through the fine-tune (almost) untouched.
    torch.testing.assert_close(new.queries[:len(old.layout)], old.queries, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="finetune needs --family lcm"):
        train("brainmass", tmp_path / "ft2", shards=shards, train_config=config(steps=1), mode="finetune",
              init=tmp_path / "pre" / "model.safetensors")


def test_finetune_model_from_another_atlas(shards, tmp_path):
    other = write_synthetic_shards(tmp_path / "other", n_parcels=10, n_subjects=8)
    train("lcm", tmp_path / "pre", shards=other, model_config=MODELS["lcm"], train_config=config(steps=1))
    with pytest.raises(InputError, match="10 parcels but the shards"):
        train("lcm", tmp_path / "ft", shards=shards, train_config=config(steps=1), mode="finetune",
              init=tmp_path / "pre" / "model.safetensors")


# -- command line -----------------------------------------------------------------------------------------------
def test_cli_train(shards, tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("pretrain:\n  trainer: {steps: 3, batch_size: 4, log_every: 1, window: 40, threads: 1}\n"
                   "  brainlm:\n    model: {window: 40, patch_size: 20, dim: 32, depth: 1, heads: 4,"
                   " decoder_dim: 16, decoder_depth: 1, decoder_heads: 2}\n")
    out = tmp_path / "out"
    code = cli.main(["train", "--family", "brainlm", "--shards", str(shards), "--out", str(out), "--config", str(cfg),
                     "--set", "trainer.lr=0.002"])
    assert code == 0
    assert "trained brainlm" in capsys.readouterr().out
    rows = history(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for column in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_fraction", "peak_rss_gb",
                   "mse_masked", "val_loss"):
        assert column in rows[0], column
    assert float(rows[0]["tokens_per_s"]) == pytest.approx(float(rows[0]["samples_per_s"]) * 16 * 2)
    model = load_model(out / "model.safetensors", family="brainlm")
    assert model.config.n_parcels == 16 and model.config.depth == 1
    assert (out / "summary.json").exists() and (out / "learning_curve.png").exists()
    code = cli.main(["train", "--family", "brainlm", "--shards", str(shards), "--out", str(tmp_path / "bad"),
                     "--config", str(cfg), "--set", "model.n_parcels=5"])
    assert code == 1
    assert "5 parcels but the shards" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["brainlm", "brainmass"])
def test_torch_compile_path(shards, tmp_path, family):
    """``compile: true`` traces the objective with dynamo (eager backend here: no C++ build in a test)."""
    cfg = config(steps=3, log_every=3, checkpoint_every=3)
    plain = train(family, tmp_path / "plain", shards=shards, model_config=MODELS[family], train_config=cfg)
    compiled = train(family, tmp_path / "compiled", shards=shards, model_config=MODELS[family],
                     train_config=config(steps=3, log_every=3, checkpoint_every=3, compile=True, compile_backend="eager"))
    assert compiled["final"]["loss"] == pytest.approx(plain["final"]["loss"], rel=1e-5)


def test_samples_per_second_counts_the_windows_that_ran(shards, tmp_path):
    """A batch larger than an epoch's training windows comes out short: throughput counts what ran."""
    n_train = ShardSource(shards, config(), WINDOW, need_pfc=False).manifest()["split"].eq("train").sum()
    batch = int(n_train) + 50
    train("brainlm", tmp_path, shards=shards, model_config=MODELS["brainlm"],
          train_config=config(steps=2, batch_size=batch, log_every=1, checkpoint_every=2), resume="never")
    for row in history(tmp_path):
        ran = float(row["samples_per_s"]) * float(row["step_time_s"])
        assert ran == pytest.approx(n_train, rel=1e-6), (ran, n_train, batch)
