"""Incremental re-processing, judged by Snakemake's own dry-run.

The demo dataset (4 subjects; the fourth excluded at first) runs through the raw entry point: the
fMRIPrep outputs already exist (the demo's derivatives tree) and are marked up to date with
``snakemake --touch``, so no fMRIPrep runs here; parcellation, pFC, shards and one small pretraining
job run for real. Then, without running anything:

- adding the fourth subject schedules only its fMRIPrep/parcellate/pfc jobs, the one shard bucket it
  hashes to, the manifest and the model;
- changing the confound strategy re-runs parcellation onward, never fMRIPrep;
- changing pFC parameters re-runs pfc onward, never parcellation.

And a run killed with SIGKILL in the middle of parcellation resumes: the finished outputs are kept,
the incomplete one is redone, and the outputs equal those of the uninterrupted run.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from slurm_support import REPO, job_counts, run_env, snakemake_cmd

pytestmark = [pytest.mark.workflow]

N_SUBJECTS = 4
N_VOLUMES = 80
NEW_SUBJECT = "04"


def _snakemake(workdir: Path, config: dict, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = snakemake_cmd(workdir, configfile, "--cores", "2", *extra)
    return subprocess.run(["timeout", "-s", "KILL", str(timeout), *cmd], capture_output=True, text=True, env=run_env())


def _targets(config: dict) -> list[str]:
    atlas = config["atlas"]["name"]
    targets = [f"results/shards/{atlas}/manifest.parquet", f"results/shards/{atlas}/norm_stats.parquet"]
    if (REPO / "workflow" / "rules" / "pretrain.smk").exists():
        targets += [f"results/models/{family}/model.safetensors" for family in config["pretrain"]["families"]]
    return targets


def _fmriprep_outputs(data: Path, subjects: list[str]) -> list[str]:
    """What the fMRIPrep rule declares for these subjects: each subject's report, sub-<label>.html.

    The demo's derivatives tree has every run's files but no report (fMRIPrep writes one per subject it
    finishes), so the report is written here, as fMRIPrep would have left it, then touched.
    """
    deriv = data / "derivatives" / "fmriprep"
    reports = [deriv / f"sub-{s}.html" for s in subjects]
    for report in reports:
        if not report.exists():
            report.write_text(f"<html><body>fMRIPrep report of {report.stem} (demo)</body></html>\n")
    return sorted(str(p) for p in reports)


def _plan(result: subprocess.CompletedProcess) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Rule -> job count, and rule -> the wildcards line of each planned job, from a dry-run."""
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\[|rule |localrule )", text):
        match = re.match(r"(?:local)?rule (\w+):", block.strip())
        if match:
            wildcards = re.search(r"wildcards: (.*)", block)
            jobs.setdefault(match.group(1), []).append(wildcards.group(1) if wildcards else "")
    return job_counts(text), jobs


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """The raw entry point run up to the shards and a small model, subjects 01-03."""
    root = tmp_path_factory.mktemp("incremental")
    data = root / "demo_data"
    subprocess.run([str(Path(snakemake_cmd(root, root)[0]).parent / "brainfoundry"), "demo-data", str(data),
                    "--n-subjects", str(N_SUBJECTS), "--n-volumes", str(N_VOLUMES), "--two-run-subjects", "1"],
                   check=True, capture_output=True, text=True, env=run_env())
    license_file = root / "license.txt"
    license_file.write_text("not a real FreeSurfer license: fMRIPrep never runs in this test\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(entry_point="raw", bids_dir=str(data / "bids"), derivatives_dir=str(data / "derivatives" / "fmriprep"))
    config["atlas"].update(path=str(data / "atlas" / Path(config["atlas"]["path"]).name),
                           labels=str(data / "atlas" / Path(config["atlas"]["labels"]).name),
                           cache_dir=str(root / "atlas_cache"))
    config["fmriprep"].update(fs_license=str(license_file), work_dir=str(root / "fmriprep_work"))
    config["bids"]["exclude_subjects"] = [NEW_SUBJECT]
    config["qc"]["figures"] = False
    config["pfc"]["n_views"] = 4
    config["shards"]["n_buckets"] = 4
    pretrain = config["pretrain"]
    pretrain["families"] = ["brainlm"]
    pretrain["trainer"].update(steps=2, window=40, batch_size=2, eval_every=2, checkpoint_every=2, log_every=1)
    pretrain["brainlm"]["model"]["window"] = 40

    work = root / "work"
    work.mkdir()
    existing = ["01", "02", "03"]
    touched = _snakemake(work, config, "--touch", *_fmriprep_outputs(data, existing))
    assert touched.returncode == 0, touched.stderr[-4000:]
    done = _snakemake(work, config, *_targets(config))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    nothing = _snakemake(work, config, "--dry-run", *_targets(config))
    assert "Nothing to be done" in nothing.stdout + nothing.stderr, (nothing.stdout + nothing.stderr)[-3000:]
    return {"work": work, "config": config, "data": data}


def test_adding_a_subject_schedules_only_its_jobs_one_bucket_and_the_model(processed):
    config = copy.deepcopy(processed["config"])
    config["bids"]["exclude_subjects"] = []
    counts, jobs = _plan(_snakemake(processed["work"], config, "--dry-run", *_targets(config)))
    new_runs = [w for w in jobs.get("parcellate", [])]
    assert counts.get("parcellate") == 1 and all(f"subject={NEW_SUBJECT}" in w for w in new_runs), jobs
    assert counts.get("pfc") == 1 and all(f"subject={NEW_SUBJECT}" in w for w in jobs["pfc"]), jobs
    assert counts.get("fmriprep") == 1 and jobs["fmriprep"] == [f"subject={NEW_SUBJECT}"], (counts, jobs.get("fmriprep"))
    assert counts.get("shard") == 1 and counts.get("manifest") == 1, counts
    from brainfoundry.splits import bucket_of

    assert jobs["shard"] == [f"bucket={bucket_of(NEW_SUBJECT, config['shards']['n_buckets'])}"], jobs["shard"]
    assert "atlas_prepare" not in counts, counts
    if "pretrain" in _targets(config)[-1]:
        assert counts.get("pretrain") == 1, counts


def test_changing_the_confound_strategy_reruns_parcellation_onward_not_fmriprep(processed):
    config = copy.deepcopy(processed["config"])
    config["denoise"]["strategy"] = [s for s in config["denoise"]["strategy"] if s != "scrub"]
    counts, _ = _plan(_snakemake(processed["work"], config, "--dry-run", *_targets(config)))
    n_runs = 4  # subjects 01-03, the first with two runs
    assert counts.get("parcellate") == n_runs and counts.get("pfc") == n_runs, counts
    assert counts.get("manifest") == 1 and counts.get("shard", 0) >= 1, counts
    assert not any(rule.startswith("fmriprep") for rule in counts), counts
    assert "atlas_prepare" not in counts, counts


def test_changing_pfc_parameters_reruns_pfc_onward_not_parcellation(processed):
    config = copy.deepcopy(processed["config"])
    config["pfc"]["n_views"] = 6
    counts, _ = _plan(_snakemake(processed["work"], config, "--dry-run", *_targets(config)))
    assert counts.get("pfc") == 4 and counts.get("manifest") == 1, counts
    assert "parcellate" not in counts and not any(rule.startswith("fmriprep") for rule in counts), counts


def test_sigkill_during_parcellation_resumes(processed, tmp_path):
    config = copy.deepcopy(processed["config"])
    work = tmp_path / "killed"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    series = sorted(str(p.relative_to(processed["work"])) for p in (processed["work"] / "results").rglob("*_stat-mean_timeseries.parquet")
                    if "_desc-raw_" not in p.name)
    assert len(series) == 4
    touched = _snakemake(work, config, "--touch", *_fmriprep_outputs(processed["data"], ["01", "02", "03"]))
    assert touched.returncode == 0, touched.stderr[-3000:]

    # One job at a time, only parcellation: once the first series is written the next parcellate runs.
    cmd = snakemake_cmd(work, work / "config.yaml", "--cores", "1", *series)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=run_env(),
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not any((work / s).exists() for s in series):
            assert proc.poll() is None, "snakemake ended before the first parcellation finished"
            time.sleep(0.1)
        time.sleep(1.0)  # into the next parcellate job
        finished = [s for s in series if (work / s).exists()]
        assert finished and len(finished) < len(series), "no parcellation was in flight"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the running job, no clean-up
        proc.wait()
    stamps = {s: (work / s).stat().st_mtime_ns for s in finished}

    unlock = _snakemake(work, config, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    plan_result = _snakemake(work, config, "--dry-run", *series)
    counts, jobs = _plan(plan_result)
    # Finished runs are kept; the interrupted and the not-yet-started ones are (re)done.
    assert counts.get("parcellate") == len(series) - len(finished), (counts, finished)
    planned = " ".join(jobs["parcellate"])
    assert not any(Path(s).name.split("_space-")[0] in planned for s in finished), (planned, finished)

    resumed = _snakemake(work, config, "--rerun-incomplete", *series)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for s in finished:
        assert (work / s).stat().st_mtime_ns == stamps[s], f"{s} was rewritten"
    for s in series:
        a, b = pq.read_table(work / s), pq.read_table(processed["work"] / s)
        assert a.equals(b), f"{s}: resumed output differs from the uninterrupted run"
