"""Parquet shards (one per subject bucket), the manifest and the normalization statistics.

A shard holds one row per run (recording): run metadata, split, phenotypes, QC, the parcellated series
and the pFC views (DESIGN.md section 4). Layout choices, measured in ``benchmarks/bench_reader.py``:

- ``timeseries`` is a ``large_binary`` column: one value per run holding the float32 little-endian
  row-major ``[n_timepoints, n_parcels]`` array (shape in the ``n_timepoints``/``n_parcels`` columns,
  encoding in the file metadata). Decoding it is a buffer view, several times faster than a
  ``list<float32>`` column whose repetition levels parquet must decode value by value.
- ``pfc`` likewise: ``[pfc_n_views, n_parcels * (n_parcels - 1) / 2]`` upper triangles
  (``numpy.triu_indices(n_parcels, k=1)`` order) in the dtype the pFC step wrote (float16/float32).
- Rows are sorted by split, then run id, so a reader of one split touches few row groups.
- The file's key-value metadata ``brainfoundry`` holds JSON with ``schema_version``, ``config_hash``,
  ``atlas``, ``parcel_names``, ``parcel_coords``; readers refuse a schema version they do not know.

Shards are written with parquet page checksums and read with their verification; the manifest records
every shard's sha256 (``shard_sha256``), which :func:`verify_shards` checks once per process. The
per-run files a shard is built from are read through :mod:`brainfoundry.runfiles`, which checks the
sha256 their sidecars recorded.

The manifest lists every row of every shard (bucket, row group, row index, run id, split, ...); the
normalization statistics are per-parcel quantiles over the training split's time points, computed
exactly with bounded memory by :func:`streaming_quantiles`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from brainfoundry import runfiles
from brainfoundry.errors import InputError
from brainfoundry.io import (PARQUET_READ_OPTIONS, PARQUET_WRITE_OPTIONS, atomic_path, config_hash, parquet_error,
                             sha256_file, verify_sha256)

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
METADATA_KEY = b"brainfoundry"

# Run-table columns copied into every shard row under fixed names and types.
META_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "subject": pa.string(),
    "session": pa.string(),
    "task": pa.string(),
    "run": pa.string(),
    "dataset": pa.string(),
    "site": pa.string(),
    "split": pa.string(),
    "bucket": pa.int32(),
    "tr": pa.float64(),
}
QC_COLUMNS = ("mean_fd", "fraction_censored", "tsnr_median")
# Phenotypes every shard carries (null when the dataset lacks them); others follow the run table.
CORE_PHENOTYPES = ("age", "sex", "diagnosis")
# Run-table columns that name input files (and how to read them): provenance lives in the per-run
# sidecars, not in shards.
PATH_COLUMNS = ("bold", "mask", "confounds", "raw_bold", "timeseries_file", "timeseries_format", "source_file",
                "events")
# Columns the shard computes itself; run-table columns of these names are not phenotypes.
DERIVED_COLUMNS = ("n_timepoints", "n_parcels", "timeseries", "pfc", "pfc_n_views", "pfc_keep_fraction",
                   "pfc_seed", "pfc_n_kept", "zero_variance", "n_zero_variance", *QC_COLUMNS)
ARRAY_COLUMNS = ("timeseries", "pfc", "zero_variance", "pfc_seed", "pfc_n_kept")
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
# Config keys that choose which runs exist rather than what a run's row holds.
_SELECTION_KEYS = ("include_sites", "include_subjects", "include_files", "exclude_subjects", "exclude_sites",
                   "max_runs_per_site", "on_missing_file")
_SHARD_NAME = re.compile(r"^bucket-(\d+)\.parquet$")
# Manifest metadata key: shard file name -> sha256 of the shard when the manifest was written.
SHARD_CHECKSUMS_KEY = "shard_sha256"


# -- configuration ------------------------------------------------------------------------------------
def shard_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config values that shape a shard's content (their hash goes into the file metadata).

    Reader-side settings (``shards.window``, ``shards.short_runs``) are left out: changing them must
    not rewrite shards. So are the settings that only select which runs exist (subject/site filters):
    a run added or removed changes its own bucket's rows, and must not rewrite every other bucket.
    """
    shards = dict(config.get("shards", {}) or {})
    for key in ("window", "short_runs", "shuffle_buffer"):
        shards.pop(key, None)
    timeseries = config.get("timeseries")
    if isinstance(timeseries, Mapping):
        timeseries = {k: v for k, v in timeseries.items() if k not in _SELECTION_KEYS}
    atlas = config.get("atlas", {}) or {}
    return {
        "schema_version": SCHEMA_VERSION,
        "entry_point": config.get("entry_point"),
        "seed": config.get("seed"),
        "space": config.get("space"),
        "atlas": atlas.get("name") if isinstance(atlas, Mapping) else atlas,
        "denoise": config.get("denoise"),
        "timeseries": timeseries,
        "pfc": config.get("pfc"),
        "shards": shards,
    }


# -- bucket run tables ----------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def bucket_rows_json(runs: pd.DataFrame, bucket: int) -> str:
    """The run-table rows of one bucket as deterministic JSON (a Snakemake ``params`` value).

    Snakemake re-runs a job when its params change, so a rule taking this string re-runs only for the
    bucket whose rows changed. Column kinds come from the whole table so every bucket gets the same
    column types (a phenotype that happens to be all null in one bucket stays numeric).
    """
    table = runs.reset_index() if "run_id" not in runs.columns else runs.copy()
    if "run_id" not in table.columns:
        raise ValueError("run table needs a run_id index or column")
    columns = [c for c in table.columns if c not in PATH_COLUMNS]
    kinds = {}
    for col in columns:
        dtype = table[col].dtype
        kinds[col] = "number" if (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)) \
            else "bool" if pd.api.types.is_bool_dtype(dtype) else "string"
    rows = table[table["bucket"].astype(int) == int(bucket)].sort_values("run_id")
    data = [[_json_value(v) for v in row] for row in rows[columns].itertuples(index=False, name=None)]
    return json.dumps({"bucket": int(bucket), "columns": columns, "kinds": kinds, "rows": data},
                      sort_keys=True, separators=(",", ":"))


