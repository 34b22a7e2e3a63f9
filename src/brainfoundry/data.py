"""Streaming torch dataset over parquet shards: windows of parcel series, robustly scaled.

Work is split in units of (shard, row group). Each epoch the units are permuted (same permutation on
every rank), then dealt round-robin to the ``world_size x num_workers`` readers, so every run is read
exactly once per epoch (``partition="row_groups"``). With ``partition="samples"`` (the trainer's
default) every rank plans the one-process stream instead and keeps its slice of each global batch, so
a run on G ranks sees the batches of the one-process run whatever G is; each rank then decodes the row
groups its slices come from (with shuffling, about all of them). A reader decodes its row groups in
order (one sequential read per row group, never one per sample) and shuffles with a bounded buffer:
up to ``R`` decoded row groups are resident, each sample is drawn uniformly from their remaining rows,
and an exhausted row group is replaced by the next one (``R = ceil(buffer_size / rows per row group)``).

The yield order is planned from metadata alone (run ids, splits, lengths) before any series is
decoded; row groups are then decoded as the plan needs them. Crop offsets depend only on
``(seed, epoch, run_id)``. Both make the sample stream a pure function of (seed, epoch, rank,
worker), which is what exact resume needs: a resumed reader re-plans and drops the samples already
consumed (:class:`ShardLoader` counts them per worker).

A window is cropped and scaled straight from the decoded row group into its output tensor; with
``batch_size`` set (as :func:`make_dataloader` does) that output is a batch tensor allocated in
shared memory inside the DataLoader worker, so no per-sample copy and no collate copy is made.

Samples (or batches of them, with a leading batch dimension) are dicts:

- ``x`` float32 ``[window, N]``: ``(series - median) / iqr`` with the training-split statistics
- ``mask`` bool ``[window]``: True for real time points (False for padding)
- ``run_id``, ``subject``, ``split`` (str); ``start``, ``n_timepoints`` (int)
- ``age`` float32 (NaN if missing); ``sex``, ``diagnosis``, ``site`` int64 codes into
  :attr:`ShardDataset.vocab` (-1 if missing)
- ``zero_variance`` bool ``[N]`` (parcels constant in this run)
- ``pfc`` ``[K, E]`` in the stored dtype, when ``pfc=True``
- ``worker``: the reader's worker index, used by :class:`ShardLoader` for resume bookkeeping
- ``position`` (``partition="samples"`` on several ranks): each sample's index in the global batch
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.io import PARQUET_READ_OPTIONS, parquet_error
from brainfoundry.shards import (
    check_compatible, decode_binary, find_shards, open_shard, read_norm_stats, sha256_verified, shard_metadata,
    verify_shards)

PARTITIONS = ("samples", "row_groups")
INDEX_COLUMNS = ("run_id", "subject", "split", "n_timepoints", "n_parcels", "age", "sex", "diagnosis", "site")
CATEGORICAL = ("sex", "diagnosis", "site")
_MASK64 = (1 << 64) - 1


def _stable_u64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _mix(*values: int) -> int:
    """splitmix64 over several integers: a well-spread, platform-independent 64-bit hash."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """Windows of parcel time series streamed from many shards.

    Parameters
    ----------
    shards
        Shard files, or a directory holding ``bucket-<k>.parquet`` files.
    split
        ``"train"``, a list of splits, or None for every row.
    window
        Time points per sample (config ``shards.window``).
    short_runs
        ``"skip"``: runs shorter than ``window`` are left out and counted (:attr:`n_short_skipped`);
        ``"pad"``: zero-padded after scaling, with ``mask`` False on the padding.
    crop
        ``"random"`` (seeded by seed, epoch and run id), ``"center"`` or ``"start"``.
    shuffle, buffer_size
        Shuffle the row-group order, and the samples through a buffer of about ``buffer_size``
        decoded rows (whole row groups: ``ceil(buffer_size / rows per row group)`` of them).
    seed
        Base seed for unit order, buffer and crops; the epoch is mixed in (:meth:`set_epoch`).
    norm_stats
        ``norm_stats.parquet`` (default: beside the shards); ignored when ``scale=False``.
    pfc
        Also yield the stored pFC views ``[K, E]``.
    rank, world_size
        DDP position; default ``torch.distributed`` when initialised, else a single process.
    partition
        How ranks share an epoch: ``"row_groups"``, each rank reads its own share of the row groups
        (its batches depend on the number of ranks); ``"samples"``, each rank takes positions
        ``[rank * b, (rank + 1) * b)`` of every block of ``world_size * b`` samples of the one-process
        stream (``b = batch_size``, needed), so the global batches do not depend on the number of ranks.
        An epoch's last, short block is split as evenly as possible; it is dropped with ``drop_last``, and,
        when it has fewer samples than ranks, by a shuffled stream (so that every training rank takes every
        step); an unshuffled (evaluation) one leaves some ranks without a batch for it.
    batch_size, drop_last
        Yield batches of this many samples (per worker; the last one smaller unless ``drop_last``)
        instead of single samples. Use with ``DataLoader(batch_size=None)``; :class:`ShardLoader`
        sets both.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], *, split: str | Sequence[str] | None = "train",
                 window: int = 200, short_runs: str = "skip", crop: str = "random", shuffle: bool = True,
                 buffer_size: int = 256, seed: int = 0, norm_stats: str | Path | None = None, scale: bool = True,
                 pfc: bool = False, rank: int | None = None, world_size: int | None = None,
                 batch_size: int | None = None, drop_last: bool = False, partition: str = "row_groups"):
        super().__init__()
        if isinstance(shards, (str, Path)) and Path(shards).is_dir():
            paths = find_shards(shards)
            if not paths:
                raise InputError(shards, "no bucket-<k>.parquet shards in this directory")
        else:
            paths = [Path(shards)] if isinstance(shards, (str, Path)) else [Path(p) for p in shards]
        if not paths:
            raise InputError("shards", "no shards given")
        if short_runs not in ("skip", "pad"):
            raise ConfigError("shards.short_runs", f"must be 'skip' or 'pad', got {short_runs!r}")
        if crop not in ("random", "center", "start"):
            raise ValueError(f"crop must be random, center or start, got {crop!r}")
        if int(window) < 1:
            raise ConfigError("shards.window", f"must be >= 1, got {window}")
        if partition not in PARTITIONS:
            raise ConfigError("trainer.partition", f"must be one of {PARTITIONS}, got {partition!r}")
        self.partition = partition
        self.paths = [str(p) for p in paths]
        self.splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        self.window = int(window)
        self.short_runs = short_runs
        self.crop = crop
        self.shuffle = bool(shuffle)
        self.buffer_size = max(1, int(buffer_size))
        self.seed = int(seed)
        self.want_pfc = bool(pfc)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.drop_last = bool(drop_last)
        # Resolved here, in the main process: a DataLoader worker (spawned, or forked before
        # init_process_group) may not see torch.distributed, and would then read rank 0's share.
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self._rank, self._world = _dist_info(rank, world_size)
        if not 0 <= self._rank < self._world:
            raise ValueError(f"rank {self._rank} outside world size {self._world}")
        self.epoch = 0
        self._skip: list[int] | None = None  # samples to drop per worker (resume)
        self._yielded_here: list[int] = [0]  # samples yielded in this process (num_workers=0 use)
        self.stats = {"row_groups_read": 0, "rows_decoded": 0, "max_resident_row_groups": 0,
                      "max_resident_rows": 0}
        self._build_index()
        self.median = self.inv_iqr = None
        if scale:
            stats_path = Path(norm_stats) if norm_stats else Path(self.paths[0]).parent / "norm_stats.parquet"
            median, iqr = read_norm_stats(stats_path, self.parcel_names)
            self.median, self.inv_iqr = median, (1.0 / iqr).astype(np.float32)
            self.norm_stats_path = str(stats_path)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], split: str | Sequence[str] | None = "train",
                    **overrides: Any) -> "ShardDataset":
        """A dataset over the configured shard directory with the ``shards`` config's window settings."""
        from brainfoundry.paths import Layout

        shards_cfg = config.get("shards", {}) or {}
        # Only the keys that are set: the defaults are this class's.
        names = {"window": "window", "short_runs": "short_runs", "shuffle_buffer": "buffer_size"}
        kwargs = {arg: shards_cfg[key] for key, arg in names.items() if key in shards_cfg}
        if "seed" in config:
            kwargs["seed"] = config["seed"]
        kwargs.update(overrides)
        return cls(Layout.from_config(config).shard_dir, split=split, **kwargs)

    # -- index -------------------------------------------------------------------------------------------
    def _build_index(self) -> None:
        """Small columns of every shard, read once: the plan needs no series bytes."""
        verify_shards(self.paths)  # sha256 against the manifest, once per process and shard
        metas, cols = [], {c: [] for c in (*INDEX_COLUMNS, "shard", "row_group", "row")}
        self.row_group_sizes: list[list[int]] = []
        for s, path in enumerate(self.paths):
            handle, meta = open_shard(path)
            metas.append((path, meta))
            if self.want_pfc and "pfc" not in handle.schema_arrow.names:
                raise InputError(path, "shard has no pFC columns (written without --pfc-pattern)")
            present = [c for c in INDEX_COLUMNS if c in handle.schema_arrow.names]
            try:
                table = handle.read(columns=present)
            except Exception as err:  # a page checksum failure, or an undecodable page
                raise parquet_error(path, "shard", err) from err
            sizes = [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)]
            self.row_group_sizes.append(sizes)
            for c in INDEX_COLUMNS:
                cols[c].extend(table.column(c).to_pylist() if c in present else [None] * table.num_rows)
            cols["shard"].extend([s] * table.num_rows)
            cols["row_group"].extend(np.repeat(np.arange(len(sizes)), sizes).tolist())
            cols["row"].extend(np.concatenate([np.arange(n) for n in sizes]).tolist() if sizes else [])
        check_compatible(metas)
        meta = metas[0][1]
        self.metadata = meta
        self.parcel_names: list[str] = list(meta["parcel_names"])
        self.n_parcels = len(self.parcel_names)
        self.parcel_coords = np.array([[np.nan if v is None else v for v in row] for row in meta["parcel_coords"]],
                                      dtype=np.float32)
        self.atlas = meta.get("atlas")
        self.run_ids = np.array(cols["run_id"], dtype=object)
        self.subjects = np.array(cols["subject"], dtype=object)
        self.split_of = np.array(cols["split"], dtype=object)
        self.n_timepoints = np.array(cols["n_timepoints"], dtype=np.int64)
        self.shard_idx = np.array(cols["shard"], dtype=np.int64)
        self.rg_idx = np.array(cols["row_group"], dtype=np.int64)
        self.row_idx = np.array(cols["row"], dtype=np.int64)
        age = np.array([np.nan if v is None else float(v) for v in cols["age"]], dtype=np.float32)
        self.age = age
        # Category codes over every shard (not just the selected split), so codes agree across splits.
        self.vocab: dict[str, list[Any]] = {}
        self.codes: dict[str, np.ndarray] = {}
        for name in CATEGORICAL:
            values = cols[name]
            uniq = sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))},
                          key=lambda v: (isinstance(v, str), v))
            lookup = {v: i for i, v in enumerate(uniq)}
            self.vocab[name] = uniq
            self.codes[name] = np.array([lookup.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)
        self.run_hash = np.array([_stable_u64(r) for r in self.run_ids], dtype=np.uint64)
        selected = np.ones(len(self.run_ids), bool) if self.splits is None else \
            np.isin(self.split_of.astype(str), sorted(self.splits))
        short = self.n_timepoints < self.window
        self.short_run_ids = sorted(self.run_ids[selected & short].tolist()) if self.short_runs == "skip" else []
        self.n_short_skipped = len(self.short_run_ids)
        self.selected = selected & ~short if self.short_runs == "skip" else selected
        # Work units: (shard, row group) holding at least one selected row; rows in file order.
        self.units: list[np.ndarray] = []
        self.unit_keys: list[tuple[int, int]] = []
        key = self.shard_idx * (1 << 32) + self.rg_idx
        for k in np.unique(key[self.selected]):
            rows = np.flatnonzero(self.selected & (key == k))
            self.units.append(rows)
            self.unit_keys.append((int(k >> 32), int(k & 0xFFFFFFFF)))
        self.unit_of = np.full(len(self.run_ids), -1, dtype=np.int64)
        for u, rows in enumerate(self.units):
            self.unit_of[rows] = u
        largest = max((len(r) for r in self.units), default=1)
        self.resident_units = max(1, math.ceil(self.buffer_size / largest))

    @property
    def n_samples(self) -> int:
        """Samples per epoch over all ranks and workers (the selected, non-skipped runs)."""
        return int(self.selected.sum())

    # -- epoch, resume ----------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (new unit order, buffer and crops)."""
        self.epoch = int(epoch)
        self._skip = None
        self._yielded_here = [0]

    def state_dict(self) -> dict[str, Any]:
        """Position of in-process iteration (``num_workers=0``); use :class:`ShardLoader` with workers."""
        skip = self._skip or [0]
        return {"epoch": self.epoch, "per_worker": [skip[0] + self._yielded_here[0]]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` drops ``state['per_worker'][w]`` samples of
        worker ``w`` (the number of workers must be the same as when the state was saved)."""
        self.epoch = int(state["epoch"])
        self._skip = [int(v) for v in state["per_worker"]]
        self._yielded_here = [0]

    # -- planning -----------------------------------------------------------------------------------------------
    def _unit_order(self) -> np.ndarray:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(order)
        return order

    def units_for(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
        """Unit indices (in read order) of one reader for the current epoch."""
        slot, n_slots = rank * num_workers + worker, world_size * num_workers
        return [int(u) for u in self._unit_order()[slot::n_slots]]

    def plan(self, units: Sequence[int], rank: int, worker: int, num_workers: int) -> list[int]:
        """Global row indices in yield order.

        Without shuffling, the units' rows in order. With it, up to :attr:`resident_units` units are
        resident; each step draws one of their remaining rows uniformly at random, and a unit that
        runs out is replaced by the next unit in order.
        """
        if not self.shuffle:
            return [int(r) for u in units for r in self.units[u]]
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, num_workers])
        pending = deque(units)
        resident: list[list[int]] = []
        out: list[int] = []
        while pending or resident:
            while pending and len(resident) < self.resident_units:
                resident.append([int(r) for r in self.units[pending.popleft()]])
            sizes = np.cumsum([len(rows) for rows in resident])
            k = int(rng.integers(sizes[-1]))
            i = int(np.searchsorted(sizes, k, side="right"))
            rows = resident[i]
            j = k - (int(sizes[i - 1]) if i else 0)
            out.append(rows[j])
            rows[j] = rows[-1]  # swap-remove keeps the draw O(1) within the unit
            rows.pop()
            if not rows:
                resident.pop(i)
        return out

    def plan_sizes(self, num_workers: int = 1) -> np.ndarray:
        """Samples per ``[rank, worker]`` this epoch (DDP trainers can take the minimum over ranks)."""
        _, world = _dist_info(self._rank, self._world)
        nw = max(1, num_workers)
        if self._by_samples(world):
            return np.array([[sum(len(rows) for _, rows in self._rank_slices(w, nw, r, world)) for w in range(nw)]
                             for r in range(world)], dtype=np.int64)
        return np.array([[sum(len(self.units[u]) for u in self.units_for(r, world, w, nw)) for w in range(nw)]
                         for r in range(world)], dtype=np.int64)

    def _by_samples(self, world: int) -> bool:
        if self.partition != "samples" or world == 1:
            return False
        if self.batch_size is None:
            raise ValueError('partition="samples" needs batch_size (the per-rank batch)')
        return True

    def _rank_slices(self, worker: int, num_workers: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
        """``partition="samples"``: this rank's part of every global block of the one-process stream of
        reader ``worker``: (position of its first sample in the block, rows) per local batch."""
        order = self.plan(self.units_for(0, 1, worker, num_workers), 0, worker, num_workers)
        block = self.batch_size * world
        out = []
        for first in range(0, len(order), block):
            piece = order[first:first + block]
            n = len(piece)
            # A shuffled (training) stream keeps every rank taking every step: a short block that cannot
            # give each rank a sample is skipped by all. An evaluation stream hands it to some ranks.
            if n < block and (self.drop_last or (n < world and self.shuffle)):
                continue
            lo, hi = (rank * self.batch_size, (rank + 1) * self.batch_size) if n == block else \
                (rank * n // world, (rank + 1) * n // world)
            if hi > lo:
                out.append((lo, piece[lo:hi]))
        return out

    def crop_start(self, row: int) -> int:
        n_t = int(self.n_timepoints[row])
        span = n_t - self.window
        if span <= 0:
            return 0
        if self.crop == "start":
            return 0
        if self.crop == "center":
            return span // 2
        return _mix(self.seed, self.epoch, int(self.run_hash[row])) % (span + 1)

    # -- reading ------------------------------------------------------------------------------------------------
    def _decode_unit(self, unit: int, files: dict[int, pq.ParquetFile]) -> dict[str, Any]:
        """One row group's arrays (views into arrow buffers; nothing is copied per row).

        ``files`` holds the stream's open shards: one set per reader stream, since a
        ``ParquetFile`` is not safe to share between threads.
        """
        shard, rg = self.unit_keys[unit]
        if shard not in files:
            # Page CRCs cost more CPU than the npy floor's whole read; a shard whose sha256 was
            # checked against the manifest needs no second check of the same bytes.
            files[shard] = open_shard(self.paths[shard], memory_map=True,
                                      verify_pages=not sha256_verified(self.paths[shard]))[0]
        columns = ["timeseries", "zero_variance"] + (["pfc", "pfc_n_views"] if self.want_pfc else [])
        try:
            table = files[shard].read_row_group(rg, columns=columns, use_threads=False)
        except Exception as err:  # pages are checksum-verified as they are read
            raise parquet_error(self.paths[shard], f"shard (row group {rg})", err) from err
        self.stats["row_groups_read"] += 1
        offsets, data = decode_binary(table.column("timeseries"))
        # Every list holds N flags, so the flattened values reshape to [rows, N] in one call.
        zero_col = table.column("zero_variance").combine_chunks()
        decoded = {"path": self.paths[shard], "offsets": offsets, "data": data, "table": table,
                   "zero": zero_col.flatten().to_numpy(zero_copy_only=False).reshape(len(zero_col), self.n_parcels)}
        if self.want_pfc:
            decoded["pfc_offsets"], decoded["pfc_data"] = decode_binary(table.column("pfc"))
            decoded["pfc_views"] = table.column("pfc_n_views").to_numpy()
        return decoded

    def _series(self, decoded: dict[str, Any], ref: int) -> np.ndarray:
        i, n_t, n = int(self.row_idx[ref]), int(self.n_timepoints[ref]), self.n_parcels
        buf = decoded["data"][decoded["offsets"][i]:decoded["offsets"][i + 1]]
        if buf.size != n_t * n * 4:
            raise InputError(decoded["path"], f"run {self.run_ids[ref]}: {buf.size} series bytes, expected "
                                              f"{n_t} x {n} float32")
        return buf.view("<f4").reshape(n_t, n)

    def _window_into(self, series: np.ndarray, start: int, out_x: np.ndarray, out_mask: np.ndarray) -> None:
        """Crop, scale and zero-pad one window straight into its output rows."""
        piece = series[start:start + self.window]
        length = piece.shape[0]
        if self.median is not None:
            np.subtract(piece, self.median, out=out_x[:length])
            np.multiply(out_x[:length], self.inv_iqr, out=out_x[:length])
        else:
            out_x[:length] = piece
        out_mask[:length] = True
        if length < self.window:  # only reached with short_runs="pad"
            out_x[length:] = 0.0
            out_mask[length:] = False

    def _pfc(self, decoded: dict[str, Any], ref: int) -> np.ndarray:
        i = int(self.row_idx[ref])
        dtype = np.dtype(self.metadata["pfc_encoding"]["dtype"]).newbyteorder("<")
        raw = decoded["pfc_data"][decoded["pfc_offsets"][i]:decoded["pfc_offsets"][i + 1]]
        return raw.view(dtype).reshape(int(decoded["pfc_views"][i]), -1)

    def _sample(self, decoded: dict[str, Any], ref: int, worker: int) -> dict[str, Any]:
        x = np.empty((self.window, self.n_parcels), dtype=np.float32)
        mask = np.empty(self.window, dtype=bool)
        start = self.crop_start(ref)
        self._window_into(self._series(decoded, ref), start, x, mask)
        sample = {
            "x": torch.from_numpy(x),
            "mask": torch.from_numpy(mask),
            "run_id": str(self.run_ids[ref]),
            "subject": str(self.subjects[ref]),
            "split": str(self.split_of[ref]),
            "start": int(start),
            "n_timepoints": int(self.n_timepoints[ref]),
            "age": torch.tensor(self.age[ref], dtype=torch.float32),
            "sex": int(self.codes["sex"][ref]),
            "diagnosis": int(self.codes["diagnosis"][ref]),
            "site": int(self.codes["site"][ref]),
            "zero_variance": torch.from_numpy(decoded["zero"][int(self.row_idx[ref])].copy()),
            "worker": worker,
        }
        if self.want_pfc:
            sample["pfc"] = torch.from_numpy(self._pfc(decoded, ref).astype(np.dtype(
                self.metadata["pfc_encoding"]["dtype"]), copy=True))
        return sample

    def _batch(self, rows: list[tuple[dict[str, Any], int]], worker: int, shared: bool) -> dict[str, Any]:
        """A batch assembled in place: each window is written once, into (shared) batch memory."""
        b, w, n = len(rows), self.window, self.n_parcels

        def empty(shape, dtype):
            t = torch.empty(shape, dtype=dtype)
            return t.share_memory_() if shared else t  # in a worker: no copy when sent to the trainer

        x, mask = empty((b, w, n), torch.float32), empty((b, w), torch.bool)
        xs, ms = x.numpy(), mask.numpy()
        refs = np.array([ref for _, ref in rows], dtype=np.int64)
        starts = np.empty(b, dtype=np.int64)
        zero = np.empty((b, n), dtype=bool)
        for k, (decoded, ref) in enumerate(rows):
            starts[k] = self.crop_start(ref)
            self._window_into(self._series(decoded, ref), int(starts[k]), xs[k], ms[k])
            zero[k] = decoded["zero"][int(self.row_idx[ref])]
        batch = {
            "x": x,
            "mask": mask,
            "run_id": [str(r) for r in self.run_ids[refs]],
            "subject": [str(s) for s in self.subjects[refs]],
            "split": [str(s) for s in self.split_of[refs]],
            "start": torch.from_numpy(starts),
            "n_timepoints": torch.from_numpy(self.n_timepoints[refs].copy()),
            "age": torch.from_numpy(self.age[refs].copy()),
            "sex": torch.from_numpy(self.codes["sex"][refs].copy()),
            "diagnosis": torch.from_numpy(self.codes["diagnosis"][refs].copy()),
            "site": torch.from_numpy(self.codes["site"][refs].copy()),
            "zero_variance": torch.from_numpy(zero),
            "worker": torch.full((b,), worker, dtype=torch.int64),
        }
        if self.want_pfc:
            views = [self._pfc(decoded, ref) for decoded, ref in rows]
            pfc = empty((b, *views[0].shape), getattr(torch, self.metadata["pfc_encoding"]["dtype"]))
            for k, v in enumerate(views):
                pfc.numpy()[k] = v
            batch["pfc"] = pfc
        return batch

    def _rows(self, order: list[int], units: list[int]) -> Iterator[tuple[dict[str, Any], int]]:
        """``(decoded row group, row)`` in plan order, decoding each row group once, in unit order,
        and dropping it when its last planned row has been used."""
        remaining: dict[int, int] = {}
        for ref in order:
            u = int(self.unit_of[ref])
            remaining[u] = remaining.get(u, 0) + 1
        pending = iter([u for u in units if u in remaining])
        resident: dict[int, dict[str, Any]] = {}
        files: dict[int, pq.ParquetFile] = {}
        for ref in order:
            u = int(self.unit_of[ref])
            while u not in resident:
                nxt = next(pending)
                resident[nxt] = self._decode_unit(nxt, files)
                self.stats["max_resident_row_groups"] = max(self.stats["max_resident_row_groups"], len(resident))
                rows_held = sum(remaining[v] for v in resident)
                self.stats["max_resident_rows"] = max(self.stats["max_resident_rows"], rows_held)
            yield resident[u], ref
            self.stats["rows_decoded"] += 1
            remaining[u] -= 1
            if remaining[u] == 0:
                del resident[u]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:  # in this process: count what is yielded (state_dict without a loader)
            return self.iter_worker(0, 1, shared=False, count=True)
        return self.iter_worker(info.id, info.num_workers, shared=True)

    def iter_worker(self, worker: int, num_workers: int, *, shared: bool = False,
                    count: bool = False) -> Iterator[dict[str, Any]]:
        """The stream of reader ``worker`` of ``num_workers`` on this rank (samples or batches).

        ``shared`` allocates batch tensors in shared memory (for DataLoader worker processes).
        """
        rank, world = _dist_info(self._rank, self._world)
        skip_list = self._skip or []
        if skip_list and len(skip_list) != num_workers:
            raise ValueError(f"resume state was saved with {len(skip_list)} worker(s); this loader has {num_workers}")
        skip = skip_list[worker] if skip_list else 0
        if self._by_samples(world):
            yield from self._iter_slices(worker, num_workers, rank, world, skip, shared, count)
            return
        units = self.units_for(rank, world, worker, num_workers)
        order = self.plan(units, rank, worker, num_workers)[skip:]
        rows = self._rows(order, units)
        if self.batch_size is None:
            for decoded, ref in rows:
                sample = self._sample(decoded, ref, worker)
                if count:
                    self._yielded_here[0] += 1
                yield sample
            return
        pending: list[tuple[dict[str, Any], int]] = []
        for item in rows:
            pending.append(item)
            if len(pending) == self.batch_size:
                batch = self._batch(pending, worker, shared=shared)
                pending = []
                if count:
                    self._yielded_here[0] += len(batch["run_id"])
                yield batch
        if pending and not self.drop_last:
            if count:
                self._yielded_here[0] += len(pending)
            yield self._batch(pending, worker, shared=shared)

    def _iter_slices(self, worker: int, num_workers: int, rank: int, world: int, skip: int, shared: bool,
                     count: bool) -> Iterator[dict[str, Any]]:
        """``partition="samples"``: one batch per global block, this rank's slice of it, from ``skip`` on."""
        slices = []
        for first, piece in self._rank_slices(worker, num_workers, rank, world):
            if skip >= len(piece):
                skip -= len(piece)
                continue
            slices.append((first + skip, piece[skip:]))
            skip = 0
        rows = self._rows([r for _, piece in slices for r in piece], self.units_for(0, 1, worker, num_workers))
        for first, piece in slices:
            batch = self._batch([next(rows) for _ in piece], worker, shared=shared)
            # Where the samples sit in the global batch: the trainer's per-sample seeds follow it.
            batch["position"] = torch.arange(first, first + len(piece))
            if count:
                self._yielded_here[0] += len(piece)
            yield batch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class ShardLoader:
    """Batches from a :class:`ShardDataset`, with its exact position for resume.

    Two backends produce the same batches in the same order:

    - ``"thread"`` (default): ``num_workers`` reader threads in this process. pyarrow's decoding and
      numpy's arithmetic release the GIL, so the threads run in parallel, and batches live in
      ordinary memory that the allocator recycles. ``benchmarks/bench_reader.py`` measured this
      several times faster than processes here, where every fresh shared-memory batch costs page
      faults in both processes.
    - ``"process"``: a torch ``DataLoader`` with ``num_workers`` worker processes (batches
      assembled in shared memory by the workers, no collate copy).

    Batches come round-robin from the workers (as ``DataLoader`` does), each worker streaming its
    own share of the row groups. Iterating runs the current epoch from the recorded position; when
    an epoch is exhausted the epoch advances and the position resets, so ``for batch in loader``
    loops epoch after epoch. ``state_dict()`` after a training step and ``load_state_dict()`` before
    iterating resume exactly: the same remaining samples, windows and order (the number of workers
    must stay the same). Under DDP each rank has its own position; call ``state_dict(gather=True)``
    on every rank to collect all of them (one ``all_gather_object``) and pass the result to
    ``load_state_dict`` on every rank.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int = 32, num_workers: int = 2, *,
                 backend: str = "thread", prefetch: int = 2, pin_memory: bool = False, drop_last: bool = False,
                 **loader_kwargs: Any):
        if backend not in ("thread", "process"):
            raise ValueError(f"backend must be 'thread' or 'process', got {backend!r}")
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.backend = backend
        self.prefetch = max(1, int(prefetch))
        self.pin_memory = bool(pin_memory)
        # The dataset assembles batches itself (each window written once, in place).
        dataset.batch_size = int(batch_size)
        dataset.drop_last = bool(drop_last)
        self.loader = None
        if backend == "process":
            loader_kwargs.setdefault("persistent_workers", False)  # workers must see each epoch's state
            if loader_kwargs["persistent_workers"]:
                raise ValueError("persistent_workers=True would hide set_epoch/resume from the workers")
            if self.num_workers > 0:
                loader_kwargs.setdefault("prefetch_factor", self.prefetch)
            self.loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory, **loader_kwargs)
        elif loader_kwargs:
            raise TypeError(f"unexpected arguments for the thread backend: {sorted(loader_kwargs)}")
        self._consumed = [0] * max(1, self.num_workers)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._consumed = [0] * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.load_state_dict({"epoch": self.dataset.epoch, "per_worker": list(self._consumed)})
        batches = self.loader if self.loader is not None else self._thread_batches()
        for batch in batches:
            counts = torch.bincount(batch["worker"], minlength=len(self._consumed)).tolist()
            for w, c in enumerate(counts):
                self._consumed[w] += int(c)
            yield batch
        self.set_epoch(self.dataset.epoch + 1)

    def _thread_batches(self) -> Iterator[dict[str, Any]]:
        n = max(1, self.num_workers)
        if self.num_workers == 0:
            for batch in self.dataset.iter_worker(0, 1):
                yield self._pin(batch)
            return
        queues = [queue.Queue(maxsize=self.prefetch) for _ in range(n)]
        stop = threading.Event()

        def put(w: int, item: Any) -> bool:
            while not stop.is_set():
                try:
                    queues[w].put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce(w: int) -> None:
            try:
                for batch in self.dataset.iter_worker(w, n):
                    if not put(w, batch):
                        return
                put(w, _END)
            except BaseException as err:  # surfaces in the consumer, with its traceback
                put(w, _Failure(err))

        threads = [threading.Thread(target=produce, args=(w,), name=f"shard-reader-{w}", daemon=True)
                   for w in range(n)]
        for thread in threads:
            thread.start()
        try:
            active = list(range(n))
            while active:
                for w in list(active):  # round-robin, skipping exhausted workers, like DataLoader
                    item = queues[w].get()
                    if item is _END:
                        active.remove(w)
                        continue
                    if isinstance(item, _Failure):
                        raise item.error
                    yield self._pin(item)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)

    def _pin(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.pin_memory:
            return batch
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (from the start), per-worker partial batches included."""
        rank, _ = _dist_info(self.dataset._rank, self.dataset._world)
        sizes = self.dataset.plan_sizes(self.num_workers)[rank]
        b = self.dataset.batch_size
        return int(sum((n // b) if self.dataset.drop_last else -(-n // b) for n in sizes))

    def state_dict(self, gather: bool = False) -> dict[str, Any]:
        rank, world = _dist_info(self.dataset._rank, self.dataset._world)
        state = {"epoch": self.dataset.epoch, "num_workers": self.num_workers, "per_worker": list(self._consumed),
                 "rank": rank, "world_size": world}
        if gather and world > 1 and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * world
            torch.distributed.all_gather_object(everyone, state["per_worker"])
            state["per_rank"] = everyone
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("num_workers", self.num_workers)) != self.num_workers:
            raise ValueError(f"resume state was saved with num_workers={state['num_workers']}, "
                             f"this loader has {self.num_workers}")
        rank, _ = _dist_info(self.dataset._rank, self.dataset._world)
        per_worker = state["per_rank"][rank] if "per_rank" in state else state["per_worker"]
        self.dataset.set_epoch(int(state["epoch"]))
        self._consumed = [int(v) for v in per_worker]


def make_dataloader(dataset: ShardDataset, batch_size: int = 32, num_workers: int = 2, *,
                    backend: str = "thread", pin_memory: bool | None = None, drop_last: bool = False,
                    **kwargs: Any) -> ShardLoader:
    """A :class:`ShardLoader` with sensible defaults: 2 reader threads, batches of 32, pinned
    memory when CUDA is available. ``backend="process"`` uses DataLoader worker processes."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, backend=backend,
                       pin_memory=pin_memory, drop_last=drop_last, **kwargs)


def read_manifest(path: str | Path):
    """The manifest as a pandas DataFrame (schema version checked)."""
    try:
        table = pq.read_table(path, **PARQUET_READ_OPTIONS)
    except Exception as err:
        raise parquet_error(path, "manifest", err) from err
    shard_metadata(path, table.schema)
    return table.to_pandas()
