"""The ``timeseries`` entry point: already parcellated series plus a phenotype table.

Two steps, like the other entry points:

- ``index_timeseries(config)`` reads the phenotype table (one row per run), maps its columns onto the
  run-table contract (``runtable.py``) by ``config["timeseries"]["columns"]``, finds each row's series
  file and its TR, and returns the run table. It only stats files, so building the DAG stays fast.
- ``import_run`` (CLI ``brainfoundry import-timeseries``, rule ``import_timeseries``) reads one series
  file and writes exactly what parcellation writes for a run: the time-series parquet (columns named
  by the atlas labels TSV) and its JSON sidecar with TR and QC (zero-variance and all-zero parcels
  flagged, so they do not poison correlations with NaN later).

Series formats: ABIDE Preprocessed Connectomes Project ROI files (``*_rois_<atlas>.1D``, also ``.1D.gz``:
a header line ``#1 #2 ... #N`` naming the atlas label values, then one whitespace-separated row per
volume), TSV/CSV (one row per volume, optional header row, one column per parcel in atlas label order;
``.gz`` allowed) and NPY (a 2-D ``[T, N]`` array).

ABIDE site: ``SITE_ID`` of the phenotype table (13 values here: CALTECH, KKI, LEUVEN_1, MAX_MUN, OHSU,
SBL, STANFORD, UCLA_1, UCLA_2, UM_1, UM_2, USM, YALE). It is the acquisition site ABIDE itself uses, the
unit of its site-grouped cross-validation, and the key of the per-site TR table. The ``FILE_ID`` prefix
splits some sites further (``MaxMun_a`` .. ``MaxMun_d``), but those are sub-samples scanned at one site
with one protocol, so they stay one site; ``file_id`` is kept in the run table for anyone who needs it.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.naming import run_prefix

log = logging.getLogger(__name__)

FORMATS = ("auto", "abide_1d", "tsv", "csv", "npy")
#: timeseries.standardize: per run and parcel over time, at import (before pFC, shards and baselines).
STANDARDIZE = ("zscore", "demean", "none")
#: A series is "not centred" when, for the median parcel, |mean| exceeds this many standard deviations
#: (means dominate the variance: raw BOLD around 1e4 with fluctuations of ~1 %, not a denoised series).
CENTRED_MAX_MEAN_OVER_STD = 1.0
#: Contract name -> phenotype column, as the ABIDE PCP phenotype file names them (config default).
ABIDE_COLUMNS = {"file_id": "FILE_ID", "subject": "SUB_ID", "site": "SITE_ID", "age": "AGE_AT_SCAN",
                 "sex": "SEX", "diagnosis": "DX_GROUP", "mean_fd": "func_mean_fd"}
REQUIRED_MAPPED = ("subject",)
_LABEL_RE = re.compile(r"[A-Za-z0-9]+")

#: Defaults of the ``timeseries`` section (the schema documents the keys; the values live here).
DEFAULTS = {
    "dataset_name": "timeseries", "task": "rest", "format": "auto", "file_pattern": "{file_id}",
    "columns": {}, "extra_columns": {}, "value_maps": {}, "missing_values": [],
    "no_file_values": [], "subject_zero_pad": 0, "tr": None, "tr_by_site": {}, "tr_by_file": {},
    "on_missing_file": "error", "include_sites": [], "include_subjects": [], "include_files": [],
    "exclude_subjects": [], "max_runs_per_site": None, "compute_tsnr": False,
    "standardize": "zscore", "short_series": "skip",
}


# -- configuration ----------------------------------------------------------------------------------
def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``timeseries`` config section with defaults filled in (schema: config/config.schema.yaml)."""
    ts = dict(config.get("timeseries") or {})
    for key in ("phenotypes", "series_dir"):
        if not ts.get(key):
            raise ConfigError(f"timeseries.{key}", "required for entry_point: timeseries")
    for key, value in DEFAULTS.items():
        ts.setdefault(key, value)
    ts["columns"] = dict(ts["columns"])
    if ts["format"] not in FORMATS:
        raise ConfigError("timeseries.format", f"must be one of {FORMATS}, got {ts['format']!r}")
    missing = [name for name in REQUIRED_MAPPED if name not in ts["columns"]]
    if missing:
        raise ConfigError("timeseries.columns", f"must map {missing} to phenotype columns")
    return ts


