"""Baselines: FC features against numpy, reconstruction fills, forecasting models."""

from __future__ import annotations

import numpy as np
import pytest

from brainfoundry.evaluate.baselines import (LSTMForecaster, RidgeAR, correlation, expand_mask, fc_features, fc_rows,
                                             interpolate_masked, parcel_mean_masked, patch_mask, persistence)


def test_correlation_matches_numpy_and_zero_variance_parcels_give_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 12)).astype(np.float32)
    np.testing.assert_allclose(correlation(x), np.corrcoef(x.T), atol=1e-6)
    x[:, 4] = 3.0  # a constant ROI, as in some ABIDE PCP subjects
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.corrcoef(x.T)
    corr = correlation(x)
    assert np.isfinite(corr).all()
    assert (corr[4, np.arange(12) != 4] == 0).all() and corr[4, 4] == 1
    keep = np.arange(12) != 4
    np.testing.assert_allclose(corr[np.ix_(keep, keep)], ref[np.ix_(keep, keep)], atol=1e-6)


def test_fc_features_are_fisher_z_upper_triangles():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 6))
    feats = fc_features(x)
    iu = np.triu_indices(6, k=1)
    np.testing.assert_allclose(feats, np.arctanh(np.corrcoef(x.T)[iu]), rtol=1e-5)
    rows = fc_rows(x)
    assert rows.shape == (6, 6) and np.all(np.diag(rows) == 0)


def test_patch_mask_hides_the_exact_token_count():
    rng = np.random.default_rng(0)
    for ratio in (0.2, 0.5, 0.75):
        m = patch_mask(30, 10, ratio, rng)
        assert m.shape == (30, 10) and m.sum() == round(ratio * 300)
    point = expand_mask(m, 20)
    assert point.shape == (200, 30)
    assert (point[:20, 0] == m[0, 0]).all() and (point[180:, 0] == m[0, 9]).all()


def test_interpolation_is_exact_on_lines_and_the_mean_on_constants():
    t = np.arange(100, dtype=np.float32)
    x = np.stack([2 * t + 1, -t, np.full(100, 5.0, np.float32)], axis=1)
    mask = np.zeros((100, 3), bool)
    mask[30:50] = True  # interior gap: linear interpolation recovers a line exactly
    filled = interpolate_masked(x, mask)
    np.testing.assert_allclose(filled, x, atol=1e-4)
    np.testing.assert_allclose(parcel_mean_masked(x, mask)[:, 2], 5.0)
    # the mean baseline fills with the visible mean, not the truth
    assert not np.allclose(parcel_mean_masked(x, mask)[:, 0], x[:, 0])
    # a fully hidden parcel gets 0 (the training median after robust scaling)
    mask[:, 1] = True
    assert (interpolate_masked(x, mask)[:, 1] == 0).all()


def _ar2(n_windows=60, length=200, n_parcels=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n_windows, length + 50, n_parcels))
    e = rng.standard_normal(x.shape)
    for t in range(2, x.shape[1]):
        x[:, t] = 1.6 * x[:, t - 1] - 0.8 * x[:, t - 2] + e[:, t]  # oscillating AR(2)
    return (x[:, 50:] / x.std()).astype(np.float32)


def test_ridge_ar_beats_persistence_on_an_ar_process():
    train, test = _ar2(seed=0), _ar2(n_windows=20, seed=1)
    ctx, fut = train[:, :180], train[:, 180:]
    model = RidgeAR(lags=20).fit(ctx, fut)
    pred = model.predict(test[:, :180], 20)
    assert pred.shape == (20, 20, 4)
    mse_ar = np.mean((pred - test[:, 180:]) ** 2)
    mse_p = np.mean((persistence(test[:, :180], 20) - test[:, 180:]) ** 2)
    assert mse_ar < 0.8 * mse_p
    # the first step of an AR(2) is nearly known from the lags: error close to the innovation variance
    assert np.mean((pred[:, 0] - test[:, 180]) ** 2) < 0.5 * np.mean((test[:, 179] - test[:, 180]) ** 2)


