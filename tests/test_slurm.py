"""The demo workflow with the repository's Slurm profile on a real single-node Slurm.

``scripts/slurm_local.sh`` starts munge, MariaDB, slurmdbd, slurmctld and slurmd (two fake GPUs); the
session fixture starts it when it is not running and skips with the script's reason where it cannot
(not root, no apt-get, packages not installable). The workflow runs with
``workflow/profiles/slurm`` fitted to this node (CPUs, memory caps; tests/slurm_support.site_profile),
plus two probe rules: one fails on its first attempt and must be retried with more memory, one always
fails and must be reported. Then:

- every job Snakemake submitted is a real sbatch job with an accounting record (sacct), every rule
  that is not a local rule ran inside one, per-run jobs were grouped into fewer Slurm jobs;
- the GPU rule's job asked for and got a GPU (ReqTRES/AllocTRES gres/gpu);
- the flaky probe shows a FAILED then a COMPLETED record with twice the memory; the broken probe is
  reported by Snakemake and failed every attempt; --keep-going finished everything else;
- the outputs equal those of a local run of the same workflow (default profile).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from slurm_support import (
    DEFAULT_PROFILE,
    REPO,
    job_counts,
    local_slurm,
    node_cpus_and_memory,
    run_env,
    sacct_jobs,
    site_profile,
    snakemake_cmd,
    stop_slurm,
    submitted_job_ids,
    tres,
)

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

N_SUBJECTS = 3
N_VOLUMES = 120
MEM_CAP_MB = 1000
RETRIES = 1


@pytest.fixture(scope="session")
def slurm_cluster():
    state = local_slurm(start=True)
    if not state.available:
        if state.reason.startswith("FAILED"):
            pytest.fail(f"scripts/slurm_local.sh start failed: {state.reason}")
        pytest.skip(f"no local Slurm: {state.reason}")
    yield state
    if state.started_here:
        stop_slurm()


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    """A small demo dataset and a config for it (absolute paths, so any workdir can use it)."""
    root = tmp_path_factory.mktemp("slurm_demo")
    data = root / "demo_data"
    subprocess.run(
        [str(Path(snakemake_cmd(root, root)[0]).parent / "brainfoundry"), "demo-data", str(data),
         "--n-subjects", str(N_SUBJECTS), "--n-volumes", str(N_VOLUMES), "--two-run-subjects", "0"],
        check=True, capture_output=True, text=True, env=run_env(),
    )
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["bids_dir"] = str(data / "bids")
    config["derivatives_dir"] = str(data / "derivatives" / "fmriprep")
    config["atlas"]["path"] = str(data / "atlas" / Path(config["atlas"]["path"]).name)
    config["atlas"]["labels"] = str(data / "atlas" / Path(config["atlas"]["labels"]).name)
    config["atlas"]["cache_dir"] = str(root / "atlas_cache")
    config["pfc"]["n_views"] = 4
    config["shards"]["n_buckets"] = 2
    config["qc"]["figures"] = False  # matplotlib figures add minutes on 2 cores and nothing Slurm-specific
    # One small model family: the GPU rule's job, in seconds (the runs are short, so is the window).
    pretrain = config["pretrain"]
    pretrain["families"] = ["brainlm"]
    pretrain["trainer"].update(steps=6, window=60, batch_size=4, eval_every=3, checkpoint_every=3, log_every=3)
    pretrain["brainlm"]["model"]["window"] = 60
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PROBES = '''
include: "{snakefile}"


# Fails on its first attempt only: Snakemake must resubmit it, with the profile's larger memory.
rule slurm_probe_flaky:
    output:
        "probe/flaky.txt",
    log:
        "probe/flaky.log",
    shell:
        "if [ ! -e probe/flaky.first-attempt ]; then touch probe/flaky.first-attempt; "
        "echo 'failing on purpose' > {{log}}; exit 3; fi; echo $SLURM_JOB_ID > {{output}}"


# Always fails: Snakemake must report it and, with keep-going, finish everything else.
rule slurm_probe_broken:
    output:
        "probe/broken.txt",
    shell:
        "echo 'broken on purpose' >&2; exit 5"
'''

GPU_PROBE = '''

# Stands in for the pretraining rule until the workflow has one: runs with the profile's pretrain resources.
rule slurm_probe_gpu:
    output:
        "probe/gpu.txt",
    shell:
        "echo ${{SLURM_GPUS_ON_NODE:-none}} > {output}"
'''


def _workflow_has_rule(name: str, configfile: Path, workdir: Path) -> bool:
    out = subprocess.run(snakemake_cmd(workdir, configfile, "--list-rules"), capture_output=True, text=True,
                         env=run_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return name in out.stdout.split()


def _targets(configfile: Path) -> list[str]:
    """Everything up to the shards plus pretraining (evaluation would add many minutes, no new Slurm feature)."""
    config = yaml.safe_load(configfile.read_text())
    atlas = config["atlas"]["name"]
    targets = [f"results/shards/{atlas}/manifest.parquet", f"results/shards/{atlas}/norm_stats.parquet"]
    if (REPO / "workflow" / "rules" / "pretrain.smk").exists():
        targets += [f"results/models/{family}/model.safetensors" for family in config["pretrain"]["families"]]
    return targets


def _local_run(configfile: Path, workdir: Path) -> None:
    workdir.mkdir()
    cmd = snakemake_cmd(workdir, configfile, "--profile", str(DEFAULT_PROFILE.parent), "--cores", "2",
                        *_targets(configfile))
    done = subprocess.run(["timeout", "-s", "KILL", "900", *cmd], capture_output=True, text=True, env=run_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


# Keys and columns that record when and how fast a file was written, not what it holds: provenance
# timestamps and the trainer's throughput/memory measurements.
VOLATILE_KEYS = {"CreatedAt", "samples_per_s", "tokens_per_s", "step_time_s", "data_wait_fraction", "peak_rss_gb"}


def _json_differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - VOLATILE_KEYS
        return [d for k in sorted(keys) for d in _json_differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _json_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:60]} != {str(b)[:60]}"]


def _compare_trees(local: Path, slurm: Path) -> int:
    """Every result file of the local run exists in the Slurm run with equal content; returns the count."""
    compared, problems = 0, []
    for path in sorted((local / "results").rglob("*")):
        rel = path.relative_to(local)
        if not path.is_file() or "logs" in rel.parts or "benchmarks" in rel.parts:  # timings differ by nature
            continue
        other = slurm / rel
        if not other.is_file():
            problems.append(f"{rel}: made by the local run, missing from the Slurm run")
            continue
        compared += 1
        if path.suffix == ".parquet":
            a, b = pq.read_table(path), pq.read_table(other)
            if not (a.schema.equals(b.schema, check_metadata=False) and a.equals(b)):
                problems.append(f"{rel}: contents differ")
        elif path.suffix == ".json":
            problems += [f"{rel}{d}" for d in _json_differences(json.loads(path.read_text()), json.loads(other.read_text()))]
        elif path.name.endswith(".nii.gz"):
            import nibabel as nib

            a_img, b_img = nib.load(path), nib.load(other)
            if not (np.array_equal(np.asarray(a_img.dataobj), np.asarray(b_img.dataobj))
                    and np.array_equal(a_img.affine, b_img.affine)):
                problems.append(f"{rel}: image differs")
        elif path.suffix == ".csv":
            import pandas as pd

            a, b = (pd.read_csv(p).drop(columns=VOLATILE_KEYS, errors="ignore") for p in (path, other))
            if not a.equals(b):
                problems.append(f"{rel}: table differs")
        elif path.suffix in {".tsv", ".txt"}:
            if path.read_text() != other.read_text():
                problems.append(f"{rel}: text differs")
        # Figures (.png) and checkpoints (.pt) are compared by existence: encoders and pickles embed
        # versions/timestamps; the model's numbers are in metrics.csv, compared above.
    assert not problems, "\n".join(problems)
    return compared


def test_demo_workflow_on_slurm(slurm_cluster, demo_config, tmp_path):
    cpus, memory = node_cpus_and_memory()
    workdir = tmp_path / "slurm"
    workdir.mkdir()
    has_pretrain = _workflow_has_rule("pretrain", demo_config, workdir)
    gpu_rule = "pretrain" if has_pretrain else "slurm_probe_gpu"

    profile = site_profile(tmp_path / "profile", cores=cpus, mem_cap_mb=min(MEM_CAP_MB, memory // 4),
                           alias=None if has_pretrain else {"slurm_probe_gpu": "pretrain"}, retries=RETRIES, jobs=20)

    wrapper = workdir / "Snakefile.slurmtest"
    wrapper.write_text(PROBES.format(snakefile=REPO / "Snakefile") + ("" if has_pretrain else GPU_PROBE))
    targets = _targets(demo_config) + ["probe/flaky.txt", "probe/broken.txt"] + ([] if has_pretrain else ["probe/gpu.txt"])
    cmd = snakemake_cmd(workdir, demo_config, "--profile", str(profile), "--slurm-no-account", *targets)
    cmd[cmd.index("--snakefile") + 1] = str(wrapper)

    started = time.time()
    run = subprocess.run(["timeout", "-s", "KILL", "1500", *cmd], capture_output=True, text=True, env=run_env())
    log = run.stdout + run.stderr
    (tmp_path / "snakemake-slurm.log").write_text(log)  # for a failing test's post-mortem
    assert run.returncode not in (-9, 137), "snakemake hung and was killed:\n" + log[-5000:]
    # The broken probe makes the run fail, after everything else finished (keep-going).
    assert run.returncode != 0, log[-3000:]
    assert "Error in rule slurm_probe_broken" in log, log[-5000:]
    failed_rules = set(re.findall(r"Error in rule (\w+):", log))
    assert failed_rules == {"slurm_probe_flaky", "slurm_probe_broken"}, log[-5000:]

    # -- every submitted job is a real Slurm job with an accounting record ---------------------------
    submitted = submitted_job_ids(log)
    assert submitted, log[-5000:]
    records = {r["JobID"]: r for r in sacct_jobs(submitted)}
    assert set(records) == set(submitted), f"sacct lacks {set(submitted) - set(records)}"
    by_comment: dict[str, list[dict]] = {}
    for record in records.values():
        by_comment.setdefault(record["Comment"].split("_wildcards_")[0], []).append(record)
    executed = job_counts(log)
    # Jobs of local rules (bookkeeping, `run:` blocks) run in Snakemake itself; it logs them as `localrule`.
    local_rules = set(re.findall(r"^localrule (\w+):", log, re.M))
    assert "parcellate" not in local_rules and "pfc" not in local_rules
    remote_rules = {rule for rule in executed if rule not in local_rules}
    # The plugin's --comment: rule_<rule>[_wildcards_...] or, for a group job, rule_<group>_<rules...>.
    groups = {c for c in by_comment if c.startswith("rule_perrun_")}
    ran_in = {rule: [c for c in by_comment if c == f"rule_{rule}" or (c in groups and f"_{rule}_" in c + "_")]
              for rule in remote_rules}
    assert all(ran_in.values()), f"rules without a Slurm job: {[r for r, c in ran_in.items() if not c]}"
    # Per-run rules were grouped: fewer Slurm jobs than per-run Snakemake jobs.
    per_run_jobs = sum(executed.get(rule, 0) for rule in ("parcellate", "pfc", "qc_figures", "import_timeseries"))
    group_jobs = sum(len(by_comment[c]) for c in groups)
    assert per_run_jobs > 0 and 0 < group_jobs < per_run_jobs, (executed, sorted(by_comment))

    # -- everything but the probes completed ---------------------------------------------------------
    for comment, recs in by_comment.items():
        if "slurm_probe_flaky" in comment or "slurm_probe_broken" in comment:
            continue
        assert all(r["State"] == "COMPLETED" for r in recs), (comment, recs)

    # -- the GPU rule's job carried the GPU request and got a GPU ------------------------------------
    gpu_jobs = by_comment.get(f"rule_{gpu_rule}", [])
    assert len(gpu_jobs) == 1, sorted(by_comment)
    assert tres(gpu_jobs[0]["ReqTRES"]).get("gres/gpu") == "1", gpu_jobs[0]
    assert tres(gpu_jobs[0]["AllocTRES"]).get("gres/gpu") == "1", gpu_jobs[0]
    if not has_pretrain:
        assert (workdir / "probe/gpu.txt").read_text().strip() == "1"

    # -- retried with more memory, and reported ------------------------------------------------------
    flaky = sorted(by_comment["rule_slurm_probe_flaky"], key=lambda r: int(r["JobID"]))
    assert [r["State"] for r in flaky] == ["FAILED", "COMPLETED"], flaky
    mem = [tres(r["ReqTRES"])["mem"] for r in flaky]
    assert mem[1] != mem[0] and _mb(mem[1]) == 2 * _mb(mem[0]), mem
    assert (workdir / "probe/flaky.txt").read_text().strip() == flaky[1]["JobID"]
    broken = by_comment["rule_slurm_probe_broken"]
    assert [r["State"] for r in broken] == ["FAILED"] * (RETRIES + 1), broken
    assert not (workdir / "probe/broken.txt").exists()

    # Nothing is left to do for the workflow itself: Slurm produced all of it.
    again = subprocess.run(snakemake_cmd(workdir, demo_config, "--dry-run", *_targets(demo_config)), capture_output=True,
                           text=True, env=run_env(), timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]

    # -- the same outputs as a local run ---------------------------------------------------------------
    local = tmp_path / "local"
    _local_run(demo_config, local)
    assert _compare_trees(local, workdir) > 0
    print(f"slurm run: {len(submitted)} sbatch jobs for {sum(executed.values())} Snakemake jobs "
          f"in {time.time() - started:.0f} s")


def _mb(value: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    return float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value) / 2**20


# -- fMRIPrep: the profile's (and the command line's) resources reach the one `fmriprep` rule ----------
@pytest.fixture()
def running_slurm():
    """The local Slurm when it already runs (CI starts it with scripts/slurm_local.sh); never started here."""
    state = local_slurm(start=False)
    if not state.available:
        pytest.skip(f"no local Slurm: {state.reason}")
    return state


def test_fmriprep_job_asks_slurm_for_the_set_resources_memory(running_slurm, demo_config, tmp_path):
    """`--set-resources fmriprep:mem_mb=M` and `--set-threads fmriprep=N` name the workflow's one fMRIPrep
    rule, so the subject's sbatch job asks for M MB and N CPUs (sacct ReqTRES/ReqMem).

    fMRIPrep itself cannot run here (no FreeSurfer, ANTs or TemplateFlow): `--version` as its extra
    argument makes it exit at once, and the job then fails for want of the subject's report. What is
    checked is what Slurm was asked for, which is decided before the job starts.
    """
    cpus, memory = node_cpus_and_memory()
    mem_mb, threads = min(321, memory // 2), min(2, cpus)
    config = yaml.safe_load(demo_config.read_text())
    license_file = tmp_path / "license.txt"
    license_file.write_text("not a FreeSurfer license: fMRIPrep stops at --version\n")
    derivatives = tmp_path / "derivatives" / "fmriprep"
    config.update(entry_point="raw", derivatives_dir=str(derivatives))
    config["fmriprep"].update(runner="apptainer", fs_license=str(license_file), work_dir=str(tmp_path / "fmriprep_work"),
                              extra_args=["--version"])
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    workdir.mkdir()
    profile = site_profile(tmp_path / "profile", cores=cpus, mem_cap_mb=min(MEM_CAP_MB, memory // 4), retries=0, jobs=5)
    # A command-line --set-resources replaces the profile's list: runtime is given again (the rule's own
    # 24 h may exceed the local partition's limit).
    # --retries 0: profiles/default (read too) retries once; fMRIPrep is absent here, so the one job fails.
    cmd = snakemake_cmd(workdir, configfile, "--profile", str(profile), "--slurm-no-account", "--retries", "0",
                        "--set-threads", f"fmriprep={threads}",
                        "--set-resources", f"fmriprep:mem_mb={mem_mb}", "fmriprep:runtime=10")
    # The target right after the program: --configfile and --set-resources take every argument after them.
    cmd.insert(1, str(derivatives.parent / "fmriprep" / "sub-01.html"))
    run = subprocess.run(["timeout", "-s", "KILL", "600", *cmd], capture_output=True, text=True, env=run_env())
    log = run.stdout + run.stderr
    submitted = submitted_job_ids(log)
    try:
        assert run.returncode not in (-9, 137), "snakemake hung and was killed:\n" + log[-5000:]
        assert len(submitted) == 1, log[-5000:]
        (record,) = sacct_jobs(submitted)
        assert record["Comment"].split("_wildcards_")[0] == "rule_fmriprep", record
        requested = tres(record["ReqTRES"])
        assert requested.get("mem") == f"{mem_mb}M", record
        assert requested.get("cpu") == str(threads), record
        assert record["ReqMem"].rstrip("n").rstrip("c") == f"{mem_mb}M", record
    finally:
        if submitted:
            subprocess.run(["scancel", *submitted], capture_output=True, text=True)


# -- pretraining on two nodes: srun + torchrun (c10d, gloo) ends where one process ends --------------------
def _nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout
    return sorted(set(out.split()))


def test_pretraining_on_two_nodes_ends_equal_to_one_process(running_slurm, demo_config, tmp_path):
    """`pretrain.nodes: 2` on the two-node local Slurm: the pretrain job asks for 2 nodes, its shell's srun
    starts one torchrun agent on each (c10d rendezvous on the first node, 1 gloo process per node), and
    the model it writes equals the one of `brainfoundry train` in one process with the same settings
    (the same global batches: trainer.partition "samples" hands each rank its slice of each)."""
    import torch

    from brainfoundry.models import read_model_file
    from brainfoundry.testing import write_synthetic_shards
    from brainfoundry.workflow.pretrain import workflow_settings

    nodes = _nodes()
    if len(nodes) < 2:
        pytest.skip(f"the local Slurm has {len(nodes)} node(s); scripts/slurm_local.sh start configures two")
    cpus, memory = node_cpus_and_memory()
    config = yaml.safe_load(demo_config.read_text())
    config["pretrain"]["nodes"] = 2
    # 8 training runs in 4 row groups, global batches of 6: each epoch one full batch (3 samples per rank)
    # and one short one (1 + 1). 6 steps, 1 torch thread per process.
    config["pretrain"]["trainer"].update(batch_size=6, threads=1)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    shard_dir = f"results/shards/{config['atlas']['name']}"
    workdir = tmp_path / "work"
    # A tiny synthetic shard set where the workflow keeps its shards (the demo's bucket names); Snakemake
    # runs only the pretrain rule on it (the Slurm of the other rules is the first test's).
    write_synthetic_shards(workdir / shard_dir, n_subjects=12, n_buckets=config["shards"]["n_buckets"],
                           row_group_size=2, n_timepoints=config["pretrain"]["brainlm"]["model"]["window"])

    # The same settings, the same shards, one process: `brainfoundry train` as the rule runs it with one
    # node, in the background while Slurm runs the two-node job (the test's time is mostly start-ups).
    settings = json.dumps(workflow_settings(config, "brainlm"), sort_keys=True)
    single = tmp_path / "single"
    one = subprocess.Popen([str(Path(snakemake_cmd(workdir, configfile)[0]).parent / "brainfoundry"), "train",
                            "--family", "brainlm", "--shards", str(workdir / shard_dir), "--out", str(single),
                            "--config-json", settings, "--resume", "never"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env())

    profile = site_profile(tmp_path / "profile", cores=cpus, mem_cap_mb=min(MEM_CAP_MB, memory // 4), retries=0, jobs=5)
    cmd = snakemake_cmd(workdir, configfile, "--profile", str(profile), "--slurm-no-account", "--retries", "0",
                        "--allowed-rules", "pretrain")
    cmd.insert(1, "results/models/brainlm/model.safetensors")  # before --configfile, which takes what follows
    run = subprocess.run(["timeout", "-s", "KILL", "600", *cmd], capture_output=True, text=True, env=run_env(),
                         check=False)
    log = run.stdout + run.stderr
    train_log = workdir / "results" / "logs" / "pretrain" / "brainlm.log"
    submitted = submitted_job_ids(log)
    try:
        assert run.returncode == 0, log[-4000:] + (train_log.read_text()[-4000:] if train_log.exists() else "")
        assert len(submitted) == 1, log[-3000:]
        out = subprocess.run(["sacct", "-n", "-P", "-j", submitted[0], "-o", "JobID,NNodes,NodeList,State"],
                             capture_output=True, text=True, check=True).stdout
        records = {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines() if line}
        job = records[submitted[0]]
        assert job[0] == "2" and job[2] == "COMPLETED", out  # the allocation: two nodes
        # The shell's srun: one step over both nodes (the torchrun agents), completed.
        steps = [v for k, v in records.items() if k.split(".")[-1].isdigit() and "." in k]
        assert any(s[0] == "2" and s[2] == "COMPLETED" for s in steps), out
        sinfo_names = subprocess.run(["scontrol", "show", "hostnames", job[1]], capture_output=True, text=True,
                                     check=True).stdout.split()
        assert sorted(sinfo_names) == nodes[:2], (job, nodes)
    finally:
        if submitted and run.returncode != 0:
            subprocess.run(["scancel", *submitted], capture_output=True, text=True, check=False)
    model_dir = workdir / "results" / "models" / "brainlm"
    assert json.loads((model_dir / "summary.json").read_text())["world_size"] == 2
    assert "world size 2" in train_log.read_text()

    one_log, _ = one.communicate(timeout=300)
    assert one.returncode == 0, one_log[-3000:]
    assert json.loads((single / "summary.json").read_text())["world_size"] == 1
    a = read_model_file(single / "model.safetensors")["state_dict"]
    b = read_model_file(model_dir / "model.safetensors")["state_dict"]
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)
    final = [json.loads((d / "summary.json").read_text())["final"] for d in (single, model_dir)]
    assert final[1]["loss"] == pytest.approx(final[0]["loss"], rel=1e-4)
    assert final[1]["val_loss"] == pytest.approx(final[0]["val_loss"], rel=1e-4)
