"""The one trainer for every model family: ``brainfoundry train --family F --shards DIR --out DIR``.

Read top to bottom (nanoGPT style): settings -> distributed set-up -> data -> model -> optimizer
and schedule -> optional resume -> the loop (data wait, forward under bf16 autocast on CUDA,
non-finite check, backward, gradient clipping, AdamW step, LR schedule, EMA hook, logging,
validation, atomic checkpoints) -> final model, metrics CSV and learning-curve plot.

Outputs in ``--out``: ``model.safetensors`` + ``model.json`` (the model file,
:func:`brainfoundry.models.load_model`; weights, metadata and the weights' sha256),
``metrics.csv`` (one row per logged step: loss, lr, grad norm, samples/s, tokens/s, data-wait
fraction, memory, validation loss and the zero predictor's on the same batches (``val_zero_loss``),
family metrics), ``learning_curve.png``, ``summary.json``, and
``checkpoint.pt`` (the latest checkpoint; ``--resume auto`` continues from it when it matches).

Distributed: launch with ``torchrun --nproc_per_node G --no-python brainfoundry train ...`` (or
``-m brainfoundry.train``); ``env://`` initialisation, NCCL on GPUs, gloo on CPUs. ``batch_size``
is the global batch, split evenly over ranks; gradients are averaged by DDP and every loss is a mean
of per-sample terms, so one process with batch B and G processes with B/G each take the same steps.
Per-sample randomness (masks, views) comes from ``batch["seed"]``, a function of the global seed,
the step and the sample's global index, never of the rank layout. On shards, ``trainer.partition:
samples`` (the default) gives each rank its slice of the one-process run's global batches
(:class:`brainfoundry.data.ShardDataset`), so a run on G ranks ends where the one-process run ends (an
epoch's last, short batch excepted: split over the ranks, its loss is a mean of per-rank means).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from brainfoundry.checkpoint import (CHECKPOINT_NAME, check_resumable, load_checkpoint, rng_state, save_checkpoint,
                                     set_rng_state)
from brainfoundry.errors import BrainfoundryError, ConfigError, InputError
from brainfoundry.io import atomic_path, sha256_file, write_json_atomic
from brainfoundry.models import FAMILIES, FoundationModel, build_model, load_model, make_config
from brainfoundry.models.files import MODEL_FILE, UnsafeModelFileError, read_model_file
# The settings live in a torch-free module (the workflow checks them while parsing); re-exported here.
from brainfoundry.train_settings import RESUME_FREE_KEYS, TrainConfig, family_window, resolve_settings

FAMILY_NAMES = tuple(FAMILIES)
MODES = ("pretrain", "finetune")


# -- distributed ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "CUDA was asked for but is not available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _all_reduce(values: Sequence[float], dist: Dist, op=None) -> list[float]:
    if not dist.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _gather(obj: Any, dist: Dist) -> list[Any]:
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


# -- optimisation -------------------------------------------------------------------------------------------
def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms, tokens or position tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = any(k in name for k in ("token", "temporal", "var_embed", "spatial.table"))
        (decay if p.dim() >= 2 and not is_table else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def sample_seeds(seed: int, step: int, first_index: int, n: int) -> torch.Tensor:
    """Per-sample seeds of one step: distinct for every (step, global sample index < 2**16)."""
    base = (((int(seed) % (1 << 20)) * 2654435761 + int(step)) * (1 << 16) + int(first_index)) % (1 << 62)
    return (base + torch.arange(n, dtype=torch.int64)) % (1 << 62)


class NonFiniteLossError(BrainfoundryError):
    """The loss became NaN/inf: the message names the step and the batch's runs."""


