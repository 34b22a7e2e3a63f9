"""io.atomic_path: temp names that say whose they are, and leftovers of killed writers removed on the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from brainfoundry import io
from brainfoundry.io import STALE_AFTER_S, atomic_path, remove_stale_temps

# A writer in its own process, as a shard job is: opens the temp, writes, then is killed or waits.
WRITER = """
import os, signal, sys, time
from pathlib import Path
from brainfoundry.io import atomic_path
final, mode = Path(sys.argv[1]), sys.argv[2]
with atomic_path(final) as tmp:
    tmp.write_bytes(b"partial")
    (final.parent / "ready").write_text(tmp.name)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while not (final.parent / "go").exists():
        time.sleep(0.05)
    tmp.write_bytes(b"done by the live writer")
"""


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _writer(final: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(final), mode], env=env)


def _wait_for(path: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_temp_name_carries_pid_and_host(tmp_path):
    with atomic_path(tmp_path / "out.parquet") as tmp:
        assert tmp.name.startswith(f".out.parquet.{os.getpid()}@{io._HOST}.") and tmp.name.endswith(".tmp.parquet")
        tmp.write_text("x")
    assert (tmp_path / "out.parquet").read_text() == "x" and _hidden(tmp_path) == []


def test_killed_writer_leftover_is_removed_when_the_job_runs_again(tmp_path):
    final = tmp_path / "shard-0000.parquet"
    proc = _writer(final, "kill")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    leftover = (tmp_path / "ready").read_text()
    assert _hidden(tmp_path) == [leftover] and not final.exists()
    with atomic_path(final) as tmp:  # the job again
        tmp.write_text("complete")
    assert final.read_text() == "complete"
    assert _hidden(tmp_path) == []


def test_live_writer_temp_is_kept(tmp_path):
    final = tmp_path / "manifest.parquet"
    proc = _writer(final, "wait")
    try:
        _wait_for(tmp_path / "ready")
        live = (tmp_path / "ready").read_text()
        assert remove_stale_temps(final) == []
        with atomic_path(final) as tmp:  # a concurrent writer of the same file on this host
            tmp.write_text("ours")
        assert live in _hidden(tmp_path)
    finally:
        (tmp_path / "go").write_text("")
        assert proc.wait(timeout=120) == 0
    assert final.read_text() == "done by the live writer" and _hidden(tmp_path) == []


def test_which_leftovers_count_as_stale(tmp_path):
    final = tmp_path / "model.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - STALE_AFTER_S - 60

    def leftover(name: str, mtime: float | None = None) -> Path:
        path = tmp_path / name
        path.write_text("x")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    gone = [leftover(f".model.pt.{dead.pid}@{io._HOST}.abcd1234.tmp.pt"),  # dead writer on this host
            leftover(".model.pt.77@node17.abcd1234.tmp.pt", old),  # another node, untouched for a day
            leftover(".model.pt.k2j_9x0q.tmp.pt", old)]  # a temp named before PIDs were recorded
    kept = [leftover(f".model.pt.{os.getpid()}@{io._HOST}.abcd1234.tmp.pt", old),  # alive (even if old)
            leftover(".model.pt.77@node17.abcd1234.tmp.pt".replace("abcd", "efgh")),  # another node, recent
            leftover(".model.pt.k2j_9x0r.tmp.pt"),  # unmarked, recent
            leftover(f".model.pt.bak.{dead.pid}@{io._HOST}.abcd1234.tmp.pt", old),  # another file's temp
            leftover(".model.pt.notes", old),  # not a temp at all
            leftover("model.pt")]
    assert sorted(remove_stale_temps(final)) == sorted(gone)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in gone)
    assert remove_stale_temps(tmp_path / "absent" / "x.json") == []
