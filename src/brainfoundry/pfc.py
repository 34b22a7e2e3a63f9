"""Pseudo functional connectivity (pFC) views, the BrainMass augmentation.

One view of a run = the Pearson correlation matrix of its parcel series over a random subset of time
points (``keep_fraction`` of them, 0.8 drops BrainMass's 20 %), optionally Fisher-z transformed, stored
as the upper triangle in ``numpy.triu_indices(N, k=1)`` order.

How the views are computed (``method="gram"``, the default): the series is centred once on its full
mean and its Gram matrix ``G = XᵀX`` and column sums ``s`` are formed once. A view that keeps the set
``S`` and drops ``D`` then needs only the dropped points' contribution,
``C_S = G - X_DᵀX_D - s_S s_Sᵀ / n``, ``s_S = s - Σ_D x``, i.e. one symmetric rank-k update (BLAS
``ssyrk``, upper triangle only) over the dropped points (20 % of T) instead of a matmul over the kept
points (80 %). ``method="direct"`` centres the kept points of each view and forms their ``ssyrk``. Both are checked against
``numpy.corrcoef`` in the tests; ``benchmarks/bench_pfc.py`` measures speed and error.

Zero variance: a parcel with no variance over the kept points has no defined correlation; it is set
to 0 (not NaN) against every other parcel. "No variance" means the kept points' sum of squares about
their mean is at most ``ZERO_VARIANCE_RTOL`` times the full series' sum of squares about its mean (a
parcel constant over the whole run, e.g. an ABIDE ROI outside the brain mask, is exactly 0). Below that
ratio float32 cancellation leaves no significant digits in the correlation anyway.

Seeds: each view's seed is a stable hash of (global seed, subject, run_id, view) and is stored with the
view; the kept points follow from the seed alone (``keep_indices``), so ``regenerate_view`` rebuilds any
stored view: the same kept time points bit for bit, and the same values up to float32 rounding. They
are bit-identical with the same BLAS library and thread count; another thread count changes the
matmul's summation order, which can move a value by 1e-7 (and, rarely, a float16 value by one ulp).
The draw uses the raw output of numpy's PCG64 bit generator, whose stream numpy keeps stable across
versions (unlike ``Generator`` methods).

The same computation runs batched on torch tensors (CPU or GPU) for on-the-fly views during training:
``pfc_views_torch``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainfoundry.errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: the per-run CLI does not need it
    import torch

#: |r| is clipped to this before the Fisher z transform, so duplicated parcels give a finite z (7.25).
FISHER_Z_CLIP = 1.0 - 1e-6
#: A parcel whose kept-point sum of squares is at most this fraction of its full-series sum of squares
#: counts as zero variance in that view (correlation 0).
ZERO_VARIANCE_RTOL = 1e-5
#: Fewer kept points than this can never give a correlation (with 2 points every r is +-1).
MIN_KEPT_ABSOLUTE = 3
METHODS = ("gram", "direct")


# -- seeds and kept time points ------------------------------------------------------------------
def derive_seed(global_seed: int, subject: str, run_id: str, view: int) -> int:
    """The seed of one view: a stable hash of (global seed, subject, run_id, view), in [0, 2**63).

    Python's ``hash`` is salted per process, so sha256 is used; the result fits an int64 column.
    """
    blob = "\x1f".join(["brainfoundry-pfc", str(int(global_seed)), str(subject), str(run_id), str(int(view))])
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") >> 1


def view_seeds(global_seed: int, subject: str, run_id: str, n_views: int) -> np.ndarray:
    """Seeds of views ``0 .. n_views-1`` of one run (int64)."""
    return np.array([derive_seed(global_seed, subject, run_id, v) for v in range(n_views)], dtype=np.int64)


def n_kept(n_timepoints: int, keep_fraction: float) -> int:
    """How many time points a view keeps: ``keep_fraction * T`` rounded half up, within [1, T]."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    return int(min(n_timepoints, max(1, math.floor(keep_fraction * n_timepoints + 0.5))))


def keep_indices(n_timepoints: int, seed: int, keep_fraction: float) -> np.ndarray:
    """Sorted indices of the time points one view keeps, a function of ``seed`` alone.

    The kept points are those holding the ``n_kept`` smallest of ``T`` raw PCG64 draws (ties, which
    practically never happen, broken by index).
    """
    keys = np.random.PCG64(int(seed)).random_raw(n_timepoints)
    order = np.argsort(keys, kind="stable")
    return np.sort(order[: n_kept(n_timepoints, keep_fraction)])


