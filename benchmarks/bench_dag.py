"""DAG building and scheduling overhead of the workflow at cluster scale.

1. Scheduler jobs for a 1,000-run dataset, by rule (`snakemake --dry-run` on a synthetic run table via
   the `run_table` config key, derivatives entry point), and the Slurm jobs they become with the Slurm
   profile's grouping of per-run rules (group-components).
2. DAG-building time (`snakemake --dry-run`, whole process) for 1,000 and 10,000 runs, beside the same
   measurement for a bare Snakemake workflow of the same shape (one input file per run, the same per-run
   rule chain, no run-table lookups): the reference, i.e. what Snakemake itself costs for that many jobs.
3. The workflow's own overhead per job on the local Slurm (scripts/slurm_local.sh), when it is running:
   wall time of one trivial job submitted through the repository's Slurm profile, minus the same job run
   locally; null when no local Slurm answers.

    python benchmarks/bench_dag.py [--runs 1000 10000] [--no-slurm]

Last line: one JSON object (dag_seconds_1000_runs, dag_seconds_10000_runs, jobs_for_1000_runs,
slurm_jobs_for_1000_runs, dag_ratio_vs_bare_snakemake_*, slurm_overhead_seconds_per_job, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_support import job_counts, local_slurm, site_profile, sacct_jobs, submitted_job_ids  # noqa: E402

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def synthetic_dataset(root: Path, n_runs: int) -> tuple[Path, Path]:
    """A run table of n_runs (two runs per subject) whose derivatives files exist (empty), plus a config."""
    deriv = root / "derivatives"
    deriv.mkdir(parents=True)
    rows = []
    for i in range(n_runs):
        sub, run = f"{i // 2:05d}", str(i % 2 + 1)
        base = deriv / f"sub-{sub}_task-rest_run-{run}"
        files = {k: f"{base}_{k}" for k in ("bold.nii.gz", "mask.nii.gz", "confounds.tsv")}
        rows.append({"run_id": f"sub-{sub}_task-rest_run-{run}", "subject": sub, "session": None, "task": "rest",
                     "run": run, "dataset": "synthetic", "site": f"site{i % 7}", "tr": 2.0,
                     "bold": files["bold.nii.gz"], "mask": files["mask.nii.gz"],
                     "confounds": files["confounds.tsv"], "age": 20.0 + i % 50, "sex": "MF"[i % 2],
                     "diagnosis": None})
    table = pd.DataFrame(rows)
    for column in ("bold", "mask", "confounds"):
        for path in table[column]:
            Path(path).touch()
    table_path = root / "runs.parquet"
    table.to_parquet(table_path, index=False)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    atlas = root / "atlas"
    atlas.mkdir()
    (atlas / "atlas.nii.gz").touch()
    (atlas / "atlas.tsv").write_text("index\tname\n1\tA\n")
    config.update(entry_point="derivatives", run_table=str(table_path), bids_dir=str(root),
                  derivatives_dir=str(deriv), results_dir="results")
    config["atlas"].update(path=str(atlas / "atlas.nii.gz"), labels=str(atlas / "atlas.tsv"),
                           cache_dir=str(root / "cache"))
    config["shards"]["n_buckets"] = 16
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path, table_path


BARE_SNAKEFILE = '''
import pandas as pd
RUNS = pd.read_parquet(config["run_table"]).set_index("run_id")
IDS = list(RUNS.index)
BOLD = dict(zip(RUNS.index, RUNS["bold"]))
rule all:
    input: expand("results/{run_id}_pfc.parquet", run_id=IDS), "results/manifest.parquet"
rule parcellate:
    input: lambda wc: BOLD[wc.run_id]
    output: "results/{run_id}_timeseries.parquet"
    shell: "touch {output}"
rule qc_figures:
    input: "results/{run_id}_timeseries.parquet"
    output: "results/{run_id}_qc.png"
    shell: "touch {output}"
rule pfc:
    input: "results/{run_id}_timeseries.parquet"
    output: "results/{run_id}_pfc.parquet"
    shell: "touch {output}"
rule manifest:
    input: expand("results/{run_id}_pfc.parquet", run_id=IDS), expand("results/{run_id}_qc.png", run_id=IDS)
    output: "results/manifest.parquet"
    shell: "touch {output}"
'''


def dry_run(cmd: list[str], workdir: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=1800)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"dry-run failed ({' '.join(cmd[:6])} ...):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, out.stdout + out.stderr


def measure_dag(n_runs: int, tmp: Path) -> dict:
    root = tmp / f"runs{n_runs}"
    config, table = synthetic_dataset(root, n_runs)
    work = root / "work"
    work.mkdir()
    ours, text = dry_run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
                          "--configfile", str(config), "--dry-run", "--quiet", "rules", "--cores", "2"], work)
    counts = job_counts(text)
    bare_file = root / "Snakefile.bare"
    bare_file.write_text(BARE_SNAKEFILE)
    bare, _ = dry_run([SNAKEMAKE, "--snakefile", str(bare_file), "--directory", str(work),
                       "--config", f"run_table={table}", "--dry-run", "--quiet", "rules", "--cores", "2"], work)
    return {"seconds": ours, "bare_seconds": bare, "counts": counts}


def slurm_jobs(counts: dict[str, int]) -> dict[str, int]:
    """Slurm jobs the profile makes of Snakemake's jobs: local rules none, each group's runs in chunks."""
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    groups = profile.get("groups", {})
    components = profile.get("group-components", {})
    local = {"all", "bids_index", "bucket_runs", "dataset_description"}  # localrules of the workflow (bookkeeping only)
    out: dict[str, int] = {}
    per_group: dict[str, int] = {}
    for rule, n in counts.items():
        if rule in local:
            continue
        if rule in groups:
            # One component per run: the group's rules of one run are connected; the largest count is the runs.
            per_group[groups[rule]] = max(per_group.get(groups[rule], 0), n)
        else:
            out[rule] = n
    for group, runs in per_group.items():
        out[f"group:{group}"] = math.ceil(runs / int(components.get(group, 1)))
    return out


TRIVIAL = '''
include: "{snakefile}"

rule bench_noop:
    output: "bench/noop-{{i}}.txt"
    resources: mem_mb=100, runtime=5
    shell: "echo {{wildcards.i}} > {{output}}"
'''


def slurm_overhead(tmp: Path, n_jobs: int = 2) -> dict | None:
    """Per trivial job: wall time through the Slurm profile minus the local executor's, plus sacct's view."""
    state = local_slurm(start=False)
    if not state.available:
        print(f"local Slurm: not measured ({state.reason})")
        return None
    root = tmp / "overhead"
    config, _ = synthetic_dataset(root, 2)
    targets = [f"bench/noop-{i}.txt" for i in range(n_jobs)]
    snakefile = root / "Snakefile.noop"
    snakefile.write_text(TRIVIAL.format(snakefile=REPO / "Snakefile"))
    cpus = os.cpu_count() or 2
    profile = site_profile(root / "profile", cores=cpus, mem_cap_mb=500)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    base = [SNAKEMAKE, "--snakefile", str(snakefile), "--configfile", str(config)]

    def timed(workdir: Path, *extra: str) -> tuple[float, str]:
        workdir.mkdir()
        t0 = time.perf_counter()
        out = subprocess.run(["timeout", "-s", "KILL", "600", *base, "--directory", str(workdir), *extra, *targets],
                             capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if out.returncode != 0:
            raise SystemExit(f"trivial run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return seconds, out.stdout + out.stderr

    local_s, _ = timed(root / "local", "--cores", "1")
    slurm_s, log = timed(root / "slurm", "--profile", str(profile), "--slurm-no-account", "--jobs", str(n_jobs))
    ids = submitted_job_ids(log)
    records = sacct_jobs(ids)
    return {"local_seconds": local_s, "slurm_seconds": slurm_s, "jobs": len(ids),
            "overhead_per_job": (slurm_s - local_s) / max(len(ids), 1) if len(ids) > 1 else slurm_s - local_s,
            "sacct_states": sorted({r["State"] for r in records})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--no-slurm", action="store_true", help="skip the per-job overhead on the local Slurm")
    args = parser.parse_args(argv)

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_dag_") as tmp_name:
        tmp = Path(tmp_name)
        dag = {n: measure_dag(n, tmp) for n in args.runs}
        overhead = None if args.no_slurm else slurm_overhead(tmp)

    print(f"{'runs':>7} {'jobs':>7} {'dag s':>8} {'bare s':>8} {'ratio':>6} {'ms/job':>7}")
    for n, m in dag.items():
        jobs = sum(m["counts"].values())
        print(f"{n:>7} {jobs:>7} {m['seconds']:>8.1f} {m['bare_seconds']:>8.1f} "
              f"{m['seconds'] / m['bare_seconds']:>6.2f} {1000 * m['seconds'] / jobs:>7.2f}")
        results[f"dag_seconds_{n}_runs"] = round(m["seconds"], 2)
        results[f"bare_snakemake_dag_seconds_{n}_runs"] = round(m["bare_seconds"], 2)
        results[f"dag_ratio_vs_bare_snakemake_{n}_runs"] = round(m["seconds"] / m["bare_seconds"], 2)
    if 1000 in dag:
        counts = dag[1000]["counts"]
        slurm = slurm_jobs(counts)
        print("\nSnakemake jobs for 1,000 runs, by rule -> Slurm jobs with the Slurm profile:")
        for rule, n in counts.items():
            print(f"  {rule:<16} {n:>6}")
        for rule, n in slurm.items():
            print(f"  -> {rule:<13} {n:>6}")
        results["jobs_for_1000_runs"] = counts
        results["total_jobs_for_1000_runs"] = sum(counts.values())
        results["slurm_jobs_for_1000_runs"] = slurm
        results["total_slurm_jobs_for_1000_runs"] = sum(slurm.values())
    if overhead:
        print(f"\ntrivial job: local {overhead['local_seconds']:.1f} s, Slurm {overhead['slurm_seconds']:.1f} s "
              f"({overhead['jobs']} sbatch jobs, states {overhead['sacct_states']})")
    results["slurm_overhead_seconds_per_job"] = None if overhead is None else round(overhead["overhead_per_job"], 1)
    if len(args.runs) >= 2:
        small, big = sorted(dag)[:2]
        results["dag_scaling_per_run_ratio"] = round(
            (dag[big]["seconds"] / big) / (dag[small]["seconds"] / small), 2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
