"""The tidy metrics table, its merge, the verdict "did pretraining help", and the report's plots.

Columns of ``metrics.parquet`` / ``metrics.tsv``:
model, method, is_baseline, task, target, condition, split, fold, seed, metric, value, ci_low, ci_high, n,
n_values. Per-fold/per-seed rows have empty intervals; aggregated rows have ``fold`` 'all' (mean over
folds x seeds, or over held-out windows with a subject bootstrap) or 'pooled' (out-of-fold predictions
pooled per seed, averaged over seeds).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

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
# A model's random-init control (same architecture and training, no pretraining) is the model named
# "<model>_random_init" in the table, on the same tasks, folds and seeds; shown beside its model.
CONTROL_SUFFIX = "_random_init"
NO_INTERVAL = "no interval"
NO_CONTROL = "no control run"
# Chance where no task row gives it: an uninformative score's AUC, the mean predictor's R².
THEORETICAL_CHANCE = {"auc": (0.5, "chance (AUC 0.5)"), "r2": (0.0, "mean predictor (R² 0)")}


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


def is_control(model: str) -> bool:
    return str(model).endswith(CONTROL_SUFFIX)


def verdict(table: pd.DataFrame) -> pd.DataFrame:
    """Best model method vs best baseline per task/target/condition on the primary metric.

    'better' / 'worse' only when the intervals do not overlap; 'no interval' when either has none (one
    test subject, a single fold); otherwise 'no clear difference'. Beside each model: its random-init
    control (``<model>_random_init``, same method where it has it, same split), the n of each, and the
    chance level (`chance_level`).
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
        models = grp[~grp["is_baseline"]]
        controls = models[models["model"].map(is_control)]
        for model, mgrp in models[~models["model"].map(is_control)].groupby("model"):
            if base.empty:
                continue
            # Subjects outside the pretraining split are the strict scope ('cv_heldout'): a label-using model
            # has no other, and a self-supervised one saw the others' series. Compare on it when it exists.
            # An external-site split, where configured, is stricter still (no site of it trained anything).
            if (mgrp["split"] == "external").any():
                mgrp = mgrp[mgrp["split"] == "external"]
            elif (mgrp["split"] == "cv_heldout").any():
                mgrp = mgrp[mgrp["split"] == "cv_heldout"]
            splits = mgrp["split"].unique()
            b = base[base["split"].isin(splits)]
            b = b if len(b) else base
            best_m = mgrp.loc[mgrp["value"].idxmax() if higher else mgrp["value"].idxmin()]
            best_b = b.loc[b["value"].idxmax() if higher else b["value"].idxmin()]
            m_lo, m_hi, b_lo, b_hi = best_m["ci_low"], best_m["ci_high"], best_b["ci_low"], best_b["ci_high"]
            delta = (best_m["value"] - best_b["value"]) * (1 if higher else -1)
            if not np.isfinite([m_lo, m_hi, b_lo, b_hi]).all():
                word = NO_INTERVAL
            elif m_lo > b_hi or m_hi < b_lo:
                word = "better" if delta > 0 else "worse"
            else:
                word = "no clear difference"
            ctrl = controls[(controls["model"] == f"{model}{CONTROL_SUFFIX}") & controls["split"].isin(splits)]
            same = ctrl[ctrl["method"] == best_m["method"]]
            ctrl = same if len(same) else ctrl
            best_c = ctrl.loc[ctrl["value"].idxmax() if higher else ctrl["value"].idxmin()] if len(ctrl) else None
            chance, chance_source = chance_level(table, task, target, condition, metric)
            out.append({"task": task, "target": target, "condition": condition, "metric": metric, "model": model,
                        "split": ",".join(sorted(splits)),
                        "model_method": best_m["method"], "model_value": best_m["value"], "model_ci": _ci(m_lo, m_hi),
                        "model_n": int(best_m["n"]),
                        "baseline_method": best_b["method"], "baseline_value": best_b["value"],
                        "baseline_ci": _ci(b_lo, b_hi), "baseline_n": int(best_b["n"]),
                        "control_method": "" if best_c is None else best_c["method"],
                        "control_value": np.nan if best_c is None else best_c["value"],
                        "control_ci": "" if best_c is None else _ci(best_c["ci_low"], best_c["ci_high"]),
                        "control_n": 0 if best_c is None else int(best_c["n"]),
                        "chance": chance, "chance_source": chance_source, "delta": delta, "verdict": word})
    return pd.DataFrame(out)