def keep_masks(n_timepoints: int, seeds: Sequence[int], keep_fraction: float) -> np.ndarray:
    """Boolean masks ``[K, T]`` of the kept points of each seed's view."""
    masks = np.zeros((len(seeds), n_timepoints), dtype=bool)
    for k, seed in enumerate(seeds):
        masks[k, keep_indices(n_timepoints, int(seed), keep_fraction)] = True
    return masks


# -- numpy ------------------------------------------------------------------------------------------
def fisher_z(r: np.ndarray) -> np.ndarray:
    """``arctanh`` of ``r`` with ``|r|`` clipped to ``FISHER_Z_CLIP`` (finite for r = +-1)."""
    return np.arctanh(np.clip(r, -FISHER_Z_CLIP, FISHER_Z_CLIP))


def zero_variance_parcels(series: np.ndarray) -> np.ndarray:
    """Boolean ``[N]``: parcels constant over the whole series (all-zero parcels included)."""
    series = np.asarray(series)
    return np.ptp(series, axis=0) == 0


def _centred(series: np.ndarray) -> np.ndarray:
    """float32 series centred on its float64 mean; parcels constant over the run become exactly 0."""
    x = np.asarray(series)
    if x.ndim != 2:
        raise ValueError(f"series must be [T, N], got shape {x.shape}")
    xc = (x - x.mean(axis=0, dtype=np.float64)).astype(np.float32)
    xc[:, zero_variance_parcels(x)] = 0.0
    return xc


def pfc_views(series: np.ndarray, keep: np.ndarray, *, fisher_z: bool = False,
              method: str = "gram") -> np.ndarray:
    """pFC views of one run: ``[K, N*(N-1)/2]`` float32 upper triangles.

    Parameters
    ----------
    series : array ``[T, N]``
        Parcel time series (any float dtype; computed in float32 after centring in float64).
    keep : bool array ``[K, T]``
        Which time points each view keeps (``keep_masks``). Views may keep different counts.
    fisher_z : bool
        Return ``arctanh(r)`` (``|r|`` clipped to ``FISHER_Z_CLIP``) instead of ``r``.
    method : {"gram", "direct"}
        "gram" subtracts the dropped points from the full Gram matrix; "direct" multiplies the
        centred kept points (module docstring).

    Returns
    -------
    numpy.ndarray
        float32 ``[K, E]``; zero-variance parcels give 0, never NaN.

    Each view is one BLAS ``ssyrk`` (only the upper triangle is formed: half a general matmul's
    work) into a Fortran-ordered ``N x N`` buffer that stays in cache; the rank-one mean
    correction rides in the same call as one extra row, the correlation scaling is two in-place
    passes over that buffer, and the triangle is gathered straight into the output row. Views are
    computed one at a time, so a view's values do not depend on which others share the call.
    """
    from scipy.linalg.blas import ssyrk

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    xc = _centred(series)
    n_t, n_p = xc.shape
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 2 or keep.shape[1] != n_t:
        raise ValueError(f"keep must be [K, {n_t}], got shape {keep.shape}")
    counts = keep.sum(axis=1)
    if counts.size and counts.min() < MIN_KEPT_ABSOLUTE:
        raise ValueError(f"every view must keep >= {MIN_KEPT_ABSOLUTE} time points, got {int(counts.min())}")
    iu, ju = np.triu_indices(n_p, k=1)
    upper = iu + ju * n_p  # position of (i, j), i < j, in the Fortran-ordered buffer
    ss_full = np.einsum("ti,ti->i", xc, xc, dtype=np.float64).astype(np.float32)
    floor = ZERO_VARIANCE_RTOL * ss_full
    total = xc.sum(axis=0, dtype=np.float64).astype(np.float32)
    # ssyrk(alpha, A, beta, C) = alpha A Aᵀ + beta C; A = rowsᵀ is a no-copy view of C-ordered rows.
    gram = ssyrk(1.0, xc.T, trans=0, lower=0) if method == "gram" else None
    rows = np.empty((n_t + 1, n_p), dtype=np.float32)
    cov = np.zeros((n_p, n_p), dtype=np.float32, order="F")  # ssyrk never writes the lower half: keep it 0
    out = np.empty((keep.shape[0], iu.size), dtype=np.float32)
    for v in range(keep.shape[0]):
        n = np.float32(counts[v])
        if method == "gram":
            # C_S = G - X_DᵀX_D - s_S s_Sᵀ/n: the dropped rows and s_S/sqrt(n) in one call with alpha -1.
            picked = np.flatnonzero(~keep[v])
            m = picked.size
            np.take(xc, picked, axis=0, out=rows[:m])
            rows[m] = (total - rows[:m].sum(axis=0)) / np.sqrt(n)
            np.copyto(cov, gram)
            cov = ssyrk(-1.0, rows[:m + 1].T, beta=1.0, c=cov, trans=0, lower=0, overwrite_c=1)
        else:
            picked = np.flatnonzero(keep[v])
            m = picked.size
            np.take(xc, picked, axis=0, out=rows[:m])
            rows[:m] -= rows[:m].mean(axis=0, dtype=np.float64).astype(np.float32)
            cov = ssyrk(1.0, rows[:m].T, beta=0.0, c=cov, trans=0, lower=0, overwrite_c=1)
        var = cov.diagonal()
        # 1/std, and 0 for a zero-variance parcel, so its correlations come out 0 with no mask pass.
        inv = np.zeros(n_p, dtype=np.float32)
        np.divide(1.0, np.sqrt(var, where=var > floor, out=np.ones(n_p, np.float32)), out=inv, where=var > floor)
        cov *= inv[:, None]
        cov *= inv[None, :]
        np.take(cov.reshape(-1, order="F"), upper, out=out[v])
    if fisher_z:
        np.clip(out, -FISHER_Z_CLIP, FISHER_Z_CLIP, out=out)
        return np.arctanh(out, out=out)
    return np.clip(out, -1.0, 1.0, out=out)