def rows_from_json(text: str) -> pd.DataFrame:
    """Inverse of :func:`bucket_rows_json`: a DataFrame with one row per run, typed by column kind."""
    payload = json.loads(text)
    frame = pd.DataFrame(payload["rows"], columns=payload["columns"])
    for col, kind in payload["kinds"].items():
        if kind == "number":
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64") \
                if frame[col].isna().any() or not pd.api.types.is_integer_dtype(frame[col]) else frame[col]
        elif kind == "string":
            frame[col] = pd.Series([None if _json_value(v) is None else str(v) for v in frame[col]],
                                   index=frame.index, dtype=object)
    frame.attrs["kinds"] = payload["kinds"]
    return frame


def write_bucket_runs(rows_json: str, path: str | Path, log: str | Path | None = None) -> Path:
    """Write one bucket's run-table rows (from :func:`bucket_rows_json`) as parquet, atomically."""
    frame = rows_from_json(rows_json)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"brainfoundry_kinds"] = json.dumps(frame.attrs["kinds"], sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_WRITE_OPTIONS)
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"{len(frame)} runs written to {path}\n")
    return Path(path)


def read_bucket_runs(path: str | Path) -> pd.DataFrame:
    try:
        table = pq.read_table(path, **PARQUET_READ_OPTIONS)
    except Exception as err:
        raise parquet_error(path, "bucket run table", err) from err
    frame = table.to_pandas()
    raw = (table.schema.metadata or {}).get(b"brainfoundry_kinds")
    frame.attrs["kinds"] = json.loads(raw) if raw else {}
    if "run_id" not in frame.columns or "subject" not in frame.columns:
        raise InputError(path, "bucket run table lacks run_id/subject columns")
    if frame["run_id"].duplicated().any():
        raise InputError(path, f"duplicate run ids {frame.loc[frame['run_id'].duplicated(), 'run_id'].tolist()[:5]}")
    return frame


# -- shard writing ------------------------------------------------------------------------------------------
def _pheno_type(kind: str | None, values: pd.Series | None) -> pa.DataType:
    if kind == "number":
        return pa.float64()
    if kind == "bool":
        return pa.bool_()
    if kind is None and values is not None and pd.api.types.is_numeric_dtype(values.dtype):
        return pa.float64()
    return pa.string()


def shard_schema(phenotypes: Mapping[str, pa.DataType], pfc_dtype: str | None) -> pa.Schema:
    fields = [pa.field(name, typ) for name, typ in META_COLUMNS.items()]
    fields += [pa.field("n_timepoints", pa.int32()), pa.field("n_parcels", pa.int32()),
               pa.field("timeseries", pa.large_binary())]
    fields += [pa.field(name, pa.float64()) for name in QC_COLUMNS]
    fields += [pa.field("n_zero_variance", pa.int32()), pa.field("zero_variance", pa.list_(pa.bool_()))]
    if pfc_dtype is not None:
        fields += [pa.field("pfc", pa.large_binary()), pa.field("pfc_n_views", pa.int32()),
                   pa.field("pfc_keep_fraction", pa.float32()), pa.field("pfc_seed", pa.list_(pa.int64())),
                   pa.field("pfc_n_kept", pa.list_(pa.int32()))]
    fields += [pa.field(name, typ) for name, typ in phenotypes.items()]
    return pa.schema(fields)


