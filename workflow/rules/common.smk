# Shared state for all rule files (the validated config, the run table, the output layout).
import json
from pathlib import Path

from brainfoundry.workflow.common import Layout, load_run_table


LAYOUT = Layout.from_config(config)
RUNS = load_run_table(config)
ENTRY = config["entry_point"]
RESULTS = LAYOUT.results
SPACE = LAYOUT.space
ATLAS = LAYOUT.atlas

# Our own step image and conda env (the fMRIPrep rule uses the upstream image from config instead).
BF_IMAGE = config.get("containers", {}).get("cpu", "docker://brainfoundry/brainfoundry-cpu:0.1.0")
# CUDA torch for pretraining on GPU nodes (containers/Dockerfile.gpu); runs on CPU too.
BF_GPU_IMAGE = config.get("containers", {}).get("gpu", "docker://brainfoundry/brainfoundry-gpu:0.1.0")
BF_ENV = "../../envs/brainfoundry.yaml"


# Rows as dicts, built once: input functions run per job, and RUNS.loc makes a new Series each call
# (~0.35 ms; three lookups per run added ~10 s to DAG building at 10,000 runs, benchmarks/bench_dag.py).
RUN_ROWS = RUNS.to_dict("index")


def run_row(wildcards):
    """The run table row of the job's run (a dict: column -> value)."""
    return RUN_ROWS[wildcards.run_id]


def per_run(pattern):
    """Every run's path for a per-run pattern with {subject} and {run_id}."""
    return [pattern.format(subject=subject, run_id=run_id) for run_id, subject in zip(RUNS.index, RUNS["subject"])]


def runs_in_bucket(bucket):
    return RUNS[RUNS["bucket"] == int(bucket)]


def buckets():
    return sorted(int(b) for b in RUNS["bucket"].unique())


def all_targets():
    targets = [LAYOUT.run_table, LAYOUT.dataset_description]
    targets += per_run(LAYOUT.timeseries)
    targets += per_run(LAYOUT.pfc)
    targets += [LAYOUT.manifest, LAYOUT.norm_stats]
    targets += atlas_targets(LAYOUT, ENTRY) + qc_figure_targets(LAYOUT, RUNS, ENTRY, config)  # atlas/parcellate.smk
    targets += PRETRAIN_TARGETS  # workflow/rules/pretrain.smk
    targets += EVALUATION_TARGETS  # workflow/rules/evaluate.smk
    return targets
