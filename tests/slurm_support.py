"""Helpers shared by the Slurm test, the incremental tests and benchmarks/bench_dag.py.

- ``local_slurm()``: make sure the single-node Slurm of ``scripts/slurm_local.sh`` runs (start it when
  it does not), or say why it cannot;
- ``site_profile()``: the repository's Slurm profile fitted to this node (CPUs, memory), every other
  setting (groups, retries with more memory, GPU requests) as written;
- ``sacct_jobs()``: the accounting records of jobs, as dicts;
- ``snakemake_cmd()`` / ``job_counts()``: run the workflow of the repository in a work directory and
  read Snakemake's job-stats table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = REPO / "scripts" / "slurm_local.sh"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
DEFAULT_PROFILE = REPO / "profiles" / "default" / "config.yaml"  # the workflow profile, beside the Snakefile


@dataclass
class SlurmState:
    available: bool
    reason: str = ""
    started_here: bool = False


def local_slurm(start: bool = True, timeout: int = 900) -> SlurmState:
    """Whether the local Slurm answers; start it with scripts/slurm_local.sh when asked."""
    if os.name != "posix" or shutil.which("bash") is None:
        return SlurmState(False, "needs a POSIX system with bash")
    if os.geteuid() != 0:
        return SlurmState(False, "a local Slurm needs root (scripts/slurm_local.sh starts munge, MariaDB, slurmdbd, slurmctld, slurmd)")
    status = subprocess.run(["bash", str(SLURM_SCRIPT), "status"], capture_output=True, text=True)
    if status.returncode == 0:
        return SlurmState(True)
    if not start:
        return SlurmState(False, "the local Slurm is not running (scripts/slurm_local.sh start)")
    started = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=timeout)
    if started.returncode == 0:
        return SlurmState(True, started_here=True)
    message = started.stderr.strip().splitlines()[-1] if started.stderr.strip() else f"exit {started.returncode}"
    # Exit 2: this machine cannot run it (not root, no apt, packages not installable) -> a skip reason.
    # Anything else is a real failure of the harness.
    return SlurmState(False, message if started.returncode == 2 else f"FAILED: {message}")


def stop_slurm() -> None:
    subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], capture_output=True, text=True, timeout=300)


def node_cpus_and_memory() -> tuple[int, int]:
    """CPUs and RealMemory (MB) of the local Slurm node."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=True).stdout
    cpus, mem = out.split()[:2]
    return int(cpus), int(mem.rstrip("+"))


def site_profile(dest: Path, cores: int, mem_cap_mb: int, alias: dict[str, str] | None = None,
                 **overrides) -> Path:
    """The repository's Slurm profile, fitted to a small node, written to ``dest/config.yaml``.

    Only sizes change: ``cores`` (the widest grouped job; also caps threads and CPUs per GPU) and each
    ``mem_mb`` expression, clamped to ``mem_cap_mb * attempt`` so that the retry still asks for more. Polling intervals are shortened
    for a local cluster. ``alias`` gives extra rules the per-rule resources of a profile rule
    ({"probe_rule": "pretrain"}). ``overrides`` replace or add top-level keys.
    """
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    for new, existing in (alias or {}).items():
        profile["set-resources"][new] = dict(profile["set-resources"][existing])
    profile["cores"] = cores
    profile["latency-wait"] = 5
    profile["seconds-between-status-checks"] = 2
    profile["slurm-init-seconds-before-status-checks"] = 1

    def clamp(resources: dict) -> None:
        if "mem_mb" in resources:
            resources["mem_mb"] = f"min({resources['mem_mb']}, {mem_cap_mb} * attempt)"
        for key in ("cpus_per_gpu", "cpus_per_task"):
            if key in resources:
                resources[key] = min(int(resources[key]), cores)

    clamp(profile["default-resources"])
    for resources in profile.get("set-resources", {}).values():
        clamp(resources)
    for rule, threads in profile.get("set-threads", {}).items():
        profile["set-threads"][rule] = min(int(threads), cores)
    profile.update(overrides)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def sacct_jobs(job_ids: list[str] | None = None, name: str | None = None) -> list[dict]:
    """Allocation records (one per sbatch job) from sacct, selected by job ids or job name."""
    fields = ["JobID", "JobName", "State", "ExitCode", "ReqTRES", "AllocTRES", "ReqMem", "Comment"]
    cmd = ["sacct", "-X", "-n", "-P", "-a", "-S", "now-1days", "-o", ",".join(fields)]
    if job_ids:
        cmd += ["-j", ",".join(job_ids)]
    if name:
        cmd += ["--name", name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def tres(text: str) -> dict[str, str]:
    """'billing=1,cpu=1,gres/gpu=1,mem=300M,node=1' -> {'cpu': '1', 'gres/gpu': '1', ...}."""
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def snakemake_cmd(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    snakemake = Path(sys.executable).parent / "snakemake"
    return [str(snakemake if snakemake.exists() else "snakemake"), "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(configfile), *extra]


def run_env() -> dict[str, str]:
    """Environment for snakemake subprocesses: our venv first on PATH (jobs call `brainfoundry`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def job_counts(text: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's job-stats table (dry-run or real run)."""
    counts: dict[str, int] = {}
    in_table = False
    for line in text.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            counts = {}
            continue
        if in_table:
            if len(parts) == 2 and parts[1].isdigit():
                if parts[0] != "total":
                    counts[parts[0]] = int(parts[1])
            elif parts and not set(line.replace(" ", "")) <= {"-"}:
                in_table = False
    return counts


SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


def submitted_job_ids(text: str) -> list[str]:
    return SUBMITTED.findall(text)
