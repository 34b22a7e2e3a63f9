"""The tidy metrics table, its merge, the verdict "did pretraining help", and the report's plots.

Columns of ``metrics.parquet`` / ``metrics.tsv``:
model, method, is_baseline, task, target, condition, split, fold, seed, metric, value, ci_low, ci_high, n,
n_values. Per-fold/per-seed rows have empty intervals; aggregated rows have ``fold`` 'all' (mean over
folds x seeds, or over held-out windows with a subject bootstrap) or 'pooled' (out-of-fold predictions
pooled per seed, averaged over seeds).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from brainfoundry.io import atomic_path, write_text_atomic

COLUMNS = ["model", "method", "is_baseline", "task", "target", "condition", "split", "fold", "seed", "metric",
           "value", "ci_low", "ci_high", "n", "n_values"]
# Primary metric per task and whether larger is better; what the verdict compares.
PRIMARY = {"reconstruction": ("r2", True), "forecasting": ("r2", True), "networks": ("balanced_accuracy", True),
           "fingerprint": ("accuracy", True)}
PHENOTYPE_PRIMARY = {"auc": True, "mae": False}
LOWER_IS_BETTER = {"mse", "mae"}


def tidy(rows: pd.DataFrame, model: str, task: str, is_baseline: bool) -> pd.DataFrame:
    """Give task rows every column of the table, in order, with the model/task filled in."""
    rows = rows.copy()
    rows["model"] = model
    rows["task"] = task
    rows["is_baseline"] = bool(is_baseline)
    for col in COLUMNS:
        if col not in rows.columns:
            rows[col] = np.nan if col in ("ci_low", "ci_high", "value", "n_values") else ""
    rows["fold"] = rows["fold"].astype(str)
    rows["seed"] = pd.to_numeric(rows["seed"], errors="coerce").fillna(-1).astype(int)
    for col in ("target", "condition", "split", "method"):
        rows[col] = rows[col].fillna("").astype(str)
    rows["n"] = pd.to_numeric(rows["n"], errors="coerce").fillna(0).astype(int)
    return rows[COLUMNS]


def write_table(table: pd.DataFrame, parquet: str | Path, tsv: str | Path | None = None) -> None:
    with atomic_path(parquet) as tmp:
        table.to_parquet(tmp, index=False)
    if tsv is not None:
        with atomic_path(tsv) as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def merge(task_files: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate per model x task tables and their status sidecars (``.json`` beside each parquet)."""
    tables, status = [], []
    for path in task_files:
        path = Path(path)
        table = pd.read_parquet(path)
        if len(table):
            tables.append(table)
        side = path.with_suffix(".json")
        if side.exists():
            info = json.loads(side.read_text())
            status.append({"model": info.get("model"), "task": info.get("task"), "status": info.get("status"),
                           "seconds": info.get("seconds"), "notes": " | ".join(info.get("notes", []))})
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COLUMNS)
    return table[COLUMNS], pd.DataFrame(status, columns=["model", "task", "status", "seconds", "notes"])


def summary_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One aggregated row per model/method/target/condition/split/metric (permutations left out).

    The mean over folds x seeds (fold 'all') when it is defined, else the pooled out-of-fold value
    (per-fold AUC or r is undefined when test folds hold one class or two subjects, as on the demo).
    """
    agg = table[table["fold"].isin(["all", "pooled"]) & (table["seed"] < 0) | (table["fold"] == "all")]
    agg = agg[agg["split"] != "permuted"]
    keys = ["model", "method", "task", "target", "condition", "split", "metric"]
    rank = np.where((agg["fold"] == "all") & np.isfinite(agg["value"].to_numpy(float)), 0,
                    np.where(agg["fold"] == "pooled", 1, 2))
    agg = agg.assign(_rank=rank).sort_values("_rank", kind="stable")
    return agg.drop_duplicates(keys).drop(columns="_rank").sort_index()


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """Summary rows (`summary_rows`) of each task's primary metric(s)."""
    agg = summary_rows(table)
    keep = []
    for _, row in agg.iterrows():
        if row["task"] == "phenotype":
            keep.append(row["metric"] in PHENOTYPE_PRIMARY)
        else:
            keep.append(row["metric"] == PRIMARY.get(row["task"], ("", True))[0])
    return agg[np.array(keep, bool)] if len(agg) else agg


