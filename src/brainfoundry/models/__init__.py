"""Model families for pretraining: BrainLM, BrainMass, the Large Connectome Model, MinD-Vis SC-MBM.

>>> from brainfoundry.models import build_model, load_model
>>> model = build_model("brainlm", {"n_parcels": 100, "dim": 64, "depth": 2, "heads": 4})
>>> loss, metrics = model.loss(batch)            # batch: a dict from brainfoundry.data
>>> emb = model.encode(batch)                    # {"pooled", "tokens", "parcels"}
>>> model.save("model.safetensors"); same = load_model("model.safetensors")   # + model.json beside it

The interface is described in :mod:`brainfoundry.models.base`, model files in
:mod:`brainfoundry.models.files`.

The registry is lazy: importing this package (or asking ``FAMILIES`` for its names) does not import
torch; a family's module is imported when its classes are first needed. Snakemake checks the
``pretrain`` section while it parses the workflow, and every Slurm job re-parses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from brainfoundry.errors import ConfigError
from brainfoundry.models.files import (
    ModelChecksumError,
    UnsafeModelFileError,
    load_model,
    read_model_file,
    read_model_metadata,
)

if TYPE_CHECKING:
    from brainfoundry.models.base import FoundationModel, ModelConfig

#: family name -> (module, config class name, model class name); imported on first use.
_FAMILY_MODULES: dict[str, tuple[str, str, str]] = {
    "brainlm": ("brainfoundry.models.brainlm", "BrainLMConfig", "BrainLM"),
    "brainmass": ("brainfoundry.models.brainmass", "BrainMassConfig", "BrainMass"),
    "lcm": ("brainfoundry.models.lcm", "LCMConfig", "LCM"),
    "scmbm": ("brainfoundry.models.scmbm", "SCMBMConfig", "SCMBM"),
}
#: Families whose model config fixes the training window: family -> (model key, default). The config
#: dataclasses take their default from here, so the workflow checks a conflicting ``trainer.window``
#: while it parses, without torch; the other families read ``pretrain.trainer.window``.
MODEL_WINDOWS: dict[str, tuple[str, int]] = {"brainlm": ("window", 200), "scmbm": ("frame_points", 4)}
# Classes this package exports by name (``from brainfoundry.models import BrainLM``), also lazily.
_LAZY_NAMES = {"FoundationModel": "brainfoundry.models.base", "ModelConfig": "brainfoundry.models.base",
               **{cls: module for module, *classes in _FAMILY_MODULES.values() for cls in classes}}


class _Registry(Mapping):
    """family name -> (config class, model class), importing a family's module on first lookup."""

    def __init__(self, modules: Mapping[str, tuple[str, str, str]]):
        self._modules = modules

    def __getitem__(self, family: str) -> tuple[type, type]:
        module_name, config_name, model_name = self._modules[family]
        module = importlib.import_module(module_name)
        return getattr(module, config_name), getattr(module, model_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __contains__(self, family: object) -> bool:  # names only: no import
        return family in self._modules

    def __repr__(self) -> str:
        return f"FAMILIES({sorted(self._modules)})"


#: family name -> (config class, model class)
FAMILIES: Mapping[str, tuple[type[ModelConfig], type[FoundationModel]]] = _Registry(_FAMILY_MODULES)

__all__ = [
    "FAMILIES",
    "LCM",
    "BrainLM",
    "BrainLMConfig",
    "BrainMass",
    "BrainMassConfig",
    "FoundationModel",
    "LCMConfig",
    "MODEL_WINDOWS",
    "ModelChecksumError",
    "ModelConfig",
    "SCMBM",
    "SCMBMConfig",
    "UnsafeModelFileError",
    "build_model",
    "load_model",
    "make_config",
    "read_model_file",
    "read_model_metadata",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_config(family: str, config: ModelConfig | Mapping[str, Any] | None = None) -> ModelConfig:
    """The family's config from a mapping (unknown keys are an error) or an existing config."""
    from brainfoundry.models.base import ModelConfig

    if family not in FAMILIES:
        raise ConfigError("family", f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    config_class = FAMILIES[family][0]
    if isinstance(config, ModelConfig):
        if not isinstance(config, config_class):
            raise ConfigError("model", f"a {type(config).__name__} is not a config of the {family} family")
        config.validate()
        return config
    return config_class.from_dict(config or {})


def build_model(family: str, config: ModelConfig | Mapping[str, Any] | None = None, coords: Any = None) -> FoundationModel:
    """A fresh model of ``family``; ``coords`` (``[N, 3]`` MNI mm) are the atlas's parcel centroids."""
    model = FAMILIES[family][1](make_config(family, config)) if family in FAMILIES else None
    if model is None:
        raise ConfigError("family", f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    if coords is not None:
        model.set_coords(coords)
    return model