def _code(value: Any) -> str:
    """A phenotype value as a lookup key: 1, 1.0 and "1" all become "1"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


# -- the phenotype table -> run table ----------------------------------------------------------------
def read_phenotypes(path: str | Path, missing_values=()) -> pd.DataFrame:
    """The phenotype table (CSV, or TSV by extension), with ``missing_values`` read as null."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "phenotype table not found")
    sep = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz", ".txt")) else ","
    na = [str(v) for v in missing_values]
    try:
        return pd.read_csv(path, sep=sep, na_values=na, keep_default_na=True, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise InputError(path, f"cannot parse the phenotype table ({err})") from err


def _subject_label(raw: Any, pad: int, source: Path) -> str:
    """A BIDS subject label: ``sub-`` stripped, integers zero-padded to ``pad`` digits, alphanumeric."""
    text = _code(raw)
    text = text.removeprefix("sub-")
    if pad and text.isdigit():
        text = text.zfill(pad)
    if not _LABEL_RE.fullmatch(text):
        raise InputError(source, f"subject id {raw!r} is not a valid BIDS label (letters and digits only)")
    return text


def index_timeseries(config: Mapping[str, Any]) -> pd.DataFrame:
    """The run table of the ``timeseries`` entry point: one row per (phenotype row with a series file).

    Columns: the run-table contract (``run_id``, ``subject``, ``session``, ``task``, ``run``,
    ``dataset``, ``site``, ``tr``), ``timeseries_file`` and ``timeseries_format``, ``file_id``, the
    mapped phenotypes (``age``, ``sex``, ``diagnosis`` recoded by ``value_maps``, ``mean_fd``...) and
    ``extra_columns``. Rows without a series (``no_file_values``, or a missing file with
    ``on_missing_file: skip``) are left out; ``table.attrs["dropped"]`` lists them with the reason.

    Raises
    ------
    InputError
        The phenotype table lacks a mapped column, has duplicate subject ids (per session/run), has a
        code that ``value_maps`` does not know, or a series file is missing (``on_missing_file: error``).
    ConfigError
        A run's TR is known neither from a TR column, ``tr_by_file``, ``tr_by_site`` nor ``tr``.
    """
    ts = _settings(config)
    source = Path(ts["phenotypes"])
    table = read_phenotypes(source, ts["missing_values"])
    mapped = {**ts["columns"], **dict(ts["extra_columns"])}
    absent = {name: col for name, col in mapped.items() if col not in table.columns}
    if absent:
        listed = ", ".join(f"{col!r} (for {name})" for name, col in absent.items())
        raise InputError(source, f"missing mapped column(s) {listed}; columns present: {list(table.columns)[:40]}")

    cols = ts["columns"]
    out = pd.DataFrame(index=table.index)
    out["subject"] = [_subject_label(v, int(ts["subject_zero_pad"]), source) for v in table[cols["subject"]]]
    out["session"] = table[cols["session"]].map(_optional_label) if "session" in cols else None
    out["run"] = table[cols["run"]].map(_optional_label) if "run" in cols else None
    out["task"] = ts["task"]
    out["dataset"] = ts["dataset_name"]
    out["site"] = table[cols["site"]].map(lambda v: None if pd.isna(v) else _code(v)) if "site" in cols else None
    out["file_id"] = table[cols["file_id"]].map(lambda v: None if pd.isna(v) else _code(v)) \
        if "file_id" in cols else out["subject"]
    out["run_id"] = [run_prefix(s, task=ts["task"], session=ses, run=r)
                     for s, ses, r in zip(out["subject"], out["session"], out["run"])]
    dup = out["run_id"][out["run_id"].duplicated(keep=False)]
    if len(dup):
        raise InputError(source, f"duplicate subject ids (same subject/session/run in several rows): "
                                 f"{sorted(set(dup))[:10]} ({dup.nunique()} ids)")

    for name, col in mapped.items():
        if name in ("subject", "session", "run", "site", "file_id", "tr"):
            continue
        out[name] = _recode(table[col], ts["value_maps"].get(name), source, col)

    dropped: list[dict[str, str]] = []
    keep = _apply_filters(out, ts, dropped)
    no_file = {_code(v) for v in ts["no_file_values"]}
    paths, formats = {}, {}
    for idx in keep:
        row = out.loc[idx]
        if row["file_id"] is None or row["file_id"] in no_file:
            dropped.append({"run_id": row["run_id"], "file_id": str(row["file_id"]), "reason": "no series file listed"})
            continue
        path = Path(ts["series_dir"]) / ts["file_pattern"].format(
            file_id=row["file_id"], subject=row["subject"], site=row["site"] or "",
            session=row["session"] or "", run=row["run"] or "")
        if not path.is_file():
            if ts["on_missing_file"] == "skip":
                dropped.append({"run_id": row["run_id"], "file_id": row["file_id"], "reason": f"file not found: {path}"})
                continue
            raise InputError(path, f"series file of phenotype row {row['file_id']!r} not found "
                                   f"(timeseries.on_missing_file: skip leaves such rows out)")
        paths[idx] = str(path)
        formats[idx] = detect_format(path) if ts["format"] == "auto" else ts["format"]
    out = out.loc[list(paths)]
    out["timeseries_file"] = pd.Series(paths)
    out["timeseries_format"] = pd.Series(formats)
    out["tr"] = [_tr_of(row, table.loc[idx], ts) for idx, row in out.iterrows()]
    out = out.set_index("run_id").sort_index()
    out = _check_shapes(out, config, ts, dropped)
    out.attrs["dropped"] = dropped
    if dropped:
        reasons = pd.Series([d["reason"].split(":")[0] for d in dropped]).value_counts()
        log.warning("timeseries index: %d of %d phenotype rows left out (%s)", len(dropped), len(table),
                    ", ".join(f"{n} {r}" for r, n in reasons.items()))
    return out


def _check_shapes(out: pd.DataFrame, config: Mapping[str, Any], ts: Mapping[str, Any],
                  dropped: list) -> pd.DataFrame:
    """Read each series' shape (cheap: a header or a line count, no values parsed) and apply the
    start-up checks of brainfoundry.checks: one region count for all files, no series shorter than
    the model window (``timeseries.short_series``: skip names them, error stops)."""
    from brainfoundry import checks

    shapes = {run_id: series_shape(path, fmt)
              for run_id, path, fmt in zip(out.index, out["timeseries_file"], out["timeseries_format"])}
    checks.check_region_counts(shapes, dict(zip(out.index, out["timeseries_file"])), config)
    short = checks.short_series(shapes, dict(zip(out.index, out["timeseries_file"])), config, ts["short_series"])
    for run_id in short:
        dropped.append({"run_id": run_id, "file_id": str(out.loc[run_id, "file_id"]),
                        "reason": f"shorter than the model window: {shapes[run_id][0]} volumes"})
    out["n_volumes"] = [shapes[r][0] for r in out.index]
    out = out.drop(index=short)
    if len(out):  # one file's values, so raw-scaled data is said at start-up, not only in job logs
        first = out["timeseries_file"].iloc[0]
        scale = scale_check(read_series_file(first, out["timeseries_format"].iloc[0])[0])
        if not scale["centred"]:
            log.warning("%s: series are not centred (median parcel |mean| / std = %.3g); timeseries.standardize: "
                        "%s%s", first, scale["median_abs_mean_over_std"], ts["standardize"],
                        " leaves them so: baselines that keep each run's offset will look far better than they are"
                        if ts["standardize"] == "none" else " is applied at import")
    return out


def _optional_label(value: Any) -> str | None:
    if pd.isna(value) or _code(value) == "":
        return None
    text = _code(value)
    if not _LABEL_RE.fullmatch(text):
        raise ConfigError("timeseries.columns", f"session/run value {value!r} is not alphanumeric")
    return text


def _recode(values: pd.Series, mapping: Mapping | None, source: Path, column: str) -> pd.Series:
    """Map coded phenotype values to readable ones (``{1: ASD, 2: control}``); nulls stay null."""
    if not mapping:
        return values
    lookup = {_code(k): v for k, v in mapping.items()}
    codes = values.map(lambda v: None if pd.isna(v) else _code(v))
    unknown = sorted({c for c in codes.dropna() if c not in lookup})
    if unknown:
        raise InputError(source, f"column {column!r} has values {unknown[:10]} not in timeseries.value_maps "
                                 f"(known: {sorted(lookup)})")
    return codes.map(lambda c: None if pd.isna(c) else lookup[c])


def _apply_filters(out: pd.DataFrame, ts: Mapping[str, Any], dropped: list) -> list:
    """Row labels left after the subset options (sites, subjects, files, at most N runs per site)."""
    def as_set(key: str) -> set[str]:
        return {_code(v) for v in ts.get(key) or []}

    sites, subjects, files, excluded = (as_set(k) for k in
                                        ("include_sites", "include_subjects", "include_files", "exclude_subjects"))
    mask = pd.Series(True, index=out.index)
    if sites:
        mask &= out["site"].isin(sites)
    if subjects:
        mask &= out["subject"].isin(subjects) | out["subject"].str.lstrip("0").isin(subjects)
    if files:
        mask &= out["file_id"].isin(files)
    if excluded:
        mask &= ~(out["subject"].isin(excluded) | out["subject"].str.lstrip("0").isin(excluded))
    chosen = out[mask]
    cap = ts.get("max_runs_per_site")
    if cap:
        # Runs with a series come first, so the cap does not spend its places on rows without files.
        no_file = {_code(v) for v in ts["no_file_values"]}
        has_file = ~chosen["file_id"].isin(no_file) & chosen["file_id"].notna()
        ordered = chosen.assign(_f=~has_file).sort_values(["_f", "run_id"])
        chosen = ordered.groupby(ordered["site"].fillna(""), sort=False).head(int(cap))
    return list(chosen.index)


def _tr_of(row: pd.Series, raw: pd.Series, ts: Mapping[str, Any]) -> float:
    """TR in seconds: a TR column, then ``tr_by_file``, ``tr_by_site``, then ``tr``."""
    col = ts["columns"].get("tr")
    if col and not pd.isna(raw[col]):
        return float(raw[col])
    by_file = {_code(k): v for k, v in (ts["tr_by_file"] or {}).items()}
    by_site = {_code(k): v for k, v in (ts["tr_by_site"] or {}).items()}
    if row["file_id"] in by_file:
        return float(by_file[row["file_id"]])
    if row["site"] is not None and row["site"] in by_site:
        return float(by_site[row["site"]])
    if ts["tr"] is not None:
        return float(ts["tr"])
    raise ConfigError("timeseries.tr_by_site", f"no TR for {row['file_id']} (site {row['site']!r}); "
                                               "add the site to tr_by_site, or set tr / tr_by_file / columns.tr")


# -- reading one series file --------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """``abide_1d`` / ``tsv`` / ``csv`` / ``npy`` from the file name."""
    name = Path(path).name.lower()
    name = name.removesuffix(".gz")
    for suffix, fmt in ((".1d", "abide_1d"), (".tsv", "tsv"), (".csv", "csv"), (".npy", "npy")):
        if name.endswith(suffix):
            return fmt
    raise InputError(path, "unknown series format (expected .1D[.gz], .tsv[.gz], .csv[.gz] or .npy); "
                           "set timeseries.format")


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path, "rt")


