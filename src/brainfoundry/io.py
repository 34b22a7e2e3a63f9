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
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


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


# -- parquet with checksums -------------------------------------------------------------------------
# Every parquet written here carries a CRC32 per page, and every read here verifies it: a flipped bit
# becomes a named error instead of a changed value. The whole-file sha256 (recorded in a sidecar or
# the manifest by whoever owns the file) also catches what page checksums do not cover (footer,
# page headers, a truncated or swapped file).
PARQUET_WRITE_OPTIONS = {"write_page_checksum": True}
PARQUET_READ_OPTIONS = {"page_checksum_verification": True}


def checksum_mismatch(path: str | os.PathLike, actual: str, expected: str, recorded_in: str | os.PathLike):
    """The ``InputError`` for a file whose sha256 differs from the one recorded when it was written."""
    from brainfoundry.errors import InputError

    return InputError(path, f"checksum mismatch: sha256 {actual[:16]}... differs from {expected[:16]}... recorded in "
                            f"{os.fspath(recorded_in)}; the file is corrupt or was changed after it was written "
                            "(delete it and rerun the step that writes it)")


def verify_sha256(path: str | os.PathLike, expected: str, recorded_in: str | os.PathLike) -> None:
    """Raise a named ``InputError`` unless ``path``'s sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise checksum_mismatch(path, actual, expected, recorded_in)


def parquet_error(path: str | os.PathLike, what: str, err: BaseException):
    """A pyarrow read failure as a one-line ``InputError`` (page checksum failures say so)."""
    from brainfoundry.errors import InputError

    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "checksum" in text.lower() or "crc" in text.lower():
        return InputError(path, f"corrupt {what}: parquet page checksum mismatch ({text})")
    return InputError(path, f"cannot read the {what} ({text})")


def write_parquet_atomic(table: Any, path: str | os.PathLike, **options: Any) -> str:
    """Write a pyarrow table atomically with page checksums; return the written file's sha256."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_WRITE_OPTIONS, **options)
        digest = sha256_file(tmp)  # the bytes that will sit under the final name
    return digest


def read_parquet_verified(path: str | os.PathLike, what: str, *, sha256: str | None = None,
                          recorded_in: str | os.PathLike | None = None, columns: Sequence[str] | None = None):
    """Read a (small) parquet file whole, checking its sha256 when one is recorded and its page checksums.

    The bytes are read once: the hash and the parse see the same bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brainfoundry.errors import InputError

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise InputError(path, f"{what} not found") from err
    except OSError as err:
        raise InputError(path, f"cannot read the {what} ({err})") from err
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise checksum_mismatch(path, actual, sha256, recorded_in or "its sidecar")
    try:
        # ParquetFile, not read_table: one file needs no dataset layer (pyarrow.dataset imports pandas,
        # ~0.5 s of every pfc job's start-up; benchmarks/bench_job_startup.py).
        return pq.ParquetFile(pa.BufferReader(data), **PARQUET_READ_OPTIONS).read(columns=columns)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise parquet_error(path, what, err) from err
