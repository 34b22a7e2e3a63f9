"""The evaluation set: every run's parcel time series with its subject, site, split and phenotypes.

Evaluation needs whole runs (fingerprinting splits runs in halves, FC baselines use the whole run), so it
reads runs rather than training windows. Three sources fill the same `EvalSet`:

- the shards (``manifest.parquet`` + ``bucket-<k>.parquet``, the workflow's normal path);
- ABIDE PCP ``.1D.gz`` files and the phenotype CSV, read directly (the full-ABIDE FC baseline);
- arrays in memory (tests, notebooks).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from brainfoundry.errors import InputError

PHENOTYPE_DEFAULTS = ("age", "sex", "diagnosis")


@dataclass
class EvalSet:
    """Runs for evaluation.

    Attributes
    ----------
    runs : DataFrame indexed by run_id with at least subject, site, split, tr and phenotype columns.
    series : one float32 array [T_i, N] per run, in ``runs`` order (raw scale; see ``normalized``).
    parcel_names : N names; ``parcel_coords`` [N, 3] MNI mm or None; ``networks`` N labels or None.
    median, iqr : per-parcel robust scaling statistics from training subjects only (or None).
    """

    runs: pd.DataFrame
    series: list[np.ndarray]
    parcel_names: list[str]
    parcel_coords: np.ndarray | None = None
    networks: np.ndarray | None = None
    median: np.ndarray | None = None
    iqr: np.ndarray | None = None
    source: str = "memory"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.series) != len(self.runs):
            raise InputError(self.source, f"{len(self.series)} series for {len(self.runs)} runs")
        n = {s.shape[1] for s in self.series}
        if len(n) > 1:
            raise InputError(self.source, f"runs have different parcel counts {sorted(n)}")
        if n and n.pop() != len(self.parcel_names):
            raise InputError(self.source, "parcel names do not match the series' parcel count")
        self.runs = self.runs.copy()
        self.runs["subject"] = self.runs["subject"].astype(str)

    @property
    def n_parcels(self) -> int:
        return len(self.parcel_names)

    def fit_norm(self, split: str = "train") -> None:
        """Robust scaling statistics from one split's runs (training subjects only: no leakage)."""
        idx = np.flatnonzero(self.runs["split"].to_numpy() == split) if "split" in self.runs else []
        if len(idx) == 0:
            idx = np.arange(len(self.series))
        stacked = np.concatenate([self.series[i] for i in idx], axis=0)
        q25, q50, q75 = np.percentile(stacked, [25, 50, 75], axis=0)
        self.median = q50.astype(np.float32)
        iqr = (q75 - q25).astype(np.float32)
        self.iqr = np.where(iqr > 0, iqr, 1.0).astype(np.float32)

    def normalized(self, i: int) -> np.ndarray:
        """Run i scaled as the models see it: (x - median) / IQR (parentheses matter; DESIGN.md §8)."""
        x = self.series[i]
        if self.median is None:
            return x.astype(np.float32)
        return ((x - self.median) / self.iqr).astype(np.float32)

    def subset(self, mask: np.ndarray | Sequence[bool]) -> "EvalSet":
        idx = np.flatnonzero(np.asarray(mask))
        return EvalSet(self.runs.iloc[idx], [self.series[i] for i in idx], self.parcel_names, self.parcel_coords,
                       self.networks, self.median, self.iqr, self.source, dict(self.meta))

    def restrict_length(self, min_timepoints: int) -> "EvalSet":
        """Only runs with at least ``min_timepoints`` points (the same set for every model and baseline)."""
        lengths = np.array([len(s) for s in self.series])
        keep = lengths >= min_timepoints
        if keep.all():
            return self
        if not keep.any():
            raise InputError(self.source, f"no run has {min_timepoints} time points (longest: {lengths.max()}); "
                                          "lower evaluate.min_timepoints or the model window")
        out = self.subset(keep)
        out.meta["length_note"] = (f"{(~keep).sum()} of {len(keep)} runs shorter than {min_timepoints} points "
                                   f"are left out of every task ({out.runs['subject'].nunique()} subjects remain)")
        return out

    def subject_table(self, columns: Sequence[str] = ()) -> pd.DataFrame:
        """One row per subject (first run's values): site, split and the asked phenotype columns."""
        cols = ["site", "split", *[c for c in columns if c in self.runs.columns]]
        cols = [c for c in dict.fromkeys(cols) if c in self.runs.columns]
        return self.runs.groupby("subject", sort=True)[cols].first()


