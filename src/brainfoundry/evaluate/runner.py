"""Run one model x task on an evaluation set and return tidy, aggregated rows plus a status record.

A task that cannot run on this input (`TaskSkipped`: constant phenotype, too few subjects for the
folds, a model without the needed head) returns no rows and status 'skipped' with the reason; the
workflow's other tasks are unaffected and the report lists the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from brainfoundry.evaluate import fingerprint, forecasting, networks, phenotype, reconstruction
from brainfoundry.evaluate.adapters import Embeddings, ModelAdapter
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.evaluate.protocol import FoldSpec, TaskSkipped, aggregate, make_folds
from brainfoundry.evaluate.settings import EvalSettings
from brainfoundry.evaluate.table import tidy

BASELINE = "baseline"
BASELINE_METHODS = ("fc_alone",)


def folds_for(evalset: EvalSet, settings: EvalSettings) -> pd.DataFrame:
    """The fold table every model and baseline shares (subjects of the whole evaluation set)."""
    cv = settings.cv
    columns = [cv.stratify_by] if cv.stratify_by else []
    subjects = evalset.subject_table(columns)
    if cv.stratify_by and cv.stratify_by in subjects.columns and subjects[cv.stratify_by].isna().any():
        subjects[cv.stratify_by] = subjects[cv.stratify_by].fillna("unknown")
    spec = FoldSpec(n_folds=cv.n_folds, seeds=tuple(cv.seeds), group_by=cv.group_by, stratify_by=cv.stratify_by)
    return make_folds(subjects, spec)


def run_task(task: str, model: str, evalset: EvalSet, settings: EvalSettings, folds: pd.DataFrame | None = None,
             adapter: ModelAdapter | None = None, embeddings: Embeddings | None = None,
             folds_note: str | None = None, finetuned: tuple = ()) -> tuple[pd.DataFrame, dict]:
    """Rows of the metrics table for one model (or ``'baseline'``) and task, and its status record.

    ``folds_note`` is why the fold table is empty (e.g. too few subjects for the folds asked).
    """
    start = time.perf_counter()
    is_baseline = model == BASELINE
    notes: list[str] = list(embeddings.notes) if embeddings is not None else []
    if evalset.meta.get("length_note"):
        notes.append(evalset.meta["length_note"])
    try:
        if task in ("phenotype", "finetune") and (folds is None or folds.empty):
            raise TaskSkipped(f"no cross-validation folds: {folds_note or 'the fold table is missing'}")
        rows, task_notes = _dispatch(task, evalset, settings, folds, None if is_baseline else adapter,
                                     None if is_baseline else embeddings, model, finetuned)
        notes += task_notes
        status = "ok" if len(rows) else "skipped"
        if not len(rows) and not task_notes:
            notes.append("no rows were produced")
    except TaskSkipped as err:
        rows, status = pd.DataFrame(), "skipped"
        notes.append(str(err))
    # Fine-tuning is its own job but a phenotype method: its rows sit with the phenotype rows.
    table_task = "phenotype" if task == "finetune" else task
    table = tidy(rows, model, table_task, is_baseline) if len(rows) else \
        tidy(pd.DataFrame(columns=["fold", "seed", "n"]), model, table_task, is_baseline)
    if len(table) and "method" in table:
        # FC alone on a model's subjects (beside FC + embedding) is a baseline, though in the model's table.
        table.loc[table["method"].isin(BASELINE_METHODS), "is_baseline"] = True
    info = {"model": model, "task": task, "status": status, "notes": notes,
            "seconds": round(time.perf_counter() - start, 3), "n_rows": int(len(table))}
    return table, info


def _dispatch(task, evalset, settings, folds, adapter, emb, model, finetuned=()):
    level = settings.ci_level
    if task == "reconstruction":
        per_window, notes = reconstruction.run(evalset, settings, adapter)
        return _held_out_rows(per_window, level), notes
    if task == "forecasting":
        per_window, notes = forecasting.run(evalset, settings, adapter)
        if adapter is not None and len(per_window):
            per_window["method"] = per_window["method"].replace({"forecast": "future_masking"})
        return _held_out_rows(per_window, level), notes
    if model != BASELINE and emb is None and task in ("phenotype", "networks", "fingerprint"):
        raise TaskSkipped(f"model '{model}' has no embeddings (it cannot embed: see the embed step's notes)")
    if task == "phenotype":
        rows, notes = phenotype.run(evalset, settings, folds, adapter=adapter, embeddings=emb, finetuned=finetuned)
        if rows.empty:
            return rows, notes
        permuted = rows[rows["split"] == "permuted"]
        # Held-out and external-site rows are already aggregated (subject bootstrap).
        heldout = rows[rows["split"].isin(["heldout", "external"])]
        cv_rows = rows[~rows["split"].isin(["permuted", "heldout", "external"])]
        agg = aggregate(cv_rows, ["method", "target", "split", "metric"], level)
        perm_agg = aggregate(permuted.assign(fold="0"), ["method", "target", "split", "metric"], level) \
            if len(permuted) else permuted
        return pd.concat([cv_rows, agg, permuted, perm_agg, heldout], ignore_index=True), notes
    if task == "finetune":
        if adapter is None:
            raise TaskSkipped("fine-tuning applies to pretrained models (the FC baseline is in the phenotype task)"
                              if model == BASELINE else f"model '{model}' was not loaded (no checkpoint)")
        if not settings.finetune.enabled:
            raise TaskSkipped("evaluate.finetune.enabled is false")
        rows, notes = phenotype.run_finetune(evalset, settings, folds, adapter)
        if rows.empty:
            return rows, notes
        external = rows[rows["split"] == "external"]  # already aggregated (subject bootstrap)
        rows = rows[rows["split"] != "external"]
        agg = aggregate(rows, ["method", "target", "split", "metric"], level) if len(rows) else rows
        return pd.concat([rows, agg, external], ignore_index=True), notes
    if task == "networks":
        labels = evalset.networks
        if labels is None and evalset.meta.get("network_note"):
            raise TaskSkipped(f"no network labels: {evalset.meta['network_note']}")
        rows, notes = networks.run(evalset, settings, emb, labels, adapter=adapter)
        per = rows[rows["fold"] != "all"]
        agg = aggregate(per, ["method", "metric"], level)
        return pd.concat([per, agg, rows[rows["fold"] == "all"]], ignore_index=True), notes
    if task == "fingerprint":
        return fingerprint.run(evalset, settings, emb, settings.window)
    raise TaskSkipped(f"unknown task '{task}'")


def _held_out_rows(per_window: pd.DataFrame, level: float) -> pd.DataFrame:
    if per_window.empty:
        return per_window
    summ = reconstruction.summarize(per_window, level)
    summ["split"] = "heldout"
    summ.loc[summ["fold"] == "heldout", "fold"] = "0"
    return summ


def write_task_output(table: pd.DataFrame, info: dict, out: str | Path) -> None:
    from brainfoundry.evaluate.table import write_table
    from brainfoundry.io import write_json_atomic

    out = Path(out)
    write_table(table, out)
    write_json_atomic(out.with_suffix(".json"), info)


def network_labels(evalset: EvalSet, settings: EvalSettings, atlas_image: str | None,
                   labels_tsv: str | None = None) -> np.ndarray | None:
    """Labels TSV network column when present (already on the set), else the Schaefer majority vote.

    The vote is per label value of ``atlas_image``; the labels TSV (``index``, ``name``) maps the values
    to the series' parcel order. Without it, label values in ascending order must match the parcels.
    """
    if evalset.networks is not None and (np.asarray(evalset.networks) != "").any():
        return evalset.networks
    if not (settings.network_atlas and settings.network_atlas_labels and atlas_image):
        return None
    votes = networks.majority_vote_networks(atlas_image, settings.network_atlas, settings.network_atlas_labels)
    names = list(evalset.parcel_names)
    if labels_tsv is not None and Path(labels_tsv).exists():
        from brainfoundry.runfiles import read_labels

        table = read_labels(labels_tsv)
        if set(names) <= set(table["name"]):
            value_of = table.set_index("name")["index"].astype(int)
            by_value = votes.set_index("index")["network"]
            return by_value.reindex(value_of.reindex(names).to_numpy()).fillna("").to_numpy()
    if len(votes) != len(names):
        raise TaskSkipped(f"atlas image {atlas_image} has {len(votes)} parcels, the series {len(names)}")
    return votes["network"].to_numpy()