def verdict(table: pd.DataFrame) -> pd.DataFrame:
    """Best model method vs best baseline per task/target/condition on the primary metric.

    'better' / 'worse' only when the intervals do not overlap; otherwise 'no clear difference'.
    """
    head = headline(table)
    head = head[head["method"] != "chance"]
    out = []
    order = {t: i for i, t in enumerate(("phenotype", "reconstruction", "forecasting", "networks", "fingerprint"))}
    head = head.assign(_order=head["task"].map(order).fillna(len(order))).sort_values(["_order", "target", "condition"])
    for key, grp in head.groupby(["task", "target", "condition", "metric"], sort=False):
        task, target, condition, metric = key
        higher = metric not in LOWER_IS_BETTER
        base = grp[grp["is_baseline"]]
        for model, mgrp in grp[~grp["is_baseline"]].groupby("model"):
            if base.empty:
                continue
            # Subjects outside the pretraining split are the strict scope ('cv_heldout'): a label-using model
            # has no other, and a self-supervised one saw the others' series. Compare on it when it exists.
            # An external-site split, where configured, is stricter still (no site of it trained anything).
            if (mgrp["split"] == "external").any():
                mgrp = mgrp[mgrp["split"] == "external"]
            elif (mgrp["split"] == "cv_heldout").any():
                mgrp = mgrp[mgrp["split"] == "cv_heldout"]
            b = base[base["split"].isin(mgrp["split"].unique())]
            b = b if len(b) else base
            best_m = mgrp.loc[mgrp["value"].idxmax() if higher else mgrp["value"].idxmin()]
            best_b = b.loc[b["value"].idxmax() if higher else b["value"].idxmin()]
            m_lo, m_hi, b_lo, b_hi = best_m["ci_low"], best_m["ci_high"], best_b["ci_low"], best_b["ci_high"]
            delta = (best_m["value"] - best_b["value"]) * (1 if higher else -1)
            if np.isfinite([m_lo, m_hi, b_lo, b_hi]).all() and (m_lo > b_hi or m_hi < b_lo):
                word = "better" if delta > 0 else "worse"
            else:
                word = "no clear difference"
            out.append({"task": task, "target": target, "condition": condition, "metric": metric, "model": model,
                        "split": ",".join(sorted(mgrp["split"].unique())),
                        "model_method": best_m["method"], "model_value": best_m["value"], "model_ci": _ci(m_lo, m_hi),
                        "baseline_method": best_b["method"], "baseline_value": best_b["value"],
                        "baseline_ci": _ci(b_lo, b_hi), "delta": delta, "verdict": word})
    return pd.DataFrame(out)


def _ci(lo, hi) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else ""


