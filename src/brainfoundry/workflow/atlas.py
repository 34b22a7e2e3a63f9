"""Helpers of ``workflow/rules/atlas.smk``: the atlas_prepare rule's inputs, arguments and targets."""

from __future__ import annotations

import shlex

from brainfoundry.atlas import DEFAULT_MAX_BYTES


def rule_inputs(atlas_cfg: dict, entry: str) -> dict[str, str]:
    """Input files of the atlas_prepare rule: local image, labels table, reference image."""
    inputs = {}
    if atlas_cfg.get("path") and not atlas_cfg.get("url"):
        inputs["atlas"] = str(atlas_cfg["path"])
    if atlas_cfg.get("labels"):
        inputs["labels"] = str(atlas_cfg["labels"])
    if atlas_cfg.get("reference_img") and entry != "timeseries":
        inputs["reference"] = str(atlas_cfg["reference_img"])
    return inputs


def rule_source_args(atlas_cfg: dict) -> str:
    """``--atlas PATH`` or ``--url URL --sha256 H --cache-dir D --max-bytes N`` (shell-quoted)."""
    if not atlas_cfg.get("url") and not atlas_cfg.get("path"):
        return ""  # labels only (timeseries entry point; brainfoundry.checks.check_atlas made sure)
    if atlas_cfg.get("url"):
        return (f"--url {shlex.quote(atlas_cfg['url'])} --sha256 {shlex.quote(str(atlas_cfg.get('sha256') or ''))} "
                f"--cache-dir {shlex.quote(str(atlas_cfg.get('cache_dir', '.cache/brainfoundry/atlases')))} "
                f"--max-bytes {int(atlas_cfg.get('max_bytes', DEFAULT_MAX_BYTES))}")
    return f"--atlas {shlex.quote(str(atlas_cfg['path']))}"


def rule_option_args(inputs: dict, entry: str) -> str:
    """``--labels``, and ``--no-resample`` (timeseries entry point) or ``--reference-img``."""
    keys = set(inputs.keys())  # a Snakemake input list or a dict
    args = [f"--labels {shlex.quote(str(inputs.get('labels')))}"] if "labels" in keys else []
    if entry == "timeseries":
        args.append("--no-resample")
    elif "reference" in keys:
        args.append(f"--reference-img {shlex.quote(str(inputs.get('reference')))}")
    return " ".join(args)


def atlas_targets(layout, entry: str) -> list[str]:
    """The prepared atlas files the workflow builds (no image for the timeseries entry point)."""
    targets = [layout.atlas_labels, layout.atlas_json]
    return targets + ([layout.atlas_dseg] if entry != "timeseries" else [])
