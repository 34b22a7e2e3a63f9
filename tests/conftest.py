"""Shared fixtures: repository paths, the shared real data (skipped where absent), the demo dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRAINFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))


_ORIGINAL_WARN = (warnings.warn, warnings.showwarning)


@pytest.fixture(autouse=True)
def _warnings_not_rerouted():
    """Importing fMRIPrep (its parser, in test_fmriprep) replaces ``warnings.warn`` with a logger for the
    rest of the process, which would hide warnings from ``pytest.warns`` in later tests."""
    warnings.warn, warnings.showwarning = _ORIGINAL_WARN
    yield
    warnings.warn, warnings.showwarning = _ORIGINAL_WARN


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: the real atlases and ABIDE series are not part of the repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set BRAINFOUNDRY_SHARED_DATA or place shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def a424(shared_data) -> Path:
    path = shared_data / "atlases" / "A424" / "A424+2mm.nii.gz"
    if not path.exists():
        pytest.skip(f"A424 atlas not found at {path}")
    return path


@pytest.fixture(scope="session")
def abide_data(shared_data) -> dict[str, Path]:
    """The ABIDE PCP series, phenotypes and the atlases the ABIDE tests use, or skip naming what is missing."""
    paths = {
        "series_dir": shared_data / "abide_pcp_cc200" / "rois_cc200",
        "phenotypes": shared_data / "abide_pcp_cc200" / "Phenotypic_V1_0b_preprocessed1.csv",
        "atlas": shared_data / "atlases" / "cc200" / "CC200.nii.gz",
        "schaefer": shared_data / "atlases" / "schaefer2018" / "Schaefer2018_400Parcels_7Networks_order_FSLMNI152_2mm.nii.gz",
        "order": shared_data / "atlases" / "schaefer2018" / "Schaefer2018_400Parcels_7Networks_order.txt",
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        pytest.skip(f"ABIDE PCP / atlas data not found: {missing}")
    return paths


def abide_subset_config(data: dict[str, Path], files: list[str]) -> dict:
    """config/abide.yaml on a few ABIDE files (``include_files``), with the paths of ``abide_data``,
    writing to ``results/`` and ``cache/`` of the Snakemake working directory."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "abide.yaml").read_text())
    config["results_dir"] = "results"
    config["atlas"]["path"] = str(data["atlas"])
    config["atlas"]["cache_dir"] = "cache"
    config["timeseries"].update(series_dir=str(data["series_dir"]), phenotypes=str(data["phenotypes"]),
                                include_files=files)
    return config


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A small embedded demo dataset (3 subjects, one with two runs), written once per test session."""
    out = tmp_path_factory.mktemp("demo") / "demo_data"
    subprocess.run([sys.executable, "-m", "brainfoundry.cli", "demo-data", str(out), "--n-subjects", "3",
                    "--n-volumes", "80", "--two-run-subjects", "1"], check=True)
    return out


def bin_path(name: str) -> str:
    """A console script of the environment running the tests (snakemake, brainfoundry)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)
