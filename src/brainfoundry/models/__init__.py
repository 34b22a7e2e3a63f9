"""Model families for pretraining: BrainLM, BrainMass, the Large Connectome Model, MinD-Vis SC-MBM.

>>> from brainfoundry.models import build_model, load_model
>>> model = build_model("brainlm", {"n_parcels": 100, "dim": 64, "depth": 2, "heads": 4})
>>> loss, metrics = model.loss(batch)            # batch: a dict from brainfoundry.data
>>> emb = model.encode(batch)                    # {"pooled", "tokens", "parcels"}
>>> model.save("model.safetensors"); same = load_model("model.safetensors")   # + model.json beside it

The interface is described in :mod:`brainfoundry.models.base`, model files in
:mod:`brainfoundry.models.files`.
"""

from __future__ import annotations

from typing import Any, Mapping

from brainfoundry.errors import ConfigError
from brainfoundry.models.base import FoundationModel, ModelConfig
from brainfoundry.models.brainlm import BrainLM, BrainLMConfig
from brainfoundry.models.brainmass import BrainMass, BrainMassConfig
from brainfoundry.models.files import (ModelChecksumError, UnsafeModelFileError, load_model, read_model_file,
                                       read_model_metadata)
from brainfoundry.models.lcm import LCM, LCMConfig
from brainfoundry.models.scmbm import SCMBM, SCMBMConfig

#: family name -> (config class, model class)
FAMILIES: dict[str, tuple[type[ModelConfig], type[FoundationModel]]] = {
    "brainlm": (BrainLMConfig, BrainLM),
    "brainmass": (BrainMassConfig, BrainMass),
    "lcm": (LCMConfig, LCM),
    "scmbm": (SCMBMConfig, SCMBM),
}

__all__ = ["FAMILIES", "FoundationModel", "ModelConfig", "BrainLM", "BrainLMConfig", "BrainMass", "BrainMassConfig",
           "LCM", "LCMConfig", "SCMBM", "SCMBMConfig", "ModelChecksumError", "UnsafeModelFileError", "build_model",
           "load_model", "make_config", "read_model_file", "read_model_metadata"]


def make_config(family: str, config: ModelConfig | Mapping[str, Any] | None = None) -> ModelConfig:
    """The family's config from a mapping (unknown keys are an error) or an existing config."""
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