def chance_level(table: pd.DataFrame, task: str, target: str, condition: str, metric: str) -> tuple[float, str]:
    """The chance level of one comparison and where it comes from.

    A task's own 'chance' rows (most frequent network, 1/k, 1/n identification) first, then the
    shuffled-label ('permuted') score of the protocol, then the theoretical value (AUC 0.5, R² 0 for the
    mean predictor); NaN where none applies (MAE of a continuous target without permutations).
    """
    same = table[(table["task"] == task) & (table["target"] == target) & (table["metric"] == metric)]
    rows = same[(same["method"] == "chance") & (same["condition"] == condition)]
    if len(rows) and np.isfinite(rows["value"].to_numpy(float)).any():
        return float(np.nanmean(rows["value"].to_numpy(float))), "chance rows of the task"
    if metric in THEORETICAL_CHANCE:
        return THEORETICAL_CHANCE[metric]
    perm = same[(same["split"] == "permuted") & same["fold"].isin(["all", "pooled"])]
    perm = perm[perm["is_baseline"]] if perm["is_baseline"].any() else perm
    values = perm["value"].to_numpy(float)
    if np.isfinite(values).any():
        return float(np.nanmean(values)), "shuffled labels"
    return float("nan"), ""


def _ci(lo, hi) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else ""


# -- report artefacts -------------------------------------------------------------------------------
HEADLINE_COLUMNS = ["task", "target", "condition", "metric", "model", "model_value", "model_interval", "model_n",
                    "baseline", "baseline_value", "baseline_interval", "baseline_n", "control", "control_value",
                    "control_interval", "control_n", "chance", "verdict"]


def headline_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The headline table: each model beside its strongest baseline and its random-init control.

    One row per verdict comparison; intervals as text ("no interval" where there is none), the control
    columns "no control run" where the table has no ``<model>_random_init`` rows.
    """
    ver = verdict(table)
    rows = []
    for r in ver.itertuples():
        has_control = bool(r.control_method)
        rows.append({"task": r.task, "target": r.target, "condition": r.condition, "metric": r.metric,
                     "model": f"{r.model} [{r.model_method}]", "model_value": r.model_value,
                     "model_interval": r.model_ci or NO_INTERVAL, "model_n": r.model_n,
                     "baseline": r.baseline_method, "baseline_value": r.baseline_value,
                     "baseline_interval": r.baseline_ci or NO_INTERVAL, "baseline_n": r.baseline_n,
                     "control": f"{r.model}{CONTROL_SUFFIX} [{r.control_method}]" if has_control else NO_CONTROL,
                     "control_value": r.control_value,
                     "control_interval": (r.control_ci or NO_INTERVAL) if has_control else "",
                     "control_n": r.control_n if has_control else "",
                     "chance": r.chance, "verdict": r.verdict})
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


def what_ran(manifest: str | Path | None, entry_point: str = "", data: str = "") -> dict:
    """What the evaluated run was made of: entry point, data, runs and subjects per split (the manifest)."""
    info = {"entry_point": entry_point, "data": data}
    if manifest is None or not Path(manifest).exists():
        return info
    man = pd.read_parquet(manifest, columns=None)
    info["n_runs"] = len(man)
    info["n_subjects"] = int(man["subject"].nunique()) if "subject" in man else 0
    if "site" in man and man["site"].notna().any():
        info["n_sites"] = int(man["site"].dropna().astype(str).replace("", np.nan).dropna().nunique())
    if "split" in man:
        info["splits"] = {str(split): {"runs": len(g), "subjects": int(g["subject"].nunique())}
                          for split, g in man.groupby("split", sort=True)}
    return info


def _what_ran_text(info: Mapping) -> list[str]:
    lines = [f"entry point: {info.get('entry_point') or '?'}" + (f"; data: {info['data']}" if info.get("data") else "")]
    if "n_runs" in info:
        sites = f" at {info['n_sites']} sites" if info.get("n_sites") else ""
        lines.append(f"{info['n_runs']} runs of {info['n_subjects']} subjects{sites}")
    if info.get("splits"):
        lines.append("splits: " + ", ".join(f"{k} {v['runs']} runs / {v['subjects']} subjects"
                                            for k, v in info["splits"].items()))
    return lines


def write_headline(table: pd.DataFrame, html_path: str | Path, tsv_path: str | Path,
                   info: Mapping | None = None, verdict_png: str | Path | None = None) -> pd.DataFrame:
    """``headline.tsv`` (the table) and ``headline.html`` (what ran, the table, the verdict plot), atomically.

    The HTML is a standalone page (the plot inlined as a data URI) that the report's landing page embeds
    as it is: Snakemake's ``embeddedimage`` directive does not inline, and a file link breaks on a copy.
    """
    frame = headline_frame(table)
    with atomic_path(tsv_path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, float_format="%.4g")
    colour = {"better": "#c8f0c8", "worse": "#f6c8c8", "no clear difference": "#eeeeee", NO_INTERVAL: "#fff4d6"}
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in frame.columns)
    body = "".join(f'<tr style="background:{colour.get(r["verdict"], "#fff")}">'
                   + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for _, r in frame.iterrows())
    table_html = (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if len(frame)
                  else "<p><em>No model/baseline pair was scored (see status.tsv for the skipped tasks).</em></p>")
    ran = "".join(f"<li>{html.escape(line)}</li>" for line in _what_ran_text(info or {}))
    plot = ""
    if verdict_png is not None and Path(verdict_png).exists():
        data = base64.b64encode(Path(verdict_png).read_bytes()).decode()
        plot = (f'<p>The verdict plot: numbers, n and the dotted chance line in each panel.</p>'
                f'<img alt="verdict" style="max-width:100%" src="data:image/png;base64,{data}">')
    page = f"""<!doctype html>
