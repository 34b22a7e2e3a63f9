"""locks.explain_lock: a run that finds a Snakemake lock says whether a live run holds it or a killed one left it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from brainfoundry.locks import explain_lock, live_runs
from conftest import REPO, bin_path

# A run that holds the lock of its directory for a while (bounded: it ends by itself).
HOLDER = """
rule hold:
    output: "held.txt"
    shell: "sleep 60 && touch {output}"
"""


def _env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _start_holder(workdir: Path) -> subprocess.Popen:
    (workdir / "Holder.smk").write_text(HOLDER)
    proc = subprocess.Popen([bin_path("snakemake"), "--snakefile", "Holder.smk", "--cores", "1",
                             "--workflow-profile", "none"], cwd=workdir, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((workdir / ".snakemake" / "locks").glob("*.lock")):
        assert proc.poll() is None and time.monotonic() < deadline, "the holder run never took its lock"
        time.sleep(0.2)
    return proc


def test_no_lock_no_message(tmp_path):
    assert explain_lock(tmp_path, stream=io.StringIO()) is None


def test_live_and_killed_holders_are_told_apart(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        assert live_runs(tmp_path) == [holder.pid]
        out = io.StringIO()
        message = explain_lock(tmp_path, stream=out)
        assert f"another Snakemake run is alive in {tmp_path.resolve()} (pid {holder.pid})" in message
        assert "do not --unlock" in message and out.getvalue().strip() == message
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # its own session: the run and its job's shell
        holder.wait(timeout=60)
    assert live_runs(tmp_path) == []
    message = explain_lock(tmp_path, stream=io.StringIO())  # the lock stays behind a SIGKILL
    assert "no Snakemake process runs in" in message and "a killed run left it" in message
    assert "--unlock" in message


@pytest.mark.workflow
def test_the_workflow_says_so_at_start(tmp_path, demo_dataset):
    """The Snakefile's start-up check, in a real second run of the workflow in a locked directory."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(bids_dir=str(demo_dataset / "bids"), derivatives_dir=str(demo_dataset / "derivatives" / "fmriprep"))
    config["atlas"].update(path=str(demo_dataset / "atlas" / "atlas-Demo100_dseg.nii.gz"),
                           labels=str(demo_dataset / "atlas" / "atlas-Demo100_dseg.tsv"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    holder = _start_holder(tmp_path)
    try:
        second = subprocess.run([bin_path("snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
                                 str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"],
                                check=False, capture_output=True, text=True, timeout=600, env=_env())
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    assert f"brainfoundry: another Snakemake run is alive in {tmp_path.resolve()} (pid {holder.pid})" in second.stderr, \
        second.stderr[-3000:]