def test_lstm_trains_and_beats_persistence():
    train, test = _ar2(n_windows=80, seed=2), _ar2(n_windows=20, seed=3)
    lstm = LSTMForecaster(hidden=16, lags=20, epochs=4, seed=0).fit(train[:, :180], train[:, 180:])
    pred = lstm.predict(test[:, :180], 20)
    assert pred.shape == (20, 20, 4)
    mse_lstm = np.mean((pred - test[:, 180:]) ** 2)
    mse_p = np.mean((persistence(test[:, :180], 20) - test[:, 180:]) ** 2)
    assert mse_lstm < mse_p
    # the same seed gives the same network
    again = LSTMForecaster(hidden=16, lags=20, epochs=4, seed=0).fit(train[:, :180], train[:, 180:])
    np.testing.assert_allclose(again.predict(test[:, :180], 20), pred, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("horizon", [5, 20])
def test_persistence_holds_the_last_value(horizon):
    ctx = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
    out = persistence(ctx, horizon)
    assert out.shape == (2, horizon, 3)
    assert (out == ctx[:, -1:, :]).all()


# -- ridge reconstruction from the visible parcels (issue 10) ---------------------------------------
def test_ridge_reconstructor_equals_sklearn_ridge_for_each_mask_pattern():
    from sklearn.linear_model import Ridge

    from brainfoundry.evaluate.baselines import RidgeReconstructor

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, 12))
    train = rng.normal(size=(300, 4)) @ mix + 0.3 * rng.normal(size=(300, 12)) + 2.0
    test = rng.normal(size=(20, 4)) @ mix + 0.3 * rng.normal(size=(20, 12)) + 2.0
    mask = np.zeros((20, 12), bool)
    mask[:10, [1, 4, 7]] = True  # two patterns in one window
    mask[10:, [0, 2, 3, 11]] = True
    model = RidgeReconstructor(alpha=0.05).fit(train)
    pred = model.predict(test, mask)
    for rows in (slice(0, 10), slice(10, 20)):
        hidden = mask[rows][0]
        ref = Ridge(alpha=0.05 * len(train)).fit(train[:, ~hidden], train[:, hidden])
        np.testing.assert_allclose(pred[rows][:, hidden], ref.predict(test[rows][:, ~hidden]), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(pred[~mask], test[~mask].astype(np.float32))  # visible points kept


def test_ridge_reconstruction_uses_other_parcels_where_interpolation_cannot():
    """White-noise time courses shared across parcels: no temporal structure, all spatial."""
    from brainfoundry.evaluate.baselines import RidgeReconstructor, select_alpha

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(3, 20))
    def make(n):
        return (rng.normal(size=(n, 3)) @ mix + 0.2 * rng.normal(size=(n, 20))).astype(np.float32)

    train, val, test = make(2000), make(200), make(200)
    mask = np.zeros_like(test, bool)
    mask[:, rng.permutation(20)[:10]] = True
    alpha, errors = select_alpha(train, [val], [mask])
    assert alpha in errors and errors[alpha] == min(errors.values())
    ridge = RidgeReconstructor(alpha).fit(train).predict(test, mask)
    interp = interpolate_masked(test, mask)

    def r2(p):
        return 1 - np.sum((p[mask] - test[mask]) ** 2) / np.sum((test[mask] - test[mask].mean()) ** 2)

    assert r2(ridge) > 0.8 and r2(interp) < 0.1


def test_gram_rotation_residual_keeps_rbf_svm_predictions_exact():
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from brainfoundry.evaluate.protocol import GramRotation

    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 400))
    y = (X[:, :5].sum(1) > 0).astype(int)
    Xtr, Xte, ytr = X[:40], X[40:], y[:40]
    scaler = StandardScaler().fit(Xtr)
    raw = SVC(kernel="rbf", gamma=1e-3, C=1.0).fit(scaler.transform(Xtr), ytr)
    rot = GramRotation(residual=True).fit(scaler.transform(Xtr))
    small = SVC(kernel="rbf", gamma=1e-3, C=1.0).fit(rot.transform(scaler.transform(Xtr)), ytr)
    np.testing.assert_allclose(small.decision_function(rot.transform(scaler.transform(Xte))),
                               raw.decision_function(scaler.transform(Xte)), rtol=1e-6, atol=1e-8)
    assert rot.transform(scaler.transform(Xtr)).shape[1] <= 41
