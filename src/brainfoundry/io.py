"""Atomic writes, checksums and provenance sidecars shared by every step.

Every output is written to a temporary name in the same directory and renamed into place, so a
killed job never leaves a half-written file under the final name (Snakemake then redoes it). The
temporary name carries the writer's PID and host, so that when the job runs again the leftovers of a
killed writer are removed (:func:`remove_stale_temps`) and a live writer's are not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

log = logging.getLogger(__name__)

# Temp names: .<final name>.<pid>@<host>.<8 random chars>.tmp<suffixes> (older ones lack <pid>@<host>.).
# <host> is the host name plus the PID namespace (containers on one host number their PIDs apart), so a
# PID is only ever checked where it means the same process.


def _host_token() -> str:
    try:
        namespace = f"-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS)
        namespace = ""
    return (re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host") + namespace


_HOST = _host_token()
# A leftover whose writer cannot be checked (another host of a shared filesystem, an unmarked older name)
# counts as dead once untouched this long; every writer here writes within seconds of opening its temp.
STALE_AFTER_S = 24 * 3600


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed writers of ``path`` left beside it; returns the removed paths.

    A temp of this host is removed when its writer's PID is gone (a reused PID keeps it: the safe side);
    one of another host, or with an older name without PID, when untouched for ``STALE_AFTER_S``.
    :func:`atomic_path` calls this before it makes its own temp, so a job that runs again cleans up.
    """
    final = Path(path)
    pattern = re.compile(r"\." + re.escape(final.name) + r"\.(?:(\d+)@([A-Za-z0-9-]+)\.)?[a-z0-9_]{8}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid, host = match.group(1), match.group(2)
        try:
            if pid and host == _HOST:
                if _writer_alive(int(pid)):
                    continue
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # another job cleaned it first
            continue
        removed.append(Path(entry.path))
        log.info("removed %s, left by a killed writer of %s", entry.path, final)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Leftover temps of ``path`` from killed writers are removed first (:func:`remove_stale_temps`).

    ``suffix`` defaults to the final path's suffixes so libraries that pick a format by extension
    (nibabel, pyarrow) behave the same on the temporary name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes)
    remove_stale_temps(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}@{_HOST}.", suffix=f".tmp{suffix}",
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files; give the final file the usual umask-derived mode so that
        # containers running as another user (Apptainer on HPC) can read it.
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and paths appear in sidecars; make them plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(values: Mapping[str, Any]) -> str:
    """A short stable hash of the config values that shaped an output (order-independent)."""
    blob = json.dumps(values, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def software_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions of the libraries that shape numerical outputs (only those already importable)."""
    from importlib import metadata

    names = ["brainfoundry", "numpy", "scipy", "pandas", "pyarrow", "nibabel", "nilearn", "nipype", *extra]
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(inputs: Sequence[str | os.PathLike], config: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The provenance block every JSON sidecar carries: inputs with checksums, config, versions."""
    return {
        "GeneratedBy": [{"Name": "brainfoundry", "Version": software_versions().get("brainfoundry", "unknown")}],
        "Sources": [{"path": os.fspath(p), "sha256": sha256_file(p)} for p in inputs],
        "Config": dict(config),
        "ConfigHash": config_hash(config),
        "SoftwareVersions": software_versions(),
        "CreatedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
