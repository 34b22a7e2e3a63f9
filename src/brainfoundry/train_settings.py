"""Trainer settings: :class:`TrainConfig` and how the workflow config layers into it.

Kept apart from :mod:`brainfoundry.train` so that they are importable without torch: Snakemake checks
the ``pretrain`` section while it parses the workflow (``brainfoundry.workflow.pretrain``), and every
Slurm job re-parses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from brainfoundry.errors import ConfigError
from brainfoundry.models import FAMILIES, MODEL_WINDOWS  # lazy: no torch


# -- settings ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    """Trainer settings (``pretrain.trainer`` in the workflow config, ``trainer.<key>=`` overrides)."""

    steps: int = 1000
    #: Global batch (all ranks together); must divide evenly by the number of ranks.
    batch_size: int = 32
    lr: float = 1e-3
    #: The cosine decay ends at ``lr * min_lr_ratio``.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    #: Window length for families without their own (``MODEL_WINDOWS``: BrainLM's ``model.window``,
    #: SC-MBM's ``model.frame_points``; :func:`resolve_settings` sets it to theirs).
    window: int = 200
    short_runs: str = "skip"
    shuffle_buffer: int = 256
    num_workers: int = 0
    drop_last: bool = False
    #: How DDP ranks share the shards: "samples", each rank takes its slice of the one-process run's
    #: global batches (the run does not depend on the number of ranks; every rank decodes the row groups
    #: its slices come from); "row_groups", each rank reads only its share of the row groups (1/G of the
    #: decoding, but batches, hence weights, depend on G). The same with one process.
    partition: str = "samples"
    checkpoint_every: int = 100
    log_every: int = 10
    #: Validation loss every this many steps (and at the end); 0 = only at the end.
    eval_every: int = 0
    eval_batches: int = 4
    #: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    #: "bf16": autocast to bfloat16 on CUDA (never on CPU); "fp32": no autocast.
    dtype: str = "bf16"
    compile: bool = False
    #: ``torch.compile`` backend ("inductor"; "eager" traces without code generation, for tests).
    compile_backend: str = "inductor"
    #: CPU threads for torch (0 = leave torch's default).
    threads: int = 0
    #: Device peak FLOP/s for the MFU column (0 = from the device name when known).
    peak_flops: float = 0.0
    # -- fine-tuning (``--mode finetune``, LCM only) --
    target: str = "diagnosis"
    #: A pseudo-label needs the target head's top class probability to reach this.
    threshold: float = 0.9
    #: "equal": as many pseudo-labels per class (the most confident), "none": every confident one.
    pseudo_balance: str = "equal"
    pseudo_weight: float = 1.0
    #: Fraction of training subjects whose ``target`` label the trainer may see, in pretraining and
    #: fine-tuning alike; the others' label is hidden (chosen per subject by a seeded hash), so that the
    #: pseudo-label pass has unlabelled training runs to label, as in the LCM's semi-supervised setting.
    label_fraction: float = 1.0

    def validate(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
                    "log_every": self.log_every, "eval_batches": self.eval_batches, "window": self.window}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"trainer.{key}", f"must be >= 1, got {value}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("trainer.lr", f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.num_workers < 0 or self.eval_every < 0:
            raise ConfigError("trainer", "warmup_steps, grad_clip, num_workers and eval_every must be >= 0")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError("trainer.dtype", f"must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.partition not in ("samples", "row_groups"):
            raise ConfigError("trainer.partition", f"must be 'samples' or 'row_groups', got {self.partition!r}")
        if self.short_runs not in ("skip", "pad"):
            raise ConfigError("trainer.short_runs", f"must be 'skip' or 'pad', got {self.short_runs!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("trainer.threshold", f"must be in [0, 1], got {self.threshold}")
        if self.pseudo_balance not in ("equal", "none"):
            raise ConfigError("trainer.pseudo_balance", f"must be 'equal' or 'none', got {self.pseudo_balance!r}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise ConfigError("trainer.label_fraction", f"must be in [0, 1], got {self.label_fraction}")


#: Settings that do not change the trajectory: a checkpoint may be resumed across changes of these.
RESUME_FREE_KEYS = ("checkpoint_every", "log_every", "eval_every", "eval_batches", "device", "compile",
                    "compile_backend", "threads", "peak_flops")


def _from_mapping(cls, values: Mapping[str, Any], key: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(key, f"unknown keys {unknown}; known: {sorted(names)}")
    return cls(**values)


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def resolve_settings(family: str, config: Mapping[str, Any] | None = None,
                     overrides: Sequence[str] = ()) -> tuple[dict[str, Any], TrainConfig]:
    """Model config dict and :class:`TrainConfig` from a config mapping and ``key=value`` overrides.

    ``config`` is the workflow config (its ``pretrain`` section is used) or that section itself:
    ``trainer`` (shared), ``<family>.trainer`` (per-family overrides) and ``<family>.model``.
    Overrides are ``trainer.steps=10`` or ``model.dim=64`` (values parsed as YAML).
    """
    if family not in FAMILIES:
        raise ConfigError("family", f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    section = dict((config or {}).get("pretrain", config or {}))
    per_family = dict(section.get(family) or {})
    trainer = {**dict(section.get("trainer") or {}), **dict(per_family.get("trainer") or {})}
    model = dict(per_family.get("model") or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides look like trainer.steps=10 or model.dim=64")
        key, text = item.split("=", 1)
        scope, _, name = key.strip().partition(".")
        if scope not in ("trainer", "model") or not name:
            raise ConfigError(key, "override keys start with 'trainer.' or 'model.'")
        target = trainer if scope == "trainer" else model
        parts = name.split(".")
        for part in parts[:-1]:  # nested model keys, e.g. model.brain.dim=64
            target = target.setdefault(part, {})
        target[parts[-1]] = _parse_value(text)
    train_cfg = _from_mapping(TrainConfig, trainer, "pretrain.trainer")
    if family in MODEL_WINDOWS:
        train_cfg.window = _own_window(family, section, per_family, model, overrides)
    train_cfg.validate()
    return model, train_cfg


def family_window(family: str, model: Mapping[str, Any], train_cfg: TrainConfig) -> int:
    """Time points per training sample: the model's own key (``MODEL_WINDOWS``), else ``trainer.window``."""
    if family in MODEL_WINDOWS:
        key, default = MODEL_WINDOWS[family]
        return int(model.get(key, default))
    return train_cfg.window


