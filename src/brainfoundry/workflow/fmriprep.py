"""Helpers of ``workflow/rules/fmriprep.smk``: one fMRIPrep job per subject, on ``{subject}``.

The rule's one output is the subject's report (:func:`brainfoundry.fmriprep.subject_report`), which
fMRIPrep always writes; the derivatives files of each run come from the run table, and the per-run
rules take the report as their input (:func:`brainfoundry.workflow.parcellate.run_inputs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brainfoundry import fmriprep as _fmriprep


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fmriprep`` section over the defaults (a timeseries-only config has no such section)."""
    return {**_fmriprep.DEFAULTS, **(config.get("fmriprep") or {})}


def image(config: Mapping[str, Any]) -> str | None:
    """The upstream image for ``container:`` (apptainer runner); the docker runner brings its own."""
    section = settings(config)
    return section.get("image") if section["runner"] == "apptainer" else None


def report_pattern(config: Mapping[str, Any]) -> str:
    """The rule's output, with the ``{subject}`` wildcard."""
    return _fmriprep.subject_report(config["derivatives_dir"], "{subject}")


def raw_inputs(runs) -> dict[str, list[str]]:
    """Subject -> the raw BOLD files of its runs (the run table's ``raw_bold``), built once: a lookup
    per subject's job, not a scan of the whole table (which grows as subjects x runs at DAG build)."""
    by_subject: dict[str, list[str]] = {}
    for subject, path in zip(runs["subject"], runs["raw_bold"]):
        by_subject.setdefault(subject, []).append(str(path))
    return by_subject


def shell_param(config: Mapping[str, Any]):
    """A ``params`` function: the job's shell line for its subject, threads and memory.

    Threads and ``mem_mb`` are the job's own, so ``--set-threads fmriprep=N`` and ``--set-resources
    fmriprep:mem_mb=M`` (the Slurm profile) reach fMRIPrep's ``--nthreads`` and ``--mem-mb``.
    """

    def shell_line(wildcards, threads, resources):
        return _fmriprep.build_shell_command(dict(config), wildcards.subject, threads, resources.mem_mb)

    return shell_line