# -- from shards ------------------------------------------------------------------------------------
def load_shards(shard_dir: str | Path, labels_tsv: str | Path | None = None,
                splits: Sequence[str] | None = None, max_runs: int | None = None) -> EvalSet:
    """Read whole runs (every scalar column: ids, split, site, phenotypes, QC) from the shards.

    Streams a row group at a time through `brainfoundry.shards.iter_series` (which refuses unknown
    schema versions); the normalization statistics come from ``norm_stats.parquet`` (training split
    only), else they are fitted here on the training split.
    """
    from brainfoundry.shards import (ARRAY_COLUMNS, check_compatible, find_shards, iter_series, open_shard,
                                     verify_shards)
    from brainfoundry.shards import read_norm_stats as shard_norm_stats

    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise InputError(shard_dir, "shard directory not found; run the shard step first")
    paths = find_shards(shard_dir)
    if not paths:
        raise InputError(shard_dir, "no bucket-<k>.parquet shards")
    verify_shards(paths)  # sha256 against the manifest, once per process and shard
    metas = []
    rows, series = [], []
    for path in paths:
        handle, meta = open_shard(path)
        metas.append((path, meta))
        scalar = [f.name for f in handle.schema_arrow if f.name not in ARRAY_COLUMNS]
        for fields, x in iter_series(path, splits, columns=scalar):
            rows.append(fields)
            series.append(np.array(x, dtype=np.float32))  # copy: the reader's buffer is reused
    check_compatible(metas)
    if not rows:
        raise InputError(shard_dir, f"no runs{' in splits ' + str(list(splits)) if splits else ''} in the shards")
    runs = pd.DataFrame(rows).set_index("run_id")
    order = np.argsort(runs.index.to_numpy().astype(str), kind="stable")
    runs = runs.iloc[order]
    series = [series[i] for i in order]
    if max_runs is not None:
        runs, series = runs.iloc[:max_runs], series[:max_runs]
    meta = metas[0][1]
    names = [str(n) for n in meta.get("parcel_names") or range(series[0].shape[1])]
    coords = np.asarray(meta["parcel_coords"], dtype=float) if meta.get("parcel_coords") is not None else None
    evs = EvalSet(runs, series, names, coords, source=str(shard_dir), meta=meta)
    evs.networks = network_labels_from_tsv(labels_tsv, names) if labels_tsv else None
    norm_path = shard_dir / "norm_stats.parquet"
    if norm_path.exists():
        evs.median, evs.iqr = shard_norm_stats(norm_path, names)
    else:
        evs.fit_norm("train")
    return evs


def network_labels_from_tsv(path: str | Path, parcel_names: Sequence[str]) -> np.ndarray | None:
    """The atlas labels TSV's ``network`` column in parcel order (None when the column is absent/empty)."""
    path = Path(path)
    if not path.exists():
        return None
    from brainfoundry.runfiles import read_labels

    labels = read_labels(path)
    if (labels["network"] == "").all():
        return None
    by_name = labels.set_index("name")["network"] if "name" in labels.columns else None
    if by_name is not None and set(parcel_names) <= set(by_name.index):
        values = by_name.reindex(list(parcel_names))
    elif len(labels) == len(parcel_names):
        values = labels["network"]
    else:
        raise InputError(path, f"{len(labels)} labels do not match the {len(parcel_names)} parcels of the series")
    return values.fillna("").astype(str).to_numpy()


# -- ABIDE PCP, read directly -----------------------------------------------------------------------
ABIDE_COLUMNS = {"subject": "SUB_ID", "site": "SITE_ID", "diagnosis": "DX_GROUP", "sex": "SEX", "age": "AGE_AT_SCAN",
                 "mean_fd": "func_mean_fd"}


