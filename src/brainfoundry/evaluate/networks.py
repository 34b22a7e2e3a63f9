"""Network identification: each parcel's Yeo-7 network from its representation (BrainLM: 58.8 % vs 39.2 %).

Labels come from the atlas labels TSV's ``network`` column when present (the demo atlas carries one),
else from the Schaefer-400 7-network atlas by majority vote over each parcel's voxels, with the Schaefer
image resampled onto the parcel atlas's grid (nearest neighbour). Samples are (run, parcel) pairs; the
folds group by parcel, so a test parcel is never seen in training (in any run) and the classifier must
read the network from the representation, not recognise the parcel.

With a BrainLM encoder (adapter capability ``cls_attention``) a second model row follows the paper's own
read-out: the CLS token's attention to each parcel in the last encoder layer (mean over heads and time
patches, then over a run's windows). A parcel's features are its attention in each of the runs
(log of the weight relative to a uniform 1/N), one sample per parcel, the same parcel-grouped folds.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from brainfoundry.errors import InputError
from brainfoundry.evaluate.adapters import Embeddings, ModelAdapter, window_starts
from brainfoundry.evaluate.baselines import fc_rows
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.evaluate.protocol import TaskSkipped, classification_metrics, fit_nested
from brainfoundry.evaluate.settings import EvalSettings

YEO7 = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")
_SCHAEFER_RE = re.compile(r"^\d+Networks_(LH|RH)_([A-Za-z]+)_")


def schaefer_networks(order_txt: str | Path) -> dict[int, str]:
    """Label value -> Yeo-7 network from the Schaefer order file (``1\\t7Networks_LH_Vis_1\\t...``)."""
    out = {}
    for line in Path(order_txt).read_text().splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        m = _SCHAEFER_RE.match(parts[1]) if len(parts) > 1 else None
        if m is None:
            raise InputError(order_txt, f"cannot read a network from line {line[:60]!r}")
        out[int(parts[0])] = m.group(2)
    return out


def majority_vote_networks(atlas_img, schaefer_img, schaefer_order: str | Path,
                           labels: np.ndarray | None = None, min_coverage: float = 0.25) -> pd.DataFrame:
    """Each parcel's majority Yeo-7 network over its voxels (nearest-neighbour resampling to one grid).

    Parameters
    ----------
    atlas_img : the parcel atlas (path or NIfTI image), integer labels, 0 = background.
    schaefer_img : the Schaefer-400 7-network label image (path or image).
    labels : parcel label values to report (default: every non-zero value of the atlas).
    min_coverage : share of a parcel's voxels that must fall in Schaefer's (cortical) labels for the
        parcel to get a network; subcortical and cerebellar parcels touching cortex stay unlabelled.

    Returns
    -------
    DataFrame with columns index, network ('' when unlabelled), fraction (share of the parcel's
    overlapping voxels in that network), coverage (share of its voxels inside Schaefer), n_voxels.
    """
    import nibabel as nib
    from nilearn.image import resample_to_img

    atlas = nib.load(atlas_img) if isinstance(atlas_img, (str, Path)) else atlas_img
    schaefer = nib.load(schaefer_img) if isinstance(schaefer_img, (str, Path)) else schaefer_img
    net_of = schaefer_networks(schaefer_order)
    # Nearest neighbour keeps label values intact; resample Schaefer onto the parcel atlas's grid.
    res = resample_to_img(schaefer, atlas, interpolation="nearest", force_resample=True, copy_header=True)
    a = np.asarray(atlas.dataobj).astype(np.int64).ravel()
    s = np.asarray(res.dataobj).astype(np.int64).ravel()
    nets = np.array([""] + list(YEO7))
    code = {n: i + 1 for i, n in enumerate(YEO7)}
    lut = np.zeros(max(net_of) + 1, dtype=np.int64)
    for value, name in net_of.items():
        lut[value] = code[name]
    s_net = np.where((s > 0) & (s < len(lut)), lut[np.clip(s, 0, len(lut) - 1)], 0)
    if labels is None:
        labels = np.unique(a[a > 0])
    inside = (a > 0) & (s_net > 0)
    counts = pd.crosstab(a[inside], s_net[inside]).reindex(index=labels, fill_value=0)
    sizes = pd.Series(a[a > 0]).value_counts().reindex(labels, fill_value=0)
    best = counts.idxmax(axis=1).to_numpy() if counts.shape[1] else np.zeros(len(labels), int)
    total = counts.sum(axis=1).to_numpy()
    frac = np.where(total > 0, counts.max(axis=1).to_numpy() / np.maximum(total, 1), 0.0)
    coverage = total / np.maximum(sizes.to_numpy(), 1)
    labelled = (total > 0) & (coverage >= min_coverage)
    return pd.DataFrame({"index": labels, "network": np.where(labelled, nets[best], ""), "fraction": frac,
                         "coverage": coverage, "n_voxels": sizes.to_numpy()})


def parcel_features(evalset: EvalSet, emb: Embeddings | None, window: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per (run, parcel) features: the model's parcel embedding, or the raw window and the FC row.

    Returns ({method: [R * N, D]}, parcel index per sample).
    """
    n = evalset.n_parcels
    if emb is not None:
        if emb.parcels is None or len(emb.parcel_run_ids) == 0:
            raise TaskSkipped(f"model '{emb.model}' gives no per-parcel embeddings (parcel tokens)")
        X = emb.parcels.reshape(-1, emb.parcels.shape[-1])
        return {"parcel_embedding_probe": X}, np.tile(np.arange(n), len(emb.parcel_run_ids))
    # Baselines on the same runs a model would use: held-out splits first, at most network_runs of them.
    runs = evalset.runs
    raw, fc = [], []
    for i in range(len(evalset.series)):
        x = evalset.normalized(i)
        if len(x) < window:
            continue
        raw.append(x[:window].T)
        fc.append(fc_rows(evalset.series[i]))
    if not raw:
        raise TaskSkipped(f"no run has {window} time points for the raw-series baseline")
    del runs
    return ({"raw_timeseries": np.concatenate(raw), "fc_row": np.concatenate(fc)},
            np.tile(np.arange(n), len(raw)))


