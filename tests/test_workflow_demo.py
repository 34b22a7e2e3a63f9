"""The demo's main job, for real: Snakemake runs the whole DAG on a (smaller) embedded demo dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import REPO, bin_path

pytestmark = pytest.mark.workflow


def _snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [bin_path("snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def test_plain_command_loads_the_default_profile(tmp_path):
    """README's `snakemake --cores N --configfile X` (no --profile) gets profiles/default: its settings are
    in force (printshellcmds shows the shell lines even in a dry run)."""
    import yaml

    from brainfoundry.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "demo_data", n_subjects=2, n_volumes=12, two_run_subjects=0)
    proc = _snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"), timeout=600)
    log = proc.stdout + proc.stderr
    assert "workflow specific profile" in log and "profiles/default for setting default command line" in log, log[-3000:]
    assert "brainfoundry parcellate --bold" in log, log[-3000:]  # a shell line: printshellcmds is on
    profile = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert profile["keep-going"] and profile["rerun-incomplete"] and profile["retries"] >= 1
    assert not (REPO / "workflow" / "profiles" / "default").exists()  # one default profile, where Snakemake looks


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A workdir in which the whole demo workflow has run (4 subjects, one with two runs)."""
    workdir = tmp_path_factory.mktemp("demo_workflow")
    from brainfoundry.demo import write_demo_dataset

    write_demo_dataset(workdir / "demo_data", n_subjects=4, n_volumes=150, two_run_subjects=1)
    _snakemake(workdir)
    return workdir


def test_every_target_is_built_and_nothing_is_left_to_do(demo_run):
    proc = _snakemake(demo_run, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_parcellated_series_follow_the_contract(demo_run):
    runs = pd.read_parquet(demo_run / "results" / "bids_index" / "runs.parquet")
    assert len(runs) == 5 and runs["subject"].nunique() == 4
    series = sorted((demo_run / "results").glob("sub-*/func/*_seg-Demo100_stat-mean_timeseries.parquet"))
    assert len(series) == 5
    for path in series:
        table = pq.read_table(path)
        assert table.num_columns == 100
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["RepetitionTime"] in (1.5, 2.0)
        assert table.num_rows == sidecar["NumberOfVolumes"] == len(sidecar["KeptVolumes"])
        assert 0.0 <= sidecar["QC"]["fraction_censored"] < 0.5
        assert all(source["sha256"] for source in sidecar["Sources"])


def test_shards_hold_every_run_once(demo_run):
    manifest = pd.read_parquet(demo_run / "results" / "shards" / "Demo100" / "manifest.parquet")
    assert sorted(manifest["run_id"]) == sorted(pd.read_parquet(
        demo_run / "results" / "bids_index" / "runs.parquet")["run_id"])
    # splits are per subject: no subject in two splits
    assert (manifest.groupby("subject")["split"].nunique() == 1).all()


def test_report_builds(demo_run):
    _snakemake(demo_run, "--report", "report.html")
    report = demo_run / "report.html"
    assert report.stat().st_size > 10_000


def test_lint_is_clean(demo_run):
    proc = _snakemake(demo_run, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_every_step_records_its_wall_time(demo_run):
    """Each job's `benchmark:` TSV is there, and `brainfoundry walltime` adds them up per step."""
    from brainfoundry.walltime import read_benchmarks, summarize

    jobs = read_benchmarks(demo_run / "results" / "benchmarks")
    steps = set(jobs["step"])
    assert {"parcellate", "pfc", "shards", "pretrain", "evaluate"} <= steps, steps
    assert (jobs["seconds"] > 0).all()
    summary = summarize(jobs)
    assert summary.iloc[-1]["step"] == "all"
    assert summary.iloc[-1]["jobs"] == len(jobs)
    pretrain = jobs[jobs["step"] == "pretrain"]
    assert sorted(pretrain["job"]) == ["pretrain/brainlm", "pretrain/brainmass", "pretrain/lcm", "pretrain/scmbm"]
