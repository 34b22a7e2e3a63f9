"""Helpers of ``workflow/rules/parcellate.smk``: per-run inputs and arguments, QC figure paths."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from brainfoundry.fmriprep import subject_report


def raw_timeseries_path(timeseries_path: str) -> str:
    """The uncleaned parcel means beside a ``..._stat-mean_timeseries.parquet`` (for QC figures)."""
    return timeseries_path.replace("_stat-mean_timeseries.parquet", "_desc-raw_stat-mean_timeseries.parquet")


def run_files(row: Mapping[str, Any]) -> dict[str, str]:
    """A run's fMRIPrep files from its run-table row (the mask only when the row has one)."""
    files = {"bold": str(row["bold"]), "confounds": str(row["confounds"])}
    mask = row.get("mask")
    if isinstance(mask, str) and mask:
        files["mask"] = mask
    return files


def run_inputs(row: Mapping[str, Any], config: Mapping[str, Any], keys=("bold", "confounds", "mask")) -> dict[str, str]:
    """What a per-run rule waits for: the subject's fMRIPrep report when the workflow runs fMRIPrep
    (raw entry point; the files themselves are only known to exist once it has run), else the files.

    The rule passes the paths themselves as params (:func:`run_files`), the same in both cases.
    """
    if config["entry_point"] == "raw":
        return {"fmriprep": subject_report(config["derivatives_dir"], row["subject"])}
    return {key: path for key, path in run_files(row).items() if key in keys}


def mask_arg(row: Mapping[str, Any]) -> str:
    """``--mask PATH`` when the run has a brain mask."""
    mask = run_files(row).get("mask")
    return f"--mask {shlex.quote(mask)}" if mask else ""


def qc_figure_patterns(layout) -> dict[str, str]:
    """Per-run QC figure patterns (wildcards {subject}, {run_id})."""
    return {"fd": f"{layout.qc_dir}_desc-framewisedisplacement_qc.png",
            "carpet": f"{layout.qc_dir}_desc-carpet_qc.png",
            "fc": f"{layout.qc_dir}_desc-connectivity_qc.png"}


def qc_figure_targets(layout, runs, entry: str, config: dict) -> list[str]:
    """Every run's QC figures, when the entry point parcellates BOLD here and ``qc.figures`` is on."""
    if entry == "timeseries" or not config.get("qc", {}).get("figures", True):
        return []
    # zip, not iterrows (a Series per row, ~0.5 s per 1,000 runs at every DAG build: bench_dag.py).
    runs_subjects = list(zip(runs.index, runs["subject"]))
    return [pattern.format(subject=subject, run_id=run_id)
            for pattern in qc_figure_patterns(layout).values() for run_id, subject in runs_subjects]
