"""``brainfoundry export-model``: a model file as a folder a lab can publish (Hugging Face Hub layout).

The folder holds

``model.safetensors``
    The weights, byte for byte as safetensors writes them (the Hub's ``"format": "pt"`` marker).
``config.json``
    The model file's metadata (:mod:`brainfoundry.models.files`: family, model config, data
    fingerprint, normalisation statistics, training config, versions, the weights' sha256) plus the
    Hub's ``model_type`` and ``library_name``.
``README.md``
    The model card: YAML front matter (library, licence, tags, the training data with its fingerprint
    and licence, steps) and a body with the evaluation's headline table when a metrics table is given,
    the intended use and how to load the model.

The folder is itself a model file: ``brainfoundry train --init DIR``, ``brainfoundry evaluate ...
--checkpoint DIR`` and :func:`brainfoundry.models.load_model` read it, the checksum verified.
Each file is written atomically; the weights first, the card last.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Mapping

from brainfoundry.errors import InputError
from brainfoundry.io import write_text_atomic
from brainfoundry.models.files import HUB_CONFIG, HUB_WEIGHTS, read_model_file, write_model_file

INTENDED_USE = (
    "Research on resting-state fMRI: embeddings of parcellated BOLD time series (and, where the family "
    "has a decoder, reconstruction and forecasting) for downstream analyses such as phenotype prediction "
    "with the subject held out. The model was trained on the data named above only; it is not a medical "
    "device and its outputs are not a diagnosis. Inputs must be parcellated with the same atlas "
    "({atlas}, {n_parcels} parcels) and scaled with the normalisation statistics in config.json.")


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if not math.isfinite(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def headline_rows(metrics: str | Path, model: str) -> list[dict[str, Any]]:
    """The evaluation's headline rows (primary metric per task) of ``model`` and of the baselines."""
    import pandas as pd

    from brainfoundry.evaluate.table import headline

    metrics = Path(metrics)
    if not metrics.is_file():
        raise InputError(metrics, "evaluation metrics table not found (results/evaluation/metrics.parquet)")
    try:
        table = pd.read_parquet(metrics) if metrics.suffix == ".parquet" else pd.read_csv(metrics, sep="\t")
    except Exception as err:  # pyarrow/pandas raise several types for foreign files
        raise InputError(metrics, f"cannot read the metrics table ({err})") from None
    missing = {"model", "is_baseline", "task", "metric", "value", "fold", "seed", "split"} - set(table.columns)
    if missing:
        raise InputError(metrics, f"not an evaluation metrics table (no columns {sorted(missing)})")
    table["is_baseline"] = table["is_baseline"].astype(str).str.lower().isin(["true", "1"])
    if not (table["model"].astype(str) == model).any():
        known = sorted(set(table.loc[~table["is_baseline"], "model"].astype(str)))
        raise InputError(metrics, f"has no rows of model {model!r} (models: {known}); pass --eval-model")
    head = headline(table)
    head = head[(head["model"].astype(str) == model) | head["is_baseline"]]
    head = head[head["method"] != "chance"]
    rows = []
    for _, r in head.sort_values(["task", "target", "condition", "is_baseline", "method"]).iterrows():
        lo, hi = float(r.get("ci_low", math.nan)), float(r.get("ci_high", math.nan))
        rows.append({"task": r["task"], "target": r.get("target", ""), "condition": r.get("condition", ""),
                     "split": r["split"], "model": r["model"], "method": r.get("method", ""), "metric": r["metric"],
                     "value": float(r["value"]),
                     "95% CI": f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else ""})
    return rows


