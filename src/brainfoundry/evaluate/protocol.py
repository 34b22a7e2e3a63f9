"""The evaluation protocol: subject/site-grouped folds, nested hyper-parameter search, CIs, permutations.

Every model and every baseline is scored on the same folds: `make_folds` assigns each subject a fold per
seed once, the table is saved (``folds.parquet``) and every task reads it back. Scaling and
hyper-parameters are fitted inside the training part of each fold only (a scikit-learn ``Pipeline``
searched by ``GridSearchCV`` over an inner grouped split), so nothing of a test subject leaks into the
model that scores it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from brainfoundry.errors import InputError


class TaskSkipped(Exception):
    """A task (or one target of it) that cannot run on this input; the reason is shown in the report.

    Raised for expected bad input (a constant phenotype, too few subjects for the folds asked, a model
    without the needed head) so that the caller records the reason and the other tasks still run.
    """


# -- folds ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldSpec:
    n_folds: int = 5
    seeds: tuple[int, ...] = (0,)
    group_by: str = "auto"  # "subject", "site", or "auto" (site when at least n_folds sites exist)
    stratify_by: str | None = "diagnosis"


def _group_labels(subjects: pd.DataFrame, spec: FoldSpec) -> tuple[np.ndarray, str]:
    """The grouping column for each subject and its name (site or subject)."""
    sites = subjects["site"] if "site" in subjects.columns else pd.Series(index=subjects.index, dtype=object)
    has_sites = sites.notna().all() and sites.nunique() >= 2
    if spec.group_by == "site" and not has_sites:
        raise TaskSkipped("folds grouped by site were asked, but the subjects do not all have a site "
                          f"(or only {sites.nunique()} site exists)")
    if spec.group_by == "site" or (spec.group_by == "auto" and has_sites and sites.nunique() >= spec.n_folds):
        return sites.astype(str).to_numpy(), "site"
    return subjects.index.astype(str).to_numpy(), "subject"


def make_folds(subjects: pd.DataFrame, spec: FoldSpec) -> pd.DataFrame:
    """Assign every subject a test fold for every seed, grouped by site (when sites exist) or subject.

    Parameters
    ----------
    subjects : DataFrame indexed by subject id, with a ``site`` column (may be null) and the stratification
        column when ``spec.stratify_by`` names one.
    spec : number of folds, seeds, grouping and stratification.

    Returns
    -------
    DataFrame with columns subject, site, group, group_by, seed, fold (one row per subject and seed).
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if subjects.index.has_duplicates:
        raise InputError("subjects", "duplicate subject ids in the evaluation set")
    groups, group_by = _group_labels(subjects, spec)
    n_groups = len(np.unique(groups))
    if spec.n_folds < 2:
        raise TaskSkipped(f"at least 2 folds are needed, {spec.n_folds} were asked")
    if n_groups < spec.n_folds:
        raise TaskSkipped(f"{spec.n_folds} folds were asked but only {n_groups} {group_by}s are available "
                          f"({len(subjects)} subjects); lower evaluate.cv.n_folds or add subjects")
    strat = None
    if spec.stratify_by and spec.stratify_by in subjects.columns:
        col = subjects[spec.stratify_by]
        if col.notna().all() and col.nunique() >= 2:
            strat = col.astype(str).to_numpy()
    rows = []
    for seed in spec.seeds:
        if strat is not None:
            splitter = StratifiedGroupKFold(n_splits=spec.n_folds, shuffle=True, random_state=seed)
            with warnings.catch_warnings():  # "least populated class" warnings on tiny demo sets
                warnings.simplefilter("ignore", UserWarning)
                splits = list(splitter.split(np.zeros(len(subjects)), strat, groups))
        else:
            # GroupKFold shuffles groups only from sklearn 1.6; permute groups ourselves for other versions.
            rng = np.random.default_rng(seed)
            uniq = np.unique(groups)
            perm = dict(zip(uniq, rng.permutation(len(uniq))))
            codes = np.array([perm[g] for g in groups])
            splits = list(GroupKFold(n_splits=spec.n_folds).split(np.zeros(len(subjects)), groups=codes))
        fold = np.full(len(subjects), -1, dtype=int)
        for k, (_, test) in enumerate(splits):
            fold[test] = k
        rows.append(pd.DataFrame({
            "subject": subjects.index.astype(str), "site": subjects.get("site", pd.Series(index=subjects.index)).to_numpy(),
            "group": groups, "group_by": group_by, "seed": int(seed), "fold": fold,
        }))
    return pd.concat(rows, ignore_index=True)