# -- report artefacts -------------------------------------------------------------------------------
def write_html(table: pd.DataFrame, status: pd.DataFrame, path: str | Path, title: str = "brainfoundry evaluation") -> None:
    """One self-contained page: the verdict first, then every aggregated number, then skipped tasks."""
    ver = verdict(table)
    agg = table[table["fold"].isin(["all", "pooled"])].sort_values(["task", "target", "condition", "metric", "model", "method"])
    colour = {"better": "#c8f0c8", "worse": "#f6c8c8", "no clear difference": "#eeeeee"}

    def frame(df: pd.DataFrame, colour_col: str | None = None) -> str:
        if df.empty:
            return "<p><em>none</em></p>"
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        body = []
        for _, row in df.iterrows():
            style = f' style="background:{colour.get(row[colour_col], "#fff")}"' if colour_col else ""
            cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
            body.append(f"<tr{style}>{cells}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    skipped = status[status["status"] != "ok"] if len(status) else status
    notes = status[(status["notes"].astype(str) != "")] if len(status) else status
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:12px;margin-bottom:1.5em}}
td,th{{border:1px solid #bbb;padding:2px 6px;text-align:right}} th{{background:#ddd}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Did pretraining help?</h2>
<p>Each model's best method against the best baseline on the same folds or held-out windows, on the task's primary
metric (higher is better except MAE/MSE). "better"/"worse" only where the 95 % intervals do not overlap.
Phenotypes are judged on split "cv_heldout" where it exists: the same cross-validation folds, scored only on
subjects outside the pretraining split (whose series, or for the LCM labels, no model saw); split "cv" scores
every subject.</p>
{frame(ver, "verdict")}
<h2>All aggregated metrics</h2>
<p>fold "all": mean over folds x seeds (t interval) or held-out windows (subject bootstrap); fold "pooled":
out-of-fold predictions pooled per seed. Split "permuted": shuffled labels, the chance level of the protocol.</p>
{frame(agg[[c for c in COLUMNS if c not in ("is_baseline",)]])}
<h2>Tasks skipped or with notes</h2>
{frame(skipped) if len(skipped) else "<p>No task was skipped.</p>"}
{frame(notes) if len(notes) else ""}
</body></html>"""
    write_text_atomic(path, page)


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def plot_task(table: pd.DataFrame, task: str, path: str | Path) -> None:
    """Point + interval per model/method, baselines in grey, one panel per target/condition/metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = summary_rows(table)
    agg = agg[agg["task"] == task]
    panels = list(agg.groupby(["target", "condition", "metric"], sort=True))
    if not panels:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.text(0.5, 0.5, f"{task}: no results (see the skipped tasks table)", ha="center", va="center")
        ax.axis("off")
    else:
        ncol = min(3, len(panels))
        nrow = int(np.ceil(len(panels) / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 0.5 + 0.32 * max(len(g) for _, g in panels) * nrow + 1.2 * nrow),
                                 squeeze=False)
        for ax, ((target, condition, metric), grp) in zip(axes.ravel(), panels):
            grp = grp.sort_values(["is_baseline", "model", "method"])
            labels = [f"{m}: {me}" + (f" ({sp})" if sp not in ("cv", "heldout", "") else "") + (" [pooled]" if f == "pooled" else "")
                      for m, me, sp, f in zip(grp["model"], grp["method"], grp["split"], grp["fold"])]
            y = np.arange(len(grp))
            vals = grp["value"].to_numpy(float)
            lo = np.where(np.isfinite(grp["ci_low"]), vals - grp["ci_low"].to_numpy(float), 0)
            hi = np.where(np.isfinite(grp["ci_high"]), grp["ci_high"].to_numpy(float) - vals, 0)
            colours = ["#888888" if b else "#1f77b4" for b in grp["is_baseline"]]
            for yi, v, l, h, c in zip(y, vals, lo, hi, colours):
                ax.errorbar(v, yi, xerr=[[max(l, 0)], [max(h, 0)]], fmt="o", color=c, capsize=3)
            ax.set_yticks(y, labels, fontsize=8)
            ax.set_title(" ".join(x for x in (target, condition, metric) if x), fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        for ax in axes.ravel()[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{task} (blue: pretrained models, grey: baselines; 95 % intervals)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_verdict(table: pd.DataFrame, path: str | Path) -> None:
    """The answer at a glance: per task/target and model, best model method vs best baseline (primary metric).

    Each row shows the model's value and interval (coloured by the verdict) and the baseline's (grey)
    on the same axis; rows of one task share a panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ver = verdict(table)
    colour = {"better": "#2ca02c", "worse": "#d62728", "no clear difference": "#7f7f7f"}
    if ver.empty:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.text(0.5, 0.5, "No model/baseline pairs to compare yet (see the skipped tasks)", ha="center", va="center")
        ax.axis("off")
    else:
        groups = list(ver.groupby(["task", "metric"], sort=False))
        heights = [0.6 + 0.38 * len(g) for _, g in groups]
        fig, axes = plt.subplots(len(groups), 1, figsize=(8, sum(heights) + 0.6), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, ((task, metric), grp) in zip(axes[:, 0], groups):
            grp = grp.reset_index(drop=True)
            y = np.arange(len(grp))[::-1]
            for yi, row in zip(y, grp.itertuples()):
                for value, ci, dy, col, marker in ((row.baseline_value, row.baseline_ci, -0.15, "#aaaaaa", "s"),
                                                   (row.model_value, row.model_ci, 0.15, colour[row.verdict], "o")):
                    lo, hi = (float(v) for v in ci.strip("[]").split(",")) if ci else (value, value)
                    ax.errorbar(value, yi + dy, xerr=[[max(value - lo, 0)], [max(hi - value, 0)]], fmt=marker,
                                color=col, capsize=3, ms=5)
            labels = [f"{r.model} [{r.model_method}] vs {r.baseline_method}\n{' '.join(x for x in (r.target, r.condition) if x)}"
                      f"  -> {r.verdict}" for r in grp.itertuples()]
            ax.set_yticks(y, labels, fontsize=7)
            better = "higher" if metric not in LOWER_IS_BETTER else "lower"
            ax.set_title(f"{task}: {metric} ({better} is better; circle = model, square = best baseline)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle("Did pretraining help? Green: model better, red: worse, grey: intervals overlap", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_all(table: pd.DataFrame, out_dir: str | Path, tasks: Sequence[str]) -> list[Path]:
    out = []
    for task in tasks:
        path = Path(out_dir) / f"{task}.png"
        plot_task(table, task, path)
        out.append(path)
    return out
