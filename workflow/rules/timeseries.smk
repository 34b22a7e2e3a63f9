# The `timeseries` entry point: already parcellated series (ABIDE PCP .1D[.gz], TSV, CSV, NPY) become the
# same per-run outputs parcellation writes, with column names from the atlas labels TSV.
# The run table (timeseries_file, tr, phenotypes) comes from brainfoundry.timeseries.index_timeseries.

from brainfoundry.workflow.timeseries import import_options


if ENTRY == "timeseries":

    rule import_timeseries:
        input:
            series=lambda wildcards: run_row(wildcards)["timeseries_file"],
            labels=LAYOUT.atlas_labels,
        output:
            timeseries=LAYOUT.timeseries,
            sidecar=LAYOUT.timeseries_json,
        params:
            tr=lambda wildcards: float(run_row(wildcards)["tr"]),
            atlas=ATLAS,
            space=SPACE,
            options=lambda wildcards: import_options(run_row(wildcards), config),
        log:
            f"{RESULTS}/logs/import_timeseries/sub-{{subject}}/{{run_id}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/import_timeseries/sub-{{subject}}/{{run_id}}.tsv",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            BF_ENV
        container:
            BF_IMAGE
        shell:
            "brainfoundry import-timeseries {input.series:q} --labels {input.labels:q} "
            "--out {output.timeseries:q} --sidecar {output.sidecar:q} --tr {params.tr} "
            "--run-id {wildcards.run_id} --atlas {params.atlas} --space {params.space} {params.options} "
            "> {log:q} 2>&1"