def read_series_file(path: str | Path, fmt: str = "auto") -> tuple[np.ndarray, list[int] | None]:
    """One series file as float64 ``[T, N]``, plus the label values its header names (``.1D`` only).

    Raises ``InputError`` naming the file for unreadable or ragged content and for NaN/inf values.
    """
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    header: list[int] | None = None
    try:
        if fmt == "npy":
            data = np.load(path, allow_pickle=False)
        else:
            with _open_text(path) as handle:
                lines = handle.read().splitlines()
            if fmt == "abide_1d":
                tags = [ln for ln in lines if ln.lstrip().startswith("#")]
                if tags:
                    header = _parse_1d_header(tags[0], path)
                body = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
                data = np.loadtxt(body, ndmin=2) if body else np.empty((0, len(header or [])))
            else:
                delim = "\t" if fmt == "tsv" else ","
                body = [ln for ln in lines if ln.strip()]
                if body and not _is_numeric_row(body[0], delim):
                    body = body[1:]  # a header row of parcel names
                data = np.loadtxt(body, delimiter=delim, ndmin=2) if body else np.empty((0, 0))
    except InputError:
        raise
    except (OSError, EOFError, ValueError) as err:
        raise InputError(path, f"cannot read {fmt} series ({err})") from err
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise InputError(path, f"expected a 2-D [time, parcel] array, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad.any():
        t, p = np.argwhere(bad)[0]
        raise InputError(path, f"{int(bad.sum())} NaN/inf values, first at volume {t}, column {p}")
    if header is not None and len(header) != data.shape[1]:
        raise InputError(path, f"header names {len(header)} columns but rows have {data.shape[1]}")
    return data, header


def _parse_1d_header(line: str, path: Path) -> list[int]:
    tokens = line.replace("#", " ").split()
    try:
        return [int(t) for t in tokens]
    except ValueError:
        raise InputError(path, f"header line is not '#1 ... #N' label numbers: {line[:80]!r}") from None


def series_shape(path: str | Path, fmt: str = "auto") -> tuple[int, int]:
    """``(volumes, parcels)`` of a series file without parsing its values (start-up checks).

    NPY: the array header. Text formats: the ``.1D`` header's label count (else the first row's
    fields) and the number of non-empty, non-comment rows (less a TSV/CSV header row of names).
    """
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            if len(shape) != 2:
                raise InputError(path, f"expected a 2-D [time, parcel] array, got shape {shape}")
            return int(shape[0]), int(shape[1])
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as handle:
            lines = [ln.strip() for ln in handle.read().splitlines()]  # bytes: ~3x faster than text lines
        lines = [ln for ln in lines if ln]
        comments = [ln for ln in lines if ln.startswith(b"#")]
        body = [ln for ln in lines if not ln.startswith(b"#")]
        n_cols = None
        if fmt == "abide_1d" and comments:
            n_cols = len(_parse_1d_header(comments[0].decode("utf-8", "replace"), path))
        n_rows = len(body)
        if body:
            first = body[0].decode("utf-8", "replace")
            delim = {"tsv": "\t", "csv": ","}.get(fmt)
            n_cols = n_cols if n_cols is not None else len(first.split(delim) if delim else first.split())
            if delim and not _is_numeric_row(first, delim):
                n_rows -= 1  # a header row of parcel names
    except (OSError, EOFError, ValueError) as err:
        raise InputError(path, f"cannot read {fmt} series ({err})") from err
    return n_rows, int(n_cols or 0)


def _is_numeric_row(line: str, delim: str) -> bool:
    try:
        [float(v) for v in line.split(delim)]
    except ValueError:
        return False
    return True


# -- one run ---------------------------------------------------------------------------------------------
def series_qc(data: np.ndarray, names: list[str], compute_tsnr: bool) -> dict[str, Any]:
    """QC block of the sidecar for an imported series (no motion/censoring information available)."""
    zero_var = np.ptp(data, axis=0) == 0
    all_zero = np.all(data == 0, axis=0)
    qc: dict[str, Any] = {
        "mean_fd": None, "n_censored": None, "fraction_censored": None, "n_nonsteady_dropped": None,
        "tsnr": None, "tsnr_median": None,
        "empty_parcels": [names[i] for i in np.flatnonzero(all_zero)],
        "zero_variance_parcels": [names[i] for i in np.flatnonzero(zero_var)],
        "n_zero_variance_parcels": int(zero_var.sum()),
        "fraction_zero_variance_parcels": float(zero_var.mean()),
    }
    if compute_tsnr:
        std = data.std(axis=0)
        tsnr = np.where(std > 0, np.abs(data.mean(axis=0)) / np.where(std > 0, std, 1.0), np.nan)
        qc["tsnr"] = [None if math.isnan(v) else float(v) for v in tsnr]
        qc["tsnr_median"] = float(np.nanmedian(tsnr)) if np.isfinite(tsnr).any() else None
    return qc


def import_run(source: str | Path, labels_tsv: str | Path, out: str | Path, sidecar: str | Path, *,
               tr: float, run_id: str, atlas: str, space: str, fmt: str = "auto",
               mean_fd: float | None = None, compute_tsnr: bool = False,
               standardize: str = "none") -> dict[str, Any]:
    """Read one series file and write the per-run time-series parquet and sidecar (both atomically).

    ``standardize`` (``timeseries.standardize``): ``zscore`` or ``demean`` each parcel over the run's
    volumes, or ``none`` (the values as they are; the default of this function, not of the config).
    QC is computed on the values as read; the sidecar's ``Standardize`` block says what was done and
    whether the source was centred (a warning is logged when it was not).

    Raises
    ------
    InputError
        Unreadable file, NaN/inf values, fewer than 2 volumes, a parcel count that differs from the
        atlas labels (every run of one atlas must have its parcels), or ``.1D`` header label numbers
        that are not the atlas label values in order.
    """
    from brainfoundry.io import provenance
    from brainfoundry.runfiles import read_labels, write_series

    source = Path(source)
    labels = read_labels(labels_tsv)
    names = [str(n) for n in labels["name"]]
    data, header = read_series_file(source, fmt)
    n_t, n_p = data.shape
    if n_p != len(names):
        raise InputError(source, f"{n_p} parcel columns, but atlas {atlas} ({labels_tsv}) has {len(names)} labels; "
                                 "every run of one atlas must have the same parcels")
    if header is not None and header != [int(v) for v in labels["index"]]:
        first = next(i for i, (a, b) in enumerate(zip(header, labels["index"])) if a != int(b))
        raise InputError(source, f"header label #{header[first]} at column {first} is not atlas {atlas}'s "
                                 f"label {int(labels['index'].iloc[first])} (order of {labels_tsv})")
    if n_t < 2:
        raise InputError(source, f"only {n_t} volume(s); a time series needs at least 2")
    if not tr or tr <= 0 or not math.isfinite(tr):
        raise InputError(source, f"repetition time must be a positive number of seconds, got {tr!r}")
    if standardize not in STANDARDIZE:
        raise ConfigError("timeseries.standardize", f"must be one of {STANDARDIZE}, got {standardize!r}")
    scale = scale_check(data)
    if not scale["centred"]:
        done = {"none": "left as they are (timeseries.standardize: none): baselines that keep a run's "
                        "offset will look far better than they are",
                "demean": "demeaned per parcel", "zscore": "z-scored per parcel"}[standardize]
        log.warning("%s: series are not centred (median parcel |mean| / std = %.3g); %s", source,
                    scale["median_abs_mean_over_std"], done)
    values = standardized(data, standardize).astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError(source, "values overflow float32")

    qc = series_qc(data, names, compute_tsnr)
    qc["mean_fd"] = None if mean_fd is None or not math.isfinite(mean_fd) else float(mean_fd)
    info = {
        "RunID": run_id,
        "RepetitionTime": float(tr),
        "NumberOfVolumes": int(n_t),
        "KeptVolumes": list(range(n_t)),
        "Atlas": atlas,
        "Space": space,
        "ParcelNames": names,
        "SourceFile": os.fspath(source),
        "SourceFormat": detect_format(source) if fmt == "auto" else fmt,
        "QC": qc,
        "Standardize": {"method": standardize, "axis": "time, per parcel", "step": "import", **scale},
        "QCNotes": ("imported series: censoring and non-steady-state volumes are unknown (null); "
                    "mean_fd comes from the phenotype table; tsnr is null unless timeseries.compute_tsnr "
                    "(denoised series such as ABIDE PCP are demeaned, so tSNR is not meaningful)"),
        **provenance([source, labels_tsv], {"format": fmt, "tr": float(tr), "atlas": atlas, "space": space,
                                            "compute_tsnr": bool(compute_tsnr), "standardize": standardize}),
    }
    return write_series(out, values, names, info, sidecar_path=sidecar)


def scale_check(data: np.ndarray) -> dict[str, Any]:
    """Whether a ``[T, N]`` series is centred: the median over parcels of ``|mean| / std`` (parcels
    with zero variance left out) is at most :data:`CENTRED_MAX_MEAN_OVER_STD`."""
    std = data.std(axis=0)
    ok = std > 0
    ratio = float(np.median(np.abs(data.mean(axis=0)[ok]) / std[ok])) if ok.any() else 0.0
    return {"median_abs_mean_over_std": ratio, "centred": bool(ratio <= CENTRED_MAX_MEAN_OVER_STD)}


def standardized(data: np.ndarray, method: str) -> np.ndarray:
    """``data`` z-scored or demeaned per parcel over time (zero-variance parcels become 0), or as is."""
    if method == "none":
        return data
    centred = data - data.mean(axis=0, keepdims=True)
    if method == "demean":
        return centred
    std = centred.std(axis=0, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def import_options(row: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The per-run options of ``import-timeseries`` from a run-table row (used by the Snakemake rule)."""
    options = [f"--format {row['timeseries_format']}"]
    try:
        mean_fd = float(row.get("mean_fd"))
    except (TypeError, ValueError):  # no mean_fd column, or null
        mean_fd = float("nan")
    if math.isfinite(mean_fd):
        options.append(f"--mean-fd {mean_fd!r}")
    ts = {**DEFAULTS, **dict(config.get("timeseries") or {})}
    if ts["compute_tsnr"]:
        options.append("--compute-tsnr")
    options.append(f"--standardize {ts['standardize']}")
    return " ".join(options)


def cli_main(argv: list[str]) -> int:
    """``brainfoundry import-timeseries SRC --labels TSV --out TS.parquet --sidecar TS.json --tr S ...``"""
    parser = argparse.ArgumentParser(prog="brainfoundry import-timeseries",
                                     description="import one already parcellated series (ABIDE .1D, TSV, CSV, NPY)")
    parser.add_argument("source", help="the series file")
    parser.add_argument("--labels", required=True, help="atlas labels TSV (index, name, x, y, z, ...)")
    parser.add_argument("--out", required=True, help="time-series parquet to write")
    parser.add_argument("--sidecar", required=True, help="JSON sidecar to write")
    parser.add_argument("--tr", type=float, required=True, help="repetition time in seconds")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--atlas", required=True)
    parser.add_argument("--space", required=True)
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument("--mean-fd", type=float, default=None, help="mean framewise displacement (phenotypes)")
    parser.add_argument("--compute-tsnr", action="store_true")
    parser.add_argument("--standardize", choices=STANDARDIZE, default="none",
                        help="per parcel over time (the workflow passes timeseries.standardize)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import_run(args.source, args.labels, args.out, args.sidecar, tr=args.tr, run_id=args.run_id,
               atlas=args.atlas, space=args.space, fmt=args.format, mean_fd=args.mean_fd,
               compute_tsnr=args.compute_tsnr, standardize=args.standardize)
    return 0
