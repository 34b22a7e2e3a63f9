"""Forecasting on held-out subjects (BrainLM Table 3 protocol): given ``context`` points, predict ``horizon``.

Test windows come from the held-out split; the ridge AR model and the LSTM are trained on windows from
the training split only. Metrics per window: R² and MSE over the horizon x parcels values and the Pearson
r between predicted and true values.

A model gives two rows: the zero-shot forecast (its decoder fills the hidden future patches) and
``finetuned_head``, BrainLM's forecasting fine-tune in its cheapest honest form: the encoder (frozen) reads
the context with the future hidden, and a linear head shared by all parcels, fitted by ridge regression
(penalty by leave-one-out over the training samples) on training-split windows only, maps each parcel's
context tokens to its next ``horizon`` points. It runs the same way on a random-init model (the control).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import RidgeCV

from brainfoundry.evaluate.adapters import ModelAdapter
from brainfoundry.evaluate.baselines import LSTMForecaster, RidgeAR, persistence
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.evaluate.protocol import TaskSkipped
from brainfoundry.evaluate.reconstruction import heldout_windows, stable_rng
from brainfoundry.evaluate.settings import EvalSettings


def window_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    t, p = true.ravel().astype(np.float64), pred.ravel().astype(np.float64)
    ss = np.sum((t - t.mean()) ** 2)
    r = float(stats.pearsonr(t, p)[0]) if np.std(p) > 0 and np.std(t) > 0 else float("nan")
    return {"r2": float(1 - np.sum((t - p) ** 2) / ss) if ss > 0 else float("nan"), "pearson_r": r,
            "mse": float(np.mean((t - p) ** 2))}


def training_windows(evalset: EvalSet, length: int, max_windows: int, seed: int = 0) -> np.ndarray:
    """Up to ``max_windows`` windows (random starts) from the training split's runs."""
    runs = evalset.runs
    idx = [i for i in np.flatnonzero(runs["split"].to_numpy() == "train") if len(evalset.series[i]) >= length]
    if not idx:
        raise TaskSkipped(f"no training-split run has {length} points to train the AR/LSTM baselines")
    rng = stable_rng("forecast-train", seed)
    per_run = max(1, int(np.ceil(max_windows / len(idx))))
    out = []
    for i in idx:
        x = evalset.normalized(i)
        starts = rng.integers(0, len(x) - length + 1, size=per_run)
        out.extend(x[s:s + length] for s in starts)
    out = np.stack(out)
    if len(out) > max_windows:
        out = out[rng.choice(len(out), max_windows, replace=False)]
    return out.astype(np.float32)


#: (window, parcel) samples the head is fitted on: bounds its CPU time and memory (tokens x D x patches).
HEAD_MAX_SAMPLES = 20000
HEAD_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def fit_forecast_head(adapter: ModelAdapter, train_context: np.ndarray, train_future: np.ndarray,
                      seed: int = 0) -> RidgeCV:
    """Ridge head from per-parcel encoder features to the parcel's future, on training windows only."""
    adapter.require("forecast_features", "forecasting fine-tune")
    feats = _features(adapter, train_context, train_future.shape[1])
    X = feats.reshape(-1, feats.shape[-1])
    Y = train_future.transpose(0, 2, 1).reshape(-1, train_future.shape[1])  # (window, parcel) rows
    if len(X) > HEAD_MAX_SAMPLES:
        keep = stable_rng("forecast-head", seed).choice(len(X), HEAD_MAX_SAMPLES, replace=False)
        X, Y = X[keep], Y[keep]
    return RidgeCV(alphas=HEAD_ALPHAS).fit(X, Y)


def predict_forecast_head(adapter: ModelAdapter, head: RidgeCV, context: np.ndarray, horizon: int) -> np.ndarray:
    feats = _features(adapter, context, horizon)
    b, n, f = feats.shape
    return head.predict(feats.reshape(-1, f)).reshape(b, n, horizon).transpose(0, 2, 1).astype(np.float32)


def _features(adapter: ModelAdapter, context: np.ndarray, horizon: int) -> np.ndarray:
    out = [np.asarray(adapter.forecast_features(context[s:s + adapter.batch_size], horizon), np.float32)
           for s in range(0, len(context), adapter.batch_size)]
    return np.concatenate(out)


def run(evalset: EvalSet, settings: EvalSettings, adapter: ModelAdapter | None) -> tuple[pd.DataFrame, list[str]]:
    length = settings.context + settings.horizon
    if adapter is not None:
        adapter.require("forecast", "forecasting")
    windows, info = heldout_windows(evalset, settings, length)
    context, future = windows[:, :settings.context], windows[:, settings.context:]
    preds: dict[str, np.ndarray] = {}
    notes: list[str] = []
    seeds = settings.seeds
    if adapter is not None:
        out = []
        for s in range(0, len(context), adapter.batch_size):
            out.append(np.asarray(adapter.forecast(context[s:s + adapter.batch_size], settings.horizon), np.float32))
        preds[("forecast", None)] = np.concatenate(out)
        if "forecast_features" in adapter.capabilities:
            train = training_windows(evalset, length, settings.forecast_baselines.max_train_windows)
            head = fit_forecast_head(adapter, train[:, :settings.context], train[:, settings.context:], seeds[0])
            preds[("finetuned_head", None)] = predict_forecast_head(adapter, head, context, settings.horizon)
            notes.append(f"finetuned_head: ridge penalty {head.alpha_:g} (leave-one-out over "
                         f"{min(HEAD_MAX_SAMPLES, len(train) * evalset.n_parcels)} training samples)")
    else:
        fb = settings.forecast_baselines
        preds[("persistence", None)] = persistence(context, settings.horizon)
        train = training_windows(evalset, length, fb.max_train_windows)
        tc, tf = train[:, :settings.context], train[:, settings.context:]
        preds[("ridge_ar", None)] = RidgeAR(lags=fb.ridge_lags).fit(tc, tf).predict(context, settings.horizon)
        for seed in seeds[:max(1, fb.lstm_seeds)]:  # the LSTM's training is stochastic: one fit per seed
            lstm = LSTMForecaster(hidden=fb.lstm_hidden, lags=fb.lstm_lags, epochs=fb.lstm_epochs,
                                  max_samples=fb.lstm_max_samples, seed=seed)
            preds[("lstm", seed)] = lstm.fit(tc, tf).predict(context, settings.horizon)
    rows = []
    for (method, seed), pred in preds.items():
        if pred.shape != future.shape:
            raise TaskSkipped(f"{method}: forecast shape {pred.shape} != expected {future.shape}")
        for k in range(len(windows)):
            for metric, value in window_metrics(future[k], pred[k]).items():
                rows.append({"method": method, "condition": f"{settings.context}->{settings.horizon}",
                             "seed": seed if seed is not None else seeds[0], "run_id": info["run_id"][k],
                             "subject": info["subject"][k], "metric": metric, "value": value})
    return pd.DataFrame(rows), notes