class ShardWriter:
    """Streams rows into one shard, a row group at a time, under a temporary name.

    Use as a context manager; the file appears under its final name only when the block succeeds.

    Parameters
    ----------
    path
        Final shard path.
    parcel_names, parcel_coords
        The atlas's parcels (label order) and centroids ``[N, 3]``.
    phenotypes
        Phenotype column name -> arrow type (see :func:`shard_schema`).
    pfc_dtype
        ``"float16"``/``"float32"``, or None for a shard without pFC columns.
    row_group_size, compression, compression_level, timeseries_compression
        Parquet layout: rows per row group and codec (``"none"`` for uncompressed); the series
        column uses ``timeseries_compression`` when given.
    metadata
        Extra keys for the ``brainfoundry`` metadata JSON (atlas, config, config_hash, bucket, ...).
    """

    def __init__(self, path: str | Path, *, parcel_names: Sequence[str], parcel_coords: np.ndarray | None = None,
                 phenotypes: Mapping[str, pa.DataType] | None = None, pfc_dtype: str | None = None,
                 row_group_size: int = 64, compression: str = "zstd", compression_level: int | None = None,
                 timeseries_compression: str | None = None, metadata: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.parcel_names = list(parcel_names)
        self.n_parcels = len(self.parcel_names)
        self.pfc_dtype = pfc_dtype
        self.row_group_size = int(row_group_size)
        self.phenotypes = dict(phenotypes or {})
        self.schema = shard_schema(self.phenotypes, pfc_dtype)
        coords = np.full((self.n_parcels, 3), np.nan) if parcel_coords is None else np.asarray(parcel_coords, float)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "atlas": None,
            "config_hash": None,
            **dict(metadata or {}),
            "n_parcels": self.n_parcels,
            "parcel_names": self.parcel_names,
            "parcel_coords": [[None if not math.isfinite(v) else float(v) for v in row] for row in coords],
            "timeseries_encoding": {"dtype": "float32", "byteorder": "little", "order": "C",
                                    "shape": ["n_timepoints", "n_parcels"]},
            "pfc_encoding": None if pfc_dtype is None else {
                "dtype": pfc_dtype, "byteorder": "little", "order": "C",
                "shape": ["pfc_n_views", "n_parcels * (n_parcels - 1) / 2"], "triu_k": 1},
        }
        self.schema = self.schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
        # Per column: the series may use its own codec (zstd saves ~8 % on float32 series but decodes
        # about 10x slower than reading them plain; see benchmarks/bench_reader.py).
        codec = {f.name: compression or "none" for f in self.schema}
        if timeseries_compression is not None:
            codec["timeseries"] = timeseries_compression
        self.compression = codec
        self.compression_level = None if compression_level is None else {
            name: compression_level for name, c in codec.items() if c in ("zstd", "gzip", "brotli")}
        self._rows: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._ctx = None
        self.n_rows = 0
        self.raw_bytes = 0  # uncompressed array bytes written (series + pfc), for benchmarks

    def __enter__(self) -> "ShardWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        scalars = [f.name for f in self.schema if not (pa.types.is_large_binary(f.type) or pa.types.is_list(f.type))]
        strings = [f.name for f in self.schema if pa.types.is_string(f.type)]
        self._writer = pq.ParquetWriter(
            tmp, self.schema, compression=self.compression, compression_level=self.compression_level or None,
            use_dictionary=strings, write_statistics=scalars, store_schema=True, **PARQUET_WRITE_OPTIONS)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._flush()
            if self._writer is not None:
                self._writer.close()
        except BaseException as err:  # a failed close must still remove the temporary file
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def add(self, row: Mapping[str, Any]) -> None:
        """Add one run. ``row`` holds the metadata columns, ``timeseries`` (float32 ``[T, N]``), QC,
        ``zero_variance`` (optional bool ``[N]``; computed when absent), phenotypes and, for shards with
        pFC, ``pfc`` (``[K, E]``), ``pfc_seed``, ``pfc_n_kept``, ``pfc_keep_fraction``."""
        series = np.ascontiguousarray(row["timeseries"], dtype="<f4")
        if series.ndim != 2 or series.shape[1] != self.n_parcels:
            raise ValueError(f"{row.get('run_id')}: series shape {series.shape}, expected [T, {self.n_parcels}]")
        out = {name: row.get(name) for name in self.schema.names}
        zero = np.ptp(series, axis=0) == 0
        if row.get("zero_variance") is not None:
            zero |= np.asarray(row["zero_variance"], dtype=bool)
        out.update(timeseries=series.tobytes(), n_timepoints=series.shape[0], n_parcels=self.n_parcels,
                   zero_variance=zero.tolist(), n_zero_variance=int(zero.sum()))
        self.raw_bytes += series.nbytes
        if self.pfc_dtype is not None:
            views = np.ascontiguousarray(row["pfc"], dtype=np.dtype(self.pfc_dtype).newbyteorder("<"))
            n_edges = self.n_parcels * (self.n_parcels - 1) // 2
            if views.ndim != 2 or views.shape[1] != n_edges:
                raise ValueError(f"{row.get('run_id')}: pFC shape {views.shape}, expected [K, {n_edges}]")
            out.update(pfc=views.tobytes(), pfc_n_views=views.shape[0],
                       pfc_seed=[int(s) for s in row["pfc_seed"]], pfc_n_kept=[int(k) for k in row["pfc_n_kept"]])
            self.raw_bytes += views.nbytes
        for name in (*QC_COLUMNS, "tr", "age"):
            if name in out and out[name] is not None:
                value = float(out[name])
                out[name] = value if math.isfinite(value) else None
        self._rows.append(out)
        self.n_rows += 1
        if len(self._rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        columns = {name: [r[name] for r in self._rows] for name in self.schema.names}
        table = pa.Table.from_pydict(columns, schema=self.schema)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self._rows = []


def _cell(value: Any, kind: str) -> Any:
    value = _json_value(value)
    if value is None:
        return None
    if kind == "number":
        try:
            out = float(value)
        except (TypeError, ValueError):
            return None
        return out if math.isfinite(out) else None
    if kind == "bool":
        return bool(value)
    if isinstance(value, float) and value.is_integer():  # run 1 read back as 1.0 where nulls exist
        value = int(value)
    return str(value)


def _split_rank(split: Any) -> int:
    return SPLIT_ORDER.get(str(split), len(SPLIT_ORDER))


def write_shard(runs: pd.DataFrame, out: str | Path, *, labels: str | Path, atlas: str,
                timeseries_pattern: str, pfc_pattern: str | None = None, sidecar_pattern: str | None = None,
                row_group_size: int = 64, compression: str = "zstd", compression_level: int | None = None,
                timeseries_compression: str | None = None, config: Mapping[str, Any] | None = None,
                bucket: int | None = None, source: str | Path | None = None) -> dict[str, Any]:
    """Write one bucket's shard from its run rows and their per-run files.

    Parameters
    ----------
    runs
        The bucket's run-table rows (``read_bucket_runs``): run_id, subject, metadata, split, phenotypes.
    timeseries_pattern, pfc_pattern, sidecar_pattern
        Per-run paths with ``{subject}`` and ``{run_id}`` (``paths.Layout`` patterns). The sidecar
        defaults to the series path with ``.json``. Without ``pfc_pattern`` the shard has no pFC columns.
    config
        The values that shaped the shard (``shard_config``); stored with their hash in the metadata.

    Returns
    -------
    dict with ``n_rows``, ``raw_bytes`` and the output path.

    Raises
    ------
    InputError
        Naming the offending file: unreadable inputs, parcel counts or names that differ from the atlas
        labels, NaN/inf values, pFC views of the wrong size. Nothing is left under ``out``.
    """
    label_table = runfiles.read_labels(labels)
    names = label_table["name"].tolist()
    coords = label_table[["x", "y", "z"]].to_numpy(float)
    source = source or "run table"
    kinds = dict(runs.attrs.get("kinds", {}))
    known = set(META_COLUMNS) | set(DERIVED_COLUMNS) | set(PATH_COLUMNS)
    pheno_names = list(CORE_PHENOTYPES) + [c for c in runs.columns if c not in known and c not in CORE_PHENOTYPES]
    pheno_types = {c: _pheno_type(kinds.get(c), runs[c] if c in runs.columns else None)
                   if c in runs.columns else (pa.float64() if c == "age" else pa.string()) for c in pheno_names}
    if pheno_types.get("age") not in (None, pa.float64()):
        raise InputError(source, "phenotype 'age' is not numeric")
    for col in ("run_id", "subject"):
        if col not in runs.columns:
            raise InputError(source, f"run table lacks the {col!r} column")
    order = sorted(range(len(runs)), key=lambda i: (_split_rank(runs["split"].iloc[i] if "split" in runs else None),
                                                      str(runs["run_id"].iloc[i])))
    cfg = dict(config or {})
    meta = {"atlas": atlas, "config": cfg, "config_hash": config_hash(cfg) if cfg else None, "bucket": bucket}
    pfc_dtype = None
    if pfc_pattern is not None and len(runs):  # the stored dtype decides the column's encoding
        first = runs.iloc[order[0]]
        pfc_dtype = str(runfiles.read_relmat(pfc_pattern.format(subject=first["subject"], run_id=first["run_id"]),
                                             len(names))["views"].dtype)
    with ShardWriter(out, parcel_names=names, parcel_coords=coords, phenotypes=pheno_types, pfc_dtype=pfc_dtype,
                     row_group_size=row_group_size, compression=compression,
                     compression_level=compression_level, timeseries_compression=timeseries_compression,
                     metadata=meta) as writer:
        for i in order:
            run = runs.iloc[i]
            ts_path = timeseries_pattern.format(subject=run["subject"], run_id=run["run_id"])
            sc_path = (sidecar_pattern.format(subject=run["subject"], run_id=run["run_id"]) if sidecar_pattern
                       else str(Path(ts_path).with_suffix(".json")))
            # Both readers check the sha256 the per-run sidecars recorded when the files were written.
            sidecar = runfiles.read_series_sidecar(sc_path)
            series, _ = runfiles.read_series(ts_path, names, sidecar=sc_path)
            qc = sidecar.get("QC") or {}
            row: dict[str, Any] = {c: _cell(run.get(c), "number" if t == pa.float64() else "string")
                                   for c, t in META_COLUMNS.items() if c not in ("bucket", "tr")}
            row["bucket"] = int(run["bucket"]) if "bucket" in run and not pd.isna(run["bucket"]) else bucket
            tr = sidecar.get("RepetitionTime", run.get("tr"))
            row["tr"] = _cell(tr, "number")
            for name in QC_COLUMNS:  # the sidecar's figure, else the run table's (ABIDE's func_mean_fd)
                value = _cell(qc.get(name), "number")
                row[name] = value if value is not None else _cell(run.get(name), "number")
            zero = set(qc.get("zero_variance_parcels") or [])
            row["zero_variance"] = np.array([n in zero for n in names], dtype=bool)
            for name, typ in pheno_types.items():
                row[name] = _cell(run.get(name), "number" if typ == pa.float64() else
                                  "bool" if typ == pa.bool_() else "string")
            row["timeseries"] = series
            if pfc_dtype is not None:
                pfc_path = pfc_pattern.format(subject=run["subject"], run_id=run["run_id"])
                pfc = runfiles.read_relmat(pfc_path, len(names))
                if str(pfc["views"].dtype) != pfc_dtype:
                    raise InputError(pfc_path, f"pFC dtype {pfc['views'].dtype} differs from the bucket's {pfc_dtype}")
                row.update(pfc=pfc["views"], pfc_seed=pfc["seed"], pfc_n_kept=pfc["n_kept"],
                           pfc_keep_fraction=pfc["keep_fraction"])
            writer.add(row)
    return {"path": str(out), "n_rows": writer.n_rows, "raw_bytes": writer.raw_bytes}


# -- shard reading --------------------------------------------------------------------------------------------
def shard_metadata(path: str | Path, schema: pa.Schema | None = None) -> dict[str, Any]:
    """The ``brainfoundry`` metadata of a shard; refuses files of an unknown schema version."""
    if schema is None:
        try:
            schema = pq.read_schema(path)
        except Exception as err:
            raise InputError(path, f"cannot read the shard ({err})") from err
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise InputError(path, "not a brainfoundry shard (no 'brainfoundry' key-value metadata)")
    try:
        meta = json.loads(raw)
        version = int(meta["schema_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"unreadable shard metadata ({err})") from err
    if version not in KNOWN_SCHEMA_VERSIONS:
        newer = "a newer" if version > max(KNOWN_SCHEMA_VERSIONS) else "an unknown"
        raise InputError(path, f"shard written with {newer} schema version {version}; this brainfoundry reads "
                               f"version(s) {list(KNOWN_SCHEMA_VERSIONS)} (rebuild the shards or upgrade)")
    return meta


def open_shard(path: str | Path, memory_map: bool = False,
               verify_pages: bool = True) -> tuple[pq.ParquetFile, dict[str, Any]]:
    """A ``ParquetFile`` for streaming reads plus its validated metadata.

    ``memory_map`` reads pages straight from the page cache (one copy less per row group: about half
    the decode time of uncompressed series in ``benchmarks/bench_reader.py``). ``verify_pages=False``
    skips the page CRCs; only for a shard whose whole-file sha256 this process has already checked
    (:func:`sha256_verified`), where the CRCs would check the same bytes again.
    """
    options = PARQUET_READ_OPTIONS if verify_pages else {**PARQUET_READ_OPTIONS, "page_checksum_verification": False}
    try:
        handle = pq.ParquetFile(path, memory_map=memory_map, **options)
    except Exception as err:
        raise InputError(path, f"cannot open the shard ({err})") from err
    return handle, shard_metadata(path, handle.schema_arrow)


def find_shards(directory: str | Path) -> list[Path]:
    """``bucket-<k>.parquet`` files of a shard directory, by bucket number."""
    found = [p for p in Path(directory).iterdir() if _SHARD_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_SHARD_NAME.match(p.name).group(1)))


# (path, size, mtime, expected sha256) of the shards already verified in this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def verify_shards(paths: Sequence[str | Path], manifest: str | Path | None = None) -> int:
    """Check each shard's sha256 against the manifest beside it; returns the number of files hashed.

    A shard is hashed once per process (and again only if its size or mtime changed), so datasets
    built again over the same shards (train and validation, every evaluation task) cost nothing more.
    Shards without a manifest beside them, or a manifest written before checksums were recorded, are
    not hashed (their page checksums are still verified on every read).

    Raises
    ------
    InputError
        A shard whose bytes differ from the manifest's record ("checksum mismatch"), or one the
        manifest does not list.
    """
    hashed = 0
    by_dir: dict[Path, list[Path]] = {}
    for path in paths:
        by_dir.setdefault(Path(path).parent, []).append(Path(path))
    for directory, files in by_dir.items():
        where = Path(manifest) if manifest is not None else directory / "manifest.parquet"
        if not where.exists():
            continue
        recorded = shard_metadata(where).get(SHARD_CHECKSUMS_KEY)
        if not recorded:
            continue
        for path in files:
            expected = recorded.get(path.name)
            if expected is None:
                raise InputError(path, f"not listed in {where} (written after it?): rerun the manifest step")
            try:
                stat = path.stat()
            except OSError as err:
                raise InputError(path, f"cannot read the shard ({err})") from err
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(expected))
            if key in _VERIFIED:
                continue
            verify_sha256(path, str(expected), where)
            hashed += 1
            _VERIFIED.add(key)
    return hashed


def sha256_verified(path: str | Path) -> bool:
    """Whether :func:`verify_shards` matched this shard's sha256 in this process (same size and mtime)."""
    try:
        stat = Path(path).stat()
        where = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return False
    return any(key[:3] == where for key in _VERIFIED)


def check_compatible(metas: Sequence[tuple[str | Path, Mapping[str, Any]]]) -> None:
    """All shards must describe the same atlas and parcels; the first that differs is named."""
    if not metas:
        return
    ref_path, ref = metas[0]
    for path, meta in metas[1:]:
        if meta.get("atlas") != ref.get("atlas"):
            raise InputError(path, f"atlas {meta.get('atlas')!r} differs from {ref.get('atlas')!r} of {ref_path}")
        if meta.get("parcel_names") != ref.get("parcel_names"):
            raise InputError(path, f"{meta.get('n_parcels')} parcels / names differ from {ref_path} "
                                   f"({ref.get('n_parcels')} parcels)")


def decode_binary(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets ``[n + 1]`` and the byte buffer of a ``large_binary`` column, without copies."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[array.offset: array.offset + len(array) + 1]
    return offsets, np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)


def iter_series(path: str | Path, splits: Iterable[str] | None = None,
                columns: Sequence[str] = ()) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Stream ``(row fields, series [T, N])`` of one shard, a row group at a time."""
    handle, meta = open_shard(path)
    n_parcels = int(meta["n_parcels"])
    wanted = None if splits is None else set(splits)
    cols = ["split", "n_timepoints", "timeseries", *[c for c in columns if c not in ("split", "n_timepoints", "timeseries")]]
    for rg in range(handle.num_row_groups):
        try:
            if wanted is not None:
                split_col = handle.read_row_group(rg, columns=["split"]).column(0).to_pylist()
                if not wanted.intersection(split_col):
                    continue
            table = handle.read_row_group(rg, columns=cols, use_threads=False)
        except Exception as err:  # a page checksum failure, or an undecodable page
            raise parquet_error(path, f"shard (row group {rg})", err) from err
        offsets, data = decode_binary(table.column("timeseries"))
        fields = table.drop_columns(["timeseries"]).to_pylist()
        for i, row in enumerate(fields):
            if wanted is not None and row["split"] not in wanted:
                continue
            n_t = int(row["n_timepoints"])
            buf = data[offsets[i]:offsets[i + 1]]
            if buf.size != n_t * n_parcels * 4:
                raise InputError(path, f"row {row.get('run_id', i)} of row group {rg}: {buf.size} series bytes, "
                                       f"expected {n_t} x {n_parcels} float32")
            yield row, buf.view("<f4").reshape(n_t, n_parcels)


# -- exact streaming quantiles --------------------------------------------------------------------------------
def streaming_quantiles(chunks: Callable[[], Iterable[np.ndarray]], n_columns: int,
                        quantiles: Sequence[float] = (0.25, 0.5, 0.75), *, bins: int = 4096,
                        collect_cap: int = 4096, max_passes: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-column quantiles of data streamed in row chunks, exact, with bounded memory.

    Equal to ``numpy.nanquantile(all_rows, quantiles, axis=0)`` (method ``"linear"``) without holding
    all rows: each quantile needs two order statistics per column; a first pass finds the column
    ranges, then each pass histograms the values inside every order statistic's current interval into
    ``bins`` bins and narrows the interval to the bin that holds the wanted rank, until the interval
    holds at most ``collect_cap`` values (then they are collected and sorted) or a single distinct
    value. Memory is ``O(n_columns * bins)`` plus the collected values, independent of the number of
    rows; most data need three passes.

    Parameters
    ----------
    chunks
        Called once per pass; returns an iterable of float arrays ``[t, n_columns]`` (NaN = missing).
    n_columns
        Number of columns.

    Returns
    -------
    values ``[len(quantiles), n_columns]`` (NaN for a column without values) and counts ``[n_columns]``.
    """
    qs = np.asarray(quantiles, dtype=float)
    n = np.zeros(n_columns, np.int64)
    lo = np.full(n_columns, np.inf)
    hi = np.full(n_columns, -np.inf)
    for chunk in chunks():  # pass 1: counts and ranges
        x = np.asarray(chunk, dtype=np.float64).reshape(-1, n_columns)
        finite = np.isfinite(x)
        n += finite.sum(axis=0)
        if x.size:
            lo = np.fmin(lo, np.nanmin(np.where(finite, x, np.inf), axis=0))
            hi = np.fmax(hi, np.nanmax(np.where(finite, x, -np.inf), axis=0))
    lo, hi = np.where(n > 0, lo, 0.0), np.where(n > 0, hi, 0.0)  # empty columns stay inactive
    # Order statistics k = floor(h) and k + 1 (clipped) of h = (n - 1) q, for every quantile.
    h = (np.maximum(n, 1) - 1)[None, :] * qs[:, None]
    k_lo = np.floor(h).astype(np.int64)
    k_hi = np.minimum(k_lo + 1, np.maximum(n, 1) - 1)
    ranks = np.concatenate([k_lo, k_hi], axis=0).T  # [C, J]
    n_targets = ranks.shape[1]
    t_lo = np.repeat(lo[:, None], n_targets, axis=1)
    t_hi = np.repeat(np.nextafter(hi, np.inf)[:, None], n_targets, axis=1)  # half-open [lo, hi)
    below = np.zeros_like(ranks)
    value = np.full(ranks.shape, np.nan)
    active = np.repeat((n > 0)[:, None], n_targets, axis=1)
    collect = np.zeros_like(active)
    cols = np.arange(n_columns)

    for _ in range(max_passes):
        if not active.any():
            break
        hist = active & ~collect
        coll = active & collect
        # Order statistics whose intervals coincide (all of them on the first pass, k and k + 1 often
        # later) share one histogram.
        groups: dict[int, int] = {}
        for j in range(n_targets):
            if not hist[:, j].any():
                continue
            groups[j] = next((g for g in groups.values() if np.array_equal(hist[:, g], hist[:, j])
                              and np.array_equal(t_lo[:, g], t_lo[:, j]) and np.array_equal(t_hi[:, g], t_hi[:, j])), j)
        owners = sorted(set(groups.values()))
        hists = {g: _IntervalHistogram(t_lo[:, g], t_hi[:, g], hist[:, g], bins) for g in owners}
        collect_targets = [j for j in range(n_targets) if coll[:, j].any()]
        gathered: dict[int, list[np.ndarray]] = {j: [] for j in collect_targets}
        for chunk in chunks():
            x = np.asarray(chunk, dtype=np.float64).reshape(-1, n_columns)
            for g in owners:
                hists[g].add(x)
            for j in collect_targets:
                inside = (x >= t_lo[:, j]) & (x < t_hi[:, j]) & coll[None, :, j]
                if inside.any():
                    rows, cc = np.nonzero(inside)
                    gathered[j].append(np.stack([cc.astype(np.float64), x[rows, cc]]))
        for j in collect_targets:  # exact order statistic among the collected values
            use = coll[:, j]
            both = np.concatenate(gathered[j], axis=1) if gathered[j] else np.zeros((2, 0))
            order = np.lexsort((both[1], both[0]))
            cc_sorted, xv_sorted = both[0, order].astype(np.int64), both[1, order]
            starts = np.searchsorted(cc_sorted, cols)
            for c in np.flatnonzero(use):
                value[c, j] = xv_sorted[starts[c] + ranks[c, j] - below[c, j]]
            active[use, j] = False
        for j, g in groups.items():
            hg = hists[g]
            counts = hg.finish()
            use = hist[:, j].copy()
            same = use & (hg.vmin == hg.vmax)  # one distinct value left in the interval: it is the answer
            value[same, j] = hg.vmin[same]
            active[same, j] = False
            use &= ~same
            cum = np.cumsum(counts, axis=1)
            target = (ranks[:, j] - below[:, j])[:, None]
            b = np.minimum((cum <= target).sum(axis=1), bins - 1)
            before = np.where(b > 0, cum[cols, np.maximum(b - 1, 0)], 0)
            below[use, j] += before[use]
            t_lo[use, j], t_hi[use, j] = hg.edges[cols, b][use], hg.edges[cols, b + 1][use]
            collect[use, j] = counts[cols, b][use] <= collect_cap
    if active.any():  # pragma: no cover - needs > max_passes of 4096-fold narrowing
        raise RuntimeError("streaming_quantiles did not converge")
    frac = h - k_lo
    v_lo, v_hi = value[:, : len(qs)].T, value[:, len(qs):].T
    out = v_lo + frac * (v_hi - v_lo)
    out[:, n == 0] = np.nan
    return out, n


class _IntervalHistogram:
    """Per-column histogram of the values inside ``[lo, hi)`` (``bins`` equal bins), with min/max."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, use: np.ndarray, bins: int, flush_at: int = 1 << 22):
        self.lo, self.hi, self.use, self.bins = lo.copy(), hi.copy(), use.copy(), bins
        self.edges = lo[:, None] + (hi - lo)[:, None] * (np.arange(bins + 1) / bins)[None, :]
        self.edges[:, -1] = hi
        self.counts = np.zeros(len(lo) * bins, np.int64)
        self.vmin = np.full(len(lo), np.inf)
        self.vmax = np.full(len(lo), -np.inf)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._flush_at = flush_at

    def add(self, x: np.ndarray) -> None:
        inside = (x >= self.lo) & (x < self.hi) & self.use[None, :]
        if not inside.any():
            return
        rows, cc = np.nonzero(inside)
        xv = x[rows, cc]
        lo = self.lo[cc]
        b = np.clip(((xv - lo) / (self.hi[cc] - lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        # Make the bin agree with the explicit edges that the next pass compares against.
        b -= (xv < self.edges[cc, b]) & (b > 0)
        b += (xv >= self.edges[cc, b + 1]) & (b < self.bins - 1)
        self._pending.append(cc * self.bins + b)
        self._n_pending += b.size
        np.minimum.at(self.vmin, cc, xv)
        np.maximum.at(self.vmax, cc, xv)
        if self._n_pending >= self._flush_at:
            self._flush()

    def _flush(self) -> None:
        if self._pending:  # one bincount per few million values, not one per chunk
            self.counts += np.bincount(np.concatenate(self._pending), minlength=self.counts.size)
            self._pending, self._n_pending = [], 0

    def finish(self) -> np.ndarray:
        self._flush()
        return self.counts.reshape(len(self.lo), self.bins)


def norm_stats(shards: Sequence[str | Path], splits: Sequence[str] = ("train",),
               **kwargs: Any) -> tuple[pd.DataFrame, int]:
    """Per-parcel median, quartiles and IQR over the time points of ``splits`` rows (train only).

    Zero-variance parcels of a run are left out of that parcel's statistics (a constant series says
    nothing about the scale). A zero IQR becomes 1 so scaling never divides by zero.

    Returns
    -------
    The per-parcel table (``parcel_index``, ``parcel``, ``median``, ``iqr``, ``q25``, ``q75``,
    ``iqr_raw``, ``n_values``) and the number of runs it was computed from.
    """
    metas = [(p, shard_metadata(p)) for p in shards]
    check_compatible(metas)
    if not metas:
        raise InputError("shards", "no shards given")
    names = metas[0][1]["parcel_names"]
    n_parcels = len(names)
    n_runs = 0

    def chunks() -> Iterator[np.ndarray]:
        nonlocal n_runs
        n_runs = 0
        for path in shards:
            for row, series in iter_series(path, splits, columns=["zero_variance"]):
                n_runs += 1
                zero = np.asarray(row["zero_variance"], dtype=bool)
                if zero.any():
                    series = series.astype(np.float64)
                    series[:, zero] = np.nan
                yield series

    values, counts = streaming_quantiles(chunks, n_parcels, (0.25, 0.5, 0.75), **kwargs)
    if n_runs == 0:
        raise InputError(Path(shards[0]).parent, f"no rows of split(s) {list(splits)} in the shards: cannot "
                                                 "compute normalization statistics")
    q25, median, q75 = values
    iqr_raw = q75 - q25
    iqr = np.where(np.isfinite(iqr_raw) & (iqr_raw > 0), iqr_raw, 1.0)
    return pd.DataFrame({
        "parcel_index": np.arange(n_parcels, dtype=np.int32),
        "parcel": names,
        "median": np.where(np.isfinite(median), median, 0.0),
        "iqr": iqr,
        "q25": q25,
        "q75": q75,
        "iqr_raw": iqr_raw,
        "n_values": counts,
    }), n_runs


def manifest_table(shards: Sequence[str | Path]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Every row of every shard with its file, bucket, row group and row index (no array columns)."""
    tables = []
    metas = []
    for path in shards:
        handle, meta = open_shard(path)
        metas.append((path, meta))
        scalar_cols = [f.name for f in handle.schema_arrow if f.name not in ARRAY_COLUMNS]
        for rg in range(handle.num_row_groups):
            try:
                table = handle.read_row_group(rg, columns=scalar_cols)
            except Exception as err:
                raise parquet_error(path, f"shard (row group {rg})", err) from err
            n = table.num_rows
            table = table.append_column("shard", pa.array([Path(path).name] * n, pa.string()))
            table = table.append_column("row_group", pa.array(np.full(n, rg, np.int32)))
            table = table.append_column("row_index", pa.array(np.arange(n, dtype=np.int32)))
            tables.append(table)
    check_compatible(metas)
    if not tables:
        raise InputError("shards", "no shards given")
    table = pa.concat_tables(tables, promote_options="permissive")
    front = ["bucket", "shard", "row_group", "row_index", "run_id", "subject", "split", "site", "n_timepoints"]
    table = table.select(front + [c for c in table.column_names if c not in front])
    return table, [m for _, m in metas]


