"""Per-run files: one writer and one reader for each contract (docs/ARCHITECTURE.md, "File contracts").

- the parcel time series parquet (T rows x N float32 columns named by the parcels) and its JSON
  sidecar: :func:`write_series`, :func:`read_series`, :func:`read_series_sidecar`;
- the pFC relmat parquet (one row per view) and its sidecar: :func:`write_relmat`, :func:`read_relmat`;
- the prepared atlas labels TSV: :func:`write_labels`, :func:`read_labels`.

Every parquet here is written with page checksums, and its sha256 goes into the JSON sidecar written
after it (``FileSha256``: file name -> sha256). Readers verify both, so a flipped bit is a named
``InputError`` instead of a changed value. Files written before checksums were recorded have no
``FileSha256`` entry; they are still read (and their pages verified when they have page checksums).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainfoundry.errors import InputError
from brainfoundry.io import (
    atomic_path,
    read_parquet_verified,
    write_json_atomic,
    write_parquet_atomic,
)

if TYPE_CHECKING:
    import pandas as pd  # only the labels TSV needs it: imported there (a pfc job never does, ~0.3 s saved)

CHECKSUM_KEY = "FileSha256"
SERIES_COMPRESSION = "zstd"
RELMAT_COMPRESSION = "zstd"
LABEL_COLUMNS = ["index", "name", "x", "y", "z", "n_voxels", "network"]
RELMAT_COLUMNS = ("view", "seed", "keep_fraction", "n_kept", "pfc")

PathLike = str | os.PathLike


def sidecar_of(path: PathLike) -> Path:
    """The JSON sidecar beside a per-run parquet (``paths.Layout``'s ``timeseries_json``/``pfc_json``)."""
    return Path(path).with_suffix(".json")


def _read_json(path: PathLike, what: str) -> dict[str, Any]:
    try:
        info = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise InputError(path, f"{what} not found") from err
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read the {what} ({err})") from err
    if not isinstance(info, dict):
        raise InputError(path, f"{what} is not a JSON object")
    return info


def _recorded_sha256(path: PathLike, sidecar: PathLike | None, what: str) -> tuple[str | None, Path | None]:
    """The sha256 that ``path``'s sidecar recorded for it (None for files written before checksums).

    An explicit ``sidecar`` must exist; the default one beside the file is optional (a parquet made by
    hand, e.g. in tests, has none), and then only the page checksums guard the file.
    """
    where = Path(sidecar) if sidecar is not None else sidecar_of(path)
    if sidecar is None and not where.exists():
        return None, None
    recorded = _read_json(where, f"JSON sidecar of the {what}").get(CHECKSUM_KEY) or {}
    expected = recorded.get(Path(path).name) if isinstance(recorded, Mapping) else None
    return (str(expected) if expected else None), where


# -- parcel time series ----------------------------------------------------------------------------
def _series_table(values: np.ndarray, names: Sequence[str]):
    import pyarrow as pa

    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"series shape {values.shape} does not match {len(names)} parcel names")
    return pa.table({str(name): values[:, i] for i, name in enumerate(names)})


def write_series(path: PathLike, values: np.ndarray, names: Sequence[str], sidecar: Mapping[str, Any], *,
                 sidecar_path: PathLike | None = None,
                 raw: tuple[PathLike, np.ndarray] | None = None) -> dict[str, Any]:
    """Write one run's series parquet (and optionally the uncleaned ``raw`` means), then the sidecar.

    Each file is written atomically; the sidecar comes last and records every parquet's sha256, so
    a run whose sidecar exists has all its files complete.

    Parameters
    ----------
    values
        float32 ``[T, N]`` (kept volumes, in order); columns are named by ``names`` (label order).
    sidecar
        The sidecar's keys (file contract in docs/ARCHITECTURE.md); ``FileSha256`` is added here.
    sidecar_path
        Default: beside ``path`` with ``.json``.
    raw
        ``(path, values [T_in, N])``: the parcellate step's uncleaned means of every volume.

    Returns
    -------
    The sidecar as written.
    """
    sums = {}
    if raw is not None:
        raw_path, raw_values = raw
        sums[Path(raw_path).name] = write_parquet_atomic(_series_table(raw_values, names), raw_path,
                                                         compression=SERIES_COMPRESSION)
    sums[Path(path).name] = write_parquet_atomic(_series_table(values, names), path, compression=SERIES_COMPRESSION)
    info = {**dict(sidecar), CHECKSUM_KEY: sums}
    write_json_atomic(sidecar_path if sidecar_path is not None else sidecar_of(path), info)
    return info