# -- data ---------------------------------------------------------------------------------------------------------
class ShardSource:
    """The trainer's view of the shards: loaders per split and the phenotypes of every run.

    Tests may pass any object with the same attributes (``parcel_names``, ``parcel_coords``,
    ``loader(...)``, ``env_records()``, ``env_values(run_ids, names)``, ``describe()``).
    """

    def __init__(self, shards: str | Path, cfg: TrainConfig, window: int, need_pfc: bool):
        from brainfoundry.data import ShardDataset

        self.shards, self.cfg, self.window, self.need_pfc = Path(shards), cfg, int(window), need_pfc
        probe = ShardDataset(self.shards, split=None, window=self.window, short_runs=cfg.short_runs, seed=cfg.seed,
                             pfc=need_pfc, rank=0, world_size=1)
        self.parcel_names = list(probe.parcel_names)
        self.parcel_coords = probe.parcel_coords
        self.atlas = probe.atlas
        self.norm_stats_path = getattr(probe, "norm_stats_path", None)
        # What the data are: every run with its split and length, and the scaling statistics. A
        # checkpoint trained on other data (a subject added, splits changed) is not resumed.
        digest = hashlib.sha256()
        for run_id, split, n_t in sorted(zip(probe.run_ids.tolist(), probe.split_of.tolist(),
                                             probe.n_timepoints.tolist())):
            digest.update(f"{run_id}\x1f{split}\x1f{n_t}\n".encode())
        if self.norm_stats_path:
            digest.update(sha256_file(self.norm_stats_path).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self._manifest = None
        self._lookup: dict[str, dict[str, Any]] | None = None
        self._hidden: frozenset[str] = frozenset()

    def describe(self) -> str:
        return f"{self.shards} (atlas {self.atlas}, {len(self.parcel_names)} parcels)"

    def loader(self, split: str, rank: int, world_size: int, batch_size: int, train: bool = True):
        """A :class:`brainfoundry.data.ShardLoader` over ``split`` for one rank; InputError when empty."""
        from brainfoundry.data import ShardDataset, make_dataloader

        cfg = self.cfg
        ds = ShardDataset(self.shards, split=split, window=self.window, short_runs=cfg.short_runs, seed=cfg.seed,
                          crop="random" if train else "center", shuffle=train, buffer_size=cfg.shuffle_buffer,
                          pfc=self.need_pfc, rank=rank, world_size=world_size, partition=cfg.partition,
                          batch_size=batch_size)
        if ds.n_samples == 0:
            skipped = f" ({ds.n_short_skipped} runs shorter than the {self.window}-point window skipped)" \
                if ds.n_short_skipped else ""
            raise InputError(self.shards, f"split {split!r} has no runs{skipped}")
        sizes = ds.plan_sizes(max(1, cfg.num_workers)).sum(axis=1)
        if train and int(sizes.min()) == 0:
            raise InputError(self.shards, f"split {split!r} has too few row groups ({len(ds.units)}) to give each of "
                                          f"{world_size} ranks x {max(1, cfg.num_workers)} workers data")
        return make_dataloader(ds, batch_size=batch_size, num_workers=cfg.num_workers if train else 0,
                               drop_last=cfg.drop_last if train else False)

    def manifest(self):
        if self._manifest is None:
            from brainfoundry.data import read_manifest

            path = self.shards / "manifest.parquet"
            if not path.is_file():
                raise InputError(path, "the manifest beside the shards is missing (brainfoundry manifest writes it)")
            self._manifest = read_manifest(path).set_index("run_id")
        return self._manifest

    def env_records(self, split: str = "train") -> Any:
        """Phenotype columns of ``split`` runs only (environment-variable statistics: no leakage)."""
        frame = self.manifest()
        return frame[frame["split"] == split]

    def env_values(self, run_ids: Sequence[str], names: Sequence[str]) -> dict[str, list[Any]]:
        """Raw phenotype values of these runs from the manifest (None where absent or hidden)."""
        if self._lookup is None:
            frame = self.manifest()
            self._lookup = {c: dict(zip(frame.index, frame[c].tolist())) for c in frame.columns}
            self._hidden = hidden_label_runs(frame, self.cfg.label_fraction, self.cfg.seed)
        out = {name: [self._lookup.get(name, {}).get(r) for r in run_ids] for name in names}
        if self.cfg.target in out and self._hidden:
            out[self.cfg.target] = [None if r in self._hidden else v for r, v in zip(run_ids, out[self.cfg.target])]
        return out


def hidden_label_runs(manifest, label_fraction: float, seed: int) -> frozenset[str]:
    """Training runs whose subject's label is hidden: a seeded per-subject draw keeps ``label_fraction``."""
    if label_fraction >= 1.0:
        return frozenset()
    from brainfoundry.splits import unit_hash

    train = manifest[manifest["split"] == "train"]
    hidden = [run_id for run_id, subject in zip(train.index, train["subject"].astype(str))
              if unit_hash("label", seed, subject) >= label_fraction]
    return frozenset(map(str, hidden))


class Batches:
    """Endless batches from a loader that ends each epoch (the loader advances the epoch itself)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self._it: Iterator | None = None

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise InputError("shards", "a whole epoch produced no batch (fewer samples than a batch with drop_last?)")

    def state_dict(self, gather: bool) -> dict[str, Any]:
        return self.loader.state_dict(gather=gather)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def to_device(batch: Mapping[str, Any], keys: Sequence[str], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in keys:
        value = out.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
    return out


# -- outputs --------------------------------------------------------------------------------------------------
def write_metrics_csv(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per logged step; columns in first-seen order (union over rows)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return Path(path)


def plot_learning_curve(history: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Training (and validation) loss against step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.plot(steps, [r["loss"] for r in history], label="train loss", color="tab:blue")
    val = [(r["step"], r["val_loss"]) for r in history if isinstance(r.get("val_loss"), float) and math.isfinite(r["val_loss"])]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    zero = [(r["step"], r["val_zero_loss"]) for r in history
            if isinstance(r.get("val_zero_loss"), float) and math.isfinite(r["val_zero_loss"])]
    if zero:  # above it the model predicts worse than zero (the training median) on the same batches
        # Fixed validation batches and masks: one level, drawn across the whole run.
        ax.hlines(zero[-1][1], steps[0], steps[-1], linestyles=":", colors="k", label="zero predictor (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in history], color="0.6", lw=1, ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate", color="0.4")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _memory() -> dict[str, float]:
    row = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


# -- the trainer ------------------------------------------------------------------------------------------------
def train(family: str, out: str | Path, *, shards: str | Path | None = None, model_config: Mapping[str, Any] | None = None,
          train_config: TrainConfig | None = None, resume: str = "auto", mode: str = "pretrain",
          init: str | Path | None = None, source: Any = None, progress: bool | None = None) -> dict[str, Any]:
    """Train ``family`` on the shards; returns the summary (also written to ``out/summary.json``).

    ``resume``: "auto" continues from ``out/checkpoint.pt`` when it matches this run (starts over
    otherwise, saying why), "never" starts over, "always" or a path must resume (InputError if it
    cannot). ``init``: a model file whose weights and model config the run starts from (pretraining:
    continued pretraining of the same family, ``model_config`` may only repeat its values;
    ``mode="finetune"``, LCM: pseudo-label fine-tuning, required).
    """
    cfg = train_config or TrainConfig()
    cfg.validate()
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {MODES}, got {mode!r}")
    out = Path(out)
    dist = setup_distributed(cfg.device)
    device = dist.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % dist.world_size:
        raise ConfigError("trainer.batch_size", f"{cfg.batch_size} does not split evenly over {dist.world_size} ranks")
    local_bs = cfg.batch_size // dist.world_size
    log = print if dist.main else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # -- model config and data ---------------------------------------------------------------------------------
    init_payload = None
    if mode == "finetune" and (family != "lcm" or init is None):
        raise ConfigError("mode", "finetune needs --family lcm and --init <pretrained LCM model file>")
    if init is not None:
        # A safetensors model file, its sha256 checked; a pickle is refused before anything is unpickled.
        init_payload = read_model_file(init)
        if init_payload["family"] != family:
            need = "fine-tuning needs an lcm model" if mode == "finetune" else f"this run trains {family}"
            raise InputError(init, f"holds a {init_payload['family']} model; {need}")
        model_values = dict(init_payload["config"])
        if mode == "pretrain":
            differ = sorted(k for k, v in dict(model_config or {}).items() if k in model_values and model_values[k] != v)
            if differ:
                raise ConfigError("model", f"--init {init} fixes the model config; these keys differ from it: {differ}")
    else:
        model_values = dict(model_config or {})
    # SC-MBM's window is frame_points points, averaged into one frame by the model.
    window = family_window(family, model_values, cfg)
    need_pfc = _needs_pfc(family, model_values)
    if source is None:
        if shards is None:
            raise ConfigError("shards", "give the shard directory")
        source = ShardSource(shards, cfg, window, need_pfc)
    n_parcels = len(source.parcel_names)
    if "n_parcels" in model_values and int(model_values["n_parcels"]) != n_parcels:
        where = init if init is not None else "model.n_parcels"
        raise InputError(where, f"the model has {model_values['n_parcels']} parcels but the shards "
                                f"{source.describe()} have {n_parcels}")
    model_values["n_parcels"] = n_parcels
    if family == "lcm" and mode == "pretrain" and init_payload is None:
        from brainfoundry.models.lcm import default_env, fit_env_stats

        specs = model_values.get("env") or default_env()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model_values["env"] = fit_env_stats(source.env_records("train"), specs, source="training split")
        for w in caught:
            log(f"[lcm] {w.message}")
    model_cfg = make_config(family, model_values)

    # -- model, optimizer, schedule ------------------------------------------------------------------------------
    model = build_model(family, model_cfg, coords=source.parcel_coords)
    if init_payload is not None:
        model.load_state_dict(init_payload["state_dict"])
    if mode == "finetune":
        model = _finetune_queries(model, source, cfg, log)
        model_cfg = model.config
    model.to(device)
    # After the weights: per-rank streams for anything random outside the per-sample seeds (dropout).
    torch.manual_seed(cfg.seed + dist.rank)
    np.random.seed((cfg.seed + dist.rank) % 2**32)
    random.seed(cfg.seed + dist.rank)
    optimizer = configure_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    train_loader = Batches(source.loader("train", dist.rank, dist.world_size, local_bs, train=True))
    env_names = [s.name for s in getattr(model, "specs", [])]
    log(f"[{family}] {model.num_parameters():,} trainable parameters; data {source.describe()}; "
        f"device {device}; world size {dist.world_size}; global batch {cfg.batch_size}")

    pseudo: dict[str, tuple[int, float]] = {}
    pseudo_round: dict[str, Any] | None = None
    if mode == "finetune":
        pseudo, pseudo_round = _pseudo_label_pass(model, source, cfg, dist, local_bs, env_names)
        log(f"[lcm] {pseudo_round['n_assigned']} pseudo-labels for {cfg.target!r} of {pseudo_round['n_unlabelled']} "
            f"unlabelled training runs (threshold {cfg.threshold}: {pseudo_round['n_confident']} confident; balance "
            f"{cfg.pseudo_balance}: {pseudo_round['counts']}; label_fraction {cfg.label_fraction})")

    # -- resume ------------------------------------------------------------------------------------------------
    start_step, history = 0, []
    ckpt_path = out / CHECKPOINT_NAME
    fingerprint = {k: v for k, v in dataclasses.asdict(cfg).items()}
    fingerprint["mode"] = mode
    fingerprint["data"] = getattr(source, "fingerprint", None)
    if init_payload is not None:
        fingerprint["init"] = init_payload["weights"]["sha256"][:16]
    resume_from = None if resume == "never" else (ckpt_path if resume in ("auto", "always") else Path(resume))
    if resume_from is not None and (resume_from.is_file() or resume != "auto"):
        try:
            ckpt = load_checkpoint(resume_from)
            check_resumable(resume_from, ckpt, family=family, model_config=model_cfg.to_dict(), train_config=fingerprint,
                            parcel_names=source.parcel_names, world_size=dist.world_size,
                            ignore_train_keys=RESUME_FREE_KEYS)
        except UnsafeModelFileError as err:
            # Never skipped silently, not even under "auto": a pickle where a checkpoint belongs is worth a stop.
            raise UnsafeModelFileError(err.source, f"{err.problem}; or remove it (--resume never starts over)") from None
        except InputError as err:
            if resume != "auto":
                raise
            log(f"[{family}] not resuming: {err}")
            ckpt = None
        if ckpt is not None:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"][dist.rank])
            train_loader.load_state_dict(ckpt["data"])
            pseudo = {k: tuple(v) for k, v in ckpt.get("pseudo_labels", {}).items()} or pseudo
            pseudo_round = ckpt.get("pseudo_round", pseudo_round)
            start_step, history = int(ckpt["step"]), list(ckpt["history"])
            log(f"[{family}] resumed from {resume_from} at step {start_step}")

    net: torch.nn.Module = model
    if dist.enabled:
        # Fine-tuning leaves the backbone's pretraining heads (decoder, projector) out of the graph.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=mode == "finetune")
    if cfg.compile:
        net = torch.compile(net, backend=cfg.compile_backend)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.dtype == "bf16"
                else contextlib.nullcontext())
    from brainfoundry.models.flops import brainlm_flops, peak_flops

    flops_per_sample = brainlm_flops(model.config)["train"] if family == "brainlm" else None
    peak = cfg.peak_flops or (peak_flops() if device.type == "cuda" else None)
    keys = model.input_keys()

    def checkpoint(step: int) -> None:
        data_state = train_loader.state_dict(gather=True)
        rngs = _gather(rng_state(), dist)
        if dist.main:
            save_checkpoint(ckpt_path, {
                **model.payload(), "kind": "checkpoint", "step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs, "data": data_state, "history": history,
                "train_config": fingerprint, "world_size": dist.world_size, "parcel_names": source.parcel_names,
                "pseudo_labels": pseudo, "pseudo_round": pseudo_round})
            write_metrics_csv(history, out / "metrics.csv")

    def raise_if_nonfinite(flagged: tuple[int, torch.Tensor, list[str]] | None) -> None:
        if flagged is not None and not bool(flagged[1]):
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"non-finite loss at step {flagged[0]} (batch runs {flagged[2]}); {kept}")

    # -- the loop ----------------------------------------------------------------------------------------------
    pending: tuple[int, torch.Tensor, list[str]] | None = None  # (step, finite flag, runs), checked a step late
    bar = None
    show = sys.stderr.isatty() if progress is None else progress
    if dist.main and show:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {family}", unit="step", dynamic_ncols=True)
    model.train()
    t_interval, wait_interval, steps_interval, samples_interval = time.perf_counter(), 0.0, 0, 0
    loss_sum = torch.zeros((), device=device)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        batch = train_loader.next()
        wait_interval += time.perf_counter() - t0
        n_local = len(batch["run_id"])
        batch = to_device(batch, keys, device)
        batch["seed"] = sample_seeds(cfg.seed, step, _first_position(batch, dist, local_bs), n_local)
        if env_names:
            batch.update(source.env_values(batch["run_id"], env_names))

        with autocast:
            if mode == "finetune":
                loss, metrics = net(batch, finetune=_finetune_labels(model, batch, cfg, pseudo))
            else:
                loss, metrics = net(batch)
        finite = torch.isfinite(loss.detach()).float()
        if dist.enabled:  # every rank sees the same flag, so all stop together (none hangs in a collective)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        # The previous step's flag, read only now: by the time this step's work is queued the device has
        # finished that one, so the host never waits on the device in the middle of a step.
        raise_if_nonfinite(pending)
        pending = (step, finite, list(batch["run_id"]))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else \
            torch.zeros((), device=device)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_step_end((step + 1) / cfg.steps)
        loss_sum += loss.detach()
        steps_interval += 1
        samples_interval += n_local  # a worker's last batch of an epoch can be short: count what ran
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.steps:
            raise_if_nonfinite(pending)
            pending = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t_interval
            mean_loss, wait, samples = _all_reduce([float(loss_sum) / steps_interval, wait_interval,
                                                    float(samples_interval)], dist)
            samples_s = samples / elapsed
            row = {"step": done, "epoch": getattr(train_loader.loader, "epoch", 0), "loss": mean_loss / dist.world_size,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "samples_per_s": samples_s,
                   "tokens_per_s": samples_s * model.tokens_per_sample(), "step_time_s": elapsed / steps_interval,
                   "data_wait_fraction": wait / dist.world_size / elapsed, **_memory()}
            if flops_per_sample and peak:
                row["mfu"] = flops_per_sample * samples_s / (peak * dist.world_size)
            metric_values = _all_reduce([float(v) for v in metrics.values()], dist)
            row.update({k: v / dist.world_size for k, v in zip(metrics, metric_values)})
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                row["val_loss"], row["val_zero_loss"] = _validate(model, source, cfg, dist, local_bs, env_names,
                                                                  autocast, keys, mode)
            history.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{samples_s:.1f}")
            if not show:
                log(f"[{family}] step {done}/{cfg.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                    f"{samples_s:.1f} samples/s data wait {row['data_wait_fraction']:.1%}", flush=True)
            t_interval, wait_interval, steps_interval, samples_interval = time.perf_counter(), 0.0, 0, 0
            loss_sum.zero_()
        if bar is not None:
            bar.update(1)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            raise_if_nonfinite(pending)  # a checkpoint only ever holds weights of finite steps
            pending = None
            checkpoint(done)
    raise_if_nonfinite(pending)
    if bar is not None:
        bar.close()

    # -- final outputs -----------------------------------------------------------------------------------------
    summary = {"family": family, "mode": mode, "steps": cfg.steps, "n_parameters": model.num_parameters(),
               "n_parcels": n_parcels, "world_size": dist.world_size, "device": str(device),
               "final": history[-1] if history else {}, "atlas": getattr(source, "atlas", None)}
    if dist.main:
        model.save(out / MODEL_FILE, parcel_names=list(source.parcel_names), train_config=fingerprint,
                   atlas=getattr(source, "atlas", None), norm_stats=_norm_stats_record(source),
                   data={"fingerprint": fingerprint["data"],
                         "init_sha256": init_payload["weights"]["sha256"] if init_payload else None},
                   training={"family": family, "mode": mode, "steps": cfg.steps, "world_size": dist.world_size,
                             "final": summary["final"]},
                   pseudo_labels={k: [int(v[0]), float(v[1])] for k, v in pseudo.items()},
                   pseudo_label_round=pseudo_round)
        write_metrics_csv(history, out / "metrics.csv")
        plot_learning_curve(history, out / "learning_curve.png", f"{family} ({model.num_parameters():,} parameters)")
        write_json_atomic(out / "summary.json", summary)
    if dist.enabled:
        torch.distributed.barrier()
    return summary


def _norm_stats_record(source: Any) -> dict[str, Any] | None:
    """The per-parcel scaling the model was trained with (median/IQR of the training runs), for the model file."""
    path = getattr(source, "norm_stats_path", None)
    if not path:
        return None
    from brainfoundry.shards import read_norm_stats

    median, iqr = read_norm_stats(path, list(source.parcel_names))
    return {"method": "x' = (x - median) / iqr per parcel; statistics of the training split's runs",
            "file": Path(path).name, "sha256": sha256_file(path),
            "median": [float(v) for v in median], "iqr": [float(v) for v in iqr]}


def _needs_pfc(family: str, values: Mapping[str, Any]) -> bool:
    if family == "brainmass":
        return values.get("views", "stored") == "stored"
    return False


@torch.no_grad()
def _validate(model: FoundationModel, source: Any, cfg: TrainConfig, dist: Dist, local_bs: int,
              env_names: Sequence[str], autocast: Any, keys: Sequence[str],
              mode: str = "pretrain") -> tuple[float, float]:
    """Mean loss over the first ``eval_batches`` batches of the validation split (fixed crops, seeds), and
    the zero predictor's loss on the same batches (`_zero_loss`; NaN where it has none)."""
    try:
        loader = source.loader("val", dist.rank, dist.world_size, local_bs, train=False)
    except InputError:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    total, count, zero_total, zero_count = 0.0, 0, 0.0, 0
    for i, batch in enumerate(loader):
        if i >= cfg.eval_batches:
            break
        n = len(batch["run_id"])
        batch = to_device(batch, keys, dist.device)
        batch["seed"] = sample_seeds(cfg.seed + 1, 10**9 + i, _first_position(batch, dist, local_bs), n)
        if env_names:
            batch.update(source.env_values(batch["run_id"], env_names))
        with autocast:
            if mode == "finetune":  # true labels only: pseudo-labels never score a model
                loss, _ = model(batch, finetune=_finetune_labels(model, batch, cfg, {}, use_pseudo=False))
            else:
                loss, _ = model.loss(batch)
        total, count = total + float(loss) * n, count + n
        zero = _zero_loss(model, batch) if mode == "pretrain" else None
        if zero is not None:
            zero_total, zero_count = zero_total + zero * n, zero_count + n
    model.train(was_training)
    total, count, zero_total, zero_count = _all_reduce([total, count, zero_total, zero_count], dist)
    return (total / count if count else float("nan"), zero_total / zero_count if zero_count else float("nan"))


def _first_position(batch: Mapping[str, Any], dist: Dist, local_bs: int) -> int:
    """Index of the batch's first sample in the global batch: the shards' ``position`` where the ranks split
    a short batch evenly (``trainer.partition: samples``), else the rank's slot."""
    position = batch.get("position")
    return int(position[0]) if position is not None and len(position) else dist.rank * local_bs


def _zero_loss(model: FoundationModel, batch: Mapping[str, Any]) -> float | None:
    """The family's masked-reconstruction loss of the all-zero prediction on the batch's own masks (the
    learning curve's "did it learn at all" line): ``model.zero_loss`` where the family defines one
    (BrainLM, SC-MBM); None for a loss that is not an MSE of the series (BrainMass, the LCM)."""
    zero_loss = getattr(model, "zero_loss", None)
    return None if zero_loss is None else zero_loss(batch)


def _finetune_queries(model, source, cfg: TrainConfig, log) -> FoundationModel:
    """The pretrained LCM with queries for the fine-tuning target: the pretrained ones where the target
    (and class) is known, new ones for a new target or class (classes from the training split)."""
    from brainfoundry.models.lcm import fit_env_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = fit_env_stats(source.env_records("train"), [{"name": cfg.target, "kind": "categorical"}])
    if not fitted:
        raise ConfigError("trainer.target", f"{cfg.target!r} has fewer than two classes among the training split's runs")
    known = {s.name for s in model.specs}
    extended = model.with_targets(fitted)
    added = len(extended.layout) - len(model.layout)
    log(f"[lcm] fine-tuning {cfg.target!r}: {'pretrained' if cfg.target in known else 'new'} target, "
        f"{added} new queries, {len(extended.layout)} in all")
    return extended


def _pseudo_label_pass(model, source, cfg: TrainConfig, dist: Dist, local_bs: int,
                       env_names) -> tuple[dict[str, tuple[int, float]], dict[str, Any]]:
    """The semi-supervised round: confident, class-balanced pseudo-labels for unlabelled training runs
    (every rank's share gathered first), and its record for the model file."""
    from brainfoundry.models.lcm import assign_pseudo_labels, balance_pseudo_labels

    loader = source.loader("train", dist.rank, dist.world_size, local_bs, train=False)

    def batches():
        for batch in loader:
            batch = to_device(batch, model.input_keys(), dist.device)
            batch.update(source.env_values(batch["run_id"], env_names))
            yield batch

    found, n_unlabelled = assign_pseudo_labels(model, batches(), cfg.target, cfg.threshold)
    confident: dict[str, tuple[int, float]] = {}
    parts = _gather((found, n_unlabelled), dist)
    for part, _ in parts:
        confident.update(part)
    n_unlabelled = sum(n for _, n in parts)
    _, spec = model.spec(cfg.target)
    kept = balance_pseudo_labels(confident, len(spec.classes), cfg.pseudo_balance)
    counts = {c: sum(1 for v in kept.values() if v[0] == i) for i, c in enumerate(spec.classes)}
    record = {"target": cfg.target, "threshold": cfg.threshold, "balance": cfg.pseudo_balance,
              "n_unlabelled": n_unlabelled, "n_confident": len(confident), "n_assigned": len(kept),
              "counts": counts, "classes": list(spec.classes)}
    return kept, record


def _finetune_labels(model, batch: Mapping[str, Any], cfg: TrainConfig, pseudo: Mapping[str, tuple[int, float]],
                     use_pseudo: bool = True) -> dict[str, Any]:
    """Fine-tuning targets: true labels where observed, pseudo-labels (weighted) where not, else none."""
    j, _ = model.spec(cfg.target)
    values, observed = model.env_values(batch, len(batch["run_id"]))
    labels, weights = [], []
    for i, run_id in enumerate(batch["run_id"]):
        if bool(observed[i, j]):
            labels.append(int(values[i, j]))
            weights.append(1.0)
        elif use_pseudo and run_id in pseudo:
            labels.append(int(pseudo[run_id][0]))
            weights.append(cfg.pseudo_weight)
        else:
            labels.append(-1)
            weights.append(0.0)
    return {"target": cfg.target, "labels": torch.tensor(labels), "weights": torch.tensor(weights)}


# -- command line ----------------------------------------------------------------------------------------------
def _load_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "config file not found")
    with open(p) as handle:
        return yaml.safe_load(handle) or {}


