"""Say, when a run starts, whether the Snakemake lock in its directory belongs to a run that is alive.

Snakemake's own message ("Directory cannot be locked ... If you are sure that no other instances of
snakemake are running ...") leaves the user to find out, and ``--unlock`` under a live run lets two runs
write the same files. The Snakefile calls :func:`explain_lock` in the main process before Snakemake
takes its lock, so that what it prints is about someone else's. Linux ``/proc`` only (elsewhere it
says nothing); torch-free, like everything the Snakefile imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

LOCKS = Path(".snakemake") / "locks"


def _argv(pid: str) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]


def _is_snakemake(argv: list[str]) -> bool:
    # `snakemake ...`, `python .../bin/snakemake ...` (console script) or `python -m snakemake ...`
    return any(os.path.basename(a) == "snakemake" for a in argv[:2]) or argv[1:3] == ["-m", "snakemake"]


def _parent(pid: int) -> int:
    """The parent PID from ``/proc/<pid>/stat`` (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ancestors() -> set[int]:
    """This process and its parents: a job's own Snakemake is not "another run"."""
    chain, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        pid = _parent(pid)
    return chain


def live_runs(workdir: str | os.PathLike = ".") -> list[int]:
    """PIDs of Snakemake processes other than this one (and its parents) working in ``workdir``."""
    if not os.path.isdir("/proc"):
        return []
    here = os.path.realpath(workdir)
    mine = _ancestors()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) != here or not _is_snakemake(_argv(pid)):
                continue
        except OSError:  # gone meanwhile, or another user's
            continue
        found.append(int(pid))
    # A run's own children (a fork not yet exec'd still shows Snakemake's argv) are that run, not another.
    return sorted(pid for pid in found if _parent(pid) not in found)


def explain_lock(workdir: str | os.PathLike = ".", stream: TextIO | None = None) -> str | None:
    """If ``workdir`` holds Snakemake locks, print (to stderr) whose they are; return the message."""
    locks = Path(workdir) / LOCKS
    if not any(locks.glob("*.lock")):
        return None
    where = os.path.realpath(workdir)
    runs = live_runs(workdir)
    if runs:
        message = (f"brainfoundry: another Snakemake run is alive in {where} (pid {', '.join(map(str, runs))}) "
                   "and holds its lock: this run stops if it needs the same files. Wait for that run or stop "
                   "it; do not --unlock while it runs.")
    else:
        message = (f"brainfoundry: {locks} holds a lock, but no Snakemake process runs in {where}: a killed "
                   "run left it. `snakemake --unlock` (same --directory and --configfile) removes it.")
    print(message, file=stream or sys.stderr, flush=True)
    return message
