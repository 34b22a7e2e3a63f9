"""A thin adapter between the model families and the evaluation tasks.

Tasks never call a model directly; they call a `ModelAdapter`:

- ``embed(windows)``: pooled embedding per window [B, D] and per-parcel embeddings [B, N, D] (or None);
- ``reconstruct(x, mask)``: fill the masked parcel x patch tokens of [B, W, N] windows;
- ``forecast(context, horizon)``: the next ``horizon`` points of [B, Tc, N] contexts;
- ``finetune_encoder()``: a differentiable torch module windows -> pooled embedding, for fine-tuning;
- ``pseudo_label_predictor(...)``: the LCM's semi-supervised fine-tuning on its phenotype heads.

A capability a family lacks raises `TaskSkipped` with a message naming the model and what it lacks, so
a task asked of the wrong model is reported and the other tasks still run.

`embed_runs` computes every embedding a task needs once per model (per run, per run half, per parcel)
and `save_embeddings`/`load_embeddings` cache them, so every probe reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from brainfoundry.errors import InputError
from brainfoundry.evaluate.protocol import TaskSkipped
from brainfoundry.evaluate.settings import CONTROL_SUFFIX

CAPABILITIES = ("embed", "parcel_embed", "reconstruct", "forecast", "finetune", "pseudo_label", "cls_attention",
                "forecast_features")


class ModelAdapter:
    """Base class: subclasses set ``name``, ``window``, ``min_length``, ``patch``, ``capabilities``."""

    name: str = "model"
    # Time points per window the model reads; None = the whole series at once (FC-based models).
    window: int | None = 200
    min_length: int = 200  # shortest series the model can embed (== window unless it takes shorter input)
    embedding_dim: int = 0
    patch: int | None = None  # time points per token (masked reconstruction works in whole patches)
    capabilities: frozenset = frozenset()
    batch_size: int = 32
    # Subjects whose phenotype labels the model saw in pretraining (LCM): kept out of every test fold.
    label_subjects: frozenset = frozenset()

    def require(self, capability: str, task: str) -> None:
        if capability not in self.capabilities:
            have = ", ".join(sorted(self.capabilities)) or "none"
            raise TaskSkipped(f"task '{task}' needs '{capability}', which model '{self.name}' does not provide "
                              f"(it provides: {have})")

    def embed(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def reconstruct(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forecast(self, context: np.ndarray, horizon: int) -> np.ndarray:
        raise NotImplementedError

    def finetune_encoder(self):
        raise NotImplementedError

    def pseudo_label_predictor(self, target: str, classification: bool, X_train, y_train, X_unlabeled, seed: int):
        raise NotImplementedError


# -- windows and the embedding cache ----------------------------------------------------------------
def window_starts(length: int, window: int, max_windows: int | None = None) -> list[int]:
    """Starts of non-overlapping windows covering the series; the last one is aligned to the end.

    A series shorter than ``window`` has no window (the caller decides to skip or pad it).
    """
    if length < window:
        return []
    starts = list(range(0, length - window + 1, window))
    if starts[-1] + window < length:
        starts.append(length - window)
    if max_windows is not None and len(starts) > max_windows:
        pick = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        starts = [starts[i] for i in pick]
    return starts


def _segments(x: np.ndarray, adapter: ModelAdapter, max_windows: int) -> list[np.ndarray]:
    """Windows of ``adapter.window`` points, or the whole segment when shorter but >= ``min_length``."""
    if adapter.window is None:
        return [x] if len(x) >= adapter.min_length else []
    starts = window_starts(len(x), adapter.window, max_windows)
    if starts:
        return [x[s:s + adapter.window] for s in starts]
    if len(x) >= adapter.min_length:
        return [x]
    return []


@dataclass
class Embeddings:
    """Embeddings of one model for the evaluation runs (NaN rows where a run was too short)."""

    model: str
    run_ids: np.ndarray  # [R]
    subjects: np.ndarray  # [R]
    pooled: np.ndarray  # [R, D]
    halves: np.ndarray  # [R, 2, D] first and second half of each run
    parcel_run_ids: np.ndarray  # [R'] runs with per-parcel embeddings
    parcels: np.ndarray | None  # [R', N, D]
    notes: list[str]


def _embed_batched(adapter: ModelAdapter, segs: list[np.ndarray], want_parcels: bool):
    """Embed a list of segments in batches of equal length; returns lists of pooled and parcel arrays."""
    pooled: list[np.ndarray | None] = [None] * len(segs)
    parcels: list[np.ndarray | None] = [None] * len(segs)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(segs):
        by_len.setdefault(len(s), []).append(i)
    for idx in by_len.values():
        for start in range(0, len(idx), adapter.batch_size):
            chunk = idx[start:start + adapter.batch_size]
            p, tok = adapter.embed(np.stack([segs[i] for i in chunk]).astype(np.float32))
            for j, i in enumerate(chunk):
                pooled[i] = p[j]
                if want_parcels and tok is not None:
                    parcels[i] = tok[j]
    return pooled, parcels


def embed_runs(adapter: ModelAdapter, evalset, max_windows: int = 8, parcel_runs: int = 32,
               parcel_split: Sequence[str] = ("test", "val")) -> Embeddings:
    """Every embedding the tasks need, computed once: per run, per run half, per parcel (a subset of runs).

    Parameters
    ----------
    evalset : `EvalSet` (normalized series are what the model sees).
    max_windows : windows per run (and per half) averaged into its embedding.
    parcel_runs : how many runs keep per-parcel embeddings (held-out splits first), for network labels.
    """
    adapter.require("embed", "embed")
    want_parcels = "parcel_embed" in adapter.capabilities
    notes: list[str] = []
    segs, owner = [], []  # owner: (run index, part) with part 0 = whole run, 1/2 = halves
    for i in range(len(evalset.series)):
        x = evalset.normalized(i)
        half = len(x) // 2
        for part, piece in ((0, x), (1, x[:half]), (2, x[half:])):
            for seg in _segments(piece, adapter, max_windows):
                segs.append(seg)
                owner.append((i, part))
    # Per-parcel embeddings for a bounded set of runs (held-out splits first): enough for a parcel-level
    # classifier, small enough to cache on ABIDE-size sets.
    splits = evalset.runs["split"].to_numpy() if "split" in evalset.runs else np.array(["train"] * len(evalset.series))
    rank = np.array([list(parcel_split).index(s) if s in parcel_split else len(parcel_split) for s in splits])
    parcel_idx = sorted(np.argsort(rank, kind="stable")[:parcel_runs].tolist()) if want_parcels else []
    parcel_set = set(parcel_idx)
    pooled_list, parcel_list = _embed_batched(adapter, segs, want_parcels)
    dim = pooled_list[0].shape[-1] if pooled_list else 0
    n_runs = len(evalset.series)
    sums = np.zeros((n_runs, 3, dim))
    counts = np.zeros((n_runs, 3))
    parcel_sums: dict[int, np.ndarray] = {}
    for (i, part), p, tok in zip(owner, pooled_list, parcel_list):
        sums[i, part] += p
        counts[i, part] += 1
        if part == 0 and i in parcel_set and tok is not None:
            parcel_sums[i] = parcel_sums.get(i, 0) + tok
    parcel_sums = {i: v / counts[i, 0] for i, v in parcel_sums.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[..., None]
    too_short = np.flatnonzero(counts[:, 0] == 0)
    if len(too_short):
        notes.append(f"{adapter.name}: {len(too_short)} runs shorter than {adapter.min_length} points were not embedded "
                     f"(e.g. {evalset.runs.index[too_short[:3]].tolist()})")
    parcel_ids = [i for i in parcel_idx if i in parcel_sums]
    parcels = np.stack([parcel_sums[i] for i in parcel_ids]).astype(np.float32) if parcel_ids else None
    return Embeddings(
        model=adapter.name, run_ids=evalset.runs.index.to_numpy().astype(str),
        subjects=evalset.runs["subject"].to_numpy().astype(str), pooled=means[:, 0].astype(np.float32),
        halves=means[:, 1:].astype(np.float32), parcel_run_ids=evalset.runs.index.to_numpy().astype(str)[parcel_ids],
        parcels=parcels, notes=notes)


def save_embeddings(emb: Embeddings, path: str | Path) -> None:
    from brainfoundry.io import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, model=emb.model, run_ids=emb.run_ids, subjects=emb.subjects, pooled=emb.pooled,
                     halves=emb.halves, parcel_run_ids=emb.parcel_run_ids,
                     parcels=emb.parcels if emb.parcels is not None else np.zeros((0,), np.float32),
                     notes=np.array(emb.notes, dtype=str))


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "embedding cache not found; run the embed step first")
    with np.load(path, allow_pickle=False) as z:
        parcels = z["parcels"]
        return Embeddings(model=str(z["model"]), run_ids=z["run_ids"], subjects=z["subjects"], pooled=z["pooled"],
                          halves=z["halves"], parcel_run_ids=z["parcel_run_ids"],
                          parcels=parcels if parcels.ndim == 3 else None, notes=z["notes"].tolist())


def subject_means(values: np.ndarray, subjects: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Average per-run rows over each subject's runs (NaN rows ignored); returns (subjects, [S, D])."""
    df = pd.DataFrame(np.asarray(values, dtype=np.float64))
    df["_s"] = np.asarray(subjects).astype(str)
    mean = df.groupby("_s", sort=True).mean()
    return mean.index.to_numpy(), mean.to_numpy(np.float32)


