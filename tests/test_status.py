"""``brainfoundry status`` on a real run of the demo workflow: done, failed (with its log tail), out of date.

One real Snakemake run up to the shards; then one run in which a subject's parcellation fails (its
confounds file broken on purpose), then an input of another subject is touched. The status must say
so per subject and step, from Snakemake's records alone: nothing is re-run and nothing changes.
The run-log parser is also checked on text written by Snakemake's own log formatter (a Slurm group
job's failure, with the Slurm job id in the executor's message).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainfoundry.status import parse_run_log
from conftest import REPO, bin_path

N_VOLUMES = 120


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _snakemake(workdir: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [bin_path("snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def _status(workdir: Path, config: Path, *targets: str, as_json: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("brainfoundry"), "status", "--configfile", str(config), "--directory", str(workdir),
                           "--snakefile", str(REPO / "Snakefile"), *targets, *(["--json"] if as_json else [])],
                          capture_output=True, text=True, env=_env(), timeout=600)


def _rows(proc: subprocess.CompletedProcess) -> dict[tuple[str | None, str], dict]:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return {(r["subject"], r["step"]): r for r in json.loads(proc.stdout)}


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, str]:
    from brainfoundry.demo import write_demo_dataset

    workdir = tmp_path_factory.mktemp("status_demo")
    write_demo_dataset(workdir / "demo_data", n_subjects=2, n_volumes=N_VOLUMES, two_run_subjects=0)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["pfc"]["n_views"] = 4
    config["shards"]["n_buckets"] = 2
    config["qc"]["figures"] = False
    config["atlas"]["cache_dir"] = str(workdir / "atlas_cache")
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    target = f"results/shards/{config['atlas']['name']}/manifest.parquet"
    _snakemake(workdir, path, target)
    return workdir, path, target


@pytest.mark.workflow
def test_status_done_failed_out_of_date(demo):
    workdir, config, target = demo
    first = _status(workdir, config, target)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _rows(first)
    assert {(s, step) for s, step in rows if s} == {(s, step) for s in ("01", "02") for step in ("parcellate", "pfc")}
    assert all(r["state"] == "done" for r in rows.values()), rows

    # A subject whose parcellation fails: its confounds file is not a TSV any more.
    confounds = next((workdir / "demo_data" / "derivatives" / "fmriprep" / "sub-02").rglob("*desc-confounds_timeseries.tsv"))
    confounds.write_text("garbage\n1\n")
    failed_run = _snakemake(workdir, config, "--keep-going", target, check=False)
    assert failed_run.returncode != 0
    # Another subject's input is newer than its outputs.
    bold = next((workdir / "demo_data" / "derivatives" / "fmriprep" / "sub-01").rglob("*desc-preproc_bold.nii.gz"))
    later = bold.stat().st_mtime + 3600
    os.utime(bold, (later, later))

    before = _snapshot(workdir)
    proc = _status(workdir, config, target)
    assert _snapshot(workdir) == before, "status changed files"
    assert proc.returncode == 1, proc.stderr[-3000:]  # a failed job: non-zero, like snakemake
    rows = _rows(proc)
    failed = rows[("02", "parcellate")]
    assert failed["state"] == "failed", failed
    (job,) = failed["jobs"]
    assert job["wildcards"]["run_id"] == "sub-02_task-rest_run-1"
    assert job["logs"] == ["results/logs/parcellate/sub-02/sub-02_task-rest_run-1.log"]
    assert any("confounds TSV has fewer than two columns" in line for line in job["log_tail"]), job
    assert job["slurm_job_id"] is None  # a local run
    assert rows[("01", "parcellate")]["state"] == "out of date"
    assert "updated input files" in rows[("01", "parcellate")]["jobs"][0]["reason"]
    # Downstream of it: would be re-made too.
    assert rows[("01", "pfc")]["state"] == "out of date"

    table = _status(workdir, config, target, as_json=False)
    assert "FAILED parcellate (subject=02" in table.stdout and "| brainfoundry parcellate: error:" in table.stdout, table.stdout

    # Bad input: the same results folder queried with a configuration that did not write it.
    other = yaml.safe_load(config.read_text())
    other["atlas"]["name"] = "Other100"
    other_path = workdir / "other.yaml"
    other_path.write_text(yaml.safe_dump(other))
    wrong = _status(workdir, other_path, target.replace("Demo100", "Other100"))
    assert wrong.returncode == 1 and not wrong.stdout.strip()
    assert wrong.stderr.strip().splitlines()[-1].startswith("brainfoundry status: error: config key 'atlas.name':"), wrong.stderr
    assert "Demo100" in wrong.stderr


def test_status_missing_config_names_the_file(tmp_path):
    proc = subprocess.run([bin_path("brainfoundry"), "status", "--configfile", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"brainfoundry status: error: {tmp_path / 'nope.yaml'}: config file not found"


def _formatted(record: dict) -> str:
    """Text as Snakemake's own log formatter writes it into .snakemake/log."""
    from snakemake.logging import DefaultFormatter

    formatter = DefaultFormatter(quiet=set(), show_failed_logs=False)
    log_record = logging.LogRecord("snakemake", logging.ERROR, __file__, 0, record.get("msg"), None, None)
    for key, value in record.items():
        setattr(log_record, key, value)
    return formatter.format(log_record)


def test_parse_run_log_group_job_on_slurm():
    from snakemake_interface_logger_plugins.common import LogEvent

    job = dict(rule_name="parcellate", rule_msg=None, jobid=7, input=["in.nii.gz"], output=["a.parquet", "a.json"],
               log=["results/logs/parcellate/sub-02/run.log"], conda_env=None, container_img=None, aux={},
               indent=True, shellcmd="brainfoundry parcellate ...", msg=None, event=LogEvent.JOB_ERROR, local=False)
    group = dict(event=LogEvent.GROUP_ERROR, groupid="perrun", msg="SLURM-job '4242' failed, SLURM status is: 'FAILED'.",
                 aux_logs=[".snakemake/slurm_logs/group_perrun/4242.log"],
                 job_error_info=[dict(job, output=job["output"])])
    text = "\n".join([
        "Job 7 has been submitted with SLURM jobid 4242 (log: .snakemake/slurm_logs/group_perrun/4242.log).",
        _formatted(group), _formatted(job), _formatted(dict(job, indent=False, output=["b.parquet"], jobid=9,
                                                            log=["results/logs/pfc/b.log"], rule_name="pfc")),
    ])
    failures = {f.rule: f for f in parse_run_log(text)}
    assert failures["parcellate"].outputs == ["a.parquet", "a.json"]
    assert failures["parcellate"].slurm_job_id == "4242"
    assert failures["parcellate"].logs == ["results/logs/parcellate/sub-02/run.log", ".snakemake/slurm_logs/group_perrun/4242.log"]
    # A local job after it: no Slurm id, its own log only.
    assert failures["pfc"].slurm_job_id is None and failures["pfc"].logs == ["results/logs/pfc/b.log"]
