"""Helpers of ``workflow/rules/evaluate.smk``: the evaluate settings the rules pass on, inputs, targets.

Kept here (not in the rule file) so the rule file is rules only, as ``snakemake --lint`` asks, and so
the derivation of the settings is testable without Snakemake.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping

from brainfoundry.models import MODEL_WINDOWS

ALL_TASKS = ("reconstruction", "forecasting", "phenotype", "finetune", "networks", "fingerprint")
# Tasks that read a model's cached embeddings (every model task also loads the model file).
EMBEDDING_TASKS = ("phenotype", "networks", "fingerprint")
FOLD_TASKS = ("phenotype", "finetune")


def eval_settings(config: Mapping[str, Any], pretrain_families: list[str] | None = None) -> dict[str, Any]:
    """The ``evaluate`` section with the workflow's defaults filled in.

    Models default to the pretrained families; window, patch, horizon and context to the BrainLM
    model's (``pretrain.brainlm.model``), so that the baselines, which never load a model, see the same
    held-out windows and masks as the models.
    """
    ev = dict(config.get("evaluate", {}) or {})
    ev["tasks"] = list(ev.get("tasks") or ALL_TASKS)
    ev["models"] = list(ev.get("models") or pretrain_families or ["brainlm", "brainmass", "lcm"])
    pretrain = dict(config.get("pretrain", {}) or {})
    brainlm = dict(dict(pretrain.get("brainlm", {}) or {}).get("model", {}) or {})
    key, default = MODEL_WINDOWS["brainlm"]
    ev["window"] = ev.get("window") or int(brainlm.get(key, default))
    ev["patch"] = ev.get("patch") or int(brainlm.get("patch_size", 20))
    ev["horizon"] = ev.get("horizon") or ev["patch"] * max(1, int(brainlm.get("future_patches", 1)))
    ev["context"] = ev.get("context") or ev["window"] - ev["horizon"]
    if ev.get("external_sites") is None:  # the sites the shards hold out whole are the external ones
        ev["external_sites"] = [str(s) for s in dict(config.get("shards", {}) or {}).get("holdout_sites", []) or []]
    return ev


def control_name(model: str) -> str:
    from brainfoundry.evaluate.settings import CONTROL_SUFFIX

    return f"{model}{CONTROL_SUFFIX}"


def evaluated_models(ev: Mapping[str, Any]) -> list[str]:
    """The models and, with ``evaluate.controls`` (default on), each one's random-init control."""
    controls = [control_name(m) for m in ev["models"]] if ev.get("controls", True) else []
    return list(ev["models"]) + controls


def options_json(ev: Mapping[str, Any]) -> str:
    return json.dumps(dict(ev), sort_keys=True)


def baseline_tasks(ev: Mapping[str, Any]) -> list[str]:
    """Fine-tuning is a method of pretrained models only: the baseline has no job for it."""
    return [t for t in ev["tasks"] if t != "finetune"]


def model_file(results: str, model: str) -> str:
    """The pretrained model file of a family (the pretrain rule's output; ``model.json`` beside it).

    A random-init control reads its model's file (for the architecture and the seed; weights unused).
    """
    from brainfoundry.evaluate.settings import CONTROL_SUFFIX

    if model.endswith(CONTROL_SUFFIX) and len(model) > len(CONTROL_SUFFIX):
        model = model[: -len(CONTROL_SUFFIX)]
    return f"{results}/models/{model}/model.safetensors"


def pseudo_label_file(results: str, target: str) -> str:
    """The LCM model after the trainer's pseudo-label fine-tuning on ``target``."""
    return f"{results}/models/lcm_pseudolabel/{target}/model.safetensors"


def model_metadata(weights: str) -> str:
    """The JSON sidecar of a model file (``brainfoundry.models.files.sidecar_path``, kept torch-free here)."""
    return weights.rsplit(".", 1)[0] + ".json"