def write_manifest(shards: Sequence[str | Path], manifest: str | Path, norm_stats_path: str | Path, *,
                   splits: Sequence[str] = ("train",)) -> dict[str, Any]:
    """Write ``manifest.parquet`` and ``norm_stats.parquet`` for a set of shards (atomically)."""
    table, metas = manifest_table(shards)
    meta = {"schema_version": SCHEMA_VERSION, "atlas": metas[0].get("atlas"), "n_shards": len(metas),
            "shards": [Path(p).name for p in shards], "config_hashes": sorted({str(m.get("config_hash")) for m in metas}),
            "n_rows": table.num_rows,
            # Checked by every reader of the shards (verify_shards), once per process.
            SHARD_CHECKSUMS_KEY: {Path(p).name: sha256_file(p) for p in shards}}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    stats, n_runs = norm_stats(shards, splits)
    stats_table = pa.Table.from_pandas(stats, preserve_index=False)
    stats_meta = {"schema_version": SCHEMA_VERSION, "atlas": metas[0].get("atlas"), "splits": list(splits),
                  "n_runs": n_runs, "formula": "(x - median) / iqr; iqr = q75 - q25, 1 where zero",
                  "method": "exact per-parcel quantiles (numpy 'linear'), streamed (streaming_quantiles); "
                            "zero-variance parcels of a run excluded",
                  "parcel_names": metas[0].get("parcel_names")}
    stats_table = stats_table.replace_schema_metadata({METADATA_KEY: json.dumps(stats_meta, sort_keys=True).encode()})
    with atomic_path(manifest) as tmp_m, atomic_path(norm_stats_path) as tmp_s:
        pq.write_table(table, tmp_m, **PARQUET_WRITE_OPTIONS)
        pq.write_table(stats_table, tmp_s, **PARQUET_WRITE_OPTIONS)
    return {"n_rows": table.num_rows, "n_train_runs": n_runs}


