"""Stable subject -> bucket and subject -> split assignment.

Both depend only on the subject id (plus seed and ratios), never on which other subjects exist, so
adding a subject rewrites one shard bucket and leaves every other subject's split unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

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


def assign_splits(subjects: Iterable[str], seed: int, ratios: Mapping[str, float],
                  sites: Mapping[str, str | None] | None = None, holdout_sites: Iterable[str] = (),
                  fill_empty: bool = False) -> dict[str, str]:
    """train/val/test for every subject: :func:`split_of`, and with ``fill_empty`` no empty split.

    ``fill_empty`` (``shards.fill_empty_splits``): with 3 or more subjects (and a positive ratio for
    the split), a split that the hash left empty gets the one train subject whose hash lies nearest
    that split's share of [0, 1), while train keeps at least one subject. With 7 subjects and 70/15/15
    the hash leaves the test split empty for about a third of seeds; this makes it one subject instead of
    an evaluation on nothing. The price: while a split is filled this way, adding a subject can move
    that one subject back (its shard bucket is rewritten too), so it is off by default and on in the
    templates (large datasets never trigger it: their splits stay independent of other subjects).
    """
    sites = dict(sites or {})
    holdout = {str(s) for s in holdout_sites}
    unique = sorted({str(s) for s in subjects})
    out = {s: split_of(s, seed, ratios, sites.get(s), holdout) for s in unique}
    if not fill_empty or len(unique) < 3:
        return out
    total = sum(float(ratios[name]) for name in SPLITS)
    edges, edge = {}, 0.0
    for name in SPLITS:
        edges[name] = (edge, edge + float(ratios[name]) / total)
        edge = edges[name][1]
    for name in ("test", "val"):
        lo, hi = edges[name]
        if hi <= lo or name in out.values():
            continue
        movable = [s for s, split in out.items() if split == "train"
                   and not (sites.get(s) is not None and str(sites.get(s)) in holdout)]
        if len(movable) < 2:
            break
        centre = (lo + hi) / 2
        out[min(movable, key=lambda s: (abs(unit_hash("split", seed, s) - centre), s))] = name
    return out