def read_series_sidecar(path: PathLike) -> dict[str, Any]:
    """A time-series JSON sidecar (the ``.json`` file itself)."""
    return _read_json(path, "time-series JSON sidecar")


def read_series(path: PathLike, parcel_names: Sequence[str] | None = None, *, sidecar: PathLike | None = None,
                finite: bool = True) -> tuple[np.ndarray, list[str]]:
    """One run's series as C-contiguous float32 ``[T, N]`` and its parcel names, verified and validated.

    Parameters
    ----------
    parcel_names
        When given, the file must hold exactly these parcels; columns come back in this order.
    sidecar
        The sidecar holding the file's sha256 (default: beside the file, if present). The raw means of
        the parcellate step are recorded in the cleaned series' sidecar.
    finite
        Refuse NaN/inf values (the raw means are read with ``finite=False``).

    Raises
    ------
    InputError
        Naming the file: checksum mismatch or corrupt pages, unreadable, no rows, other parcels than
        ``parcel_names``, non-numeric columns, NaN/inf values.
    """
    import pyarrow as pa

    expected, where = _recorded_sha256(path, sidecar, "time-series parquet")
    table = read_parquet_verified(path, "time-series parquet", sha256=expected, recorded_in=where)
    names = [str(n) for n in table.column_names]
    if parcel_names is not None:
        wanted = [str(n) for n in parcel_names]
        if len(names) != len(wanted):
            raise InputError(path, f"{len(names)} parcel columns, but the atlas labels have {len(wanted)}; "
                                   "every run of one atlas must have the same parcels")
        if names != wanted:
            if set(names) != set(wanted):
                unknown = sorted(set(names) - set(wanted))[:5]
                raise InputError(path, f"parcel columns {unknown} are not atlas labels")
            table, names = table.select(wanted), wanted  # same parcels, other order
    if not names or table.num_rows == 0:
        raise InputError(path, f"empty time series ({table.num_rows} rows x {len(names)} parcels)")
    try:
        series = np.column_stack([c.to_numpy() for c in table.columns]).astype(np.float32, copy=False)
    except (pa.ArrowInvalid, TypeError, ValueError) as err:
        raise InputError(path, f"parcel columns are not numeric ({err})") from err
    if finite:
        bad = ~np.isfinite(series)
        if bad.any():
            t, p = np.argwhere(bad)[0]
            raise InputError(path, f"{int(bad.sum())} NaN/inf values, first at volume {t}, parcel {names[p]!r}")
    return np.ascontiguousarray(series), names


# -- pFC relmat ---------------------------------------------------------------------------------------
def write_relmat(path: PathLike, *, views: np.ndarray, seeds: np.ndarray, n_kept: np.ndarray,
                 keep_fraction: float, dtype: str, sidecar: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                 sidecar_path: PathLike | None = None) -> dict[str, Any]:
    """Write one run's pFC parquet (``views`` ``[K, E]`` stored as ``dtype``), then its sidecar.

    ``metadata`` goes into the parquet's ``brainfoundry`` key-value metadata; the sidecar gets the
    parquet's sha256 under ``FileSha256``. Returns the sidecar as written.
    """
    import pyarrow as pa

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    views = np.asarray(views).astype(np.dtype(dtype))
    k, e = views.shape
    values = pa.array(views.reshape(-1), type=pa.float16() if dtype == "float16" else pa.float32())
    table = pa.table({
        "view": pa.array(np.arange(k, dtype=np.int32)),
        "seed": pa.array(np.asarray(seeds).astype(np.int64)),
        "keep_fraction": pa.array(np.full(k, keep_fraction, dtype=np.float32)),
        "n_kept": pa.array(np.asarray(n_kept).astype(np.int32)),
        "pfc": pa.FixedSizeListArray.from_arrays(values, e),
    })
    if metadata:
        table = table.replace_schema_metadata({"brainfoundry": json.dumps(dict(metadata), sort_keys=True)})
    digest = write_parquet_atomic(table, path, compression=RELMAT_COMPRESSION)
    info = {**dict(sidecar), CHECKSUM_KEY: {Path(path).name: digest}}
    write_json_atomic(sidecar_path if sidecar_path is not None else sidecar_of(path), info)
    return info


