"""BrainLM in-silico perturbation: which parcels must change to move one group's embedding to another's.

BrainLM (Caro et al., ICLR 2024) uses the pretrained model as a simulator; no public code exists, so
the design is ours: one additive perturbation ``delta`` (per parcel, or per parcel x time patch) is
added to every source-group window (scaled and windowed as evaluation does: ``EvalSet.normalized`` and
`window_starts`), the encoder runs with NO masking, and Adam minimises the squared distance between
the perturbed windows' CLS embeddings and the target group's mean CLS embedding, plus an L1/L2
penalty on ``delta``. Per-parcel magnitude is ``|delta|`` (mean over patches when per patch); a
network's score is the mean magnitude of its parcels. The null re-runs the same optimisation with the
group labels of the runs shuffled (seeded); a network's p-value is (1 + #null >= observed) / (1 + n).

Not yet validated: on synthetic runs whose groups differ in one network only, a random-init tiny
BrainLM's perturbation did not concentrate on that network (issue 12), so read its output as
exploratory until a planted-effect check passes with a trained model. No rule runs it yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from brainfoundry.errors import ConfigError, InputError


@dataclass
class PerturbSettings:
    """The ``perturb`` config section; its defaults live here only."""

    enabled: bool = False
    column: str = "eye_status"
    source: Any = 1
    target: Any = 2
    per_patch: bool = False
    steps: int = 200
    lr: float = 0.05
    l1: float = 0.0
    l2: float = 0.01
    max_windows_per_run: int = 4
    n_permutations: int = 20
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PerturbSettings:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"perturb.{unknown[0]}", f"unknown setting; known: {sorted(known)}")
        s = cls(**values)
        for key in ("steps", "max_windows_per_run"):
            if int(getattr(s, key)) < 1:
                raise ConfigError(f"perturb.{key}", f"must be >= 1, got {getattr(s, key)}")
        if s.n_permutations < 0:
            raise ConfigError("perturb.n_permutations", f"must be >= 0, got {s.n_permutations}")
        if s.lr <= 0 or s.l1 < 0 or s.l2 < 0:
            raise ConfigError("perturb.lr", "lr must be > 0 and l1, l2 >= 0")
        return s


def _matches(values: pd.Series, wanted: Any) -> np.ndarray:
    """Rows equal to ``wanted`` comparing as numbers where both are numeric, else as strings."""
    num = pd.to_numeric(values, errors="coerce")
    try:
        w = float(wanted)
        if num.notna().any():
            return (num == w).to_numpy()
    except (TypeError, ValueError):
        pass
    return (values.astype(str) == str(wanted)).to_numpy()


def group_runs(runs: pd.DataFrame, settings: PerturbSettings) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the source and target runs; errors name the setting."""
    col = settings.column
    if col not in runs.columns:
        raise ConfigError("perturb.column", f"phenotype column {col!r} not in the runs; have {sorted(map(str, runs.columns))}")
    out = []
    for key in ("source", "target"):
        idx = np.flatnonzero(_matches(runs[col], getattr(settings, key)))
        if len(idx) == 0:
            seen = sorted(map(str, runs[col].dropna().unique()))[:20]
            raise ConfigError(f"perturb.{key}", f"no runs with {col} == {getattr(settings, key)!r}; values present: {seen}")
        out.append(idx)
    return out[0], out[1]


def run_windows(evalset, window: int, max_windows: int) -> list[np.ndarray]:
    """Each run's windows ``[W_i, T, N]`` scaled as evaluation scales them (empty when too short)."""
    from brainfoundry.evaluate.adapters import window_starts

    out = []
    for i in range(len(evalset.series)):
        x = evalset.normalized(i)
        starts = window_starts(len(x), window, max_windows)
        out.append(np.stack([x[s:s + window] for s in starts]) if starts else np.zeros((0, window, x.shape[1]), np.float32))
    return out


def check_model(model) -> None:
    if getattr(model, "family", None) != "brainlm" or not hasattr(model, "cls_token"):
        raise InputError("perturb.model", f"in-silico perturbation needs a BrainLM model with a CLS embedding, "
                                          f"got family {getattr(model, 'family', type(model).__name__)!r}")


