"""Helpers of ``workflow/rules/pretrain.smk``: what the pretrain job is handed, checked at parse time.

Torch-free (the trainer's settings are :mod:`brainfoundry.train_settings`, the model registry is
lazy), so the trainer keys of a config are checked while Snakemake parses the workflow, naming the
key, without importing torch. Model keys are checked by each family's config class, which lives with
its torch module: the pretrain job checks them first thing (``brainfoundry train``), before it reads
any shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brainfoundry.errors import ConfigError
from brainfoundry.models import FAMILIES, MODEL_WINDOWS
from brainfoundry.train_settings import resolve_settings

FAMILY_NAMES = tuple(FAMILIES)


def workflow_settings(config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The pretrain section the workflow hands the trainer for ``family``.

    The workflow's ``seed`` and the shards' ``window``/``short_runs`` are the trainer's defaults (the
    window only for families whose model does not set it, ``MODEL_WINDOWS``); ``pretrain.threads`` is
    its torch thread count unless ``pretrain.trainer.threads`` is set.
    """
    section = dict(config.get("pretrain") or {})
    shards = dict(config.get("shards") or {})
    defaults = {"seed": int(config.get("seed", 0)), "short_runs": shards.get("short_runs", "skip")}
    if "window" in shards and family not in MODEL_WINDOWS:
        defaults["window"] = int(shards["window"])
    trainer = {**defaults, **dict(section.get("trainer") or {})}
    trainer.setdefault("threads", int(section.get("threads", 2)))
    return {"trainer": trainer, family: dict(section.get(family) or {})}


def check_workflow_settings(config: Mapping[str, Any]) -> list[str]:
    """The configured families, their names and trainer keys checked now (ConfigError naming the key)."""
    families = list((config.get("pretrain") or {}).get("families", FAMILY_NAMES))
    for family in families:
        if family not in FAMILIES:
            raise ConfigError("pretrain.families", f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
        resolve_settings(family, workflow_settings(config, family))
    return families


def launcher(gpus: int) -> str:
    """The command that starts training: torchrun over the node's GPUs when there are several."""
    if int(gpus) > 1:
        return f"torchrun --standalone --nproc-per-node={int(gpus)} -m brainfoundry.train"
    return "brainfoundry train"