def regenerate_view(series: np.ndarray, seed: int, keep_fraction: float, fisher_z: bool = False,
                    method: str = "gram") -> np.ndarray:
    """Rebuild one stored view (float32 ``[E]``) from the run's series and the view's recorded seed."""
    mask = keep_masks(np.asarray(series).shape[0], [seed], keep_fraction)
    return pfc_views(series, mask, fisher_z=fisher_z, method=method)[0]


# -- torch ------------------------------------------------------------------------------------------
def random_keep_mask(batch: int, n_views: int, n_timepoints: int, keep_fraction: float,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Bool ``[B, K, T]``: each view keeps ``n_kept(T, keep_fraction)`` points drawn from ``generator``."""
    import torch

    keys = torch.rand(batch, n_views, n_timepoints, generator=generator,
                      device=generator.device if generator is not None else device)
    kept = keys.argsort(dim=-1)[..., : n_kept(n_timepoints, keep_fraction)]
    return torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, kept, True)


def pfc_views_torch(x: torch.Tensor, keep_mask: torch.Tensor | None = None, *,
                    keep_fraction: float | None = None, n_views: int | None = None,
                    generator: torch.Generator | None = None, fisher_z: bool = False) -> torch.Tensor:
    """Batched pFC views on torch tensors (any device): ``[B, T, N] -> [B, K, E]``.

    The Gram computation of ``pfc_views`` (same zero-variance rule, same Fisher z clip), so with the
    same masks it equals the numpy path up to float32 rounding. Runs in float32 whatever ``x``'s dtype
    (bf16 correlations are too coarse); pass ``x`` already on the GPU for on-the-fly views.

    Parameters
    ----------
    x : Tensor ``[B, T, N]`` (or ``[T, N]``, then the result is ``[K, E]``)
    keep_mask : bool Tensor ``[B, K, T]`` (or ``[K, T]``), optional
        Kept points per view; e.g. ``torch.from_numpy(keep_masks(T, seeds, f))`` for stored views.
    keep_fraction, n_views, generator :
        Without ``keep_mask``: draw ``n_views`` masks keeping ``keep_fraction`` with ``generator``.
    fisher_z : bool
        Return Fisher z instead of r.
    """
    import torch

    single = x.dim() == 2
    if single:
        x = x[None]
        if keep_mask is not None and keep_mask.dim() == 2:
            keep_mask = keep_mask[None]
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, N] or [T, N], got shape {tuple(x.shape)}")
    b, n_t, n_p = x.shape
    if keep_mask is None:
        if keep_fraction is None or n_views is None:
            raise ValueError("give keep_mask, or keep_fraction and n_views")
        keep_mask = random_keep_mask(b, n_views, n_t, keep_fraction, generator, device=x.device)
    keep_mask = keep_mask.to(device=x.device, dtype=torch.bool)
    if keep_mask.dim() != 3 or keep_mask.shape[0] != b or keep_mask.shape[2] != n_t:
        raise ValueError(f"keep_mask must be [{b}, K, {n_t}], got shape {tuple(keep_mask.shape)}")
    counts = keep_mask.sum(-1)
    if counts.numel() and int(counts.min()) < MIN_KEPT_ABSOLUTE:
        raise ValueError(f"every view must keep >= {MIN_KEPT_ABSOLUTE} time points, got {int(counts.min())}")

    x64 = x.to(torch.float64)
    xc = (x64 - x64.mean(dim=1, keepdim=True)).to(torch.float32)
    constant = (x.amax(dim=1) == x.amin(dim=1))  # [B, N]: exactly 0 after centring, as in numpy
    xc = xc.masked_fill(constant[:, None, :], 0.0)
    ss_full = (xc.to(torch.float64) ** 2).sum(dim=1).to(torch.float32)
    gram = xc.transpose(1, 2) @ xc                                        # [B, N, N]
    total = xc.to(torch.float64).sum(dim=1).to(torch.float32)              # [B, N]

    dropped = ~keep_mask
    length = int(dropped.sum(-1).max()) if dropped.numel() else 0
    # Each view's dropped points first (stable, in time order), zero-padded to the longest view.
    rows = torch.argsort((~dropped).to(torch.int8), dim=-1, stable=True)[..., :length]   # [B, K, m]
    xd = xc[torch.arange(b, device=x.device)[:, None, None], rows]                       # [B, K, m, N]
    valid = torch.gather(dropped, -1, rows)
    if not bool(valid.all()):
        xd = xd * valid[..., None]
    removed = (xd.transpose(-1, -2) @ xd).flatten(-2)                                   # [B, K, N*N]
    sums = total[:, None] - xd.sum(dim=2)                                               # [B, K, N]
    n = counts.to(torch.float32)[..., None]
    iu, ju = torch.triu_indices(n_p, n_p, offset=1, device=x.device)
    flat, diag = iu * n_p + ju, torch.arange(n_p, device=x.device) * (n_p + 1)
    full = gram.flatten(-2)[:, None]                                                    # [B, 1, N*N]
    cov = full[..., flat] - removed[..., flat] - sums[..., iu] * sums[..., ju] / n
    var = full[..., diag] - removed[..., diag] - sums * sums / n
    flat_var = var <= ZERO_VARIANCE_RTOL * ss_full[:, None]
    std = torch.sqrt(torch.where(flat_var, torch.ones_like(var), var))
    r = cov / (std[..., iu] * std[..., ju])
    r = r.masked_fill(flat_var[..., iu] | flat_var[..., ju], 0.0).clamp(-1.0, 1.0)
    if fisher_z:
        r = torch.atanh(r.clamp(-FISHER_Z_CLIP, FISHER_Z_CLIP))
    return r[0] if single else r


# -- one run: compute, write, CLI -------------------------------------------------------------------
def compute_run(series: np.ndarray, *, source: str | Path, subject: str, run_id: str, global_seed: int,
                n_views: int = 32, keep_fraction: float = 0.8, fisher_z: bool = True,
                min_kept: int = 10, method: str = "gram") -> dict[str, Any]:
    """All views of one run with their seeds, or an ``InputError`` naming ``source`` if too short."""
    n_t, n_p = series.shape
    kept = n_kept(n_t, keep_fraction)
    need = max(MIN_KEPT_ABSOLUTE, int(min_kept))
    if kept < need:
        raise InputError(source, f"too short for pFC: {n_t} time points keep {kept} at keep_fraction "
                                 f"{keep_fraction}, fewer than the minimum {need} (pfc.min_kept)")
    if n_p < 2:
        raise InputError(source, f"pFC needs at least 2 parcels, got {n_p}")
    seeds = view_seeds(global_seed, subject, run_id, n_views)
    masks = keep_masks(n_t, seeds, keep_fraction)
    views = pfc_views(series, masks, fisher_z=fisher_z, method=method)
    return {"views": views, "seeds": seeds, "n_kept": masks.sum(axis=1).astype(np.int32),
            "zero_variance": zero_variance_parcels(series)}


def write_run(timeseries: str | Path, out: str | Path, sidecar: str | Path, *, subject: str, run_id: str,
              global_seed: int, n_views: int = 32, keep_fraction: float = 0.8, fisher_z: bool = True,
              dtype: str = "float16", min_kept: int = 10, method: str = "gram") -> dict[str, Any]:
    """Read one run's series, write its pFC parquet and JSON sidecar (``runfiles.write_relmat``)."""
    from brainfoundry.io import provenance
    from brainfoundry.runfiles import read_series, write_relmat

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    series, names = read_series(timeseries)
    result = compute_run(series, source=timeseries, subject=subject, run_id=run_id, global_seed=global_seed,
                         n_views=n_views, keep_fraction=keep_fraction, fisher_z=fisher_z, min_kept=min_kept,
                         method=method)
    n_p = series.shape[1]
    settings = {"seed": int(global_seed), "n_views": int(n_views), "keep_fraction": float(keep_fraction),
                "fisher_z": bool(fisher_z), "dtype": dtype, "min_kept": int(min_kept), "method": method}
    zero = [names[i] for i in np.flatnonzero(result["zero_variance"])]
    info = {
        "RunID": run_id,
        "Subject": subject,
        "NParcels": n_p,
        "NEdges": n_p * (n_p - 1) // 2,
        "EdgeOrder": "numpy.triu_indices(NParcels, k=1) over ParcelNames",
        "ParcelNames": names,
        "NTimepoints": int(series.shape[0]),
        "NViews": int(n_views),
        "KeepFraction": float(keep_fraction),
        "NKept": int(result["n_kept"][0]) if n_views else 0,
        "FisherZ": bool(fisher_z),
        "FisherZClip": FISHER_Z_CLIP if fisher_z else None,
        "Dtype": dtype,
        "Method": method,
        "ZeroVarianceParcels": zero,
        "ZeroVarianceRule": f"kept-point sum of squares <= {ZERO_VARIANCE_RTOL} x full-series; correlation set to 0",
        "SeedDerivation": ("seed = sha256('brainfoundry-pfc' \\x1f global_seed \\x1f subject \\x1f run_id "
                           "\\x1f view)[:8] >> 1; kept points = indices of the n_kept smallest of "
                           "numpy PCG64(seed).random_raw(T); see brainfoundry.pfc.regenerate_view"),
        **provenance([timeseries], settings),
    }
    return write_relmat(out, views=result["views"], seeds=result["seeds"], n_kept=result["n_kept"],
                        keep_fraction=keep_fraction, dtype=dtype, sidecar=info, sidecar_path=sidecar,
                        metadata={"run_id": run_id, "subject": subject, "n_parcels": n_p, **settings})


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes"}:
        return True
    if lowered in {"0", "false", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def cli_main(argv: list[str]) -> int:
    """``brainfoundry pfc TIMESERIES --out PFC.parquet --sidecar PFC.json --subject S --run-id R ...``"""
    parser = argparse.ArgumentParser(prog="brainfoundry pfc", description="pseudo-FC views of one run")
    parser.add_argument("timeseries", help="the run's time-series parquet (T rows x N parcel columns)")
    parser.add_argument("--out", required=True, help="pFC parquet to write")
    parser.add_argument("--sidecar", required=True, help="JSON sidecar to write")
    parser.add_argument("--subject", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--seed", type=int, required=True, help="global seed (config 'seed')")
    parser.add_argument("--n-views", type=int, default=32)
    parser.add_argument("--keep-fraction", type=float, default=0.8)
    parser.add_argument("--fisher-z", type=_bool, default=True)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--min-kept", type=int, default=10)
    parser.add_argument("--method", choices=METHODS, default="gram")
    args = parser.parse_args(argv)
    write_run(args.timeseries, args.out, args.sidecar, subject=args.subject, run_id=args.run_id,
              global_seed=args.seed, n_views=args.n_views, keep_fraction=args.keep_fraction,
              fisher_z=args.fisher_z, dtype=args.dtype, min_kept=args.min_kept, method=args.method)
    return 0