def optimise_delta(model, source: np.ndarray, target_mean, settings: PerturbSettings, seed: int) -> np.ndarray:
    """Learned ``delta`` ``[N]`` (or ``[N, n_patches]``) moving ``source`` windows' CLS to ``target_mean``."""
    import torch

    c = model.config
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(source, np.float32))
    target = torch.as_tensor(target_mean, dtype=torch.float32)
    shape = (c.n_parcels, c.n_patches) if settings.per_patch else (c.n_parcels, 1)
    delta = torch.zeros(shape, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    for _ in range(settings.steps):
        opt.zero_grad()
        # [N, n_patches or 1] -> [T, N] added to every window (BrainLM patches are contiguous in time).
        add = delta.repeat_interleave(c.window // shape[1], dim=1).T
        cls = model.encode({"x": x + add})["pooled"]
        loss = ((cls - target) ** 2).sum(1).mean() + settings.l1 * delta.abs().sum() + settings.l2 * (delta ** 2).sum()
        loss.backward()
        opt.step()
    d = delta.detach().numpy()
    return d[:, 0] if not settings.per_patch else d


def _cls(model, windows: np.ndarray):
    import torch

    with torch.no_grad():
        return model.encode({"x": torch.from_numpy(np.ascontiguousarray(windows, np.float32))})["pooled"]


def _magnitude(delta: np.ndarray) -> np.ndarray:
    return np.abs(delta) if delta.ndim == 1 else np.abs(delta).mean(1)


def _network_scores(mag: np.ndarray, networks: np.ndarray | None) -> dict[str, float]:
    if networks is None:
        return {}
    return {str(n): float(mag[networks == n].mean()) for n in sorted(set(networks)) if str(n)}


def perturb(model, evalset, settings: PerturbSettings) -> dict[str, Any]:
    """Per-parcel magnitudes, network scores and the permutation null (see the module docstring)."""
    import torch

    check_model(model)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if int(model.config.n_parcels) != evalset.n_parcels:
        raise InputError("perturb.model", f"model built for {model.config.n_parcels} parcels, the runs have {evalset.n_parcels}")
    src, tgt = group_runs(evalset.runs, settings)
    windows = run_windows(evalset, int(model.config.window), settings.max_windows_per_run)
    for key, idx in (("source", src), ("target", tgt)):
        if sum(len(windows[i]) for i in idx) == 0:
            raise ConfigError(f"perturb.{key}", f"runs of {settings.column} == {getattr(settings, key)!r} are all "
                                                f"shorter than the model's {model.config.window}-point window")
    # Embeddings of the unperturbed windows, once (the target mean of any relabelling is read from them).
    cls_runs = [_cls(model, w) if len(w) else None for w in windows]

    def fit(s_idx, t_idx, seed):
        s = np.concatenate([windows[i] for i in s_idx if len(windows[i])])
        t = torch.cat([cls_runs[i] for i in t_idx if cls_runs[i] is not None]).mean(0)
        return optimise_delta(model, s, t, settings, seed)

    delta = fit(src, tgt, settings.seed)
    mag = _magnitude(delta)
    observed = _network_scores(mag, evalset.networks)
    rng = np.random.default_rng(settings.seed)
    pooled = np.concatenate([src, tgt])
    null_mag, null_net = [], {k: [] for k in observed}
    for k in range(settings.n_permutations):
        perm = rng.permutation(pooled)
        m = _magnitude(fit(perm[:len(src)], perm[len(src):], settings.seed + 1 + k))
        null_mag.append(m)
        for net, v in _network_scores(m, evalset.networks).items():
            null_net[net].append(v)
    parcels = pd.DataFrame({"parcel": evalset.parcel_names, "magnitude": mag})
    if evalset.networks is not None:
        parcels["network"] = evalset.networks
    rows = []
    for net, v in observed.items():
        null = np.asarray(null_net[net])
        rows.append({"network": net, "n_parcels": int((evalset.networks == net).sum()), "magnitude": v,
                     "null_mean": float(null.mean()) if len(null) else np.nan,
                     "null_p95": float(np.percentile(null, 95)) if len(null) else np.nan,
                     "p_value": float((1 + (null >= v).sum()) / (1 + len(null))) if len(null) else np.nan})
    networks = pd.DataFrame(rows, columns=["network", "n_parcels", "magnitude", "null_mean", "null_p95", "p_value"])
    return {"parcels": parcels, "networks": networks, "delta": delta,
            "null_parcel_magnitude": np.asarray(null_mag),
            "network_note": None if evalset.networks is not None else
            "the atlas labels have no network column: no network summary or p-values",
            "n_runs": {"source": len(src), "target": len(tgt)},
            "n_windows": {"source": int(sum(len(windows[i]) for i in src)),
                          "target": int(sum(len(windows[i]) for i in tgt))},
            "settings": dataclasses.asdict(settings)}


def write_outputs(result: Mapping[str, Any], out_dir, model_path: str = "") -> None:
    """parcels.tsv, networks.tsv, perturb.json and networks.png, each written atomically."""
    from pathlib import Path

    from brainfoundry.io import atomic_path, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("parcels", "networks"):
        with atomic_path(out / f"{name}.tsv") as tmp:
            result[name].to_csv(tmp, sep="\t", index=False)
    write_json_atomic(out / "perturb.json", {"model": str(model_path), "settings": result["settings"],
                                             "n_runs": result["n_runs"], "n_windows": result["n_windows"],
                                             "network_note": result["network_note"]})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = result["networks"]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(nets) + 2), 3.5))
    if len(nets):
        ax.bar(nets["network"], nets["magnitude"], color="tab:blue", label="|delta| (mean over parcels)")
        ax.scatter(nets["network"], nets["null_p95"], color="k", marker="_", s=300, label="null 95th percentile")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", rotation=45)
    else:
        ax.text(0.5, 0.5, result["network_note"] or "no networks", ha="center", va="center", fontsize=8, wrap=True)
    ax.set_ylabel("perturbation magnitude")
    fig.tight_layout()
    with atomic_path(out / "networks.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def cli_main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    import torch

    p = argparse.ArgumentParser(prog="brainfoundry perturb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="BrainLM model file (model.safetensors)")
    p.add_argument("--shards", required=True, help="shard directory (as `brainfoundry evaluate`)")
    p.add_argument("--labels", default=None, help="atlas labels TSV (its network column)")
    p.add_argument("--options", default="", help="the perturb config section as JSON")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as err:
        raise ConfigError("perturb", f"--options is not JSON ({err})") from None
    settings = PerturbSettings.from_dict(options)
    from brainfoundry.evaluate.dataset import load_shards
    from brainfoundry.models import load_model

    evs = load_shards(args.shards, labels_tsv=args.labels)
    model = load_model(args.model)
    result = perturb(model, evs, settings)
    write_outputs(result, args.out, args.model)
    print(result["networks"].to_string(index=False) if len(result["networks"]) else result["network_note"])
    return 0
