"""Masked reconstruction on held-out subjects (BrainLM Table 1 protocol).

Windows of ``window`` points from held-out runs, robust-scaled with training statistics; parcel x patch
tokens masked at each ratio by a mask that depends only on (seed, run, window start, ratio), so the model
and the baselines, computed in different jobs, see the same masks. R² is computed over the masked points
of each window; the interval resamples subjects.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from brainfoundry.evaluate.adapters import ModelAdapter, window_starts
from brainfoundry.evaluate.baselines import (RidgeReconstructor, expand_mask, interpolate_masked, parcel_mean_masked,
                                             patch_mask, select_alpha)
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.evaluate.protocol import TaskSkipped, bootstrap_ci
from brainfoundry.evaluate.settings import EvalSettings


def stable_rng(*parts: object) -> np.random.Generator:
    """A generator seeded from a hash of the parts: the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def heldout_windows(evalset: EvalSet, settings: EvalSettings, length: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Windows [W, length, N] from the held-out split's runs and a frame (run_id, subject, start)."""
    split = settings.heldout_split
    runs = evalset.runs
    idx = np.flatnonzero(runs["split"].to_numpy() == split) if "split" in runs else np.array([], int)
    if len(idx) == 0:
        raise TaskSkipped(f"no runs in the held-out split '{split}' (splits present: "
                          f"{sorted(runs['split'].unique()) if 'split' in runs else []}); set evaluate.heldout_split")
    windows, info = [], []
    for i in idx:
        x = evalset.normalized(i)
        for start in window_starts(len(x), length, settings.max_windows_per_run):
            windows.append(x[start:start + length])
            info.append((runs.index[i], runs["subject"].iloc[i], start))
    if not windows:
        longest = max(len(evalset.series[i]) for i in idx)
        raise TaskSkipped(f"no held-out run has {length} time points (longest: {longest})")
    return np.stack(windows).astype(np.float32), pd.DataFrame(info, columns=["run_id", "subject", "start"])


def r2_masked(y: np.ndarray, y_hat: np.ndarray, point_mask: np.ndarray) -> float:
    """R² over the masked points of one window: 1 - SSE / SS about their mean."""
    t, p = y[point_mask], y_hat[point_mask]
    ss = np.sum((t - t.mean()) ** 2)
    return float(1.0 - np.sum((t - p) ** 2) / ss) if ss > 0 else float("nan")


def run(evalset: EvalSet, settings: EvalSettings, adapter: ModelAdapter | None) -> tuple[pd.DataFrame, list[str]]:
    """Per-window R² rows for the model (``adapter``) or, with ``adapter=None``, for both baselines."""
    if adapter is not None:
        adapter.require("reconstruct", "reconstruction")
        if adapter.window != settings.window or adapter.patch != settings.patch:
            raise TaskSkipped(f"model '{adapter.name}' reads {adapter.window}-point windows of {adapter.patch}-point "
                              f"patches but evaluate.window/patch are {settings.window}/{settings.patch}; "
                              "set them to the model's so baselines see the same masks")
    windows, info = heldout_windows(evalset, settings, settings.window)
    n_patches = settings.window // settings.patch
    notes: list[str] = []
    ridge = None
    if adapter is None:
        ridge, note = fit_ridge(evalset, settings)
        notes.append(note)
    rows = []
    for seed in settings.seeds:
        for ratio in settings.mask_ratios:
            masks = np.stack([patch_mask(evalset.n_parcels, n_patches, ratio, stable_rng("recon", seed, r, s, ratio))
                              for r, s in zip(info["run_id"], info["start"])])
            point = np.stack([expand_mask(m, settings.patch) for m in masks])
            if adapter is not None:
                preds = {"masked_autoencoder": _batched_reconstruct(adapter, windows, masks)}
            else:
                preds = {"linear_interpolation": np.stack([interpolate_masked(w, pm) for w, pm in zip(windows, point)]),
                         "parcel_mean": np.stack([parcel_mean_masked(w, pm) for w, pm in zip(windows, point)])}
                if ridge is not None:
                    preds["ridge_visible"] = np.stack([ridge.predict(w, pm) for w, pm in zip(windows, point)])
            for method, pred in preds.items():
                for k in range(len(windows)):
                    rows.append({"method": method, "condition": f"mask={ratio:g}", "seed": seed,
                                 "run_id": info["run_id"][k], "subject": info["subject"][k],
                                 "metric": "r2", "value": r2_masked(windows[k], pred[k], point[k])})
    return pd.DataFrame(rows), notes


def fit_ridge(evalset: EvalSet, settings: EvalSettings) -> tuple[RidgeReconstructor | None, str]:
    """The ridge reconstruction baseline fitted on training-split runs (normalized as the models see them).

    The penalty is chosen on a fifth of the training subjects (stable by subject) with random token masks
    at the middle mask ratio, then the map is refitted on every training run. Returns (model or None, note).
    """
    runs = evalset.runs
    train = np.flatnonzero(runs["split"].to_numpy() == "train") if "split" in runs else np.array([], int)
    if len(train) < 2:
        return None, f"ridge_visible: {len(train)} training runs; the ridge baseline needs at least 2"
    if len(train) > settings.ridge_max_train_runs:  # a stable subset: the same runs in every job
        order = sorted(train, key=lambda i: hashlib.sha256(str(runs.index[i]).encode()).hexdigest())
        train = np.sort(np.asarray(order[: settings.ridge_max_train_runs]))
    subjects = runs["subject"].astype(str).to_numpy()
    val = np.array([int(hashlib.sha256(f"ridge\x1f{subjects[i]}".encode()).hexdigest(), 16) % 5 == 0 for i in train])
    if val.all() or not val.any():
        val = np.arange(len(train)) % 5 == 0
    n_patches = settings.window // settings.patch
    ratio = sorted(settings.mask_ratios)[len(settings.mask_ratios) // 2]
    val_windows, val_masks = [], []
    for i in train[val]:
        x = evalset.normalized(i)
        for start in window_starts(len(x), settings.window, settings.max_windows_per_run):
            m = patch_mask(evalset.n_parcels, n_patches, ratio, stable_rng("ridge-val", runs.index[i], start))
            val_windows.append(x[start:start + settings.window])
            val_masks.append(expand_mask(m, settings.patch))
    alphas = list(settings.ridge_alphas)
    alpha = alphas[len(alphas) // 2]
    if val_windows and len(alphas) > 1:
        alpha, _ = select_alpha(np.concatenate([evalset.normalized(i) for i in train[~val]]), val_windows, val_masks,
                                alphas)
    model = RidgeReconstructor(alpha).fit(np.concatenate([evalset.normalized(i) for i in train]))
    return model, (f"ridge_visible: fitted on {len(train)} training runs ({model.n_} time points), alpha {alpha:g} "
                   f"chosen on {int(val.sum())} of them at mask {ratio:g}")


def _batched_reconstruct(adapter: ModelAdapter, windows: np.ndarray, masks: np.ndarray) -> np.ndarray:
    out = []
    for s in range(0, len(windows), adapter.batch_size):
        out.append(np.asarray(adapter.reconstruct(windows[s:s + adapter.batch_size], masks[s:s + adapter.batch_size]),
                              dtype=np.float32))
    return np.concatenate(out)


def summarize(per_window: pd.DataFrame, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per-seed means (fold='heldout') and the all-seed mean with a subject bootstrap interval (fold='all')."""
    if per_window.empty:
        return per_window
    keys = ["method", "condition", "metric"]
    rows = []
    for key, grp in per_window.groupby(keys, sort=False):
        base = dict(zip(keys, key))
        for s, g in grp.groupby("seed"):
            rows.append({**base, "fold": "heldout", "seed": int(s), "value": float(g["value"].mean()),
                         "n": int(g["subject"].nunique()), "n_values": len(g)})
        mean, lo, hi = bootstrap_ci(grp["value"].to_numpy(), grp["subject"].to_numpy(), level=level, seed=seed)
        rows.append({**base, "fold": "all", "seed": -1, "value": mean, "ci_low": lo, "ci_high": hi,
                     "n": int(grp["subject"].nunique()), "n_values": len(grp)})
    return pd.DataFrame(rows)
