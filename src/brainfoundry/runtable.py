"""The run table: one row per recording, the thing that drives every per-run rule.

Columns (the contract every entry point fills):

- ``run_id`` (index, unique): BIDS prefix such as ``sub-01_ses-1_task-rest_run-1``
- ``subject``, ``session`` (nullable), ``task``, ``run`` (nullable), ``dataset``, ``site`` (nullable)
- ``tr`` (seconds, float), ``bucket`` (int), ``split`` (train/val/test)
- ``bold``, ``mask``, ``confounds``: fMRIPrep derivatives files (raw/derivatives entry points)
- ``raw_bold``: the raw BIDS bold (raw entry point), ``timeseries_file`` (timeseries entry point)
- phenotypes: ``age``, ``sex``, ``diagnosis`` plus any other participants/phenotype columns, nulls allowed
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainfoundry.errors import ConfigError
from brainfoundry.splits import assign_splits, bucket_of

REQUIRED_COLUMNS = ("subject", "session", "task", "run", "dataset", "site", "tr")


def load_run_table(config: dict) -> pd.DataFrame:
    """Build (or read) the run table for the configured entry point, with buckets and splits."""
    if config.get("run_table"):
        table = pd.read_parquet(config["run_table"])
    else:
        entry = config["entry_point"]
        if entry in ("raw", "derivatives"):
            from brainfoundry.bids import index_dataset

            table = index_dataset(config)
        elif entry == "timeseries":
            from brainfoundry.timeseries import index_timeseries

            table = index_timeseries(config)
        else:  # the schema stops this earlier; keep the message for API users
            raise ConfigError("entry_point", f"unknown entry point {entry!r}")
    return finalize(table, config)


def finalize(table: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Check the contract columns, then add bucket and split (both per subject, stable)."""
    if "run_id" in table.columns:
        table = table.set_index("run_id")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError("run_table", f"run table lacks required columns {missing}")
    if not table.index.is_unique:
        dup = table.index[table.index.duplicated()].tolist()[:5]
        raise ConfigError("run_table", f"duplicate run ids {dup}")
    shards = config.get("shards", {})
    n_buckets = int(shards.get("n_buckets", 4))
    ratios = shards.get("split_ratios", {"train": 0.7, "val": 0.15, "test": 0.15})
    holdout = shards.get("holdout_sites", [])
    seed = int(config.get("seed", 0))
    table = table.copy()
    table["subject"] = table["subject"].astype(str)
    table["bucket"] = [bucket_of(s, n_buckets) for s in table["subject"]]
    sites = {s: (None if pd.isna(site) else site) for s, site in zip(table["subject"], table["site"])}
    # shards.fill_empty_splits (schema default false, templates true): no empty split with >= 3 subjects.
    splits = assign_splits(sites, seed, ratios, sites, holdout, fill_empty=bool(shards.get("fill_empty_splits")))
    table["split"] = table["subject"].map(splits)
    table.index.name = "run_id"
    return table.sort_index()


def write_run_table(table: pd.DataFrame, path: str | Path, log: str | Path | None = None) -> None:
    """Write the run table (parquet, atomically); ``log`` gets a one-line summary."""
    from brainfoundry.io import atomic_path, write_text_atomic

    with atomic_path(path) as tmp:
        table.reset_index().to_parquet(tmp, index=False)
    if log is not None:
        write_text_atomic(log, f"{path}: {len(table)} runs of {table['subject'].nunique()} subjects\n")
