# Shards: one parquet file per subject bucket (bucket = stable hash of the subject id), then the
# manifest and the train-only normalization statistics over all shards.
# Adding a subject changes one bucket's rows only, so only that bucket's run table and shard are
# rewritten (the rows travel as a params value, which Snakemake compares; no job depends on the whole
# run-table file).

from brainfoundry.workflow.shards import bucket_paths, bucket_rows_json, shard_config, write_bucket_runs

SHARDS = {"row_group_size": 64, "compression": "zstd", **config.get("shards", {})}
SHARD_CONFIG_JSON = json.dumps(shard_config(config), sort_keys=True, default=str)


rule bucket_runs:
    output:
        LAYOUT.bucket_runs,
    params:
        rows=lambda wildcards: bucket_rows_json(RUNS, int(wildcards.bucket)),
    log:
        f"{RESULTS}/logs/shards/{ATLAS}/bucket-{{bucket}}.runs.log",
    benchmark:
        f"{RESULTS}/benchmarks/shards/{ATLAS}/bucket-{{bucket}}.runs.tsv",
    localrule: True
    run:
        write_bucket_runs(params.rows, output[0], log=log[0])


rule shard:
    input:
        runs=LAYOUT.bucket_runs,
        labels=LAYOUT.atlas_labels,
        timeseries=lambda wildcards: bucket_paths(RUNS, wildcards.bucket, LAYOUT.timeseries),
        sidecars=lambda wildcards: bucket_paths(RUNS, wildcards.bucket, LAYOUT.timeseries_json),
        pfc=lambda wildcards: bucket_paths(RUNS, wildcards.bucket, LAYOUT.pfc),
    output:
        LAYOUT.shard,
    params:
        # Patterns with {subject}/{run_id} for the CLI to fill per run; lambdas so Snakemake does not
        # try to format them with this job's wildcards.
        timeseries=lambda wildcards: LAYOUT.timeseries,
        sidecar=lambda wildcards: LAYOUT.timeseries_json,
        pfc=lambda wildcards: LAYOUT.pfc,
        row_group_size=SHARDS["row_group_size"],
        compression=SHARDS["compression"],
        timeseries_compression=SHARDS.get("timeseries_compression") or SHARDS["compression"],
        config_json=lambda wildcards: SHARD_CONFIG_JSON,  # holds braces (file patterns)
        atlas=ATLAS,
    log:
        f"{RESULTS}/logs/shards/{ATLAS}/bucket-{{bucket}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/shards/{ATLAS}/bucket-{{bucket}}.tsv",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry shard --runs {input.runs:q} --labels {input.labels:q} --atlas {params.atlas} "
        "--timeseries-pattern {params.timeseries:q} --sidecar-pattern {params.sidecar:q} "
        "--pfc-pattern {params.pfc:q} --bucket {wildcards.bucket} --row-group-size {params.row_group_size} "
        "--compression {params.compression} --timeseries-compression {params.timeseries_compression} "
        "--config-json {params.config_json:q} --out {output:q} > {log:q} 2>&1"


rule manifest:
    input:
        lambda wildcards: [LAYOUT.shard.format(bucket=b) for b in buckets()],
    output:
        manifest=LAYOUT.manifest,
        norm_stats=LAYOUT.norm_stats,
    log:
        f"{RESULTS}/logs/shards/{ATLAS}/manifest.log",
    benchmark:
        f"{RESULTS}/benchmarks/shards/{ATLAS}/manifest.tsv",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry manifest {input:q} --manifest {output.manifest:q} --norm-stats {output.norm_stats:q} "
        "--splits train > {log:q} 2>&1"