def iter_folds(folds: pd.DataFrame, subjects: Sequence[str]) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield (seed, fold, train_idx, test_idx) as positions into ``subjects`` from a saved fold table.

    Subjects absent from the fold table are an error (the table was made for another data set); subjects
    of the table absent from ``subjects`` are ignored (a task may use a labelled subset).
    """
    subjects = pd.Index([str(s) for s in subjects])
    for seed, table in folds.groupby("seed", sort=True):
        lookup = table.set_index("subject")["fold"]
        missing = subjects.difference(lookup.index)
        if len(missing):
            raise InputError("folds.parquet", f"subjects {list(missing[:5])} have no fold; re-run the folds step")
        fold_of = lookup.reindex(subjects).to_numpy()
        for k in sorted(np.unique(fold_of)):
            test = np.flatnonzero(fold_of == k)
            train = np.flatnonzero(fold_of != k)
            yield int(seed), int(k), train, test


def group_of(folds: pd.DataFrame, subjects: Sequence[str]) -> np.ndarray:
    """The grouping label (site or subject) used by the folds, for the inner split of training folds."""
    lookup = folds.drop_duplicates("subject").set_index("subject")["group"]
    return lookup.reindex([str(s) for s in subjects]).astype(str).to_numpy()


# -- confidence intervals ---------------------------------------------------------------------------
def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t interval over fold x seed values (NaN-free); one value gives a NaN interval."""
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return mean, mean - float(half), mean + float(half)


