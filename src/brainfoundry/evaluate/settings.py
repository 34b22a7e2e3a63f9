"""The ``evaluate:`` config section as a dataclass (the JSON schema validates the same keys)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from brainfoundry.errors import ConfigError
from brainfoundry.models import MODEL_WINDOWS

# A random-init control of model M is evaluated as "M_random_init" (see `evaluate.adapters.load_model`).
CONTROL_SUFFIX = "_random_init"
NORMALIZATIONS = ("zscore", "minmax", "log_minmax", "none")
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
    window: int = MODEL_WINDOWS["brainlm"][1]  # the BrainLM model's (the workflow fills in its config's)
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
    # Random-init controls: every model also evaluated as ``<model>_random_init`` (same config, seed 0 init).
    controls: bool = True
    # FC baselines beside the models' probes: fc_linear (logistic / ridge), fc_svm_linear, fc_svm_rbf
    # (linear and RBF SVM / SVR, C and gamma chosen in inner folds).
    fc_probes: list[str] = field(default_factory=lambda: ["logistic", "svm", "svm_rbf"])
    # FC + embedding concatenated (``fc_plus_embedding``) beside FC alone (``fc_alone``) in each model's rows.
    fc_concat: bool = True
    # Per continuous target: zscore | minmax | log_minmax | none, fitted on training folds (BrainLM's
    # normalisations; mse rows are on this scale).
    target_normalization: dict = field(default_factory=lambda: {"age": "zscore"})
    # Sites held out whole (external validation, trained on the other sites); the workflow fills it from
    # shards.holdout_sites. Empty: no external split.
    external_sites: list[str] = field(default_factory=list)
    # Reconstruction: ridge from visible to masked parcels at each time point (fitted on training runs).
    ridge_alphas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    ridge_max_train_runs: int = 400
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
                # (external_sites: null = shards.holdout_sites, filled in by the workflow)
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
        bad = {k: v for k, v in (self.target_normalization or {}).items() if v not in NORMALIZATIONS}
        if bad:
            key = next(iter(bad))
            raise ConfigError(f"evaluate.target_normalization.{key}", f"{bad[key]!r}: choose from {list(NORMALIZATIONS)}")
        bad = [p for p in self.fc_probes if p not in ("logistic", "svm", "svm_rbf", "mlp")]
        if bad:
            raise ConfigError("evaluate.fc_probes", f"unknown probes {bad}; choose from logistic, svm, svm_rbf, mlp")
        if any(not 0 < r < 1 for r in self.mask_ratios):
            raise ConfigError("evaluate.mask_ratios", f"ratios must be in (0, 1), got {self.mask_ratios}")

    def to_dict(self) -> dict:
        return asdict(self)