def read_norm_stats(path: str | Path, parcel_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(median, iqr)`` float32 ``[N]`` from ``norm_stats.parquet``, checked against the parcels."""
    try:
        table = pq.read_table(path, **PARQUET_READ_OPTIONS)
    except Exception as err:
        raise parquet_error(path, "normalization statistics", err) from err
    shard_metadata(path, table.schema)
    for col in ("parcel", "median", "iqr"):
        if col not in table.column_names:
            raise InputError(path, f"normalization statistics lack the {col!r} column")
    if parcel_names is not None and table.column("parcel").to_pylist() != list(parcel_names):
        raise InputError(path, f"parcels ({table.num_rows}) differ from the shards' ({len(parcel_names)})")
    median = table.column("median").to_numpy().astype(np.float32)
    iqr = table.column("iqr").to_numpy().astype(np.float32)
    if not (np.isfinite(median).all() and np.isfinite(iqr).all() and (iqr > 0).all()):
        raise InputError(path, "normalization statistics contain non-finite or non-positive IQR values")
    return median, iqr


# -- command line --------------------------------------------------------------------------------------------
def cli_main_shard(argv: list[str]) -> int:
    """``brainfoundry shard --runs BUCKET_RUNS --labels TSV --timeseries-pattern P [--pfc-pattern P] --out SHARD``"""
    parser = argparse.ArgumentParser(prog="brainfoundry shard", description=cli_main_shard.__doc__)
    parser.add_argument("--runs", required=True, help="the bucket's run table (bucket-<k>.runs.parquet)")
    parser.add_argument("--labels", required=True, help="atlas labels TSV (index, name, x, y, z, ...)")
    parser.add_argument("--timeseries-pattern", required=True,
                        help="per-run series parquet path with {subject} and {run_id}")
    parser.add_argument("--sidecar-pattern", default=None, help="per-run JSON sidecar (default: series path .json)")
    parser.add_argument("--pfc-pattern", default=None, help="per-run pFC parquet path with {subject} and {run_id}")
    parser.add_argument("--atlas", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bucket", type=int, default=None)
    parser.add_argument("--row-group-size", type=int, default=64)
    parser.add_argument("--compression", default="zstd", choices=["zstd", "snappy", "lz4", "gzip", "none"])
    parser.add_argument("--compression-level", type=int, default=None)
    parser.add_argument("--timeseries-compression", default=None, choices=["zstd", "snappy", "lz4", "gzip", "none"],
                        help="codec of the series column (default: --compression)")
    parser.add_argument("--config-json", default=None, help="JSON of the config values that shaped the shard")
    args = parser.parse_args(argv)
    runs = read_bucket_runs(args.runs)
    config = json.loads(args.config_json) if args.config_json else {}
    info = write_shard(runs, args.out, labels=args.labels, atlas=args.atlas,
                       timeseries_pattern=args.timeseries_pattern, pfc_pattern=args.pfc_pattern,
                       sidecar_pattern=args.sidecar_pattern, row_group_size=args.row_group_size,
                       compression=args.compression, compression_level=args.compression_level,
                       timeseries_compression=args.timeseries_compression, config=config, bucket=args.bucket,
                       source=args.runs)
    print(f"wrote {info['path']}: {info['n_rows']} runs, {info['raw_bytes'] / 1e6:.1f} MB of arrays")
    return 0


def cli_main_manifest(argv: list[str]) -> int:
    """``brainfoundry manifest SHARD... --manifest OUT --norm-stats OUT [--splits train]``"""
    parser = argparse.ArgumentParser(prog="brainfoundry manifest", description=cli_main_manifest.__doc__)
    parser.add_argument("shards", nargs="+", help="bucket-<k>.parquet files (or one shard directory)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--norm-stats", required=True)
    parser.add_argument("--splits", nargs="+", default=["train"], help="splits the statistics come from")
    args = parser.parse_args(argv)
    shards = args.shards
    if len(shards) == 1 and Path(shards[0]).is_dir():
        shards = [str(p) for p in find_shards(shards[0])]
    info = write_manifest(shards, args.manifest, args.norm_stats, splits=args.splits)
    print(f"wrote {args.manifest} ({info['n_rows']} rows) and {args.norm_stats} "
          f"(from {info['n_train_runs']} {'/'.join(args.splits)} runs)")
    return 0
