"""The Snakemake profiles name only rules that exist.

Snakemake ignores ``set-threads``/``set-resources``/``groups`` entries for names that are no rule,
silently (the Slurm profile's fMRIPrep and evaluation entries were dead that way), so every rule key of
every profile is checked against the rules of the workflow, over its three entry points (raw runs
fMRIPrep, derivatives starts from fMRIPrep's outputs, timeseries from parcellated series).
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, bin_path

from brainfoundry import demo

PROFILES = [REPO / "profiles" / "default" / "config.yaml", REPO / "workflow" / "profiles" / "slurm" / "config.yaml"]
# Profile keys whose entries are rule names (group-components is keyed by group name).
RULE_KEYS = ("set-threads", "set-resources", "groups")


def rule_key_problems(profile: dict, rules: set[str], name: str = "profile") -> list[str]:
    """One message per profile key that names no rule (or, for group-components, no group)."""
    problems = []
    for key in RULE_KEYS:
        for rule in profile.get(key) or {}:
            if rule not in rules:
                problems.append(f"{name}: {key}.{rule} names no rule of the workflow (rules: {', '.join(sorted(rules))})")
    groups = set((profile.get("groups") or {}).values())
    for group in profile.get("group-components") or {}:
        if group not in groups:
            problems.append(f"{name}: group-components.{group} names no group of `groups` ({sorted(groups)})")
    return problems


def _list_rules(workdir: Path, config: dict) -> set[str]:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = subprocess.run([bin_path("snakemake"), "--list-rules", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(workdir), "--configfile", str(configfile)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.strip() for line in result.stdout.splitlines() if line.strip() and " " not in line.strip()}


def _timeseries_config(root: Path) -> dict:
    """config/abide.yaml on two small ABIDE-style series files written here."""
    series_dir = root / "series"
    series_dir.mkdir()
    rng = np.random.default_rng(0)
    for file_id in ("OHSU_0050142", "OHSU_0050143", "OHSU_0050144"):
        values = rng.standard_normal((30, 4))
        text = "\t".join(f"#{i}" for i in range(1, 5)) + "\n" + "\n".join("\t".join(f"{v:.4f}" for v in row) for row in values)
        with gzip.open(series_dir / f"{file_id}_rois_cc200.1D.gz", "wt") as handle:
            handle.write(text + "\n")
    pd.DataFrame({"FILE_ID": ["OHSU_0050142", "OHSU_0050143", "OHSU_0050144"], "SUB_ID": [50142, 50143, 50144],
                  "SITE_ID": ["OHSU"] * 3, "DX_GROUP": [1, 2, 1], "SEX": [1, 2, 2], "AGE_AT_SCAN": [13.9, 13.8, 12.1],
                  "func_mean_fd": [0.05, 0.07, 0.06]}
                 ).to_csv(root / "pheno.csv", index=False)
    config = yaml.safe_load((REPO / "config" / "abide.yaml").read_text())
    config["results_dir"] = "results"
    config["timeseries"].update(series_dir=str(series_dir), phenotypes=str(root / "pheno.csv"), extra_columns={})
    # A labels-only atlas for the four parcels (the start-up checks want the configured atlas to exist).
    pd.DataFrame({"index": [1, 2, 3, 4], "name": [f"#{i}" for i in range(1, 5)], "x": [-40.0, 40.0, -20.0, 20.0],
                  "y": [0.0, 0.0, -60.0, -60.0], "z": [10.0, 10.0, 30.0, 30.0]}).to_csv(root / "labels.tsv", sep="\t",
                                                                                           index=False)
    config["atlas"].update(path=None, labels=str(root / "labels.tsv"))
    # Three subjects: each split gets one; no extra phenotype columns, so no targets that need them.
    config["shards"]["fill_empty_splits"] = True
    config["evaluate"]["targets"] = ["diagnosis", "sex", "age"]
    return config


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory) -> dict[str, set[str]]:
    """Entry point -> the rules Snakemake defines for it."""
    root = tmp_path_factory.mktemp("profile_rules")
    data = root / "demo_data"
    demo.write_demo_dataset(data, n_subjects=2, n_volumes=12, two_run_subjects=0)
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base.update(bids_dir=str(data / "bids"), derivatives_dir=str(data / "derivatives" / "fmriprep"))
    base["atlas"].update(path=str(data / "atlas" / Path(base["atlas"]["path"]).name),
                         labels=str(data / "atlas" / Path(base["atlas"]["labels"]).name))
    license_file = root / "license.txt"
    license_file.write_text("not a license: nothing runs\n")
    base["fmriprep"]["fs_license"] = str(license_file)
    rules = {}
    for entry in ("raw", "derivatives"):
        workdir = root / entry
        workdir.mkdir()
        rules[entry] = _list_rules(workdir, {**base, "entry_point": entry})
    workdir = root / "timeseries"
    workdir.mkdir()
    rules["timeseries"] = _list_rules(workdir, _timeseries_config(workdir))
    return rules


def test_entry_points_define_their_own_rules(workflow_rules):
    assert "fmriprep" in workflow_rules["raw"] and "fmriprep" not in workflow_rules["derivatives"]
    assert "import_timeseries" in workflow_rules["timeseries"] and "parcellate" not in workflow_rules["timeseries"]
    assert {"parcellate", "pfc", "shard", "pretrain", "evaluate_task"} <= workflow_rules["derivatives"]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_profile_key_names_a_rule(path, workflow_rules):
    profile = yaml.safe_load(path.read_text()) or {}
    rules = set().union(*workflow_rules.values())
    problems = rule_key_problems(profile, rules, name=str(path.relative_to(REPO)))
    assert not problems, "\n".join(problems)


def test_a_key_that_names_no_rule_is_reported(workflow_rules):
    """The check above can fail: the old `evaluate:` entry (no rule has that name) is named."""
    profile = yaml.safe_load(PROFILES[1].read_text())
    profile["set-resources"]["evaluate"] = {"mem_mb": "8000 * attempt"}
    profile["set-threads"]["fmriprep_sub_01"] = 8
    profile["group-components"]["per_run"] = 64
    problems = rule_key_problems(profile, set().union(*workflow_rules.values()), name="slurm")
    assert len(problems) == 3, problems
    assert problems[0].startswith("slurm: set-threads.fmriprep_sub_01 names no rule")
    assert problems[1].startswith("slurm: set-resources.evaluate names no rule")
    assert problems[2].startswith("slurm: group-components.per_run names no group")
