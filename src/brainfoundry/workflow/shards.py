"""Helpers of ``workflow/rules/shards.smk``: one bucket's runs, their per-run paths, the shard settings."""

from __future__ import annotations

from brainfoundry.shards import bucket_rows_json, shard_config, write_bucket_runs


def bucket_paths(runs, bucket: int | str, pattern: str) -> list[str]:
    """Per-run paths (a pattern with ``{subject}`` and ``{run_id}``) of one bucket's runs."""
    rows = runs[runs["bucket"].astype(int) == int(bucket)]
    # zip, not iterrows (a Series per row): called per bucket and per input at DAG build (bench_dag.py).
    return [pattern.format(subject=subject, run_id=run_id) for run_id, subject in zip(rows.index, rows["subject"])]


__all__ = ["bucket_paths", "bucket_rows_json", "shard_config", "write_bucket_runs"]
