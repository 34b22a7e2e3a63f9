"""Per-run QC figures for the Snakemake report: FD trace, parcel carpet plot, FC before/after denoising.

Inputs are the parcellate step's outputs: the cleaned series (parquet + JSON sidecar, which lists
kept, censored and non-steady-state volumes and the configuration) and the uncleaned parcel means of
every volume (``..._desc-raw_stat-mean_timeseries.parquet``), plus the run's confounds TSV for the
framewise displacement (computed with nipype, as in parcellate, when fMRIPrep did not provide it).
Figures are PNG via matplotlib's Agg backend, written atomically.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from brainfoundry.errors import InputError
from brainfoundry.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def run_fd(confounds_tsv: str | os.PathLike, n_volumes: int) -> np.ndarray:
    """Framewise displacement per volume from the confounds TSV (nipype when the column is absent)."""
    from brainfoundry.confounds import MOTION_COLUMNS, framewise_displacement, read_confounds_table

    table = read_confounds_table(confounds_tsv)
    if len(table) != n_volumes:
        raise InputError(confounds_tsv, f"has {len(table)} rows but the run has {n_volumes} volumes")
    if "framewise_displacement" in table and table["framewise_displacement"].notna().any():
        return table["framewise_displacement"].to_numpy(dtype=float)
    if all(c in table for c in MOTION_COLUMNS):
        return framewise_displacement(table[list(MOTION_COLUMNS)].to_numpy())
    return np.full(n_volumes, np.nan)


def fd_figure(fd: np.ndarray, tr: float, threshold: float | None, censored, nonsteady, title: str):
    """FD over time with the scrubbing threshold, censored (red) and non-steady-state (grey) volumes."""
    plt = _pyplot()
    times = np.arange(len(fd)) * tr
    fig, ax = plt.subplots(figsize=(9, 2.6))
    for vol in nonsteady:
        ax.axvspan(vol * tr - tr / 2, vol * tr + tr / 2, color="0.8", lw=0)
    for vol in censored:
        ax.axvspan(vol * tr - tr / 2, vol * tr + tr / 2, color="tab:red", alpha=0.25, lw=0)
    ax.plot(times, fd, color="k", lw=0.9, label="FD")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g} mm")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("FD (mm)")
    mean_fd = np.nanmean(fd) if np.isfinite(fd).any() else float("nan")
    ax.set_title(f"{title}: mean FD {mean_fd:.3f} mm, {len(censored)} censored (red), "
                 f"{len(nonsteady)} non-steady-state (grey)", fontsize=9)
    ax.set_xlim(times[0] - tr, times[-1] + tr if len(times) else 1)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    return fig


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _network_order(names: list[str], labels: pd.DataFrame | None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Parcel order grouped by network (stable), and (start row, network) of each group."""
    if labels is None or "network" not in labels or not labels["network"].fillna("").astype(str).str.len().any():
        return np.arange(len(names)), []
    net = dict(zip(labels["name"].astype(str), labels["network"].fillna("").astype(str)))
    nets = [net.get(n, "") for n in names]
    order = np.array(sorted(range(len(names)), key=lambda i: (nets[i] == "", nets[i], i)))
    groups, previous = [], None
    for row, i in enumerate(order):
        if nets[i] != previous:
            groups.append((row, nets[i] or "other"))
            previous = nets[i]
    return order, groups


