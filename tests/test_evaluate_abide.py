"""The FC baseline on real ABIDE PCP files (a small subset; the full run's numbers are in the README)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from brainfoundry.errors import InputError
from brainfoundry.evaluate.dataset import load_abide, read_1d

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def abide_root(shared_data):
    root = shared_data / "abide_pcp_cc200"
    if not (root / "Phenotypic_V1_0b_preprocessed1.csv").exists():
        pytest.skip(f"ABIDE PCP CC200 not found at {root}")
    return root


def test_load_abide_subset_has_phenotypes_and_sites(abide_root):
    evs = load_abide(abide_root, max_subjects=26)
    assert len(evs.series) == 26 and evs.n_parcels == 200
    # round-robin over sites: every one of the 13 sites is represented
    assert evs.runs["site"].nunique() == 13
    assert set(evs.runs["diagnosis"]) <= {"ASD", "control"} and set(evs.runs["sex"]) <= {"M", "F"}
    assert all(s.dtype == np.float32 and s.shape[1] == 200 for s in evs.series)


def test_read_1d_bad_files(tmp_path):
    bad = tmp_path / "x_rois_cc200.1D.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        read_1d(bad)
    nan = tmp_path / "y_rois_cc200.1D.gz"
    with gzip.open(nan, "wt") as handle:
        handle.write("#1\t#2\n1.0\tnan\n2.0\t3.0\n")
    with pytest.raises(InputError, match="NaN"):
        read_1d(nan)


def test_abide_fc_cli_on_a_subset(abide_root, tmp_path):
    from brainfoundry.cli import main

    out = tmp_path / "abide_fc"
    rc = main(["evaluate", "--threads", "1", "abide-fc", "--root", str(abide_root), "--out-dir", str(out), "--max-subjects", "65",
               "--seeds", "0", "--targets", "diagnosis", "--n-folds", "5"])
    assert rc == 0
    table = pd.read_parquet(out / "metrics.parquet")
    info = json.loads((out / "timing.json").read_text())
    assert info["n_subjects"] == 65 and info["group_by"] == "site" and info["n_features"] == 19900
    folds = pd.read_parquet(out / "folds.parquet")
    assert (folds.groupby("site")["fold"].nunique() == 1).all()  # site-grouped: no site on both sides
    auc = table[(table["fold"] == "all") & (table["metric"] == "auc")]["value"].iloc[0]
    assert 0.3 < auc <= 1.0  # 65 subjects: noisy, but a number in range (full set: ~0.73)
    assert set(info["timing"]) >= {"read_s", "fc_s", "cv_diagnosis_s"}


def test_three_abide_sites_held_out_as_an_external_split(abide_root):
    """Probes trained on the development sites only, tested once on three held-out sites (issue 10 item 5)."""
    from brainfoundry.evaluate.protocol import FoldSpec, make_folds
    from brainfoundry.evaluate.runner import run_task
    from brainfoundry.evaluate.settings import EvalSettings

    evs = load_abide(abide_root, max_subjects=130)
    evs.runs["split"] = "test"  # no pretraining split here: every subject is a CV subject
    external = ["CALTECH", "LEUVEN_1", "SBL"]
    settings = EvalSettings.from_dict({"models": [], "targets": ["diagnosis"], "fc_probes": ["logistic", "svm"],
                                       "n_permutations": 0, "external_sites": external,
                                       "cv": {"n_folds": 5, "seeds": [0], "group_by": "site", "n_inner": 2}})
    subjects = evs.runs.groupby("subject")[["site", "diagnosis"]].first()
    folds = make_folds(subjects, FoldSpec(n_folds=5, seeds=(0,), group_by="site", stratify_by="diagnosis"))
    table, info = run_task("phenotype", "baseline", evs, settings, folds)
    assert info["status"] == "ok", info
    ext = table[(table["split"] == "external") & (table["metric"] == "auc")].set_index("method")
    n_ext = int(subjects["site"].isin(external).sum())
    assert set(ext.index) == {"fc_linear", "fc_svm_linear"} and (ext["n"] == n_ext).all()
    assert ((ext["ci_low"] < ext["value"]) & (ext["value"] < ext["ci_high"])).all()  # bootstrap over subjects
    assert (ext["value"] > 0.3).all() and (ext["value"] <= 1).all()
    assert "cv" in set(table["split"])  # beside the site-grouped cross-validation
    # a site list naming no ABIDE site: a named reason, the cross-validation still runs
    bad = EvalSettings.from_dict({**settings.to_dict(), "external_sites": ["NOWHERE"]})
    table, info = run_task("phenotype", "baseline", evs, bad, folds)
    assert "external" not in set(table["split"]) and "cv" in set(table["split"])
    assert any("none of them is a site in the data" in n for n in info["notes"])
