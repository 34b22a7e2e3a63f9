# The run table for people and for the evaluation: results/bids_index/runs.parquet. Per-run rules look
# their inputs up in the in-memory RUNS (common.smk), never in this file, so re-indexing does not make
# every job out of date. The job writes the very table this job graph was built from (no second
# indexing that could disagree with it) and re-runs when that table's content changes (params).
from brainfoundry.workflow.bids import (
    __version__,
    dataset_description,
    source_description,
    table_hash,
    write_dataset_description,
    write_run_table,
)


localrules:
    bids_index,
    dataset_description,


rule bids_index:
    output:
        LAYOUT.run_table,
    params:
        runs_hash=table_hash(RUNS),
    log:
        f"{RESULTS}/logs/bids_index.log",
    run:
        write_run_table(RUNS, output[0], log=log[0])


# results/ as a BIDS-Derivatives dataset (pybids reads it with BIDSLayout(raw, derivatives=results)).
# Re-written when its content would change (params): brainfoundry's version, the images, the source.
rule dataset_description:
    input:
        source_description(config),
    output:
        LAYOUT.dataset_description,
    params:
        description=json.dumps(dataset_description(config, __version__, BF_IMAGE), sort_keys=True),
    log:
        f"{RESULTS}/logs/dataset_description.log",
    run:
        write_dataset_description(output[0], config, __version__, BF_IMAGE)