def _own_window(family: str, section: Mapping[str, Any], per_family: Mapping[str, Any],
                model: Mapping[str, Any], overrides: Sequence[str]) -> int:
    """The window of a family whose model sets it; a trainer window meant for it that differs is an error.

    Meant for it: ``pretrain.<family>.trainer.window`` and a ``trainer.window=`` override, and for BrainLM
    also ``pretrain.trainer.window`` (the same series window). SC-MBM's is a frame length
    (``frame_points``), so the shared series window, which the other families read, is not meant for it.
    """
    key, default = MODEL_WINDOWS[family]
    own = int(model.get(key, default))
    where = f"pretrain.{family}.model.{key}" + ("" if key in model else f" (default {default})")
    candidates = [(f"pretrain.{family}.trainer.window", dict(per_family.get("trainer") or {}).get("window"))]
    if family == "brainlm":
        candidates.insert(0, ("pretrain.trainer.window", dict(section.get("trainer") or {}).get("window")))
    candidates += [(item.split("=", 1)[0].strip(), _parse_value(item.split("=", 1)[1])) for item in overrides
                   if item.split("=", 1)[0].strip() == "trainer.window"]
    for name, value in candidates:
        if value is not None and value != own:
            raise ConfigError(name, f"is {value} but {family} takes its window from {where} = {own}; "
                                    f"drop {name} or make it {own}")
    return own