def pseudo_label_settings(config: Mapping[str, Any], ev: Mapping[str, Any]) -> dict[str, Any]:
    """The LCM's trainer settings as the pretrain rule passes them, with ``pseudo_label_trainer`` on top."""
    from brainfoundry.workflow.pretrain import workflow_settings

    settings = workflow_settings(config, "lcm")
    lcm = dict(settings["lcm"])
    lcm["trainer"] = {**dict(lcm.get("trainer") or {}), **dict(ev.get("pseudo_label_trainer") or {})}
    settings["lcm"] = lcm
    return settings


def pseudo_label_targets(ev: Mapping[str, Any]) -> list[str]:
    return list(ev.get("pseudo_label_targets", ["diagnosis"])) if "lcm" in ev["models"] else []


def task_inputs(wildcards, *, layout, results: str, eval_dir: str, ev: Mapping[str, Any], entry: str,
                atlas_path: str | None) -> dict[str, str]:
    """Inputs of one ``evaluate_task`` job (model x task)."""
    inputs = {"manifest": layout.manifest, "norm_stats": layout.norm_stats, "labels": layout.atlas_labels}
    if wildcards.task in FOLD_TASKS:
        inputs["folds"] = f"{eval_dir}/folds.parquet"
    if wildcards.model != "baseline":
        if wildcards.task in EMBEDDING_TASKS:
            inputs["embeddings"] = f"{eval_dir}/embeddings/{wildcards.model}.npz"
        inputs["checkpoint"] = model_file(results, wildcards.model)
        if wildcards.model == "lcm" and wildcards.task == "phenotype":
            for target in pseudo_label_targets(ev):
                inputs[f"finetuned_{target}"] = pseudo_label_file(results, target)
    if ev.get("network_atlas") and wildcards.task == "networks":
        image = layout.atlas_dseg if entry != "timeseries" else atlas_path
        if image:
            inputs["atlas_image"] = image
    return inputs


def task_args(input) -> str:
    """Command-line options for the inputs a task job has."""
    args = [f"--labels {shlex.quote(input.labels)}"]
    for key, flag in (("folds", "--folds"), ("embeddings", "--embeddings"), ("checkpoint", "--checkpoint"),
                      ("atlas_image", "--atlas-image")):
        if key in input.keys():
            args.append(f"{flag} {shlex.quote(input[key])}")
    args += [f"--finetuned {shlex.quote(input[key])}" for key in input.keys() if key.startswith("finetuned_")]
    return " ".join(args)


def task_tables(eval_dir: str, ev: Mapping[str, Any]) -> list[str]:
    """Every model x task table plus the baseline's, the merge step's inputs."""
    out = [f"{eval_dir}/tasks/{m}/{t}.parquet" for m in evaluated_models(ev) for t in ev["tasks"]]
    return out + [f"{eval_dir}/tasks/baseline/{t}.parquet" for t in baseline_tasks(ev)]


def data_description(config: Mapping[str, Any]) -> str:
    """The input data of the entry point, as the report's 'what ran' names it."""
    entry = config.get("entry_point")
    if entry == "timeseries":
        ts = dict(config.get("timeseries", {}) or {})
        return f"series {ts.get('series_dir', '?')}, phenotypes {ts.get('phenotypes', '?')}"
    if entry == "derivatives":
        return f"fMRIPrep derivatives {config.get('derivatives_dir')}"
    return f"BIDS {config.get('bids_dir')}"


def evaluation_targets(eval_dir: str, ev: Mapping[str, Any]) -> list[str]:
    """The merged table, summary, verdict, plots and per-model examples (the report's Results section)."""
    if not ev["models"] and not ev["tasks"]:
        return []
    targets = [f"{eval_dir}/metrics.parquet", f"{eval_dir}/summary.html", f"{eval_dir}/verdict.png",
               f"{eval_dir}/headline.html", f"{eval_dir}/headline.tsv"]
    targets += [f"{eval_dir}/examples/{m}_{kind}.png" for m in evaluated_models(ev)
                for kind in ("reconstruction", "forecast")]
    return targets
