"""Baselines every model number is shown beside.

- functional connectivity: Fisher-z upper triangles (phenotype, fingerprinting) and FC rows (networks);
- masked reconstruction: linear interpolation along time per parcel, and the per-parcel mean;
- forecasting: persistence, a ridge autoregressive model and a small LSTM, the last two trained on the
  training split only.
"""

from __future__ import annotations

import numpy as np

# -- functional connectivity ------------------------------------------------------------------------
_EPS = 1e-7


def correlation(x: np.ndarray) -> np.ndarray:
    """Pearson correlation [N, N] of a [T, N] series; zero-variance parcels get 0 (not NaN) off the diagonal.

    ABIDE PCP has constant ROIs in some subjects; NaN would poison every downstream model.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    sd = np.sqrt((x * x).sum(axis=0))
    ok = sd > 1e-12 * max(1.0, float(sd.max(initial=0.0)))
    z = np.where(ok, x / np.where(ok, sd, 1.0), 0.0)
    corr = z.T @ z
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def fisher_z(r: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(r, -1 + _EPS, 1 - _EPS))


def fc_features(x: np.ndarray, fisher: bool = True) -> np.ndarray:
    """The upper triangle (``numpy.triu_indices(N, k=1)`` order) of the run's correlation, Fisher-z'd."""
    corr = correlation(x)
    iu = np.triu_indices(corr.shape[0], k=1)
    vals = corr[iu]
    return (fisher_z(vals) if fisher else vals).astype(np.float32)


def fc_rows(x: np.ndarray, fisher: bool = True) -> np.ndarray:
    """Each parcel's FC row [N, N] (its own entry set to 0), the network-identification baseline."""
    corr = correlation(x)
    np.fill_diagonal(corr, 0.0)
    return (fisher_z(corr) if fisher else corr).astype(np.float32)


