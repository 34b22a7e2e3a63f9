"""Downstream evaluation: tasks, baselines, the protocol, the tidy metrics table and the report pieces.

``brainfoundry evaluate <step>``:

- ``folds``    the fold table every model and baseline shares (``folds.parquet``);
- ``embed``    a model's embeddings of every evaluation run, computed once and cached (``.npz``);
- ``task``     one model (or ``baseline``) x one task -> rows of the metrics table (+ a status ``.json``);
- ``merge``    all task tables -> ``metrics.parquet``/``.tsv``, ``summary.html``, ``headline.html``/``.tsv``,
  the verdict and one plot per task;
- ``examples`` reconstruction and forecast plots of a held-out run;
- ``abide-fc`` the FC baseline on ABIDE PCP read directly from the ``.1D.gz`` files (no workflow).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from brainfoundry.errors import ConfigError

STEPS = ("folds", "embed", "task", "merge", "examples", "abide-fc")


def _settings(args):
    from brainfoundry.evaluate.settings import EvalSettings

    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as err:
        raise ConfigError("evaluate", f"--options is not JSON ({err})") from None
    return EvalSettings.from_dict(options)


def _evalset(args, settings):
    from brainfoundry.evaluate.dataset import load_shards

    evs = load_shards(args.shards, labels_tsv=getattr(args, "labels", None))
    evs = evs.restrict_length(settings.min_timepoints or settings.window)
    if getattr(args, "atlas_image", None) or evs.networks is None:
        from brainfoundry.evaluate.protocol import TaskSkipped
        from brainfoundry.evaluate.runner import network_labels

        try:
            evs.networks = network_labels(evs, settings, getattr(args, "atlas_image", None),
                                          getattr(args, "labels", None))
        except TaskSkipped as err:  # reported by the networks task; the other tasks do not need labels
            evs.networks = None
            evs.meta["network_note"] = str(err)
    return evs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainfoundry evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (the job's allocation)")
    sub = p.add_subparsers(dest="step", required=True)

    def common(sp, shards=True):
        if shards:
            sp.add_argument("--shards", required=True, help="shard directory (manifest.parquet, bucket-*.parquet)")
        sp.add_argument("--options", default="", help="the evaluate config section as JSON")
        return sp

    sp = common(sub.add_parser("folds", help="write the shared fold table"))
    sp.add_argument("--out", required=True)

    sp = common(sub.add_parser("embed", help="cache a model's embeddings of every evaluation run"))
    sp.add_argument("--model", required=True, help="model family (brainlm, brainmass, lcm; <family>_random_init: "
                    "its random-init control)")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", required=True)

    sp = common(sub.add_parser("task", help="one model (or 'baseline') x one task -> metrics rows"))
    sp.add_argument("--task", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--checkpoint", default=None)
    sp.add_argument("--embeddings", default=None)
    sp.add_argument("--folds", default=None)
    sp.add_argument("--labels", default=None, help="atlas labels TSV (network column)")
    sp.add_argument("--atlas-image", default=None, help="parcel atlas NIfTI for the Schaefer vote")
    sp.add_argument("--finetuned", action="append", default=[], metavar="MODEL_FILE",
                    help="an LCM model file from the trainer's pseudo-label fine-tuning (repeatable)")
    sp.add_argument("--out", required=True)

    sp = sub.add_parser("merge", help="merge task tables into the metrics table, summary and plots")
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--title", default="brainfoundry evaluation")
    sp.add_argument("--tasks", nargs="*", default=None, help="tasks to plot (one PNG each, even when empty)")
    sp.add_argument("--manifest", default=None, help="shard manifest: runs, subjects and splits for 'what ran'")
    sp.add_argument("--entry-point", default="", help="the workflow's entry point, for 'what ran'")
    sp.add_argument("--data", default="", help="the input data, for 'what ran'")

    sp = common(sub.add_parser("examples", help="reconstruction and forecast plots of a held-out run"))
    sp.add_argument("--model", required=True)
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out-reconstruction", required=True)
    sp.add_argument("--out-forecast", required=True)

    sp = sub.add_parser("abide-fc", help="FC baseline (ASD vs control, sex) on ABIDE PCP files directly")
    sp.add_argument("--root", required=True, help="folder with rois_cc200/ and the phenotype CSV")
    sp.add_argument("--atlas", default="cc200")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--targets", nargs="+", default=["diagnosis", "sex"])
    sp.add_argument("--n-folds", type=int, default=5)
    sp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sp.add_argument("--group-by", default="site", choices=["site", "subject", "auto"])
    sp.add_argument("--max-subjects", type=int, default=None)
    sp.add_argument("--n-permutations", type=int, default=0)
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # BLAS/OpenMP and torch threads = the job's allocation (Snakemake's {threads}): oversubscribed BLAS
    # threads spin and made small matmuls 4-40x slower on a busy 2-core machine.
    # threadpoolctl limits the libraries already loaded: load numpy's and scipy's BLAS first.
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:  # torch is only needed by model steps
            pass
        return _run(args)


def _run(args) -> int:
    if args.step == "folds":
        return _folds(args)
    if args.step == "embed":
        from brainfoundry.evaluate.adapters import embed_runs, load_model, save_embeddings  # noqa: I001

        settings = _settings(args)
        evs = _evalset(args, settings)
        t0 = time.perf_counter()
        adapter = load_model(args.model, args.checkpoint, evs)
        emb = embed_runs(adapter, evs, max_windows=settings.max_windows_per_run, parcel_runs=settings.network_runs)
        save_embeddings(emb, args.out)
        print(f"{args.model}: embedded {len(emb.run_ids)} runs (D={emb.pooled.shape[1]}) in "
              f"{time.perf_counter() - t0:.1f}s -> {args.out}")
        for note in emb.notes:
            print(f"note: {note}")
        return 0
    if args.step == "task":
        return _task(args)
    if args.step == "merge":
        return _merge(args)
    if args.step == "examples":
        from brainfoundry.evaluate.adapters import load_model
        from brainfoundry.evaluate.examples import write_examples

        settings = _settings(args)
        evs = _evalset(args, settings)
        adapter = load_model(args.model, args.checkpoint, evs)
        write_examples(adapter, evs, settings, args.out_reconstruction, args.out_forecast)
        return 0
    if args.step == "abide-fc":
        from brainfoundry.evaluate.abide import main as abide_main

        return abide_main(args)
    return 2


def _folds(args) -> int:
    """The shared fold table; too few subjects/sites gives an empty table and the reason beside it."""
    import pandas as pd

    from brainfoundry.evaluate.protocol import TaskSkipped
    from brainfoundry.evaluate.runner import folds_for
    from brainfoundry.evaluate.table import write_table
    from brainfoundry.io import write_json_atomic

    settings = _settings(args)
    evs = _evalset(args, settings)
    try:
        folds = folds_for(evs, settings)
        info = {"status": "ok", "n_subjects": int(folds["subject"].nunique()), "group_by": folds["group_by"].iloc[0],
                "n_folds": settings.cv.n_folds, "seeds": settings.cv.seeds}
        print(f"folds: {info['n_subjects']} subjects, grouped by {info['group_by']}, "
              f"{settings.cv.n_folds} folds x {len(settings.cv.seeds)} seeds -> {args.out}")
    except TaskSkipped as err:
        folds = pd.DataFrame({"subject": pd.Series(dtype=str), "site": pd.Series(dtype=str),
                              "group": pd.Series(dtype=str), "group_by": pd.Series(dtype=str),
                              "seed": pd.Series(dtype=int), "fold": pd.Series(dtype=int)})
        info = {"status": "skipped", "reason": str(err)}
        print(f"folds: none ({err}); cross-validated tasks will be skipped", file=sys.stderr)
    write_table(folds, args.out)
    write_json_atomic(Path(args.out).with_suffix(".json"), info)
    return 0


def _task(args) -> int:
    from brainfoundry.evaluate.runner import BASELINE, run_task, write_task_output

    settings = _settings(args)
    evs = _evalset(args, settings)
    folds = folds_note = None
    if args.folds:
        import pandas as pd

        folds = pd.read_parquet(args.folds)
        side = Path(args.folds).with_suffix(".json")
        if side.exists():
            folds_note = json.loads(side.read_text()).get("reason")
    adapter = emb = None
    if args.model != BASELINE:
        from brainfoundry.evaluate.adapters import load_embeddings, load_model

        if args.embeddings:
            emb = load_embeddings(args.embeddings)
        if args.checkpoint:
            adapter = load_model(args.model, args.checkpoint, evs)
        elif args.task in ("reconstruction", "forecasting", "finetune"):
            raise ConfigError("evaluate", f"task {args.task} of model {args.model} needs --checkpoint")
    finetuned = []
    for path in args.finetuned:
        from brainfoundry.evaluate.families import load_adapter

        ft = load_adapter(args.model, path, evs)
        if not ft.finetuned_target:
            raise ConfigError("evaluate", f"{path} is not a fine-tuned model file (trainer mode 'finetune')")
        finetuned.append(ft)
    table, info = run_task(args.task, args.model, evs, settings, folds, adapter, emb, folds_note=folds_note,
                           finetuned=tuple(finetuned))
    write_task_output(table, info, args.out)
    word = "ok" if info["status"] == "ok" else "SKIPPED"
    print(f"{args.model} x {args.task}: {word}, {info['n_rows']} rows in {info['seconds']}s -> {args.out}")
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _merge(args) -> int:
    from brainfoundry.evaluate.settings import TASKS
    from brainfoundry.evaluate.table import (merge, plot_all, plot_verdict, what_ran, write_headline, write_html,
                                             write_table)

    out = Path(args.out_dir)
    table, status = merge(args.inputs)
    write_table(table, out / "metrics.parquet", out / "metrics.tsv")
    write_table(status, out / "status.parquet", out / "status.tsv")
    write_html(table, status, out / "summary.html", title=args.title)
    tasks = args.tasks if args.tasks else [t for t in TASKS if t in set(table["task"]) | set(status["task"])]
    plot_all(table, out / "plots", tasks)
    plot_verdict(table, out / "verdict.png")
    write_headline(table, out / "headline.html", out / "headline.tsv",
                   what_ran(args.manifest, args.entry_point, args.data), out / "verdict.png")
    print(f"merged {len(args.inputs)} task tables: {len(table)} rows -> {out / 'metrics.parquet'}")
    return 0