# -- random-init controls ---------------------------------------------------------------------------
def control_base(model: str) -> str | None:
    # A control of model M is "M_random_init": M's architecture (the config in M's model file), the
    # trainer's seeded initial weights, no pretraining (BrainLM's "w/o pre-training" row).
    """The pretrained model a control name stands for (``brainlm_random_init`` -> ``brainlm``), else None."""
    return model[: -len(CONTROL_SUFFIX)] if model.endswith(CONTROL_SUFFIX) and len(model) > len(CONTROL_SUFFIX) else None


def random_init_(model, train_config: dict | None = None) -> int:
    """Replace a loaded model's parameters by the initial weights its trainer started from; returns the seed.

    The trainer seeds torch with ``trainer.seed`` and then builds the model, so a model built from the same
    config right after the same seed has those weights. Buffers (parcel coordinates, environment
    statistics: data, not learned) stay as loaded.
    """
    import torch

    from brainfoundry.models import build_model

    seed = int((train_config or {}).get("seed", 0) or 0)
    torch.manual_seed(seed)
    fresh = build_model(model.family, model.config)
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(params[name])
    return seed


def load_model(model: str, checkpoint, evalset, device: str = "cpu") -> ModelAdapter:
    """A model file behind its adapter; a control name loads the base model's file at its initial weights."""
    from brainfoundry.evaluate.families import load_adapter

    base = control_base(model)
    if base is None:
        return load_adapter(model, checkpoint, evalset, device=device)
    adapter = load_adapter(base, checkpoint, evalset, name=model, device=device)
    from brainfoundry.models.files import read_model_file

    adapter.init_seed = random_init_(adapter.model, read_model_file(checkpoint).get("train_config"))
    adapter.model.eval()
    return adapter