# -- masked reconstruction --------------------------------------------------------------------------
def patch_mask(n_parcels: int, n_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """BrainLM random masking: ``round(ratio * tokens)`` of the parcel x patch tokens, chosen uniformly.

    Returns a boolean [n_parcels, n_patches] array, True = masked (hidden from the model).
    """
    n_tokens = n_parcels * n_patches
    n_mask = int(round(ratio * n_tokens))
    flat = np.zeros(n_tokens, dtype=bool)
    flat[rng.permutation(n_tokens)[:n_mask]] = True
    return flat.reshape(n_parcels, n_patches)


def expand_mask(mask: np.ndarray, patch: int) -> np.ndarray:
    """[N, n_patches] token mask -> [T, N] time-point mask (T = n_patches * patch)."""
    return np.repeat(mask, patch, axis=1).T


def interpolate_masked(x: np.ndarray, point_mask: np.ndarray) -> np.ndarray:
    """Linear interpolation along time of each parcel's masked points from its visible ones.

    Points before the first (after the last) visible point take its value (``numpy.interp``); a parcel
    with no visible point gets 0, the training median after robust scaling.
    """
    t = np.arange(x.shape[0])
    out = np.array(x, dtype=np.float32, copy=True)
    for j in range(x.shape[1]):
        hidden = point_mask[:, j]
        if not hidden.any():
            continue
        seen = ~hidden
        out[hidden, j] = np.interp(t[hidden], t[seen], x[seen, j]) if seen.any() else 0.0
    return out


def parcel_mean_masked(x: np.ndarray, point_mask: np.ndarray) -> np.ndarray:
    """Each parcel's masked points filled with the mean of its visible points in the window (0 if none)."""
    seen = ~point_mask
    counts = seen.sum(axis=0)
    means = np.where(counts > 0, (x * seen).sum(axis=0) / np.maximum(counts, 1), 0.0)
    return np.where(point_mask, means[None, :], x).astype(np.float32)


# -- forecasting ------------------------------------------------------------------------------------
def persistence(context: np.ndarray, horizon: int) -> np.ndarray:
    """[B, Tc, N] -> [B, horizon, N]: the last observed value held."""
    return np.repeat(context[:, -1:, :], horizon, axis=1)


def _lagged(context: np.ndarray, lags: int) -> np.ndarray:
    """[B, Tc, N] -> [B * N, lags]: each parcel's last ``lags`` points, one univariate sample per parcel."""
    b, _, n = context.shape
    return context[:, -lags:, :].transpose(0, 2, 1).reshape(b * n, lags)


class RidgeAR:
    """Direct multi-horizon ridge autoregression, one model shared by all parcels (univariate lags).

    The penalty is chosen by efficient leave-one-out on the training windows (``RidgeCV``), i.e. inside the
    training split only.
    """

    def __init__(self, lags: int = 40, alphas=(1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)):
        self.lags, self.alphas = lags, tuple(alphas)

    def fit(self, context: np.ndarray, future: np.ndarray) -> "RidgeAR":
        from sklearn.linear_model import RidgeCV

        lags = min(self.lags, context.shape[1])
        self.lags_ = lags
        X = _lagged(context, lags)
        Y = future.transpose(0, 2, 1).reshape(-1, future.shape[1])
        self.model_ = RidgeCV(alphas=self.alphas).fit(X, Y)
        return self

    def predict(self, context: np.ndarray, horizon: int) -> np.ndarray:
        b, _, n = context.shape
        pred = self.model_.predict(_lagged(context, self.lags_))[:, :horizon]
        return pred.reshape(b, n, horizon).transpose(0, 2, 1).astype(np.float32)


class LSTMForecaster:
    """A small univariate LSTM (shared across parcels) reading the context and emitting the horizon at once."""

    def __init__(self, hidden: int = 32, lags: int = 60, epochs: int = 8, batch_size: int = 256, lr: float = 3e-3,
                 max_samples: int = 20000, seed: int = 0):
        self.hidden, self.lags, self.epochs = hidden, lags, epochs
        self.batch_size, self.lr, self.max_samples, self.seed = batch_size, lr, max_samples, seed

    def _net(self, horizon: int):
        import torch

        class Net(torch.nn.Module):
            def __init__(self, hidden: int):
                super().__init__()
                self.lstm = torch.nn.LSTM(1, hidden, batch_first=True)
                self.head = torch.nn.Linear(hidden, horizon)

            def forward(self, x):  # x [B, L]
                out, _ = self.lstm(x.unsqueeze(-1))
                # Residual on the last value: the network learns the change from persistence.
                return self.head(out[:, -1]) + x[:, -1:]

        return Net(self.hidden)

    def fit(self, context: np.ndarray, future: np.ndarray) -> "LSTMForecaster":
        import torch

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.lags_ = min(self.lags, context.shape[1])
        X = _lagged(context, self.lags_)
        Y = future.transpose(0, 2, 1).reshape(-1, future.shape[1])
        if len(X) > self.max_samples:
            keep = rng.choice(len(X), self.max_samples, replace=False)
            X, Y = X[keep], Y[keep]
        self.horizon_ = Y.shape[1]
        self.net_ = self._net(self.horizon_)
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        xt, yt = torch.from_numpy(np.ascontiguousarray(X, np.float32)), torch.from_numpy(np.ascontiguousarray(Y, np.float32))
        self.net_.train()
        for _ in range(self.epochs):
            order = torch.from_numpy(rng.permutation(len(xt)))
            for start in range(0, len(xt), self.batch_size):
                idx = order[start:start + self.batch_size]
                loss = torch.nn.functional.mse_loss(self.net_(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net_.eval()
        return self

    def predict(self, context: np.ndarray, horizon: int) -> np.ndarray:
        import torch

        b, _, n = context.shape
        with torch.no_grad():
            pred = self.net_(torch.from_numpy(np.ascontiguousarray(_lagged(context, self.lags_), np.float32))).numpy()
        return pred[:, :horizon].reshape(b, n, horizon).transpose(0, 2, 1).astype(np.float32)


class RidgeReconstructor:
    """Masked parcels from the visible parcels at the same time point, by ridge regression.

    Fitted on training subjects' time points only (``fit``): with the centred Gram matrix G of those
    points, the ridge map from visible set V to masked set M is ``(G_VV + alpha n I)^-1 G_VM``, so one
    Gram matrix serves every mask pattern (each patch of a random token mask hides a different parcel
    set) and each pattern costs one |V| x |V| solve. ``alpha`` is in units of the (robust-scaled)
    variance; `select_alpha` picks it on held-out training subjects, never on test subjects.
    """

    def __init__(self, alpha: float = 0.1):
        self.alpha = float(alpha)

    def fit(self, points: np.ndarray) -> RidgeReconstructor:
        """``points`` [n, N]: training time points (rows) x parcels."""
        X = np.asarray(points, dtype=np.float64)
        self.mean_ = X.mean(axis=0)
        Xc = X - self.mean_
        self.gram_ = Xc.T @ Xc
        self.n_ = len(X)
        return self

    def predict(self, x: np.ndarray, point_mask: np.ndarray) -> np.ndarray:
        """Fill the masked points (True) of one [T, N] window; visible points are kept as they are."""
        import scipy.linalg

        out = np.array(x, dtype=np.float64, copy=True)
        patterns, inverse = np.unique(point_mask, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).ravel()
        for k, hidden in enumerate(patterns):
            if not hidden.any():
                continue
            rows = np.flatnonzero(inverse == k)
            seen = ~hidden
            if not seen.any():
                out[np.ix_(rows, np.flatnonzero(hidden))] = self.mean_[hidden]
                continue
            a = self.gram_[np.ix_(seen, seen)] + self.alpha * self.n_ * np.eye(int(seen.sum()))
            w = scipy.linalg.solve(a, self.gram_[np.ix_(seen, hidden)], assume_a="pos")
            out[np.ix_(rows, np.flatnonzero(hidden))] = self.mean_[hidden] + (x[np.ix_(rows, np.flatnonzero(seen))]
                                                                              - self.mean_[seen]) @ w
        return out.astype(np.float32)


def select_alpha(fit_points: np.ndarray, val_windows: list[np.ndarray], val_masks: list[np.ndarray],
                 alphas=(1e-3, 1e-2, 1e-1, 1.0)) -> tuple[float, dict[float, float]]:
    """The ridge penalty with the least masked-point squared error on validation windows of training subjects."""
    errors = {}
    for alpha in alphas:
        model = RidgeReconstructor(alpha).fit(fit_points)
        sse = 0.0
        for w, m in zip(val_windows, val_masks):
            sse += float(np.sum((model.predict(w, m)[m] - w[m]) ** 2))
        errors[float(alpha)] = sse
    return min(errors, key=errors.get), errors
