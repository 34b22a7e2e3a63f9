"""Start-up of one per-run job (parcellate, pfc, qc-figures, import-timeseries) beside bare Python.

A per-run job is one `brainfoundry <command>` process: interpreter start, the command's imports, then
the work. On a small run the first two are most of the job (issue 11: 733 job-s for 177 CPU-s on 194
runs), so they are measured here on their own and against the floor measured in the same run:

1. start-up: `brainfoundry <command> --help` (interpreter, the command's module and everything it
   imports at module level, argparse), beside `python -c pass` (the floor), each in a fresh process,
   alternating, `--repeats` times: median wall seconds, CPU seconds and peak RSS;
2. the jobs themselves: the demo's per-run jobs run by Snakemake (`--until pfc qc_figures`, one job at
   a time), read back from each job's `benchmark:` TSV (wall s, CPU s, max RSS), so the start-up's
   share of a real job is known. `import-timeseries` runs on the demo's parcellated series saved as
   TSV files, through its CLI;
3. what one real job of each command imports: its shell command (from Snakemake's dry-run listing)
   run again with PYTHONPROFILEIMPORTTIME=1: total import seconds (everything imported, at start-up
   or lazily during the work) and the largest top-level packages.

    python benchmarks/bench_job_startup.py [--repeats 7] [--no-jobs] [--repo CHECKOUT]

(``--repo`` measures another checkout's sources, e.g. the one before a change.)

Last line: one JSON object (floor_seconds, startup_seconds and startup_ratio_vs_floor per command,
startup_peak_rss_mb, job_seconds / job_cpu_seconds / job_max_rss_mb, startup_cpu_share_of_job,
job_import_seconds and job_largest_imports per command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = ("parcellate", "pfc", "qc-figures", "import-timeseries")
RULES = {"parcellate": "parcellate", "pfc": "pfc", "qc-figures": "qc_figures"}

# Runs a command in a fresh process; prints its wall time, CPU time (user + sys) and peak RSS.
TIMER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t0
if done.returncode != 0:
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    sys.exit(done.returncode)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", TIMER, *cmd], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:3])} ...\n{out.stderr[-4000:]}")
    seconds, cpu, rss = map(float, out.stdout.split())
    return seconds, cpu, rss


def startup(repeats: int, env: dict[str, str]) -> dict[str, list[tuple[float, float, float]]]:
    cmds = {"floor": [sys.executable, "-c", "pass"]}
    cmds.update({name: [str(BIN / "brainfoundry"), name, "--help"] for name in COMMANDS})
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            samples[name].append(timed(cmd, env))
    return samples


def import_profile(cmd: str, env: dict[str, str]) -> dict:
    """Import seconds of one shell command (PYTHONPROFILEIMPORTTIME), total and by top-level package."""
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=False,
                          env=dict(env, PYTHONPROFILEIMPORTTIME="1"))
    if done.returncode != 0:
        raise SystemExit(f"failed: {cmd[:200]} ...\n{done.stderr[-3000:]}")
    by_package: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and name.startswith(" ") and not name.startswith("  "):
            top = name.strip().split(".")[0]  # imported from outside any module: top level
            by_package[top] = by_package.get(top, 0.0) + int(cumulative) / 1e6
    largest = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:4])
    return {"seconds": sum(by_package.values()), "largest": {k: round(v, 3) for k, v in largest.items()}}


def demo_jobs(work: Path, repo: Path, env: dict[str, str]) -> tuple[dict[str, list[dict[str, float]]], dict]:
    """Run the demo's per-run jobs one at a time; each job's wall s, CPU s and max RSS (its benchmark TSV)."""
    import pandas as pd

    from brainfoundry.demo import write_demo_dataset

    write_demo_dataset(work / "demo_data", n_subjects=4, n_volumes=80, two_run_subjects=1)
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["pfc"]["n_views"] = 8
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = ["timeout", "-s", "KILL", "900", str(BIN / "snakemake"), "--snakefile", str(repo / "Snakefile"),
           "--directory", str(work), "--configfile", str(configfile), "--cores", "1", "--until", "pfc",
           "qc_figures"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"demo run failed:\n{done.stderr[-4000:]}")
    listing = subprocess.run([*cmd, "--dry-run", "--printshellcmds", "--forcerun", "parcellate"], capture_output=True,
                             text=True, cwd=work, env=env, check=False)
    imports: dict[str, dict] = {}
    for line in (listing.stdout + listing.stderr).splitlines():
        if line.startswith("Shell command: brainfoundry "):
            shell = line.removeprefix("Shell command: ").split(" > ")[0]  # without the log redirect
            name = shell.split()[1]
            if name in RULES and name not in imports:
                imports[name] = import_profile(shell, env)
    jobs: dict[str, list[dict[str, float]]] = {}
    for name, rule in RULES.items():
        for tsv in sorted((work / "results" / "benchmarks" / rule).rglob("*.tsv")):
            row = pd.read_csv(tsv, sep="\t").iloc[0]
            jobs.setdefault(name, []).append({"s": float(row["s"]), "cpu": float(row["cpu_time"]),
                                              "rss": float(row["max_rss"])})
    # import-timeseries through its CLI, on each parcellated series written out as a TSV.
    labels = next((work / "results" / "atlases").rglob("*_dseg.tsv"))
    for series in sorted((work / "results").rglob("*_stat-mean_timeseries.parquet")):
        if "_desc-raw_" in series.name:
            continue
        source = work / "import" / series.name.replace(".parquet", ".tsv")
        source.parent.mkdir(exist_ok=True)
        pd.read_parquet(series).to_csv(source, sep="\t", index=False)
        run_id = series.name.split("_space-")[0]
        seconds, cpu, rss = timed([str(BIN / "brainfoundry"), "import-timeseries", str(source),
                                   "--labels", str(labels), "--out", str(source.with_suffix(".parquet")),
                                   "--sidecar", str(source.with_suffix(".json")), "--tr", "2.0",
                                   "--run-id", run_id, "--atlas", "demo", "--space", "native"], env)
        jobs.setdefault("import-timeseries", []).append({"s": seconds, "cpu": cpu, "rss": rss})
        imports.setdefault("import-timeseries", import_profile(" ".join(
            [str(BIN / "brainfoundry"), "import-timeseries", str(source), "--labels", str(labels), "--out",
             str(source.with_suffix(".parquet")), "--sidecar", str(source.with_suffix(".json")), "--tr", "2.0",
             "--run-id", run_id, "--atlas", "demo", "--space", "native"]), env))
    return jobs, imports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-jobs", action="store_true", help="start-up only (no demo jobs)")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose sources are measured")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo / "src"))
    env = dict(os.environ, PYTHONPATH=str(repo / "src"), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    samples = startup(args.repeats, env)

    def median(name: str, index: int) -> float:
        return statistics.median(s[index] for s in samples[name])

    floor = median("floor", 0)
    result: dict = {"floor_seconds": round(floor, 3), "floor_peak_rss_mb": round(median("floor", 2), 1),
                    "repeats": args.repeats}
    print(f"{'start-up (--help)':<22} {'median s':>9} {'CPU s':>7} {'x floor':>8} {'peak RSS MB':>12}")
    print(f"{'python -c pass':<22} {floor:>9.3f} {median('floor', 1):>7.3f} {1.0:>8.1f} {median('floor', 2):>12.0f}")
    for name in COMMANDS:
        s, cpu, rss = median(name, 0), median(name, 1), median(name, 2)
        print(f"{name:<22} {s:>9.3f} {cpu:>7.3f} {s / floor:>8.1f} {rss:>12.0f}")
        key = name.replace("-", "_")
        result[f"startup_seconds_{key}"] = round(s, 3)
        result[f"startup_cpu_seconds_{key}"] = round(cpu, 3)
        result[f"startup_ratio_vs_floor_{key}"] = round(s / floor, 2)
        result[f"startup_peak_rss_mb_{key}"] = round(rss, 1)

    if not args.no_jobs:
        with tempfile.TemporaryDirectory(prefix="bench_job_startup_") as tmp:
            jobs, imports = demo_jobs(Path(tmp), repo, env)
        print(f"\n{'demo job (median)':<20} {'jobs':>4} {'wall s':>7} {'CPU s':>6} {'max RSS MB':>10} "
              f"{'start-up CPU share':>18} {'import s':>8}  largest imports (s)")
        for name, rows in jobs.items():
            key = name.replace("-", "_")
            s = statistics.median(r["s"] for r in rows)
            cpu = statistics.median(r["cpu"] for r in rows)
            rss = statistics.median(r["rss"] for r in rows)
            # The start-up's CPU (--help above) over the whole job's CPU: the part a coarser unit saves.
            share = result[f"startup_cpu_seconds_{key}"] / cpu if cpu > 0 else None
            imp = imports.get(name, {"seconds": float("nan"), "largest": {}})
            print(f"{name:<20} {len(rows):>4} {s:>7.2f} {cpu:>6.2f} {rss:>10.0f} {share:>18.2f} "
                  f"{imp['seconds']:>8.2f}  {imp['largest']}")
            result[f"job_seconds_{key}"] = round(s, 3)
            result[f"job_cpu_seconds_{key}"] = round(cpu, 3)
            result[f"job_max_rss_mb_{key}"] = round(rss, 1)
            result[f"startup_cpu_share_of_job_{key}"] = None if share is None else round(share, 2)
            result[f"job_import_seconds_{key}"] = round(imp["seconds"], 3)
            result[f"job_largest_imports_{key}"] = imp["largest"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