def bootstrap_ci(values: Sequence[float], groups: Sequence[str] | None = None, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-item values and a percentile bootstrap interval, resampling groups (subjects) whole."""
    arr = np.asarray(values, dtype=float)
    keep = np.isfinite(arr)
    arr = arr[keep]
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    if groups is None:
        groups = np.arange(arr.size)
    groups = np.asarray(groups)[keep]
    codes, uniq = pd.factorize(groups)
    sums = np.bincount(codes, weights=arr)
    counts = np.bincount(codes)
    if len(uniq) < 2:
        return float(arr.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return float(arr.mean()), float(lo), float(hi)


# -- probes with nested hyper-parameter search ------------------------------------------------------
@dataclass(frozen=True)
class ProbeSpec:
    """A probe: which estimator, and its hyper-parameter grid (searched inside training folds only)."""

    kind: str  # logistic | svm | mlp | ridge | svr | mlp_reg
    grid: dict = field(default_factory=dict)


CLASSIFIERS = ("logistic", "svm", "mlp", "svm_rbf")
REGRESSORS = ("ridge", "svr", "mlp_reg", "svr_rbf")
# The same probe name works for either target type: classification probe -> its regression twin.
REGRESSION_TWIN = {"logistic": "ridge", "svm": "svr", "mlp": "mlp_reg", "svm_rbf": "svr_rbf"}
RBF = ("svm_rbf", "svr_rbf")


from sklearn.base import BaseEstimator, TransformerMixin  # noqa: E402  (sklearn is a hard dependency)


class GramRotation(TransformerMixin, BaseEstimator):
    """Rotate centred data onto its principal axes via the n x n Gram matrix (exact PCA for n << p).

    L2-penalised linear models (ridge, logistic, linear SVM) are invariant to a rotation of the feature
    space, and their solution lies in the span of the training rows, so fitting them on the n principal
    coordinates gives the same predictions as on the p raw features (19,900 for CC200 FC) at a fraction of
    the cost. Equal to ``sklearn.decomposition.PCA`` (up to component signs; a test checks it); cheaper
    because it forms the n x n Gram matrix (one matmul) instead of a full SVD of the n x p data.

    ``residual=True`` appends one coordinate, the norm of the part of a row outside the training span
    (0 for training rows): distances from any row to the training rows are then exact, so an RBF kernel
    between test and training rows (all an SVM's prediction needs) is unchanged too.
    """

    def __init__(self, rtol: float = 1e-10, residual: bool = False):
        self.rtol = rtol
        self.residual = residual

    def fit(self, X, y=None) -> "GramRotation":
        X = np.asarray(X, dtype=np.float64)
        self.mean_ = X.mean(axis=0)
        Xc = X - self.mean_
        evals, evecs = np.linalg.eigh(Xc @ Xc.T)
        keep = evals > self.rtol * max(float(evals.max(initial=0.0)), 1e-300)
        evals, evecs = evals[keep][::-1], evecs[:, keep][:, ::-1]
        # Principal axes in feature space: V = Xc^T U / sqrt(lambda), orthonormal columns.
        self.components_ = (Xc.T @ evecs) / np.sqrt(evals)
        return self

    def transform(self, X) -> np.ndarray:
        Xc = np.asarray(X, dtype=np.float64) - self.mean_
        Z = Xc @ self.components_
        if not self.residual:
            return Z
        rest = np.maximum((Xc * Xc).sum(1) - (Z * Z).sum(1), 0.0)
        # Round-off leaves ~1e-9 relative residue on training rows: below that it is zero.
        rest[rest < 1e-8 * np.maximum((Xc * Xc).sum(1), 1e-300)] = 0.0
        return np.column_stack([Z, np.sqrt(rest)])


def build_estimator(kind: str, seed: int = 0, pca: int | None = None, rotate: bool = False):
    """A scikit-learn pipeline (scaler fitted on training data only) and its default grid.

    ``rotate`` inserts `GramRotation` (exact for the linear probes; use when features outnumber samples).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR, LinearSVC

    # Balanced class weights: with ABIDE's 85 % male subjects an unweighted probe predicts "male" for
    # everyone (balanced accuracy 0.50 at AUC 0.63); weighting keeps the threshold meaningful.
    if kind == "logistic":
        est = LogisticRegression(max_iter=5000, class_weight="balanced")
        grid = {"C": [1e-3, 1e-2, 1e-1, 1.0]}
    elif kind == "svm":
        est = LinearSVC(dual="auto", max_iter=5000, class_weight="balanced", random_state=seed)
        grid = {"C": [1e-4, 1e-3, 1e-2, 1e-1]}
    elif kind == "mlp":
        # L-BFGS: full-batch, converges in a few hundred cheap steps on probe-sized data (sklearn's advice
        # for small data sets; Adam took 100x longer here).
        est = MLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", max_iter=500, random_state=seed)
        grid = {"alpha": [1e-2, 1.0]}
    elif kind == "ridge":
        est, grid = Ridge(), {"alpha": [1e-1, 1.0, 10.0, 100.0, 1000.0]}
    elif kind == "svr":
        est, grid = SVR(kernel="linear"), {"C": [1e-3, 1e-2, 1e-1, 1.0]}
    elif kind == "mlp_reg":
        est = MLPRegressor(hidden_layer_sizes=(64,), solver="lbfgs", max_iter=500, random_state=seed)
        grid = {"alpha": [1e-2, 1.0]}
    elif kind == "svm_rbf":
        # gamma as a multiple of 1 / median squared distance of the training rows (`rbf_grid`).
        est, grid = SVC(kernel="rbf", class_weight="balanced"), {"C": [0.1, 1.0, 10.0], "gamma": [0.25, 1.0, 4.0]}
    elif kind == "svr_rbf":
        est, grid = SVR(kernel="rbf"), {"C": [0.1, 1.0, 10.0], "gamma": [0.25, 1.0, 4.0]}
    else:
        raise ValueError(f"unknown probe {kind!r}; choose from {CLASSIFIERS + REGRESSORS}")
    steps = [("scale", StandardScaler())]
    if rotate and kind in ("logistic", "svm", "ridge", "svr"):
        steps.append(("rotate", GramRotation()))
    if pca:
        steps.append(("pca", PCA(n_components=pca, random_state=seed)))
    steps.append(("est", est))
    return Pipeline(steps), {f"est__{k}": v for k, v in grid.items()}


LINEAR = ("logistic", "svm", "ridge", "svr")


def rbf_grid(grid: dict, X: np.ndarray) -> dict:
    """An RBF grid's gamma multipliers in units of 1 / median squared distance between the rows of ``X``.

    ``X`` is the training fold (scaled), so the scale of gamma is set without test subjects.
    """
    from sklearn.metrics import pairwise_distances

    sub = X[: min(len(X), 500)]
    d2 = pairwise_distances(sub, metric="sqeuclidean")
    med = float(np.median(d2[np.triu_indices(len(sub), k=1)])) if len(sub) > 1 else 1.0
    med = med if med > 0 else 1.0
    return {k: ([g / med for g in v] if k.endswith("gamma") else v) for k, v in grid.items()}


def fit_nested(kind: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0,
               n_inner: int = 3, grid: dict | None = None, classification: bool = True):
    """Fit a probe on one training fold, choosing hyper-parameters by an inner grouped split of it.

    The inner split groups like the outer one (by site or subject) so the chosen hyper-parameters are
    those that transfer to unseen groups. With too few groups for an inner split the middle grid value
    is used (returned flag False, recorded as ``inner_cv=False``).

    When features outnumber samples (FC: 19,900 vs a few hundred subjects), a linear probe is fitted on
    the principal coordinates of the scaled training fold (`GramRotation`, exact for L2 linear models):
    scaling and rotation are fitted once on the whole training fold (never on test subjects; the inner
    search sees the scaler's statistics of its validation rows, unsupervised, which is how a scaler in
    front of a grid search would be set up in most pipelines too), then the grid is searched on them.
    """
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe, default_grid = build_estimator(kind, seed=seed)
    grid = {f"est__{k}": v for k, v in grid.items()} if grid else default_grid
    prep = None
    if kind in LINEAR + RBF and X.shape[1] > X.shape[0]:
        # RBF: the residual coordinate keeps test-to-training distances exact (`GramRotation`).
        prep = Pipeline([("scale", StandardScaler()), ("rotate", GramRotation(residual=kind in RBF))]).fit(X)
        X = prep.transform(X)
        pipe = Pipeline([("est", pipe.named_steps["est"])])  # rescaling rotated axes would change the penalty
    if kind in RBF:
        scaled = X if prep is not None else pipe.named_steps["scale"].fit_transform(X)
        grid = rbf_grid(grid, scaled)

    def finish(est):
        return Pipeline([("prep", prep), ("est", est.named_steps["est"])]) if prep is not None else est

    n_groups = len(np.unique(groups))
    n_splits = min(n_inner, n_groups)
    if classification:
        counts = np.unique(y, return_counts=True)[1]
        n_splits = min(n_splits, int(counts.min()))
    # Small fits: BLAS threads cost more in start-up and contention than they save (3x slower on a
    # busy 2-core machine); the big matmuls of the rotation above keep every thread.
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(limits=1 if X.size < 2_000_000 else None):
        warnings.simplefilter("ignore")  # convergence / least-populated-class chatter on small folds
        if n_splits < 2 or all(len(v) == 1 for v in grid.values()):
            pipe.set_params(**{k: v[len(v) // 2] for k, v in grid.items()})
            return finish(pipe.fit(X, y)), False
        if classification:
            inner = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            # A proper score (log loss) where the probe has probabilities: AUC alone is blind to calibration
            # and, on ties, picks the strongest penalty whose predictions collapse to one class.
            scoring = "neg_log_loss" if kind in ("logistic", "mlp") else "balanced_accuracy"
        else:
            inner = GroupKFold(n_splits=n_splits)
            scoring = "neg_mean_absolute_error"
        search = GridSearchCV(pipe, grid, cv=inner, scoring=scoring, error_score=np.nan, refit=True)
        search.fit(X, y, groups=groups)
    return finish(search.best_estimator_), True


def scores_of(estimator, X: np.ndarray) -> np.ndarray:
    """A continuous score for AUC: P(class 1) or the decision function."""
    if hasattr(estimator, "predict_proba"):
        try:
            proba = estimator.predict_proba(X)
            return proba[:, 1] if proba.shape[1] == 2 else proba
        except AttributeError:
            pass
    return estimator.decision_function(X)


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary problem by the Mann-Whitney rank sum (ties averaged), like sklearn's.

    Used in bootstraps, where ``sklearn.metrics.roc_auc_score``'s input checks cost 100x the sum itself
    (a test checks equality with sklearn).
    """
    y = np.asarray(y_true)
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (sklearn's definition)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and AUC (binary: P(class 1) or decision values; multi-class: one-vs-rest)."""
    from sklearn.metrics import roc_auc_score

    out = {"balanced_accuracy": balanced_accuracy(y_true, y_pred)}
    n_classes = len(np.unique(y_true))
    if n_classes == 2 and np.ndim(y_score) == 1:
        out["auc"] = binary_auc(y_true, y_score)
    elif n_classes > 2 and np.ndim(y_score) == 2:
        out["auc"] = float(roc_auc_score(y_true, y_score, multi_class="ovr"))
    else:
        out["auc"] = float("nan")  # a one-class test fold has no AUC
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    mae = float(np.mean(np.abs(y_true - y_pred)))
    r = float(stats.pearsonr(y_true, y_pred)[0]) if len(y_true) > 2 and np.std(y_pred) > 0 and np.std(y_true) > 0 \
        else float("nan")
    return {"mae": mae, "r": r}


class TargetScaler:
    """BrainLM's target normalisations of a continuous target, fitted on training values only.

    ``zscore`` (age), ``minmax``, ``log_minmax`` (log1p then min-max, for skewed scores) or ``none``.
    """

    def __init__(self, kind: str | None = "none"):
        self.kind = kind or "none"

    def _pre(self, y):
        y = np.asarray(y, dtype=float)
        if self.kind == "log_minmax":
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.log1p(y)
        return y

    def fit(self, y) -> TargetScaler:
        y = np.asarray(y, dtype=float)
        if self.kind == "log_minmax" and (y <= -1).any():
            raise TaskSkipped(f"log_minmax normalisation needs values > -1 (minimum {y.min():g})")
        v = self._pre(y)
        if self.kind == "zscore":
            self.shift_, self.scale_ = float(v.mean()), float(v.std() or 1.0)
        elif self.kind in ("minmax", "log_minmax"):
            self.shift_, self.scale_ = float(v.min()), float((v.max() - v.min()) or 1.0)
        elif self.kind == "none":
            self.shift_, self.scale_ = 0.0, 1.0
        else:
            raise ValueError(f"unknown target normalisation {self.kind!r}")
        return self

    def transform(self, y) -> np.ndarray:
        return (self._pre(y) - self.shift_) / self.scale_

    def inverse(self, z) -> np.ndarray:
        v = np.asarray(z, dtype=float) * self.scale_ + self.shift_
        return np.expm1(v) if self.kind == "log_minmax" else v


def cross_validate_probe(X: np.ndarray, y: np.ndarray, subjects: Sequence[str], folds: pd.DataFrame,
                         kind: str, classification: bool, n_inner: int = 3, label: str = "target",
                         grid: dict | None = None, test_mask: np.ndarray | None = None,
                         normalization: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Outer cross-validation of one probe over the saved folds; rows per (seed, fold) plus pooled rows.

    Parameters
    ----------
    X : [n_subjects, n_features] features, one row per subject (in ``subjects`` order).
    y : targets (classes as integers or strings, or floats).
    test_mask : optional boolean per subject; False keeps the subject out of every test fold (e.g. the
        subjects whose labels a model saw during pretraining). They may still train the probe.
    normalization : a continuous target's `TargetScaler` kind, fitted on each training part; the probe is
        fitted on the normalised target, MAE and r are in raw units, ``mse`` on the normalised scale.

    Returns
    -------
    (rows, notes): tidy rows with columns seed, fold, metric, value, n and the messages for folds that
    could not be scored (a class missing in a training fold, ...).
    """
    rows, notes = [], []
    pooled: dict[int, list] = {}
    for seed, fold, train, test in iter_folds(folds, subjects):
        if test_mask is not None:
            test = test[test_mask[test]]
        if len(test) == 0:
            continue
        ytr = y[train]
        if classification and len(np.unique(ytr)) < 2:
            notes.append(f"{label}: fold {fold} (seed {seed}) skipped: the training part has one class only "
                         f"({np.unique(ytr).tolist()})")
            continue
        if not classification and np.nanstd(ytr) == 0:
            notes.append(f"{label}: fold {fold} (seed {seed}) skipped: the target is constant in the training part")
            continue
        groups = group_of(folds, [subjects[i] for i in train])
        scaler = None if classification else TargetScaler(normalization).fit(ytr)
        est, searched = fit_nested(kind, X[train], ytr if scaler is None else scaler.transform(ytr), groups,
                                   seed=seed, n_inner=n_inner, grid=grid, classification=classification)
        pred = est.predict(X[test])
        sq = np.zeros(0)
        if classification:
            score = scores_of(est, X[test])
            metrics = classification_metrics(y[test], pred, score)
        else:
            sq = (scaler.transform(y[test]) - pred) ** 2
            pred = scaler.inverse(pred)
            score = pred
            metrics = regression_metrics(y[test], pred)
            if scaler.kind != "none":
                metrics["mse"] = float(np.mean(sq))
        pooled.setdefault(seed, []).append((test, pred, score, sq))
        for name, value in metrics.items():
            rows.append({"seed": seed, "fold": str(fold), "metric": name, "value": value, "n": len(test),
                         "inner_cv": searched})
    # Out-of-fold predictions pooled per seed: defined even when some test folds hold one class only.
    for seed, parts in pooled.items():
        idx = np.concatenate([p[0] for p in parts])
        pred = np.concatenate([p[1] for p in parts])
        score = np.concatenate([p[2] for p in parts])
        metrics = classification_metrics(y[idx], pred, score) if classification else regression_metrics(y[idx], pred)
        if not classification and normalization not in (None, "none"):
            metrics["mse"] = float(np.mean(np.concatenate([p[3] for p in parts])))
        for name, value in metrics.items():
            rows.append({"seed": seed, "fold": "pooled", "metric": name, "value": value, "n": len(idx),
                         "inner_cv": True})
    return pd.DataFrame(rows), notes


def permutation_scores(X: np.ndarray, y: np.ndarray, subjects: Sequence[str], folds: pd.DataFrame, kind: str,
                       classification: bool, n_permutations: int = 10, seed: int = 0, n_inner: int = 2,
                       metric: str | None = None) -> np.ndarray:
    """The pooled out-of-fold metric on shuffled labels: what chance looks like under this protocol.

    Labels are permuted across subjects (within sites when the folds are site-grouped would keep site
    confounds; we permute globally, the stricter null for a site-grouped split).
    """
    metric = metric or ("auc" if classification else "r")
    rng = np.random.default_rng(seed)
    first_seed = int(folds["seed"].min())
    folds = folds[folds["seed"] == first_seed]
    out = []
    for _ in range(n_permutations):
        y_perm = rng.permutation(y)
        rows, _notes = cross_validate_probe(X, y_perm, subjects, folds, kind, classification, n_inner=n_inner)
        sel = rows[(rows["fold"] == "pooled") & (rows["metric"] == metric)]
        out.append(float(sel["value"].iloc[0]) if len(sel) else float("nan"))
    return np.asarray(out)


# Metrics with a natural range: a t interval over few folds can step outside it, so it is clipped.
METRIC_RANGE = {"auc": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "accuracy": (0.0, 1.0), "r": (-1.0, 1.0),
                "pearson_r": (-1.0, 1.0), "mse": (0.0, np.inf)}


def aggregate(rows: pd.DataFrame, keys: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Mean and CI over fold x seed rows (fold != 'pooled') per key; the 'pooled' rows averaged over seeds.

    Returns rows with ``fold='all'`` (mean over folds and seeds, t-interval) and ``fold='pooled'``
    (out-of-fold metric, mean over seeds, interval over seeds when several).
    """
    out = []
    for key, grp in rows.groupby(list(keys), dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        base = dict(zip(keys, key))
        per_fold = grp[grp["fold"] != "pooled"]
        if len(per_fold):
            mean, lo, hi = mean_ci(per_fold["value"].to_numpy(), level)
            out.append({**base, "fold": "all", "seed": -1, "value": mean, "ci_low": lo, "ci_high": hi,
                        "n": int(per_fold["n"].sum() / max(per_fold["seed"].nunique(), 1)),
                        "n_values": int(np.isfinite(per_fold["value"]).sum())})
        pooled = grp[grp["fold"] == "pooled"]
        if len(pooled):
            mean, lo, hi = mean_ci(pooled["value"].to_numpy(), level)
            out.append({**base, "fold": "pooled", "seed": -1, "value": mean, "ci_low": lo, "ci_high": hi,
                        "n": int(pooled["n"].max()), "n_values": int(np.isfinite(pooled["value"]).sum())})
    frame = pd.DataFrame(out)
    if "metric" in frame.columns and len(frame):
        bounds = frame["metric"].map(lambda m: METRIC_RANGE.get(m, (-np.inf, np.inf)))
        frame["ci_low"] = np.maximum(frame["ci_low"].astype(float), [b[0] for b in bounds])
        frame["ci_high"] = np.minimum(frame["ci_high"].astype(float), [b[1] for b in bounds])
    return frame
