"""``brainfoundry evaluate`` end to end on real shards and real (tiny, untrained) model files.

The shards are written with the shard writer the workflow uses; the models are built by
`brainfoundry.models.build_model` and saved as the trainer saves them, so the adapters meet the real
model interface (windows, masks, parcel tokens, the LCM's heads).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from brainfoundry.cli import main
from brainfoundry.evaluate.dataset import load_shards
from brainfoundry.evaluate.synthetic import synthetic_evalset

OPTIONS = {
    "models": ["brainlm", "brainmass", "lcm"], "seeds": [0], "mask_ratios": [0.5], "probes": ["logistic"],
    "n_permutations": 2, "network_runs": 6, "max_windows_per_run": 2, "targets": ["diagnosis", "age"],
    "cv": {"n_folds": 3, "seeds": [0], "n_inner": 2},
    "finetune": {"enabled": True, "epochs": 1, "batch_size": 8, "targets": ["diagnosis", "age"]},
    "forecast_baselines": {"lstm_epochs": 1, "lstm_max_samples": 300, "max_train_windows": 20},
}


def _write_shards(evs, out):
    from brainfoundry.shards import ShardWriter, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    types = {"age": pa.float64(), "sex": pa.string(), "diagnosis": pa.string()}
    paths = []
    for bucket in range(2):
        path = out / f"bucket-{bucket}.parquet"
        with ShardWriter(path, parcel_names=evs.parcel_names, parcel_coords=evs.parcel_coords, phenotypes=types,
                         row_group_size=4, metadata={"atlas": "Synth", "bucket": bucket}) as writer:
            for i, (run_id, row) in enumerate(evs.runs.iterrows()):
                if int(row["subject"][1:]) % 2 != bucket:
                    continue
                writer.add({"run_id": run_id, "subject": row["subject"], "task": "rest", "dataset": "synthetic",
                            "site": row["site"], "split": row["split"], "bucket": bucket, "tr": 2.0,
                            "timeseries": evs.series[i], "age": row["age"], "sex": row["sex"],
                            "diagnosis": row["diagnosis"]})
        paths.append(path)
    write_manifest(paths, out / "manifest.parquet", out / "norm_stats.parquet")
    labels = pd.DataFrame({"index": np.arange(1, evs.n_parcels + 1), "name": evs.parcel_names,
                           "network": evs.networks})
    labels.to_csv(out / "labels.tsv", sep="\t", index=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    evs = synthetic_evalset(n_subjects=12, n_runs=2, n_timepoints=210, n_parcels=10, n_sites=3, seed=4,
                            splits=("train", "train", "test", "test"))
    return _write_shards(evs, tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def model_files(shards, tmp_path_factory):
    from brainfoundry.models import build_model
    from brainfoundry.models.lcm import fit_env_stats

    evs = load_shards(shards)
    out = tmp_path_factory.mktemp("models")
    tiny = {"n_parcels": 10, "dim": 16, "depth": 1, "heads": 2}
    lm = {**tiny, "window": 200, "patch_size": 20, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
          "future_patches": 1}
    train = evs.runs[evs.runs["split"] == "train"]
    env = fit_env_stats(train, [{"name": "age", "kind": "continuous"}, {"name": "diagnosis", "kind": "categorical"}])
    configs = {"brainlm": lm, "brainmass": {**tiny, "proj_dim": 8, "proj_hidden": 16},
               "lcm": {**tiny, "env": env}}
    paths = {}
    for family, cfg in configs.items():
        model = build_model(family, cfg, coords=evs.parcel_coords)
        (out / family).mkdir()
        paths[family] = model.save(out / family / "model.safetensors", parcel_names=evs.parcel_names)
    # the trainer's pseudo-label fine-tuning of the LCM on diagnosis (two steps: a real model file of that mode)
    from brainfoundry.train import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, window=200, checkpoint_every=2, log_every=1,
                      dtype="fp32", target="diagnosis", threads=1, threshold=0.0, pseudo_balance="none",
                      label_fraction=0.5)
    train("lcm", out / "lcm_pl", shards=shards, train_config=cfg, mode="finetune", init=paths["lcm"], progress=False)
    paths["lcm_pl"] = out / "lcm_pl" / "model.safetensors"
    return paths


def _run(*argv):
    return main(["evaluate", "--threads", "1", *argv])


def test_load_shards_round_trip(shards):
    evs = load_shards(shards, labels_tsv=shards / "labels.tsv")
    ref = synthetic_evalset(n_subjects=12, n_runs=2, n_timepoints=210, n_parcels=10, n_sites=3, seed=4,
                            splits=("train", "train", "test", "test"))
    assert list(evs.runs.index) == sorted(ref.runs.index)
    i = list(evs.runs.index).index(ref.runs.index[5])
    np.testing.assert_array_equal(evs.series[i], ref.series[5])
    assert list(evs.networks) == list(ref.networks)
    # normalization statistics come from norm_stats.parquet (training split), not from all runs
    train = np.concatenate([ref.series[k] for k in np.flatnonzero(ref.runs["split"] == "train")])
    np.testing.assert_allclose(evs.median, np.median(train, axis=0), rtol=1e-5)


def test_cli_baseline_and_models_end_to_end(shards, model_files, tmp_path):
    opts = json.dumps(OPTIONS)
    common = ["--shards", str(shards), "--options", opts]
    assert _run("folds", *common, "--out", str(tmp_path / "folds.parquet")) == 0
    outputs = []
    for family in ("brainlm", "brainmass", "lcm"):
        path = model_files[family]
        emb = tmp_path / "emb" / f"{family}.npz"
        assert _run("embed", "--model", family, "--checkpoint", str(path), *common, "--out", str(emb)) == 0
        for task in ("reconstruction", "forecasting", "phenotype", "finetune", "networks", "fingerprint"):
            out = tmp_path / "tasks" / family / f"{task}.parquet"
            extra = ["--finetuned", str(model_files["lcm_pl"])] if (family, task) == ("lcm", "phenotype") else []
            assert _run("task", "--task", task, "--model", family, "--checkpoint", str(path), "--embeddings", str(emb),
                        "--folds", str(tmp_path / "folds.parquet"), "--labels", str(shards / "labels.tsv"),
                        *extra, *common, "--out", str(out)) == 0
            outputs.append(out)
    for task in ("reconstruction", "forecasting", "phenotype", "networks", "fingerprint"):
        out = tmp_path / "tasks" / "baseline" / f"{task}.parquet"
        assert _run("task", "--task", task, "--model", "baseline", "--folds", str(tmp_path / "folds.parquet"),
                    "--labels", str(shards / "labels.tsv"), *common, "--out", str(out)) == 0
        outputs.append(out)
    assert _run("merge", *map(str, outputs), "--tasks", "reconstruction", "forecasting", "phenotype", "networks",
                "fingerprint", "--out-dir", str(tmp_path / "evaluation")) == 0

    table = pd.read_parquet(tmp_path / "evaluation" / "metrics.parquet")
    status = pd.read_csv(tmp_path / "evaluation" / "status.tsv", sep="\t").set_index(["model", "task"])
    # BrainMass has no time-series decoder: those two tasks are skipped with the reason, the rest ran
    assert status.loc[("brainmass", "reconstruction"), "status"] == "skipped"
    assert "does not provide" in status.loc[("brainmass", "forecasting"), "notes"]
    ok = status[status["status"] == "ok"].index
    for task in ("reconstruction", "forecasting", "phenotype", "finetune", "networks", "fingerprint"):
        assert ("brainlm", task) in ok, status.loc[("brainlm", task), "notes"]
    # The LCM reads FC (no time-series decoder) like BrainMass; its other tasks ran.
    assert "does not provide" in status.loc[("lcm", "reconstruction"), "notes"]
    for task in ("phenotype", "finetune", "networks", "fingerprint"):
        assert ("lcm", task) in ok, status.loc[("lcm", task), "notes"]
    assert {("brainmass", "phenotype"), ("brainmass", "finetune"), ("brainmass", "networks")} <= set(ok)
    # fine-tuning rows sit with the phenotype rows (task 'phenotype', method 'finetune_mlp')
    ft = table[(table["method"] == "finetune_mlp") & (table["fold"] == "all")]
    assert set(ft["task"]) == {"phenotype"} and {("brainlm", "diagnosis"), ("brainlm", "age")} <= set(
        zip(ft["model"], ft["target"]))
    # the LCM saw the training split's labels: it is scored on other subjects only, and so is a baseline row
    lcm = table[(table["model"] == "lcm") & (table["task"] == "phenotype")]
    assert set(lcm["split"]) <= {"cv_heldout", "heldout", "permuted"}
    assert {"env_head", "pseudo_label_finetune", "finetune_mlp", "logistic_probe"} <= set(lcm["method"])
    pl = lcm[(lcm["method"] == "pseudo_label_finetune") & (lcm["metric"] == "auc")]
    assert list(pl["target"]) == ["diagnosis"] and list(pl["split"]) == ["heldout"]
    base = table[(table["model"] == "baseline") & (table["task"] == "phenotype")]
    assert {"cv", "cv_heldout", "heldout", "permuted"} <= set(base["split"])
    recon = table[(table["model"] == "brainlm") & (table["task"] == "reconstruction") & (table["fold"] == "all")]
    assert len(recon) == 1 and np.isfinite(recon["value"]).all()
    summary = (tmp_path / "evaluation" / "summary.html").read_text()
    assert "Did pretraining help?" in summary and "brainmass" in summary
    assert (tmp_path / "evaluation" / "plots" / "fingerprint.png").stat().st_size > 1000

    rec, fc = tmp_path / "ex_rec.png", tmp_path / "ex_fc.png"
    assert _run("examples", "--model", "brainlm", "--checkpoint", str(model_files["brainlm"]), *common,
                "--out-reconstruction", str(rec), "--out-forecast", str(fc)) == 0
    assert rec.stat().st_size > 5000 and fc.stat().st_size > 5000


def test_random_init_control_is_the_trainers_initial_model_through_the_same_tasks(shards, model_files, tmp_path):
    """``brainlm_random_init``: the config of brainlm's file at the trainer's seeded initial weights, evaluated
    by the same jobs (embeddings, reconstruction, fine-tuning from random init, here also on external sites)."""
    import torch

    from brainfoundry.evaluate.adapters import load_model
    from brainfoundry.models import build_model

    evs = load_shards(shards)
    pretrained = load_model("brainlm", model_files["brainlm"], evs)
    control = load_model("brainlm_random_init", model_files["brainlm"], evs)
    assert control.name == "brainlm_random_init" and control.init_seed == 0
    torch.manual_seed(0)
    fresh = build_model("brainlm", pretrained.model.config)
    for (name, p), (_, q), (_, r) in zip(control.model.named_parameters(), fresh.named_parameters(),
                                          pretrained.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, r) for p, r in zip(control.model.parameters(), pretrained.model.parameters()))

    site = min(evs.runs["site"].unique())
    opts = json.dumps({**OPTIONS, "external_sites": [site], "targets": ["diagnosis"],
                       "finetune": {**OPTIONS["finetune"], "targets": ["diagnosis"]}})
    common = ["--shards", str(shards), "--options", opts]
    assert _run("folds", *common, "--out", str(tmp_path / "folds.parquet")) == 0
    emb = tmp_path / "control.npz"
    assert _run("embed", "--model", "brainlm_random_init", "--checkpoint", str(model_files["brainlm"]), *common,
                "--out", str(emb)) == 0
    tables = {}
    for task in ("reconstruction", "phenotype", "finetune"):
        out = tmp_path / f"{task}.parquet"
        assert _run("task", "--task", task, "--model", "brainlm_random_init", "--checkpoint",
                    str(model_files["brainlm"]), "--embeddings", str(emb), "--folds", str(tmp_path / "folds.parquet"),
                    *common, "--out", str(out)) == 0
        status = json.loads(out.with_suffix(".json").read_text())
        assert status["status"] == "ok", status
        tables[task] = pd.read_parquet(out)
        own = tables[task][tables[task]["method"] != "fc_alone"]  # FC alone on its subjects is a baseline
        assert set(tables[task]["model"]) == {"brainlm_random_init"} and not own["is_baseline"].any()
    ft = tables["finetune"]
    assert {"cv", "external"} <= set(ft["split"])
    n_ext = evs.runs.loc[evs.runs["site"] == site, "subject"].nunique()
    assert (ft.loc[ft["split"] == "external", "n"] == n_ext).all()
    assert "external" in set(tables["phenotype"]["split"])


def test_wrong_parcel_count_is_a_clear_error(shards, tmp_path, capsys):
    from brainfoundry.models import build_model

    model = build_model("brainmass", {"n_parcels": 12, "dim": 16, "depth": 1, "heads": 2, "proj_dim": 8,
                                      "proj_hidden": 16, "spatial_embedding": "learned"})
    path = model.save(tmp_path / "model.safetensors")
    rc = _run("embed", "--model", "brainmass", "--checkpoint", str(path), "--shards", str(shards),
              "--out", str(tmp_path / "e.npz"))
    assert rc == 1
    assert "model built for 12 parcels, the evaluation shards have 10" in capsys.readouterr().err


def test_too_many_folds_gives_an_empty_fold_table_and_skipped_phenotypes(shards, tmp_path):
    opts = json.dumps({**OPTIONS, "cv": {"n_folds": 20, "seeds": [0]}})
    common = ["--shards", str(shards), "--options", opts]
    assert _run("folds", *common, "--out", str(tmp_path / "folds.parquet")) == 0
    info = json.loads((tmp_path / "folds.json").read_text())
    assert info["status"] == "skipped" and "20 folds were asked but only 12 subjects" in info["reason"]
    assert pd.read_parquet(tmp_path / "folds.parquet").empty
    out = tmp_path / "phenotype.parquet"
    assert _run("task", "--task", "phenotype", "--model", "baseline", "--folds", str(tmp_path / "folds.parquet"),
                *common, "--out", str(out)) == 0
    status = json.loads(out.with_suffix(".json").read_text())
    assert status["status"] == "skipped" and "20 folds were asked" in status["notes"][0]
    # a task without subject folds still runs on the same input
    out = tmp_path / "fingerprint.parquet"
    assert _run("task", "--task", "fingerprint", "--model", "baseline", *common, "--out", str(out)) == 0
    assert json.loads(out.with_suffix(".json").read_text())["status"] == "ok"
