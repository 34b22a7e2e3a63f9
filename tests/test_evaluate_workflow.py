"""The `abide` configuration end to end on a small real subset: shards -> pretrain -> evaluation -> report.

Twelve ABIDE PCP subjects from three sites (site-grouped folds need a site per fold), tiny models trained
for a few steps: the point is that every evaluation job runs on real data through Snakemake and the
report gets its Results section, not the numbers (the full-set numbers are in the README).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from brainfoundry.evaluate.workflow import (eval_settings, evaluated_models, evaluation_targets, model_file,
                                            pseudo_label_settings, task_tables)
from conftest import abide_subset_config, bin_path

# Two ASD and two control subjects from each of three sites (one female among them: sex is a target
# with a too-small class, which must be a note, not a failure).
FILES = ["Caltech_0051456", "Caltech_0051457", "Caltech_0051476", "Caltech_0051477",
         "KKI_0050791", "KKI_0050792", "KKI_0050772", "KKI_0050773",
         "USM_0050477", "USM_0050480", "USM_0050433", "USM_0050434"]
TINY_LM = {"window": 100, "patch_size": 20, "dim": 16, "depth": 1, "heads": 2, "decoder_dim": 16,
           "decoder_depth": 1, "decoder_heads": 2, "future_patches": 1}


def test_eval_settings_follow_the_brainlm_model():
    config = {"pretrain": {"families": ["brainlm"], "brainlm": {"model": {"window": 120, "patch_size": 20}}},
              "evaluate": {"tasks": ["reconstruction", "finetune"]}}
    ev = eval_settings(config, ["brainlm"])
    assert (ev["window"], ev["patch"], ev["horizon"], ev["context"]) == (120, 20, 20, 100)
    assert ev["models"] == ["brainlm"]
    # fine-tuning has no baseline job; the merge reads every other model x task table
    # ... and every model's random-init control (evaluate.controls, default on) on the same tasks
    assert task_tables("E", ev) == ["E/tasks/brainlm/reconstruction.parquet", "E/tasks/brainlm/finetune.parquet",
                                    "E/tasks/brainlm_random_init/reconstruction.parquet",
                                    "E/tasks/brainlm_random_init/finetune.parquet",
                                    "E/tasks/baseline/reconstruction.parquet"]
    assert "E/verdict.png" in evaluation_targets("E", ev)
    explicit = eval_settings({"evaluate": {"window": 200, "patch": 25, "context": 150, "horizon": 50}})
    assert (explicit["window"], explicit["patch"], explicit["context"], explicit["horizon"]) == (200, 25, 150, 50)


def test_random_init_controls_read_their_models_file_and_can_be_switched_off():
    ev = eval_settings({"evaluate": {"tasks": ["phenotype"]}}, ["brainlm", "lcm"])
    assert evaluated_models(ev) == ["brainlm", "lcm", "brainlm_random_init", "lcm_random_init"]
    assert model_file("R", "lcm_random_init") == model_file("R", "lcm") == "R/models/lcm/model.safetensors"
    assert "E/examples/lcm_random_init_reconstruction.png" in evaluation_targets("E", ev)
    off = eval_settings({"evaluate": {"tasks": ["phenotype"], "controls": False}}, ["brainlm"])
    assert evaluated_models(off) == ["brainlm"] and task_tables("E", off) == [
        "E/tasks/brainlm/phenotype.parquet", "E/tasks/baseline/phenotype.parquet"]
    # the settings the rules pass on are valid EvalSettings (the control switch included)
    from brainfoundry.evaluate.settings import EvalSettings

    assert EvalSettings.from_dict(off).controls is False


def test_external_sites_default_to_the_shards_holdout_sites():
    ev = eval_settings({"shards": {"holdout_sites": ["NYU", "UM_1"]}}, ["brainlm"])
    assert ev["external_sites"] == ["NYU", "UM_1"]
    assert eval_settings({"shards": {"holdout_sites": ["NYU"]}, "evaluate": {"external_sites": []}})[
        "external_sites"] == []
    assert eval_settings({})["external_sites"] == []


def test_pseudo_label_settings_are_the_lcm_pretraining_ones_with_overrides():
    config = {"seed": 7, "shards": {"window": 100},
              "pretrain": {"trainer": {"steps": 1000, "lr": 0.001},
                           "lcm": {"trainer": {"label_fraction": 0.5}, "model": {"dim": 32}}},
              "evaluate": {"pseudo_label_trainer": {"steps": 200}}}
    ev = eval_settings(config, ["lcm"])
    settings = pseudo_label_settings(config, ev)
    assert settings["lcm"]["trainer"] == {"label_fraction": 0.5, "steps": 200}
    assert settings["lcm"]["model"] == {"dim": 32}
    assert settings["trainer"]["steps"] == 1000 and settings["trainer"]["seed"] == 7
    assert pseudo_label_settings({"pretrain": {}}, eval_settings({}, ["lcm"]))["lcm"]["trainer"] == {}


def _config(data: dict[str, Path]) -> dict:
    config = abide_subset_config(data, FILES)
    config["pfc"]["n_views"] = 2
    config["shards"].update(n_buckets=2, split_ratios={"train": 0.6, "val": 0.0, "test": 0.4}, window=100)
    config["pretrain"] = {
        "families": ["brainlm", "brainmass"], "threads": 1,
        "trainer": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "window": 100, "checkpoint_every": 2,
                    "log_every": 1, "eval_every": 0, "dtype": "fp32"},
        "brainlm": {"model": TINY_LM},
        "brainmass": {"model": {"dim": 16, "depth": 1, "heads": 2, "proj_dim": 8, "proj_hidden": 16,
                                "views": "on_the_fly"}},
    }
    ev = config["evaluate"]
    ev.update(network_atlas=str(data["schaefer"]), network_atlas_labels=str(data["order"]), seeds=[0],
              n_permutations=1, network_runs=4, targets=["diagnosis", "sex"], max_windows_per_run=1,
              cv={"n_folds": 3, "seeds": [0], "group_by": "site", "stratify_by": "diagnosis", "n_inner": 2},
              finetune={"enabled": True, "targets": ["diagnosis"], "epochs": 1, "max_windows_per_run": 1,
                        "seeds": [0]},
              forecast_baselines={"lstm_epochs": 1, "lstm_max_samples": 200, "max_train_windows": 10})
    return config


@pytest.mark.workflow
@pytest.mark.shared_data
def test_abide_subset_evaluation_and_report(repo_root, abide_data, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(_config(abide_data)))
    base = [bin_path("snakemake"), "--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config_file), "--cores", "2"]
    targets = ["results/evaluation/metrics.parquet", "results/evaluation/verdict.png",
               "results/evaluation/examples/brainlm_reconstruction.png"]
    done = subprocess.run([*base, *targets], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]

    out = workdir / "results" / "evaluation"
    table = pd.read_parquet(out / "metrics.parquet")
    status = pd.read_csv(out / "status.tsv", sep="\t").fillna("").set_index(["model", "task"])
    # the FC baseline for ASD vs control on site-grouped folds is always there
    base_rows = table[(table["model"] == "baseline") & (table["task"] == "phenotype") & (table["target"] == "diagnosis")]
    assert {"cv", "permuted"} <= set(base_rows["split"])
    folds = pd.read_parquet(out / "folds.parquet")
    assert set(folds["group_by"]) == {"site"} and (folds.groupby("site")["fold"].nunique() == 1).all()
    # CC200 parcels got Yeo-7 labels by the Schaefer vote: the network task ran for the baseline
    assert status.loc[("baseline", "networks"), "status"] == "ok", status.loc[("baseline", "networks"), "notes"]
    assert status.loc[("brainmass", "reconstruction"), "status"] == "skipped"
    for task in ("reconstruction", "forecasting", "phenotype", "finetune", "networks"):
        assert status.loc[("brainlm", task), "status"] == "ok", (task, status.loc[("brainlm", task), "notes"])

    report = subprocess.run([*base, *targets, "--report", str(workdir / "report.html")], capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (workdir / "report.html").read_text(errors="replace")
    assert "Results" in html and "verdict.png" in html
