"""Confound selection through nilearn's load_confounds, and FD via nipype when fMRIPrep lacks it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainfoundry.confounds import MOTION_COLUMNS, framewise_displacement, load_run_confounds
from brainfoundry.errors import ConfigError, InputError

BASE = {"strategy": ["motion", "wm_csf", "high_pass", "scrub", "non_steady_state"], "motion": "full",
        "wm_csf": "basic", "global_signal": None, "compcor": "anat_combined", "n_compcor": 2, "fd_threshold": 0.5,
        "std_dvars_threshold": None, "scrub_min_segment": 5}


def write_tsv(tmp_path: Path, n: int = 60, seed: int = 0, burst_at: int | None = 30, n_nonsteady: int = 2,
              drop: tuple = ()) -> Path:
    rng = np.random.default_rng(seed)
    motion = np.cumsum(rng.normal(0, 0.01, (n, 6)), axis=0) * np.array([1, 1, 1, 0.01, 0.01, 0.01])
    if burst_at is not None:
        motion[burst_at:, 0] += 1.0  # a 1 mm jump: FD > 0.5 at one volume
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(MOTION_COLUMNS):
        d = np.concatenate([[np.nan], np.diff(motion[:, j])])
        cols.update({name: motion[:, j], f"{name}_derivative1": d, f"{name}_power2": motion[:, j] ** 2,
                     f"{name}_derivative1_power2": d ** 2})
    for name in ("csf", "white_matter", "global_signal"):
        cols[name] = rng.standard_normal(n)
    dm = np.diff(motion, axis=0)
    cols["framewise_displacement"] = np.concatenate([[np.nan], np.abs(dm[:, :3]).sum(1) + 50 * np.abs(dm[:, 3:]).sum(1)])
    cols["std_dvars"] = np.concatenate([[np.nan], 1 + 0.1 * rng.standard_normal(n - 1)])
    for k in range(2):
        cols[f"cosine_{k:02d}"] = np.cos(np.pi * (2 * np.arange(n) + 1) * (k + 1) / (2 * n))
    for k in range(3):
        cols[f"a_comp_cor_{k:02d}"] = rng.standard_normal(n)
    for k in range(n_nonsteady):
        cols[f"non_steady_state_outlier_{k:02d}"] = (np.arange(n) == k).astype(int)
    for name in drop:
        cols.pop(name)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sub-01_task-rest_desc-confounds_timeseries.tsv"
    pd.DataFrame(cols).to_csv(path, sep="\t", index=False, na_rep="n/a")
    path.with_suffix(".json").write_text(json.dumps(
        {f"a_comp_cor_{k:02d}": {"Method": "aCompCor", "Mask": "combined", "Retained": True} for k in range(3)}))
    return path


def power_fd(motion: np.ndarray, radius: float = 50.0) -> np.ndarray:
    d = np.abs(np.diff(motion, axis=0))
    return np.concatenate([[np.nan], d[:, :3].sum(1) + radius * d[:, 3:].sum(1)])


def test_fd_via_nipype_is_power_fd():
    motion = np.random.default_rng(1).normal(0, 0.1, (40, 6))
    fd = framewise_displacement(motion)
    assert np.isnan(fd[0])
    np.testing.assert_allclose(fd[1:], power_fd(motion)[1:], rtol=1e-6)
    # FSL's order (rotations first) would give another answer: fMRIPrep's columns are SPM-ordered.
    swapped = power_fd(motion[:, [3, 4, 5, 0, 1, 2]])
    assert not np.allclose(fd[1:], swapped[1:])


def test_fd_matches_demo_confounds(demo_dataset):
    tsvs = sorted(demo_dataset.glob("derivatives/fmriprep/sub-*/func/*_desc-confounds_timeseries.tsv"))
    assert tsvs
    table = pd.read_csv(tsvs[0], sep="\t", na_values=["n/a"])
    fd = framewise_displacement(table[list(MOTION_COLUMNS)].to_numpy())
    np.testing.assert_allclose(fd[1:], table["framewise_displacement"].to_numpy()[1:], rtol=1e-5, atol=1e-8)


def test_motion_wm_csf_scrub_nonsteady(tmp_path):
    path = write_tsv(tmp_path)
    rc = load_run_confounds(path, BASE, 60)
    names = set(rc.columns)
    assert {f"{m}{s}" for m in MOTION_COLUMNS for s in ("", "_derivative1", "_power2", "_derivative1_power2")} <= names
    assert {"csf", "white_matter", "cosine_00", "cosine_01"} <= names
    assert "global_signal" not in names and not any(n.startswith("a_comp_cor") for n in names)
    assert rc.regressors.shape == (60, 24 + 2 + 2)
    assert rc.nonsteady.tolist() == [0, 1] and rc.n_nonsteady_dropped == 2
    assert 30 in rc.censored  # FD above threshold
    assert not set(rc.sample_mask) & (set(rc.censored) | {0, 1})
    assert len(rc.sample_mask) + len(rc.censored) + 2 == 60
    assert rc.fd_source == "fmriprep"


def test_basic_motion_global_signal_and_compcor(tmp_path):
    path = write_tsv(tmp_path)
    cfg = dict(BASE, strategy=["motion", "global_signal", "compcor", "high_pass"], motion="basic",
               global_signal="basic")
    rc = load_run_confounds(path, cfg, 60)
    assert set(rc.columns) == set(MOTION_COLUMNS) | {"global_signal", "a_comp_cor_00", "a_comp_cor_01",
                                                      "cosine_00", "cosine_01"}
    assert len(rc.censored) == 0  # no scrubbing in this strategy


def test_keep_nonsteady_when_not_in_strategy(tmp_path):
    path = write_tsv(tmp_path, burst_at=None)
    rc = load_run_confounds(path, dict(BASE, strategy=["motion"]), 60)
    assert rc.sample_mask.tolist() == list(range(60))
    assert rc.nonsteady.tolist() == [0, 1] and rc.n_nonsteady_dropped == 0


def test_fd_computed_with_nipype_when_missing(tmp_path):
    with_fd = load_run_confounds(write_tsv(tmp_path / "a"), BASE, 60)
    without = load_run_confounds(write_tsv(tmp_path / "b", drop=("framewise_displacement",)), BASE, 60)
    assert without.fd_source == "nipype"
    np.testing.assert_allclose(without.fd[1:], with_fd.fd[1:], rtol=1e-6)
    np.testing.assert_array_equal(without.sample_mask, with_fd.sample_mask)


def test_row_count_differs_from_bold(tmp_path):
    path = write_tsv(tmp_path)
    with pytest.raises(InputError, match="60 rows but the BOLD series has 61 volumes") as info:
        load_run_confounds(path, BASE, 61)
    assert info.value.source == str(path)


def test_missing_columns_named(tmp_path):
    path = write_tsv(tmp_path, drop=("csf",))
    with pytest.raises(InputError, match="csf") as info:
        load_run_confounds(path, BASE, 60)
    assert info.value.source == str(path)


def test_no_fd_and_no_motion_for_scrubbing(tmp_path):
    path = write_tsv(tmp_path, drop=("framewise_displacement", "trans_x"))
    with pytest.raises(InputError, match="framewise_displacement"):
        load_run_confounds(path, dict(BASE, strategy=["scrub"]), 60)


@pytest.mark.parametrize("cfg, key", [
    (dict(BASE, strategy=["global_signal"], global_signal=None), "denoise.global_signal"),
    (dict(BASE, strategy=["compcor"]), "denoise.strategy"),
    (dict(BASE, strategy=["scrub"], fd_threshold=None, std_dvars_threshold=None), "denoise.fd_threshold"),
])
def test_config_errors(tmp_path, cfg, key):
    with pytest.raises(ConfigError) as info:
        load_run_confounds(write_tsv(tmp_path), cfg, 60)
    assert info.value.key == key


def test_unreadable_tsv(tmp_path):
    path = tmp_path / "conf.tsv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError):
        load_run_confounds(path, BASE, 3)
    with pytest.raises(InputError, match="not found"):
        load_run_confounds(tmp_path / "absent.tsv", BASE, 3)


def test_non_numeric_cell_names_file_column_and_row(tmp_path):
    path = write_tsv(tmp_path)
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    cells = lines[8].split("\t")  # data row 8
    cells[header.index("trans_y")] = "0.1O"  # a letter O typed for a zero
    lines[8] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        load_run_confounds(path, BASE, 60)
    assert str(info.value) == (f"{path}: column 'trans_y', row 8 (line 9): '0.1O' is not a number "
                               "(confounds must be numbers or n/a)")
