"""DAG building and scheduling overhead of the workflow at cluster scale.

1. Scheduler jobs for a 1,000-run dataset, by rule (`snakemake --dry-run` on a synthetic run table via
   the `run_table` config key, derivatives entry point), and the Slurm jobs they become with the Slurm
   profile's grouping of per-run rules (group-components).
2. DAG-building time (`snakemake --dry-run`, whole process) for 1,000 and 10,000 runs (more with
   --runs), beside two bare Snakemake workflows planning the same per-run jobs, both under the
   workflow profile (profiles/default: printshellcmds, retries) ours gets:
   - the reference, "same files": the per-run rules with the same input, output, log and benchmark
     files (our Layout's names), each run's fMRIPrep files from one dict, plain `touch` jobs, no
     params, checks, resources or helpers, i.e. what Snakemake itself costs for these jobs;
   - "minimal": one input and one output file per job (the same rule chain), a floor.
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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))
from slurm_support import (
    job_counts,
    local_slurm,
    sacct_jobs,
    site_profile,
    submitted_job_ids,
)

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TARGET_RATIO = 1.15  # issue 11: the DAG of 10,000 runs within 1.15x of bare Snakemake planning the same jobs


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
                     "diagnosis": "patient" if i // 2 % 2 else "control"})  # the LCM's env variable
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


# The reference: the same per-run files as the workflow (patterns filled in from brainfoundry.paths.Layout).
SAME_FILES_SNAKEFILE = '''
import pandas as pd
RUNS = pd.read_parquet(config["run_table"])
IDS, SUBJECTS = list(RUNS["run_id"]), list(RUNS["subject"])
FILES = {{r: [b, m, c] for r, b, m, c in zip(IDS, RUNS["bold"], RUNS["mask"], RUNS["confounds"])}}
BUCKET = {{}}
for r, s in zip(IDS, SUBJECTS):
    BUCKET.setdefault(int(s) % 16, []).append((s, r))
def per_run(pattern):
    return [pattern.format(subject=s, run_id=r) for s, r in zip(SUBJECTS, IDS)]
def in_bucket(pattern, b):
    return [pattern.format(subject=s, run_id=r) for s, r in BUCKET[int(b)]]
rule all:
    input: per_run({ts!r}), per_run({pfc!r}), [per_run(p) for p in {qc!r}], {manifest!r}, {norm!r}
rule atlas_prepare:
    output: {dseg!r}, {labels!r}, {atlas_json!r}
    shell: "touch {{output}}"
rule parcellate:
    input: lambda wc: FILES[wc.run_id], dseg={dseg!r}, labels={labels!r}
    output: {ts!r}, {ts_json!r}, {raw!r}
    log: {log!r}.format("parcellate")
    benchmark: {bench!r}.format("parcellate")
    shell: "touch {{output}}"
rule qc_figures:
    input: lambda wc: FILES[wc.run_id][2], {ts!r}, {ts_json!r}, {raw!r}, {labels!r}
    output: {qc[0]!r}, {qc[1]!r}, {qc[2]!r}
    log: {log!r}.format("qc_figures")
    benchmark: {bench!r}.format("qc_figures")
    shell: "touch {{output}}"
rule pfc:
    input: {ts!r}
    output: {pfc!r}, {pfc_json!r}
    log: {log!r}.format("pfc")
    benchmark: {bench!r}.format("pfc")
    shell: "touch {{output}}"
rule shard:
    input: lambda wc: in_bucket({ts!r}, wc.bucket) + in_bucket({ts_json!r}, wc.bucket) + in_bucket({pfc!r}, wc.bucket)
    output: {shard!r}
    shell: "touch {{output}}"
rule manifest:
    input: expand({shard!r}, bucket=sorted(BUCKET))
    output: {manifest!r}, {norm!r}
    shell: "touch {{output}}"
'''


def same_files_snakefile(config_path: Path) -> str:
    from brainfoundry.paths import Layout
    from brainfoundry.workflow.parcellate import qc_figure_patterns, raw_timeseries_path

    layout = Layout.from_config(yaml.safe_load(config_path.read_text()))
    return SAME_FILES_SNAKEFILE.format(
        ts=layout.timeseries, ts_json=layout.timeseries_json, raw=raw_timeseries_path(layout.timeseries),
        pfc=layout.pfc, pfc_json=layout.pfc_json, qc=list(qc_figure_patterns(layout).values()),
        dseg=layout.atlas_dseg, labels=layout.atlas_labels, atlas_json=layout.atlas_json, shard=layout.shard,
        manifest=layout.manifest, norm=layout.norm_stats,
        log=f"{layout.results}/logs/{{}}/sub-{{{{subject}}}}/{{{{run_id}}}}.log",
        bench=f"{layout.results}/benchmarks/{{}}/sub-{{{{subject}}}}/{{{{run_id}}}}.tsv")


# A floor: one input and one output file per job, the same rule chain.
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
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=workdir, timeout=1800)
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
    seconds = {"ours": ours}
    for name, text in (("same_files", same_files_snakefile(config)), ("minimal", BARE_SNAKEFILE)):
        bare_file = root / f"Snakefile.{name}"
        bare_file.write_text(text)
        # The same Snakemake settings as ours: the workflow profile beside our Snakefile.
        seconds[name], _ = dry_run([SNAKEMAKE, "--snakefile", str(bare_file), "--directory", str(work),
                                    "--workflow-profile", str(REPO / "profiles" / "default"),
                                    "--config", f"run_table={table}", "--dry-run", "--quiet", "rules",
                                    "--cores", "2"], work)
    return {"seconds": seconds, "counts": counts}


def scontrol_seconds() -> float | None:
    """`scontrol show config`, which the Slurm executor plugin runs on import (timeout 10 s) in every
    snakemake process: seconds when no slurmctld answers, the same for ours and the references."""
    t0 = time.perf_counter()
    try:
        subprocess.run(["scontrol", "show", "config"], check=False, capture_output=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None if shutil.which("scontrol") is None else 10.0
    return round(time.perf_counter() - t0, 2)


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
                             check=False, capture_output=True, text=True, env=env)
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
        scontrol = scontrol_seconds()
        dag = {n: measure_dag(n, tmp) for n in args.runs}
        overhead = None if args.no_slurm else slurm_overhead(tmp)

    print(f"{'runs':>7} {'jobs':>7} {'ours s':>8} {'same s':>8} {'min s':>8} {'ratio':>6} {'ms/run':>7}")
    for n, m in dag.items():
        jobs, sec = sum(m["counts"].values()), m["seconds"]
        print(f"{n:>7} {jobs:>7} {sec['ours']:>8.1f} {sec['same_files']:>8.1f} {sec['minimal']:>8.1f} "
              f"{sec['ours'] / sec['same_files']:>6.2f} {1000 * sec['ours'] / n:>7.2f}")
        results[f"jobs_{n}_runs"] = jobs
        results[f"dag_seconds_{n}_runs"] = round(sec["ours"], 2)
        results[f"bare_snakemake_dag_seconds_{n}_runs"] = round(sec["same_files"], 2)
        results[f"minimal_snakemake_dag_seconds_{n}_runs"] = round(sec["minimal"], 2)
        results[f"dag_ratio_vs_bare_snakemake_{n}_runs"] = round(sec["ours"] / sec["same_files"], 3)
        results[f"dag_ratio_vs_minimal_snakemake_{n}_runs"] = round(sec["ours"] / sec["minimal"], 3)
        results[f"dag_ms_per_run_{n}_runs"] = round(1000 * sec["ours"] / n, 2)
        results[f"bare_snakemake_ms_per_run_{n}_runs"] = round(1000 * sec["same_files"] / n, 2)
    results["target_ratio"] = TARGET_RATIO
    results["scontrol_seconds"] = scontrol
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
        # Growth: time per run at the largest size over time per run at the smallest (1.0 = linear).
        small, big = min(dag), max(dag)
        results["dag_scaling_per_run_ratio"] = round(
            (dag[big]["seconds"]["ours"] / big) / (dag[small]["seconds"]["ours"] / small), 2)
        results["bare_snakemake_scaling_per_run_ratio"] = round(
            (dag[big]["seconds"]["same_files"] / big) / (dag[small]["seconds"]["same_files"] / small), 2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
