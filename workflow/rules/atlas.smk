# Atlas preparation, once per (atlas, space) and never per run: the label image from atlas.path (or an
# https atlas.url verified against atlas.sha256) resampled by nearest neighbour to the configured
# space's BOLD grid (known fMRIPrep grids, or atlas.reference_img), plus the labels TSV with centroids.
# The grid comes from the space, not from a run, so adding subjects never re-runs this job.
# For the timeseries entry point the atlas stays in its own space: only the labels TSV and JSON.
from brainfoundry.workflow.atlas import atlas_targets, rule_inputs, rule_option_args, rule_source_args


if ENTRY == "timeseries":

    rule atlas_prepare:
        input:
            unpack(lambda wildcards: rule_inputs(config["atlas"], ENTRY)),
        output:
            labels=LAYOUT.atlas_labels,
            sidecar=LAYOUT.atlas_json,
        params:
            source=rule_source_args(config["atlas"]),
            options=lambda wildcards, input: rule_option_args(input, ENTRY),
            name=ATLAS,
            space=SPACE,
        log:
            f"{RESULTS}/logs/atlas_prepare/space-{SPACE}_seg-{ATLAS}.log",
        benchmark:
            f"{RESULTS}/benchmarks/atlas_prepare/space-{SPACE}_seg-{ATLAS}.tsv",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=15,
        conda:
            BF_ENV
        container:
            BF_IMAGE
        shell:
            "brainfoundry atlas-prepare {params.source} {params.options} --name {params.name} "
            "--space {params.space} --out-labels {output.labels:q} --out-json {output.sidecar:q} > {log:q} 2>&1"

else:

    rule atlas_prepare:
        input:
            unpack(lambda wildcards: rule_inputs(config["atlas"], ENTRY)),
        output:
            dseg=LAYOUT.atlas_dseg,
            labels=LAYOUT.atlas_labels,
            sidecar=LAYOUT.atlas_json,
        params:
            source=rule_source_args(config["atlas"]),
            options=lambda wildcards, input: rule_option_args(input, ENTRY),
            name=ATLAS,
            space=SPACE,
        log:
            f"{RESULTS}/logs/atlas_prepare/space-{SPACE}_seg-{ATLAS}.log",
        benchmark:
            f"{RESULTS}/benchmarks/atlas_prepare/space-{SPACE}_seg-{ATLAS}.tsv",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=15,
        conda:
            BF_ENV
        container:
            BF_IMAGE
        shell:
            "brainfoundry atlas-prepare {params.source} {params.options} --name {params.name} "
            "--space {params.space} --out-dseg {output.dseg:q} --out-labels {output.labels:q} "
            "--out-json {output.sidecar:q} > {log:q} 2>&1"
