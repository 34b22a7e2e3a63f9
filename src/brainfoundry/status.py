"""``brainfoundry status``: per subject and step, done / failed / pending / out of date. Nothing runs.

Everything comes from Snakemake's own records, read through Snakemake itself:

- the DAG and, per output file, what ``snakemake --summary`` reports (exists or not, and whether the job
  would run again and why: updated input files, params or code changed, ...), computed by Snakemake's
  ``DAGApi.summary`` from ``.snakemake/metadata``;
- interrupted jobs from Snakemake's incomplete markers (``.snakemake/incomplete``, with the Slurm job id
  the executor recorded there);
- failed jobs from the "Error in rule/group" blocks of Snakemake's run logs (``.snakemake/log``): their
  log files (the rule's own under ``results/logs`` and the Slurm job log under
  ``.snakemake/slurm_logs``) and, on Slurm, the job id from the executor's message.

A job is *done* when its outputs exist and Snakemake would not re-run it, *out of date* when they exist
but it would, *failed* when its outputs are missing and its last attempt failed (or was interrupted),
*pending* otherwise. Per subject and step the worst state of its jobs (runs) is shown.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from brainfoundry.errors import ConfigError, InputError

# Worst first: a subject's step shows the worst state of its jobs.
STATES = ("failed", "out of date", "pending", "done")
# Rules that only collect targets (no outputs of their own).
SKIP_RULES = {"all"}
SLURM_JOB = re.compile(r"SLURM-job '(\d+)'")
SLURM_SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
SLURM_LOG = re.compile(r"(\S*\.snakemake/slurm_logs/\S+?/(\d+)\.log)")
ERROR_HEAD = re.compile(r"^(\s*)Error in (rule|group) (\S+?):?\s*$")
ITEM = re.compile(r"^(\s+)(message|jobid|output|log|external_jobid): (.*)$")


@dataclass
class JobStatus:
    rule: str
    subject: str | None
    wildcards: dict[str, str]
    state: str
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    slurm_job_id: str | None = None
    log_tail: list[str] = field(default_factory=list)


@dataclass
class Failure:
    """One failed attempt as Snakemake logged it."""

    rule: str
    outputs: list[str]
    logs: list[str]
    message: str = ""
    slurm_job_id: str | None = None
    run_log: str = ""


# -- Snakemake's run logs ------------------------------------------------------------------------------
def _paths(value: str) -> list[str]:
    return [p for p in re.split(r",\s*", value.replace("(check log file(s) for error details)", "").strip()) if p]


def parse_run_log(text: str, run_log: str = "") -> list[Failure]:
    """The failed jobs of one Snakemake run log (``.snakemake/log/*.snakemake.log``), in order.

    A job's "Error in rule" block has its outputs and logs; a Slurm job's block (or, for a group job,
    the group's block just before its rules' indented blocks) has the executor's message with the
    Slurm job id and the Slurm log.
    """
    submitted = dict(SLURM_SUBMITTED.findall(text))  # snakemake jobid -> Slurm job id
    failures: list[Failure] = []
    context: dict[str, str] = {}  # message/log outside a rule block: a group job's
    current: dict[str, str] | None = None

    def close() -> None:
        if current is None or "output" not in current:
            return
        message = current.get("message") or context.get("message", "")
        message = "" if message == "None" else message
        logs = list(dict.fromkeys(_paths(current.get("log", "")) + _paths(context.get("log", ""))))
        slurm = SLURM_JOB.search(message)
        slurm_id = slurm.group(1) if slurm else current.get("external_jobid") or submitted.get(current.get("jobid", ""))
        if slurm_id is None:
            found = [m.group(2) for p in logs for m in [SLURM_LOG.search(p)] if m]
            slurm_id = found[0] if found else None
        failures.append(Failure(current["rule"], _paths(current["output"]), logs, message, slurm_id, run_log))

    for line in text.splitlines():
        head = ERROR_HEAD.match(line)
        if head:
            close()
            current = {"rule": head.group(3)} if head.group(2) == "rule" else None
            if not head.group(1):
                context = {}
            continue
        if line and not line[0].isspace():  # a timestamp or another message ends the block
            close()
            current, context = None, {}
            continue
        item = ITEM.match(line)
        if item:
            indent, key, value = item.groups()
            if current is not None:
                current.setdefault(key, value)
            elif len(indent) <= 4:  # a group job's own message and log, not its job listing
                context.setdefault(key, value)
    close()
    return failures


def run_log_failures(workdir: Path) -> dict[str, Failure]:
    """Output path -> the latest logged failure of the job that makes it, over every run log."""
    latest: dict[str, Failure] = {}
    log_dir = workdir / ".snakemake" / "log"
    for path in sorted(log_dir.glob("*.snakemake.log")) if log_dir.is_dir() else []:
        for failure in parse_run_log(path.read_text(errors="replace"), str(path)):
            for output in failure.outputs:
                latest[output] = failure
    return latest


def tail(path: Path, lines: int) -> list[str]:
    if lines <= 0 or not path.is_file():
        return []
    with open(path, errors="replace") as handle:
        return [line.rstrip("\n") for line in handle.readlines()[-lines:]]


# -- Snakemake's DAG and summary -----------------------------------------------------------------------
def _subject_of(wildcards: dict[str, str]) -> str | None:
    if wildcards.get("subject"):
        return str(wildcards["subject"])
    match = re.match(r"sub-([A-Za-z0-9]+)", str(wildcards.get("run_id", "")))
    return match.group(1) if match else None


@contextlib.contextmanager
def _snakemake_dag(snakefile: Path, workdir: Path, configfiles: list[Path], targets: list[str]):
    """Build the DAG as ``snakemake --summary`` does; yield (workflow, summary rows by output path)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    out = io.StringIO()
    err = io.StringIO()
    api = SnakemakeApi(OutputSettings(quiet={Quietness.ALL}, enable_file_logging=False))
    with api, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            workflow_api = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(configfiles=configfiles),
                snakefile=snakefile,
                workdir=workdir,
            )
            dag_api = workflow_api.dag(dag_settings=DAGSettings(targets=set(targets)))
            dag_api.summary(detailed=False)
        except Exception as exc:  # Snakemake's own errors (schema validation, missing input, ...)
            message = str(exc).strip().splitlines()
            raise ConfigError("--configfile", f"Snakemake could not build the workflow: {message[-1] if message else type(exc).__name__}") from exc
        rows: dict[str, dict[str, str]] = {}
        lines = out.getvalue().splitlines()
        header = next((i for i, line in enumerate(lines) if line.startswith("output_file\t")), None)
        if header is None:
            raise InputError(snakefile, "Snakemake printed no summary table")
        columns = lines[header].split("\t")
        for line in lines[header + 1:]:
            values = line.split("\t")
            if len(values) == len(columns):
                rows[values[0]] = dict(zip(columns, values))
        # Inside the API's context: its event loop answers the persistence queries below.
        yield workflow_api._workflow, rows


def job_statuses(snakefile: Path, workdir: Path, configfiles: list[Path], targets: Iterable[str] = (),
                 log_lines: int = 20) -> list[JobStatus]:
    """The status of every job of the workflow's DAG (``targets`` or the default target)."""
    workdir = workdir.resolve()
    with _snakemake_dag(snakefile.resolve(), workdir, [p.resolve() for p in configfiles], list(targets)) as (workflow, rows):
        return _statuses(workflow, rows, workdir, log_lines)


def _statuses(workflow, rows: dict[str, dict[str, str]], workdir: Path, log_lines: int) -> list[JobStatus]:
    _check_results_belong(workflow, workdir)
    failures = run_log_failures(workdir)
    persistence = workflow.persistence
    statuses = []
    for job in workflow.dag.jobs:
        if job.rule.name in SKIP_RULES or not job.output:
            continue
        outputs = [str(f) for f in job.output]
        summary = [rows.get(f, {}) for f in outputs]
        exists = [(workdir / f).exists() for f in outputs]
        would_run = any(row.get("plan") == "update pending" for row in summary)
        wildcards = {k: str(v) for k, v in dict(job.wildcards).items()}
        logs = [str(f) for f in job.log]
        status = JobStatus(job.rule.name, _subject_of(wildcards), wildcards, "pending", outputs=outputs, logs=logs)
        incomplete = workflow.async_run(persistence.incomplete(job))
        failure = next((failures[f] for f in outputs if f in failures), None)
        if incomplete:
            ids = persistence.external_jobids(job)
            status.state, status.reason = "failed", "interrupted (Snakemake's incomplete marker; run again with --rerun-incomplete)"
            status.slurm_job_id = ids[0] if ids else None
        elif all(exists) and not would_run:
            status.state = "done"
        elif any(exists) and all(exists):
            status.state = "out of date"
            reasons = sorted({row.get("status", "") for row in summary} - {"ok", ""})
            status.reason = ", ".join(reasons) if reasons else "an input will be re-made first"
        elif failure is not None:
            status.state = "failed"
            status.reason = failure.message or f"failed (see {failure.run_log})"
            status.slurm_job_id = failure.slurm_job_id
            status.logs = list(dict.fromkeys(logs + failure.logs))
        elif any(exists):
            status.state = "out of date"
            status.reason = "outputs missing: " + ", ".join(f for f, e in zip(outputs, exists) if not e)
        if status.state == "failed":
            status.log_tail = _log_tail(workdir, status.logs, log_lines)
        statuses.append(status)
    return statuses


def _log_tail(workdir: Path, logs: list[str], lines: int) -> list[str]:
    """The last lines of the first non-empty log (the rule's own log first, then the Slurm job's)."""
    for log in logs:
        path = Path(log) if Path(log).is_absolute() else workdir / log
        text = tail(path, lines)
        if any(line.strip() for line in text):
            return text
    return []


def _check_results_belong(workflow, workdir: Path) -> None:
    """A results folder written for another configuration is an error naming the key that differs."""
    config = workflow.config
    results = str(config.get("results_dir", "results")).rstrip("/")
    recorded = _recorded_outputs(workdir, results)
    if not recorded:
        return
    ours = {str(f) for job in workflow.dag.jobs for f in job.output}
    if any(path in ours for path in recorded):
        return
    # Nothing Snakemake recorded under results_dir is an output of this configuration's DAG.
    for key, pattern, ours_value in (("atlas.name", r"_seg-([A-Za-z0-9]+)", config.get("atlas", {}).get("name")),
                                     ("space", r"_space-([A-Za-z0-9]+(?:_res-[0-9]+)?)", config.get("space"))):
        seen = sorted({m.group(1) for p in recorded for m in [re.search(pattern, p)] if m})
        if seen and ours_value not in seen:
            raise ConfigError(key, f"{workdir / results} holds results for {key} {', '.join(seen)}, "
                                   f"not '{ours_value}': it was written with another configuration")
    raise InputError(workdir / results, "none of its recorded outputs belong to this configuration's workflow "
                                        "(written with another configuration: check results_dir and the input paths)")


def _recorded_outputs(workdir: Path, results: str) -> list[str]:
    """Existing files under ``results`` that Snakemake's metadata records as made by a finished job."""
    metadata = workdir / ".snakemake" / "metadata"
    if not metadata.is_dir():
        return []
    found = []
    for entry in metadata.iterdir():
        try:
            path = base64.urlsafe_b64decode(entry.name + "=" * (-len(entry.name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            continue
        if path.startswith(results + "/") and (workdir / path).exists():
            found.append(path)
    return found


# -- per subject and step ------------------------------------------------------------------------------
def by_subject_and_step(statuses: list[JobStatus]) -> list[dict[str, Any]]:
    """One row per (subject, step): the worst state, counts per state, the failed jobs' details."""
    groups: dict[tuple[str, str], list[JobStatus]] = {}
    order: list[tuple[str, str]] = []
    for status in statuses:
        key = (status.subject or "", status.rule if status.subject else _step_label(status))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(status)
    rows = []
    for subject, step in sorted(order, key=lambda k: (k[0] == "", k[0], k[1])):
        jobs = groups[(subject, step)]
        counts = {state: sum(j.state == state for j in jobs) for state in STATES}
        state = next(s for s in STATES if counts[s])
        rows.append({"subject": subject or None, "step": step, "state": state,
                     "counts": {s: n for s, n in counts.items() if n},
                     "jobs": [asdict(j) for j in jobs if j.state != "done"]})
    return rows


def _step_label(status: JobStatus) -> str:
    if not status.wildcards:
        return status.rule
    return f"{status.rule} ({', '.join(f'{k}={v}' for k, v in sorted(status.wildcards.items()))})"


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len(r["step"]) for r in rows] + [4])
    lines = [f"{'subject':<10} {'step':<{width}}  state        jobs"]
    for row in rows:
        counts = ", ".join(f"{n} {s}" for s, n in row["counts"].items())
        lines.append(f"{row['subject'] or '-':<10} {row['step']:<{width}}  {row['state']:<12} {counts}")
    for row in rows:
        for job in row["jobs"]:
            if job["state"] != "failed":
                continue
            where = ", ".join(f"{k}={v}" for k, v in job["wildcards"].items())
            slurm = f", Slurm job {job['slurm_job_id']}" if job["slurm_job_id"] else ""
            lines += ["", f"FAILED {job['rule']} ({where}{slurm}): {job['reason']}"]
            lines += [f"  log: {log}" for log in job["logs"]]
            lines += [f"  | {line}" for line in job["log_tail"]]
    return "\n".join(lines)


def default_snakefile() -> Path:
    """The Snakefile of this checkout (src/brainfoundry/ -> repository root), else ./Snakefile."""
    repo = Path(__file__).resolve().parents[2] / "Snakefile"
    return repo if repo.is_file() else Path("Snakefile")


def cli_main(argv: list[str]) -> int:
    """``brainfoundry status --configfile CONFIG [--directory DIR] [--json]``"""
    parser = argparse.ArgumentParser(prog="brainfoundry status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", action="append", required=True, type=Path,
                        help="the workflow's config file(s), as given to snakemake")
    parser.add_argument("--directory", "-d", type=Path, default=Path("."),
                        help="the working directory of the run (holds results/ and .snakemake/)")
    parser.add_argument("--snakefile", "-s", type=Path, default=None, help="default: this checkout's Snakefile")
    parser.add_argument("--log-lines", type=int, default=20, help="lines of each failed job's log to show")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("targets", nargs="*", help="targets (default: the workflow's default target)")
    args = parser.parse_args(argv)
    for path in args.configfile:
        if not path.is_file():
            raise InputError(path, "config file not found")
    if not args.directory.is_dir():
        raise InputError(args.directory, "working directory not found")
    snakefile = args.snakefile or default_snakefile()
    if not snakefile.is_file():
        raise InputError(snakefile, "Snakefile not found (give --snakefile)")
    statuses = job_statuses(snakefile, args.directory, args.configfile, args.targets, args.log_lines)
    rows = by_subject_and_step(statuses)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 1 if any(r["state"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
