"""The ``evaluate:`` config section as a dataclass (the JSON schema validates the same keys)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from brainfoundry.errors import ConfigError

TASKS = ("reconstruction", "forecasting", "phenotype", "finetune", "networks", "fingerprint")


@dataclass
class CVSettings:
    n_folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    group_by: str = "auto"  # auto | site | subject
    stratify_by: str | None = "diagnosis"
    n_inner: int = 3


@dataclass
class FinetuneSettings:
    enabled: bool = True
    targets: list[str] = field(default_factory=lambda: ["diagnosis"])
    epochs: int = 3
    lr: float = 1e-4
    head_lr: float = 1e-3
    batch_size: int = 16
    hidden: int = 64
    max_windows_per_run: int = 2
    seeds: list[int] = field(default_factory=lambda: [0])  # fine-tuning is costly: fewer seeds than probes


@dataclass
class ForecastBaselineSettings:
    ridge_lags: int = 40
    lstm_hidden: int = 32
    lstm_lags: int = 30
    lstm_epochs: int = 5
    lstm_max_samples: int = 5000  # (window, parcel) sequences; bounds the LSTM's CPU time
    lstm_seeds: int = 1  # LSTM refits (first seeds of evaluate.seeds): its training is stochastic
    max_train_windows: int = 400


@dataclass
class EvalSettings:
    models: list[str] = field(default_factory=lambda: ["brainlm", "brainmass", "lcm"])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    heldout_split: str = "test"
    window: int = 200
    patch: int = 20
    mask_ratios: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.75])
    context: int = 180
    horizon: int = 20
    max_windows_per_run: int = 4
    # Runs shorter than this are left out of every task, for models and baselines alike (None: window),
    # so that every method is scored on the same subjects.
    min_timepoints: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    targets: list[str] = field(default_factory=lambda: ["diagnosis", "sex", "age"])
    regression_targets: list[str] = field(default_factory=lambda: ["age"])
    # Frozen-embedding probes; "mlp" (an sklearn MLP) is optional: the MLP head is the fine-tuning task.
    probes: list[str] = field(default_factory=lambda: ["logistic", "svm"])
    # Categorical targets of the LCM's pseudo-label fine-tuning (the trainer's finetune mode), one model each.
    pseudo_label_targets: list[str] = field(default_factory=lambda: ["diagnosis"])
    # Trainer keys for that fine-tuning over the LCM's own (e.g. fewer steps than pretraining).
    pseudo_label_trainer: dict = field(default_factory=dict)
    n_permutations: int = 5
    # Schaefer-400 7-network label image and its order file, for the majority vote when the atlas labels
    # TSV has no network column; the parcel atlas image comes from the atlas step (or atlas.path).
    network_atlas: str | None = None
    network_atlas_labels: str | None = None
    network_runs: int = 32
    ci_level: float = 0.95
    cv: CVSettings = field(default_factory=CVSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    forecast_baselines: ForecastBaselineSettings = field(default_factory=ForecastBaselineSettings)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "EvalSettings":
        values = dict(values or {})
        nested = {"cv": CVSettings, "finetune": FinetuneSettings, "forecast_baselines": ForecastBaselineSettings}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"evaluate.{unknown[0]}", f"unknown key (known: {sorted(known)})")
        kwargs = {}
        for key, value in values.items():
            if value is None and key not in ("network_atlas", "network_atlas_labels", "min_timepoints"):
                continue  # null = the default (the workflow fills window/patch from the BrainLM config)
            if key in nested:
                sub_known = {f.name for f in fields(nested[key])}
                bad = sorted(set(value or {}) - sub_known)
                if bad:
                    raise ConfigError(f"evaluate.{key}.{bad[0]}", f"unknown key (known: {sorted(sub_known)})")
                kwargs[key] = nested[key](**(value or {}))
            else:
                kwargs[key] = value
        out = cls(**kwargs)
        out.check()
        return out

    def check(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ConfigError("evaluate.tasks", f"unknown tasks {bad}; choose from {list(TASKS)}")
        if self.window % self.patch:
            raise ConfigError("evaluate.window", f"window {self.window} is not a multiple of patch {self.patch}")
        if self.context + self.horizon > self.window:
            raise ConfigError("evaluate.context", f"context {self.context} + horizon {self.horizon} exceeds window {self.window}")
        if any(not 0 < r < 1 for r in self.mask_ratios):
            raise ConfigError("evaluate.mask_ratios", f"ratios must be in (0, 1), got {self.mask_ratios}")

    def to_dict(self) -> dict:
        return asdict(self)
