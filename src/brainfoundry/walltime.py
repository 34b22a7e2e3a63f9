"""Wall time by workflow step, from the TSV files of Snakemake's ``benchmark:`` directive.

Every rule writes ``<results>/benchmarks/<step>/<job>.tsv`` (one row: seconds, max_rss, cpu_time, ...).
``brainfoundry walltime <results>/benchmarks`` sums them per step: how many jobs, their summed and
longest wall time, CPU time and the largest resident memory, so a run's cost can be reported step by
step (jobs that ran in parallel add up: the sum is compute time, not elapsed time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from brainfoundry.errors import InputError
from brainfoundry.io import atomic_path

COLUMNS = ["step", "jobs", "total_s", "max_s", "cpu_s", "max_rss_mb"]


def _number(row: pd.Series, key: str) -> float:
    """A benchmark value, NaN where Snakemake wrote '-' (not measurable on this platform) or left it out."""
    value = pd.to_numeric(pd.Series([row.get(key, None)]), errors="coerce").iloc[0]
    return float(value)


def read_benchmarks(root: str | Path) -> pd.DataFrame:
    """One row per job: its step (first folder under ``root``), job name and benchmark values."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such benchmark folder (run the workflow first)")
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        try:
            table = pd.read_csv(path, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise InputError(path, f"not a Snakemake benchmark table ({err})") from err
        if "s" not in table.columns:
            raise InputError(path, f"not a Snakemake benchmark table (columns {list(table.columns)})")
        last = table.iloc[-1]  # `repeat(...)` writes several rows; the last is the latest
        rel = path.relative_to(root)
        rows.append({
            "step": rel.parts[0] if len(rel.parts) > 1 else rel.stem,
            "job": str(rel.with_suffix("")),
            "seconds": float(last["s"]),
            "cpu_s": _number(last, "cpu_time"),
            "max_rss_mb": _number(last, "max_rss"),
        })
    return pd.DataFrame(rows, columns=["step", "job", "seconds", "cpu_s", "max_rss_mb"])


def summarize(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per-step totals, slowest step first, with a final 'all' row."""
    if jobs.empty:
        return pd.DataFrame(columns=COLUMNS)
    by_step = jobs.groupby("step").agg(jobs=("job", "size"), total_s=("seconds", "sum"), max_s=("seconds", "max"),
                                       cpu_s=("cpu_s", "sum"), max_rss_mb=("max_rss_mb", "max"))
    by_step = by_step.sort_values("total_s", ascending=False).reset_index()
    total = pd.DataFrame([{"step": "all", "jobs": int(by_step["jobs"].sum()), "total_s": by_step["total_s"].sum(),
                           "max_s": by_step["max_s"].max(), "cpu_s": by_step["cpu_s"].sum(),
                           "max_rss_mb": by_step["max_rss_mb"].max()}])
    return pd.concat([by_step, total], ignore_index=True)[COLUMNS]


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry walltime", description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", help="the workflow's benchmark folder, e.g. results/abide/benchmarks")
    parser.add_argument("--out", help="also write the summary here (TSV)")
    args = parser.parse_args(argv)
    summary = summarize(read_benchmarks(args.benchmarks))
    text = summary.to_string(index=False, float_format=lambda v: f"{v:.1f}")
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            summary.to_csv(tmp, sep="\t", index=False, float_format="%.2f")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