def read_relmat(path: PathLike, n_parcels: int, *, sidecar: PathLike | None = None) -> dict[str, Any]:
    """One run's pFC views ``[K, E]`` (stored dtype), seeds, kept counts and keep fraction, verified.

    Raises
    ------
    InputError
        Naming the file: checksum mismatch or corrupt pages, missing columns, no views, views of the
        wrong size for ``n_parcels``, NaN/inf values, views that disagree on ``keep_fraction``.
    """
    expected, where = _recorded_sha256(path, sidecar, "pFC parquet")
    table = read_parquet_verified(path, "pFC parquet", sha256=expected, recorded_in=where)
    for col in RELMAT_COLUMNS:
        if col not in table.column_names:
            raise InputError(path, f"pFC parquet lacks the {col!r} column")
    if table.num_rows < 1:
        raise InputError(path, "pFC parquet has no views")
    table = table.sort_by("view")
    column = table.column("pfc").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    n_edges = n_parcels * (n_parcels - 1) // 2
    if values.size != table.num_rows * n_edges:
        raise InputError(path, f"pFC views have {values.size // max(table.num_rows, 1)} values each, expected "
                               f"{n_edges} (upper triangle of {n_parcels} parcels)")
    if values.dtype not in (np.float16, np.float32):
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError(path, "pFC views contain NaN/inf values")
    keep = np.unique(table.column("keep_fraction").to_numpy())
    if keep.size != 1:
        raise InputError(path, f"pFC views disagree on keep_fraction ({keep.tolist()})")
    return {
        "views": values.reshape(table.num_rows, n_edges),
        "seed": table.column("seed").to_numpy().astype(np.int64),
        "n_kept": table.column("n_kept").to_numpy().astype(np.int32),
        "keep_fraction": float(keep[0]),
    }


# -- atlas labels TSV ---------------------------------------------------------------------------------
def write_labels(path: PathLike, table: pd.DataFrame) -> Path:
    """Write the prepared labels TSV (columns :data:`LABEL_COLUMNS`, label order = row order), atomically."""
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"labels table lacks columns {missing}")
    with atomic_path(path) as tmp:
        table[LABEL_COLUMNS].to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    return Path(path)


def read_labels(path: PathLike) -> pd.DataFrame:
    """The prepared labels TSV (label order = row order): ``index``, ``name`` (unique), ``x``, ``y``,
    ``z`` (float, NaN where unknown), ``network`` ("" where unknown) and any other columns."""
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except FileNotFoundError as err:
        raise InputError(path, "atlas labels TSV not found") from err
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(path, f"cannot read atlas labels TSV: {err}") from err
    missing = [c for c in ("index", "name") if c not in table.columns]
    if missing:
        raise InputError(path, f"atlas labels TSV lacks columns {missing}")
    table["name"] = table["name"].astype(str)
    if table["name"].duplicated().any():
        raise InputError(path, f"atlas labels TSV has duplicate parcel names "
                               f"{sorted(set(table.loc[table['name'].duplicated(), 'name']))[:5]}")
    for axis in "xyz":
        table[axis] = pd.to_numeric(table[axis], errors="coerce") if axis in table.columns else np.nan
    table["network"] = table["network"].fillna("").astype(str) if "network" in table.columns else ""
    return table