def model_card(meta: Mapping[str, Any], *, dataset: str, data_license: str, license: str,
               headline: list[dict[str, Any]] | None, metrics_name: str | None) -> str:
    """The README.md: YAML front matter (Hub model-card metadata) and the card's text."""
    import yaml

    family = meta["family"]
    training = dict(meta.get("training") or {})
    train_config = dict(meta.get("train_config") or {})
    data = dict(meta.get("data") or {})
    steps = training.get("steps", train_config.get("steps"))
    fingerprint = data.get("fingerprint") or train_config.get("data")
    front = {
        "library_name": "brainfoundry",
        "license": license,
        "tags": ["fmri", "neuroscience", "foundation-model", "brainfoundry", family],
        "pipeline_tag": "feature-extraction",
        "brainfoundry": {
            "family": family, "format_version": meta.get("format_version"), "atlas": meta.get("atlas"),
            "n_parcels": meta.get("n_parcels"), "n_parameters": meta.get("n_parameters"),
            "mode": training.get("mode", train_config.get("mode")), "steps": steps,
            "training_data": {"name": dataset, "fingerprint": fingerprint, "license": data_license},
            "weights_sha256": meta["weights"]["sha256"],
        },
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# brainfoundry {family} model", "",
             f"A {family} fMRI foundation model ({meta.get('n_parameters', 0):,} parameters) pretrained with "
             f"brainfoundry for {steps} steps on **{dataset}** "
             f"(data fingerprint `{fingerprint}`), parcellated with the {meta.get('atlas')} atlas "
             f"({meta.get('n_parcels')} parcels).", "",
             "## Training data", "",
             f"- Dataset: {dataset}", f"- Fingerprint of the runs, splits and scaling statistics: `{fingerprint}`",
             f"- Licence of the data: {data_license}", f"- Steps: {steps}", ""]
    lines += ["## Evaluation", ""]
    if headline:
        lines += [f"Headline metrics of the brainfoundry evaluation (`{metrics_name}`): the primary metric "
                  "per task for this model and for the baselines, mean over folds and seeds with a 95% interval.",
                  "", _markdown_table(headline, ["task", "target", "condition", "split", "model", "method", "metric",
                                                 "value", "95% CI"]), ""]
    else:
        lines += ["No evaluation metrics were given when this folder was exported.", ""]
    lines += ["## Intended use", "", INTENDED_USE.format(atlas=meta.get("atlas"), n_parcels=meta.get("n_parcels")), "",
              "## Loading", "",
              "```python",
              "from brainfoundry.models import load_model",
              "model = load_model(\"path/to/this/folder\")  # safetensors; the sha256 in config.json is checked",
              "```", "",
              "or `brainfoundry train --init <folder>` / `brainfoundry evaluate ... --checkpoint <folder>`.", ""]
    return "\n".join(lines)


def export_model(model: str | Path, out: str | Path, *, metrics: str | Path | None = None,
                 eval_model: str | None = None, dataset: str = "unspecified",
                 data_license: str = "unspecified (check the dataset's data use terms before publishing)",
                 license: str = "other") -> Path:
    """Write the publishable folder ``out`` for the model file ``model``; returns ``out``."""
    payload = read_model_file(model)  # verified: an export never republishes corrupt weights
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if (out / "model.json").exists():  # the trainer's own folder: its model.json would no longer match
        raise InputError(out, "holds a trainer model file (model.json); export into a folder of its own")
    state = payload.pop("state_dict")
    meta = {k: v for k, v in payload.items() if k not in ("weights", "extra_state", "format", "format_version")}
    meta.update(model_type=f"brainfoundry-{payload['family']}", library_name="brainfoundry")
    write_model_file(out / HUB_WEIGHTS, state, meta, meta_path=out / HUB_CONFIG)
    written = read_model_file(out)  # what was published reads back, checksum and all
    name = eval_model or payload["family"]
    rows = headline_rows(metrics, name) if metrics else None
    card = model_card(written, dataset=dataset, data_license=data_license, license=license, headline=rows,
                      metrics_name=Path(metrics).name if metrics else None)
    write_text_atomic(out / "README.md", card)
    return out


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry export-model",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("model", help="a model file (model.safetensors with model.json beside it)")
    parser.add_argument("out", help="the folder to write (model.safetensors, config.json, README.md)")
    parser.add_argument("--metrics", default=None, help="the evaluation's metrics.parquet (or .tsv): headline table")
    parser.add_argument("--eval-model", default=None, help="the model's name in the metrics table (default: family)")
    parser.add_argument("--dataset", default="unspecified", help="name of the training data, for the card")
    parser.add_argument("--data-license", default="unspecified (check the dataset's data use terms before publishing)",
                        help="licence / data use terms of the training data")
    parser.add_argument("--license", default="other", help="licence of the weights (Hub identifier, e.g. cc-by-4.0)")
    args = parser.parse_args(argv)
    out = export_model(args.model, args.out, metrics=args.metrics, eval_model=args.eval_model, dataset=args.dataset,
                       data_license=args.data_license, license=args.license)
    print(f"wrote {out / HUB_WEIGHTS}, {out / HUB_CONFIG} and {out / 'README.md'}")
    return 0