def cli_main(argv: list[str]) -> int:
    """``brainfoundry train --family F --shards DIR --out DIR [--config YAML] [--set trainer.steps=10 ...]``"""
    parser = argparse.ArgumentParser(prog="brainfoundry train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=FAMILY_NAMES)
    parser.add_argument("--shards", required=True, help="shard directory (bucket-<k>.parquet, manifest, norm_stats)")
    parser.add_argument("--out", required=True,
                        help="output directory (model.safetensors + model.json, metrics.csv, learning_curve.png)")
    parser.add_argument("--config", default=None, help="YAML: the workflow config or its pretrain section")
    parser.add_argument("--config-json", default=None, help="the pretrain section as JSON (used by the workflow)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. trainer.steps=10 or model.dim=64 (repeatable)")
    parser.add_argument("--resume", default="auto",
                        help="auto (continue a matching checkpoint in --out), never, always, or a checkpoint path")
    parser.add_argument("--mode", default="pretrain", choices=MODES)
    parser.add_argument("--init", default=None,
                        help="start from this model file (.safetensors, its .json, or an export-model folder): "
                             "required in finetune mode, continued pretraining otherwise")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bar (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    config = _load_config_file(args.config)
    if args.config_json:
        config = {"pretrain": json.loads(args.config_json)}
    model_values, cfg = resolve_settings(args.family, config, args.overrides)
    summary = train(args.family, args.out, shards=args.shards, model_config=model_values, train_config=cfg,
                    resume=args.resume, mode=args.mode, init=args.init, progress=args.progress)
    final = summary.get("final", {})
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {args.family}: {summary['n_parameters']:,} parameters, final loss {final.get('loss', float('nan')):.4f}, "
              f"{final.get('samples_per_s', float('nan')):.1f} samples/s -> {Path(args.out) / MODEL_FILE}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":  # torchrun -m brainfoundry.train ...
    from brainfoundry.cli import main as _main

    raise SystemExit(_main(["train", *sys.argv[1:]]))
