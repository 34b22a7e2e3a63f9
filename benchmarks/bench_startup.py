"""Start-up of the workflow: `snakemake -n` on the demo, beside bare Snakemake planning the same jobs.

Every Slurm job re-parses the workflow, so what Snakemake imports while it parses (the rule helpers of
brainfoundry.workflow, the run table) is paid once per job. The reference is a bare Snakefile generated
from the workflow's own plan: one rule per planned job with the same input and output files and no
Python beyond Snakemake's, i.e. what Snakemake itself costs to parse and plan those jobs. The floor is
`snakemake --version` (interpreter and Snakemake's own imports).

    python benchmarks/bench_startup.py [--repeats 5] [--subjects 4] [--repo CHECKOUT]

(``--repo`` measures another checkout's Snakefile and sources, e.g. the one before a change.)

Each command runs in its own process, alternating, `--repeats` times; medians are reported, with the
peak RSS of each command. Last line: one JSON object (startup_seconds, bare_seconds, ratio_vs_bare,
floor_seconds, peak_rss_mb, bare_peak_rss_mb, jobs, target_seconds, within_target).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TARGET_SECONDS = 2.0

# Runs a command and prints its wall time and peak RSS (a fresh process, so the RSS is this command's).
TIMER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
done = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True, text=True)
seconds = time.perf_counter() - t0
if done.returncode != 0:
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    sys.exit(done.returncode)
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", TIMER, str(cwd), *cmd], capture_output=True, text=True,
                         check=False, env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...\n{out.stderr[-4000:]}")
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def plan_jobs(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(rule, inputs, outputs) of every job in a `snakemake -n` listing."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\n]*\]\n)|\n\n", text):
        match = re.search(r"^(?:local)?rule (\w+):", block, flags=re.MULTILINE)
        if not match:
            continue
        fields = {key: [p for p in value.split(", ") if p]
                  for key, value in re.findall(r"^\s+(input|output): (.*)$", block, flags=re.MULTILINE)}
        jobs.append((match.group(1), fields.get("input", []), fields.get("output", [])))
    return jobs


def bare_snakefile(jobs: list[tuple[str, list[str], list[str]]]) -> str:
    """One plain rule per job (the target rule first), same files, no helpers."""
    jobs = sorted(jobs, key=lambda job: job[0] != "all")
    lines = []
    for i, (rule, inputs, outputs) in enumerate(jobs):
        lines += [f"rule {rule}_{i}:", f"    input: {inputs!r}"]
        if outputs:
            lines += [f"    output: {outputs!r}", '    shell: "true"']
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose workflow is measured")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    from brainfoundry.demo import write_demo_dataset

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        work = Path(tmp)
        write_demo_dataset(work / "demo_data", n_subjects=args.subjects, n_volumes=12, two_run_subjects=1)
        config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
        configfile = work / "config.yaml"
        configfile.write_text(yaml.safe_dump(config))
        ours = [SNAKEMAKE, "-n", "--snakefile", str(repo / "Snakefile"), "--directory", str(work),
                "--configfile", str(configfile), "--cores", "2"]
        listing = subprocess.run(ours, capture_output=True, text=True, cwd=work, check=False)
        if listing.returncode != 0:
            raise SystemExit(listing.stderr[-4000:])
        jobs = plan_jobs(listing.stdout + listing.stderr)
        if not jobs:
            raise SystemExit("no jobs found in the dry-run listing")
        bare_file = work / "Snakefile.bare"
        bare_file.write_text(bare_snakefile(jobs))
        bare = [SNAKEMAKE, "-n", "--snakefile", str(bare_file), "--directory", str(work), "--cores", "2"]
        floor = [SNAKEMAKE, "--version"]
        samples: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": [], "floor": []}
        for _ in range(args.repeats):
            samples["ours"].append(timed(ours, work))
            samples["bare"].append(timed(bare, work))
            samples["floor"].append(timed(floor, work))

    def median(name: str, index: int) -> float:
        return statistics.median(sample[index] for sample in samples[name])

    result = {
        "startup_seconds": round(median("ours", 0), 3),
        "bare_seconds": round(median("bare", 0), 3),
        "floor_seconds": round(median("floor", 0), 3),
        "ratio_vs_bare": round(median("ours", 0) / median("bare", 0), 3),
        "peak_rss_mb": round(median("ours", 1), 1),
        "bare_peak_rss_mb": round(median("bare", 1), 1),
        "jobs": len(jobs),
        "repeats": args.repeats,
        "target_seconds": TARGET_SECONDS,
        "within_target": median("ours", 0) <= TARGET_SECONDS,
    }
    print(f"{'command':<34} {'median s':>9} {'peak RSS MB':>12}")
    for name, label in (("ours", "snakemake -n (demo workflow)"), ("bare", f"bare Snakemake, same {len(jobs)} jobs"),
                        ("floor", "snakemake --version")):
        print(f"{label:<34} {median(name, 0):>9.2f} {median(name, 1):>12.0f}")
    print(f"ratio vs bare: {result['ratio_vs_bare']:.2f}   target <= {TARGET_SECONDS} s: {result['within_target']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
