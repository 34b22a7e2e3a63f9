"""The evaluation protocol: grouped folds, nested search, the Gram rotation, intervals, permutations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from brainfoundry.evaluate.protocol import (FoldSpec, GramRotation, TaskSkipped, aggregate, bootstrap_ci,
                                            build_estimator, cross_validate_probe, fit_nested, iter_folds, make_folds,
                                            mean_ci, permutation_scores)


def _subjects(n=40, n_sites=5, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"site": [f"site{i % n_sites}" for i in range(n)],
                         "diagnosis": rng.choice(["ASD", "control"], n)},
                        index=pd.Index([f"s{i:03d}" for i in range(n)], name="subject"))


def test_folds_group_by_site_and_are_reproducible():
    subjects = _subjects()
    spec = FoldSpec(n_folds=5, seeds=(0, 1), group_by="auto")
    folds = make_folds(subjects, spec)
    assert set(folds["group_by"]) == {"site"}
    assert len(folds) == 2 * len(subjects)
    for seed, table in folds.groupby("seed"):
        # every site sits in exactly one test fold: no site is in training and test at once
        assert (table.groupby("site")["fold"].nunique() == 1).all()
        assert sorted(table["fold"].unique()) == list(range(5))
    # the saved table is what every model reads: making it again gives the same assignment
    again = make_folds(subjects, spec)
    pd.testing.assert_frame_equal(folds, again)
    # and iter_folds partitions the subjects for each seed
    for seed, fold, train, test in iter_folds(folds, subjects.index):
        assert not set(train) & set(test)
        assert len(train) + len(test) == len(subjects)


def test_folds_fall_back_to_subjects_when_sites_are_few():
    subjects = _subjects(n=30, n_sites=2)
    folds = make_folds(subjects, FoldSpec(n_folds=5, seeds=(0,), group_by="auto"))
    assert set(folds["group_by"]) == {"subject"}
    with pytest.raises(TaskSkipped, match="5 folds were asked but only 2 sites"):
        make_folds(subjects, FoldSpec(n_folds=5, seeds=(0,), group_by="site"))


def test_too_few_subjects_for_the_folds_is_a_clear_skip():
    subjects = _subjects(n=3, n_sites=3)
    with pytest.raises(TaskSkipped, match=r"5 folds were asked but only 3 .*3 subjects"):
        make_folds(subjects, FoldSpec(n_folds=5, seeds=(0,), group_by="subject"))


def test_gram_rotation_equals_sklearn_pca_and_keeps_linear_predictions():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 300))
    Xt = rng.standard_normal((7, 300))
    ours = GramRotation().fit(X)
    ref = PCA(svd_solver="full").fit(X)
    a, b = ours.transform(Xt), ref.transform(Xt)[:, :ours.components_.shape[1]]
    signs = np.sign((a * b).sum(0))
    np.testing.assert_allclose(a, b * signs, rtol=1e-7, atol=1e-8)
    # an L2 logistic regression on the rotated coordinates predicts what it predicts on raw features
    y = (X[:, :5].sum(1) + 0.5 * rng.standard_normal(40) > 0).astype(int)
    plain, _ = build_estimator("logistic")
    rotated, _ = build_estimator("logistic", rotate=True)
    plain.set_params(est__C=0.1, est__tol=1e-12)
    rotated.set_params(est__C=0.1, est__tol=1e-12)
    d1 = plain.fit(X, y).decision_function(Xt)
    d2 = rotated.fit(X, y).decision_function(Xt)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-5)


def test_nested_search_uses_training_groups_only():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 8))
    y = (X[:, 0] > 0).astype(int)
    groups = np.repeat(np.arange(6), 10)
    est, searched = fit_nested("logistic", X, y, groups, n_inner=3)
    assert searched
    assert est.predict(X[:5]).shape == (5,)
    # one group: no inner split possible -> the middle grid value, flagged
    _, searched = fit_nested("logistic", X, y, np.zeros(60), n_inner=3)
    assert not searched


def test_mean_ci_matches_the_t_interval():
    values = [0.61, 0.72, 0.68, 0.75, 0.66]
    mean, lo, hi = mean_ci(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(ref)
    assert np.isnan(mean_ci([0.5])[1])


def test_bootstrap_resamples_whole_groups():
    values = np.r_[np.full(10, 1.0), np.full(10, 0.0)]
    groups = np.r_[np.zeros(10), np.ones(10)]
    mean, lo, hi = bootstrap_ci(values, groups, n_boot=400, seed=0)
    assert mean == 0.5
    # two groups only: a resample holds one, the other or both groups -> interval spans 0..1
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)


def _signal_data(n=60, p=30, seed=0):
    rng = np.random.default_rng(seed)
    subjects = pd.DataFrame({"site": [f"site{i % 6}" for i in range(n)]},
                            index=pd.Index([f"s{i:03d}" for i in range(n)]))
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, p)) + 2.5 * y[:, None] * (np.arange(p) < 3)
    subjects["diagnosis"] = np.where(y == 1, "ASD", "control")
    return X, y, subjects


def test_probe_finds_signal_and_permutation_gives_chance():
    X, y, subjects = _signal_data()
    folds = make_folds(subjects, FoldSpec(n_folds=3, seeds=(0,), group_by="site"))
    rows, notes = cross_validate_probe(X, y, list(subjects.index), folds, "logistic", True, n_inner=2)
    pooled_auc = rows[(rows["fold"] == "pooled") & (rows["metric"] == "auc")]["value"].iloc[0]
    assert pooled_auc > 0.85
    assert not notes
    perm = permutation_scores(X, y, list(subjects.index), folds, "logistic", True, n_permutations=8, seed=3)
    # shuffled labels: chance level (AUC near 0.5), far below the real one
    assert abs(np.mean(perm) - 0.5) < 0.15
    assert np.max(perm) < pooled_auc


def test_constant_target_in_a_training_fold_is_noted_and_skipped():
    X, y, subjects = _signal_data(n=30)
    folds = make_folds(subjects, FoldSpec(n_folds=3, seeds=(0,), group_by="site"))
    # all positives in one site group: when that fold is test, the training part still has both classes,
    # so instead make the label constant outside fold 0 -> training parts of folds 1, 2 hold one class
    fold_of = folds.set_index("subject")["fold"].reindex(subjects.index).to_numpy()
    y_bad = np.where(fold_of == 0, y, 1)
    rows, notes = cross_validate_probe(X, y_bad, list(subjects.index), folds, "logistic", True)
    assert any("one class only" in n for n in notes)
    # the fold that could be scored still produced rows
    assert set(rows["fold"]) - {"pooled"}


def test_aggregate_means_over_folds_and_seeds():
    rows = pd.DataFrame({"method": "m", "metric": "auc", "seed": [0, 0, 1, 1], "fold": ["0", "1", "0", "1"],
                         "value": [0.6, 0.7, 0.8, 0.9], "n": [10, 10, 10, 10]})
    agg = aggregate(rows, ["method", "metric"])
    row = agg[agg["fold"] == "all"].iloc[0]
    assert row["value"] == pytest.approx(0.75)
    assert row["n_values"] == 4
    assert row["ci_low"] < 0.75 < row["ci_high"]


def test_fast_metrics_equal_sklearn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from brainfoundry.evaluate.protocol import balanced_accuracy, binary_auc

    rng = np.random.default_rng(5)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        if len(np.unique(y)) < 2:
            continue
        score = np.round(rng.standard_normal(40) + y, 1)  # rounding makes ties
        pred = rng.integers(0, 2, 40)
        assert binary_auc(y, score) == pytest.approx(roc_auc_score(y, score))
        assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    y3 = rng.integers(0, 3, 30)
    p3 = rng.integers(0, 3, 30)
    assert balanced_accuracy(y3, p3) == pytest.approx(balanced_accuracy_score(y3, p3))


def test_aggregate_clips_intervals_to_the_metric_range():
    rows = pd.DataFrame({"method": "m", "metric": "auc", "seed": 0, "fold": ["0", "1", "2"],
                         "value": [1.0, 0.5, 1.0], "n": 4})
    row = aggregate(rows, ["method", "metric"]).iloc[0]
    assert row["ci_high"] == 1.0 and 0 <= row["ci_low"] < row["value"]


# -- target normalisations (BrainLM's clinical-variable protocol) -----------------------------------
@pytest.mark.parametrize("kind", ["zscore", "minmax", "log_minmax", "none"])
def test_target_scaler_round_trips_and_is_fitted_on_training_values(kind):
    from brainfoundry.evaluate.protocol import TargetScaler

    train = np.array([1.0, 4.0, 9.0, 30.0])
    scaler = TargetScaler(kind).fit(train)
    z = scaler.transform(train)
    np.testing.assert_allclose(scaler.inverse(z), train)
    if kind == "zscore":
        assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)
    if kind in ("minmax", "log_minmax"):
        assert z.min() == pytest.approx(0) and z.max() == pytest.approx(1)
    if kind == "log_minmax":
        np.testing.assert_allclose(z, (np.log1p(train) - np.log1p(1)) / (np.log1p(30) - np.log1p(1)))
    # test values outside the training range stay outside it (nothing is refitted on them)
    assert scaler.transform(np.array([60.0]))[0] > z.max()


def test_log_minmax_refuses_values_it_cannot_log():
    from brainfoundry.evaluate.protocol import TargetScaler

    with pytest.raises(TaskSkipped, match="log_minmax"):
        TargetScaler("log_minmax").fit(np.array([-2.0, 1.0]))


def test_normalised_ridge_target_adds_mse_and_keeps_raw_unit_metrics():
    """Ridge is equivariant to an affine change of the target: z-scoring leaves MAE and r as they were."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 8))
    y = 30 + 10 * X[:, 0] + rng.normal(size=40)
    subjects = pd.DataFrame({"site": np.repeat(list("abcd"), 10)}, index=[f"s{i}" for i in range(40)])
    folds = make_folds(subjects, FoldSpec(n_folds=4, seeds=(0,), stratify_by=None))
    raw, _ = cross_validate_probe(X, y, list(subjects.index), folds, "ridge", False, n_inner=2)
    z, _ = cross_validate_probe(X, y, list(subjects.index), folds, "ridge", False, n_inner=2, normalization="zscore")
    assert "mse" not in set(raw["metric"]) and "mse" in set(z["metric"])
    for metric in ("mae", "r"):
        np.testing.assert_allclose(z[z["metric"] == metric]["value"], raw[raw["metric"] == metric]["value"], rtol=1e-6)
    pooled_mse = z[(z["metric"] == "mse") & (z["fold"] == "pooled")]["value"].iloc[0]
    assert 0 < pooled_mse < 0.1  # the target is nearly linear in X: a small error on the z scale