def carpet_figure(cleaned: np.ndarray, times: np.ndarray, names: list[str], labels: pd.DataFrame | None, title: str):
    """Parcels x time of the cleaned series, z-scored per parcel, grouped by network when known."""
    plt = _pyplot()
    order, groups = _network_order(names, labels)
    data = _zscore(cleaned)[:, order].T
    fig, ax = plt.subplots(figsize=(9, 4))
    extent = (times[0], times[-1], len(names), 0) if len(times) > 1 else None
    image = ax.imshow(data, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest", extent=extent)
    for row, net in groups:
        ax.axhline(row, color="tab:orange", lw=0.6)
        ax.text(1.005, row, net, transform=ax.get_yaxis_transform(), fontsize=7, va="top")
    ax.set_xlabel("time (s), kept volumes")
    ax.set_ylabel("parcel")
    ax.set_title(f"{title}: cleaned parcel series (z-scored)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.08 if groups else 0.02, label="z")
    return fig


def _corr(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(np.asarray(x, dtype=np.float64), rowvar=False)
    c = np.nan_to_num(np.atleast_2d(c))
    np.fill_diagonal(c, 1.0)
    return c


def fc_figure(raw_kept: np.ndarray, cleaned: np.ndarray, names: list[str], labels: pd.DataFrame | None, title: str):
    """Pearson FC of the uncleaned (kept volumes) and the cleaned parcel series, side by side."""
    plt = _pyplot()
    order, _ = _network_order(names, labels)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    iu = np.triu_indices(len(names), k=1)
    for ax, series, label in zip(axes, (raw_kept, cleaned), ("before denoising", "after denoising")):
        c = _corr(series)[np.ix_(order, order)]
        image = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        mean_abs = float(np.abs(c[iu]).mean()) if len(iu[0]) else float("nan")
        ax.set_title(f"{label}: mean |r| {mean_abs:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: parcel functional connectivity", fontsize=10)
    fig.colorbar(image, ax=axes, fraction=0.025, label="Pearson r")
    return fig


def qc_figures(*, timeseries: str | os.PathLike, timeseries_json: str | os.PathLike, raw: str | os.PathLike,
               confounds: str | os.PathLike, out_fd: str | os.PathLike, out_carpet: str | os.PathLike,
               out_fc: str | os.PathLike, labels: str | os.PathLike | None = None, title: str | None = None) -> None:
    """Write the three QC figures of one run."""
    from brainfoundry.runfiles import read_labels, read_series, read_series_sidecar

    sidecar = read_series_sidecar(timeseries_json)
    cleaned, names = read_series(timeseries, sidecar=timeseries_json)
    raw_values, _ = read_series(raw, names, sidecar=timeseries_json, finite=False)  # its sha256 is there too
    n_vol = int(sidecar.get("InputVolumes", len(raw_values)))
    if len(raw_values) != n_vol:
        raise InputError(raw, f"has {len(raw_values)} rows, the sidecar says {n_vol} input volumes")
    kept = np.asarray(sidecar["KeptVolumes"], dtype=int)
    tr = float(sidecar.get("NativeRepetitionTime", sidecar["RepetitionTime"]))
    times = np.asarray(sidecar.get("SampleTimes", kept * tr), dtype=float)
    threshold = (sidecar.get("Config", {}).get("denoise", {}) or {}).get("fd_threshold")
    label_table = None
    if labels:
        label_table = read_labels(labels)
    title = title or Path(timeseries).name.split("_space-")[0]

    fd = run_fd(confounds, n_vol)
    _save(fd_figure(fd, tr, threshold, sidecar.get("CensoredVolumes", []), sidecar.get("NonSteadyStateVolumes", []),
                    title), out_fd)
    _save(carpet_figure(cleaned, times, names, label_table, title), out_carpet)
    _save(fc_figure(raw_values[kept], cleaned, names, label_table, title), out_fc)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry qc-figures", description=__doc__.splitlines()[0])
    parser.add_argument("--timeseries", required=True, help="cleaned parcel series (parquet)")
    parser.add_argument("--timeseries-json", required=True, help="its sidecar")
    parser.add_argument("--raw", required=True, help="uncleaned parcel means of every volume (parquet)")
    parser.add_argument("--confounds", required=True, help="fMRIPrep confounds TSV of the run")
    parser.add_argument("--labels", help="atlas labels TSV (groups parcels by network)")
    parser.add_argument("--title")
    parser.add_argument("--out-fd", required=True)
    parser.add_argument("--out-carpet", required=True)
    parser.add_argument("--out-fc", required=True)
    args = parser.parse_args(argv)
    qc_figures(timeseries=args.timeseries, timeseries_json=args.timeseries_json, raw=args.raw,
               confounds=args.confounds, out_fd=args.out_fd, out_carpet=args.out_carpet, out_fc=args.out_fc,
               labels=args.labels, title=args.title)
    return 0