def read_1d(path: str | Path) -> np.ndarray:
    """One ABIDE PCP ROI file (``.1D`` or ``.1D.gz``; header ``#1 ... #N``) as float32 [T, N]."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            header = handle.readline()
            data = np.loadtxt(handle, dtype=np.float64, ndmin=2)
    except (OSError, EOFError, ValueError) as err:
        raise InputError(path, f"cannot read ROI time series ({err})") from None
    if not header.startswith("#"):
        raise InputError(path, "expected a '#1 ... #N' header line")
    if not np.isfinite(data).all():
        raise InputError(path, "NaN or inf in the time series")
    return data.astype(np.float32)


def load_abide(root: str | Path, atlas: str = "cc200", max_subjects: int | None = None,
               sites: Sequence[str] | None = None) -> EvalSet:
    """ABIDE PCP ROI series and phenotypes (DX_GROUP 1=ASD -> diagnosis 'ASD', 2 -> 'control').

    Parameters
    ----------
    root : folder with ``rois_<atlas>/<FILE_ID>_rois_<atlas>.1D[.gz]`` and ``Phenotypic_V1_0b_preprocessed1.csv``.
    max_subjects : keep the first subjects of each site in turn (round-robin), for small test subsets.
    """
    root = Path(root)
    csv = root / "Phenotypic_V1_0b_preprocessed1.csv"
    if not csv.exists():
        raise InputError(csv, "ABIDE phenotype table not found")
    pheno = pd.read_csv(csv)
    missing = [c for c in ("FILE_ID", *ABIDE_COLUMNS.values()) if c not in pheno.columns]
    if missing:
        raise InputError(csv, f"missing columns {missing}")
    pheno = pheno[pheno["FILE_ID"].astype(str) != "no_filename"].copy()
    roi_dir = root / f"rois_{atlas}"
    paths = {}
    for fid in pheno["FILE_ID"].astype(str):
        for suffix in (".1D.gz", ".1D"):
            p = roi_dir / f"{fid}_rois_{atlas}{suffix}"
            if p.exists():
                paths[fid] = p
                break
    pheno = pheno[pheno["FILE_ID"].astype(str).isin(paths)]
    if pheno.empty:
        raise InputError(roi_dir, f"no rois_{atlas} files match the phenotype table's FILE_ID")
    if sites is not None:
        pheno = pheno[pheno["SITE_ID"].isin(list(sites))]
    if pheno["SUB_ID"].duplicated().any():
        raise InputError(csv, f"duplicate SUB_ID {pheno.loc[pheno['SUB_ID'].duplicated(), 'SUB_ID'].tolist()[:5]}")
    if max_subjects is not None:
        pheno = pheno.assign(_rank=pheno.groupby("SITE_ID").cumcount()).sort_values(["_rank", "SITE_ID"])
        pheno = pheno.head(max_subjects).drop(columns="_rank")
    pheno = pheno.sort_values("FILE_ID")
    runs = pd.DataFrame({
        "run_id": [f"sub-{s}_task-rest" for s in pheno["SUB_ID"]],
        "subject": pheno["SUB_ID"].astype(str).to_numpy(),
        "site": pheno["SITE_ID"].astype(str).to_numpy(),
        "split": "train",
        "diagnosis": pheno["DX_GROUP"].map({1: "ASD", 2: "control"}).to_numpy(),
        "sex": pheno["SEX"].map({1: "M", 2: "F"}).to_numpy(),
        "age": pheno["AGE_AT_SCAN"].astype(float).to_numpy(),
        "mean_fd": pd.to_numeric(pheno["func_mean_fd"], errors="coerce").to_numpy(),
        "file": [str(paths[f]) for f in pheno["FILE_ID"].astype(str)],
    }).set_index("run_id")
    series = [read_1d(p) for p in runs["file"]]
    runs["n_timepoints"] = [s.shape[0] for s in series]
    names = [f"#{i + 1}" for i in range(series[0].shape[1])]
    return EvalSet(runs, series, names, source=str(root))