def cls_attention_features(evalset: EvalSet, adapter: ModelAdapter, max_windows: int) -> np.ndarray:
    """``[N, R]``: each parcel's CLS attention (log ratio to uniform) in each run long enough for a window."""
    adapter.require("cls_attention", "networks")
    window = adapter.window
    cols = []
    for i in range(len(evalset.series)):
        x = evalset.normalized(i)
        starts = window_starts(len(x), window, max_windows) if len(x) >= window else []
        if not starts:
            continue
        att = np.asarray(adapter.cls_attention(np.stack([x[s:s + window] for s in starts])), np.float64)
        cols.append(att.mean(0))
    if not cols:
        raise TaskSkipped(f"no run has the {window} time points model '{adapter.name}' reads")
    att = np.stack(cols, axis=1)
    return np.log(np.maximum(att / att.sum(0, keepdims=True) * att.shape[0], 1e-12)).astype(np.float32)


def select_runs(evalset: EvalSet, n_runs: int, order=("test", "val")) -> EvalSet:
    """The same rule as the embedding cache: held-out splits first, then the rest, at most ``n_runs``."""
    splits = evalset.runs["split"].to_numpy()
    rank = np.array([list(order).index(s) if s in order else len(order) for s in splits])
    keep = np.zeros(len(splits), bool)
    keep[np.argsort(rank, kind="stable")[:n_runs]] = True
    return evalset.subset(keep)


def run(evalset: EvalSet, settings: EvalSettings, emb: Embeddings | None,
        networks: np.ndarray | None, adapter: ModelAdapter | None = None) -> tuple[pd.DataFrame, list[str]]:
    if networks is None:
        raise TaskSkipped("no network labels: the atlas labels TSV has no 'network' column and "
                          "evaluate.network_atlas is not set (Schaefer-400 7-network majority vote)")
    networks = np.asarray(networks).astype(str)
    labelled = networks != ""
    if len(np.unique(networks[labelled])) < 2:
        raise TaskSkipped("fewer than 2 networks among the parcels' labels")
    subset = select_runs(evalset, settings.network_runs)
    feats, parcel_idx = parcel_features(subset, emb, settings.window)
    samples = {method: (X, parcel_idx) for method, X in feats.items()}
    notes = []
    if adapter is not None and "cls_attention" in adapter.capabilities:
        try:
            att = cls_attention_features(subset, adapter, settings.max_windows_per_run)
            samples["cls_attention_probe"] = (att, np.arange(len(att)))
        except TaskSkipped as err:
            notes.append(f"cls_attention_probe: {err}")
    classes = sorted(np.unique(networks[labelled]))
    y_parcel = np.array([classes.index(v) if v else -1 for v in networks])
    rows = []
    n_parcels_per_class = np.bincount(y_parcel[labelled])
    n_folds = min(5, int(n_parcels_per_class.min()))
    if n_folds < 2:
        notes.append(f"a network has only {n_parcels_per_class.min()} parcel; using 2 folds without stratification guarantee")
        n_folds = 2
    from sklearn.model_selection import StratifiedGroupKFold

    for method, (X, parcel_idx) in samples.items():
        y = y_parcel[parcel_idx]
        ok = y >= 0
        Xk, yk, gk = X[ok], y[ok], parcel_idx[ok]
        for seed in settings.seeds:
            cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            for fold, (tr, te) in enumerate(cv.split(Xk, yk, gk)):
                est, _ = fit_nested("logistic", Xk[tr], yk[tr], gk[tr], seed=seed, n_inner=2,
                                    grid={"C": [0.01, 0.1, 1.0]})
                pred = est.predict(Xk[te])
                m = classification_metrics(yk[te], pred, np.zeros(len(te)))
                rows.append({"method": method, "seed": seed, "fold": str(fold), "metric": "accuracy",
                             "value": float(np.mean(pred == yk[te])), "n": len(np.unique(gk[te]))})
                rows.append({"method": method, "seed": seed, "fold": str(fold), "metric": "balanced_accuracy",
                             "value": m["balanced_accuracy"], "n": len(np.unique(gk[te]))})
    if emb is None:  # chance: always guessing the most frequent network, and 1/k balanced accuracy
        freq = n_parcels_per_class / n_parcels_per_class.sum()
        rows.append({"method": "chance", "seed": settings.seeds[0], "fold": "all", "metric": "accuracy",
                     "value": float(freq.max()), "n": int(labelled.sum())})
        rows.append({"method": "chance", "seed": settings.seeds[0], "fold": "all", "metric": "balanced_accuracy",
                     "value": 1.0 / len(classes), "n": int(labelled.sum())})
    return pd.DataFrame(rows), notes
