"""Stable subject -> bucket and subject -> split assignment.

Both depend only on the subject id (plus seed and ratios), never on which other subjects exist, so
adding a subject rewrites one shard bucket and leaves every other subject's split unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

SPLITS = ("train", "val", "test")


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) from a stable hash of the parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def bucket_of(subject: str, n_buckets: int) -> int:
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    digest = hashlib.sha256(f"bucket\x1f{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_buckets


def split_of(subject: str, seed: int, ratios: Mapping[str, float], site: str | None = None,
             holdout_sites: Iterable[str] = ()) -> str:
    """train/val/test for one subject. Subjects of a held-out site always go to test."""
    if site is not None and str(site) in {str(s) for s in holdout_sites}:
        return "test"
    total = sum(float(ratios[name]) for name in SPLITS)
    if total <= 0:
        raise ValueError(f"split ratios must sum to a positive number, got {dict(ratios)}")
    u = unit_hash("split", seed, subject)
    edge = 0.0
    for name in SPLITS:
        edge += float(ratios[name]) / total
        if u < edge:
            return name
    return SPLITS[-1]