<meta charset="utf-8"><title>brainfoundry headline</title>
<div class="bf-headline">
<style>.bf-headline{{font-family:sans-serif}} .bf-headline table{{border-collapse:collapse;font-size:12px}}
.bf-headline td,.bf-headline th{{border:1px solid #bbb;padding:2px 6px;text-align:right}}
.bf-headline th{{background:#ddd}}</style>
<h2>What ran</h2><ul>{ran}</ul>
<h2>Did pretraining help?</h2>
<p>Each model's best method beside the strongest baseline and the model's random-init control on the same folds
or held-out windows, primary metric of the task (higher is better except MAE/MSE), 95 % intervals, n scored
subjects. "better"/"worse" only where the model's and the baseline's intervals do not overlap; "no interval"
where either has none (e.g. one test subject): no verdict can be drawn there.</p>
{table_html}
{plot}
</div>
"""
    write_text_atomic(html_path, page)
    return frame


def format_headline(tsv_path: str | Path) -> str:
    """The headline table as console text (read from ``headline.tsv``, never recomputed)."""
    frame = pd.read_csv(tsv_path, sep="\t", keep_default_na=False)
    if frame.empty:
        return "No model/baseline pair was scored (see status.tsv for the skipped tasks)."

    def num(v) -> str:
        return f"{float(v):.3f}" if str(v) not in ("", "nan") else "-"

    lines = []
    for r in frame.itertuples():
        what = " ".join(x for x in (r.task, str(r.target), str(r.condition), r.metric) if x)
        control = (f"{r.control} {num(r.control_value)} {r.control_interval}" if r.control != NO_CONTROL
                   else NO_CONTROL)
        lines.append(f"{what}: {r.model} {num(r.model_value)} {r.model_interval} (n={r.model_n}) | "
                     f"baseline {r.baseline} {num(r.baseline_value)} {r.baseline_interval} (n={r.baseline_n}) | "
                     f"control {control} | chance {num(r.chance)} -> {r.verdict}")
    return "\n".join(lines)


def write_html(table: pd.DataFrame, status: pd.DataFrame, path: str | Path, title: str = "brainfoundry evaluation") -> None:
    """One self-contained page: the verdict first, then every aggregated number, then skipped tasks."""
    ver = verdict(table)
    agg = table[table["fold"].isin(["all", "pooled"])].sort_values(["task", "target", "condition", "metric", "model", "method"])
    colour = {"better": "#c8f0c8", "worse": "#f6c8c8", "no clear difference": "#eeeeee", NO_INTERVAL: "#fff4d6"}

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
metric (higher is better except MAE/MSE). "better"/"worse" only where the 95 % intervals do not overlap;
"no interval" where either number has none (e.g. one test subject). Controls are the models named *_random_init.
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


def print_headline(tsv_path: str | Path, report_path: str | Path, out=None) -> bool:
    """The end of a run on the console: the headline table as written, where to read more. False if absent."""
    tsv_path = Path(tsv_path)
    if not tsv_path.exists():
        return False
    html_path = tsv_path.with_suffix(".html")
    report = Path(report_path)
    where = (f"Report: {report}" if report.exists()
             else f"Report: snakemake --report {report} (same options as this run) writes it")
    print(f"\nDid pretraining help? ({tsv_path})\n{format_headline(tsv_path)}\nHeadline page: {html_path}\n{where}",
          file=out)
    return True


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
            colours = ["#888888" if b else "#9467bd" if is_control(m) else "#1f77b4"
                       for b, m in zip(grp["is_baseline"], grp["model"])]
            for yi, v, l, h, c in zip(y, vals, lo, hi, colours):
                ax.errorbar(v, yi, xerr=[[max(l, 0)], [max(h, 0)]], fmt="o", color=c, capsize=3)
            ax.set_yticks(y, labels, fontsize=8)
            ax.set_title(" ".join(x for x in (target, condition, metric) if x), fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        for ax in axes.ravel()[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{task} (blue: pretrained models, purple: random-init controls, grey: baselines; "
                     "95 % intervals)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_verdict(table: pd.DataFrame, path: str | Path) -> None:
    """The answer at a glance: per task/target and model, best model method vs best baseline (primary metric).

    Each row shows the model's value and interval (coloured by the verdict), its random-init control
    (open diamond, when run) and the baseline's (grey square), each with its number and n; the dotted
    line of a panel is the chance level (`chance_level`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ver = verdict(table)
    colour = {"better": "#2ca02c", "worse": "#d62728", "no clear difference": "#7f7f7f", NO_INTERVAL: "#e6a000"}
    if ver.empty:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.text(0.5, 0.5, "No model/baseline pairs to compare yet (see the skipped tasks)", ha="center", va="center")
        ax.axis("off")
    else:
        groups = list(ver.groupby(["task", "metric"], sort=False))
        heights = [0.8 + 0.62 * len(g) for _, g in groups]
        fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, ((task, metric), grp) in zip(axes[:, 0], groups):
            grp = grp.reset_index(drop=True)
            y = np.arange(len(grp))[::-1]
            for yi, row in zip(y, grp.itertuples()):
                points = [(row.baseline_value, row.baseline_ci, row.baseline_n, -0.25, "#aaaaaa", "s", "baseline"),
                          (row.model_value, row.model_ci, row.model_n, 0.25, colour[row.verdict], "o", "model")]
                if row.control_method:
                    points.append((row.control_value, row.control_ci, row.control_n, 0.0, "#555555", "D", "control"))
                for value, ci, n, dy, col, marker, _ in points:
                    lo, hi = (float(v) for v in ci.strip("[]").split(",")) if ci else (value, value)
                    ax.errorbar(value, yi + dy, xerr=[[max(value - lo, 0)], [max(hi - value, 0)]], fmt=marker,
                                color=col, capsize=3, ms=5, mfc="none" if marker == "D" else col)
                    label = f"{value:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if ci else f" ({NO_INTERVAL})") + f" n={n}"
                    ax.annotate(label, (hi, yi + dy), xytext=(5, 0), textcoords="offset points", fontsize=6,
                                va="center", color="#333333")
            chance = grp["chance"].to_numpy(float)
            if np.isfinite(chance).any():
                level = float(np.nanmean(chance))
                ax.axvline(level, ls=":", color="k", lw=1)
                ax.annotate(f"chance {level:.3g}", (level, y.max() + 0.45), fontsize=6, ha="left", va="bottom")
            labels = [f"{r.model} [{r.model_method}] vs {r.baseline_method}\n{' '.join(x for x in (r.target, r.condition) if x)}"
                      f"  -> {r.verdict}" + ("" if r.control_method else f" ({NO_CONTROL})") for r in grp.itertuples()]
            ax.set_yticks(y, labels, fontsize=7)
            ax.set_ylim(-0.7, len(grp) - 0.1)
            ax.margins(x=0.35)
            better = "higher" if metric not in LOWER_IS_BETTER else "lower"
            ax.set_title(f"{task}: {metric} ({better} is better; circle = model, diamond = random-init control, "
                         f"square = best baseline, dotted = chance)", fontsize=7)
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle("Did pretraining help? Green: model better, red: worse, grey: intervals overlap, "
                     "orange: no interval", fontsize=9)
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
