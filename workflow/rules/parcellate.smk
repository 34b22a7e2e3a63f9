# Per run: denoise (nilearn's fMRIPrep confound strategies, config `denoise`) and average within the
# atlas parcels (prepared once per space by atlas_prepare), streaming the BOLD image; plus the per-run
# QC figures of the report. The timeseries entry point has its own import rule with the same outputs.
import json

from brainfoundry.workflow.parcellate import (
    mask_arg,
    qc_figure_patterns,
    qc_figure_targets,
    raw_timeseries_path,
    run_files,
    run_inputs,
)

RAW_TIMESERIES = raw_timeseries_path(LAYOUT.timeseries)
QC_FIGURES = qc_figure_patterns(LAYOUT)


if ENTRY != "timeseries":

    rule parcellate:
        input:
            unpack(lambda wildcards: run_inputs(run_row(wildcards), config)),
            dseg=LAYOUT.atlas_dseg,
            labels=LAYOUT.atlas_labels,
        output:
            timeseries=LAYOUT.timeseries,
            sidecar=LAYOUT.timeseries_json,
            raw=RAW_TIMESERIES,
        params:
            # The run's fMRIPrep files (inputs themselves unless this workflow runs fMRIPrep: run_inputs).
            bold=lambda wildcards: run_files(run_row(wildcards))["bold"],
            confounds=lambda wildcards: run_files(run_row(wildcards))["confounds"],
            mask=lambda wildcards: mask_arg(run_row(wildcards)),
            tr=lambda wildcards: float(run_row(wildcards)["tr"]),
            denoise=json.dumps(config.get("denoise", {})),
            atlas=ATLAS,
            space=SPACE,
        log:
            f"{RESULTS}/logs/parcellate/sub-{{subject}}/{{run_id}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/parcellate/sub-{{subject}}/{{run_id}}.tsv",
        # One thread decompresses (ISA-L), the other averages parcels as the volumes arrive.
        threads: 2
        resources:
            mem_mb=1500,
            runtime=20,
        conda:
            BF_ENV
        container:
            BF_IMAGE
        shell:
            "brainfoundry parcellate --bold {params.bold:q} {params.mask} --confounds {params.confounds:q} "
            "--atlas-dseg {input.dseg:q} --atlas-labels {input.labels:q} --atlas {params.atlas} "
            "--space {params.space} --tr {params.tr} --denoise {params.denoise:q} "
            "--out {output.timeseries:q} --out-json {output.sidecar:q} --out-raw {output.raw:q} > {log:q} 2>&1"

    rule qc_figures:
        input:
            unpack(lambda wildcards: run_inputs(run_row(wildcards), config, keys=("confounds",))),
            timeseries=LAYOUT.timeseries,
            sidecar=LAYOUT.timeseries_json,
            raw=RAW_TIMESERIES,
            labels=LAYOUT.atlas_labels,
        output:
            fd=report(
                QC_FIGURES["fd"],
                caption="../report/qc_fd.rst",
                category="QC",
                subcategory="{run_id}",
                labels={"run": "{run_id}", "figure": "framewise displacement"},
            ),
            carpet=report(
                QC_FIGURES["carpet"],
                caption="../report/qc_carpet.rst",
                category="QC",
                subcategory="{run_id}",
                labels={"run": "{run_id}", "figure": "carpet plot"},
            ),
            fc=report(
                QC_FIGURES["fc"],
                caption="../report/qc_fc.rst",
                category="QC",
                subcategory="{run_id}",
                labels={"run": "{run_id}", "figure": "connectivity before/after"},
            ),
        params:
            confounds=lambda wildcards: run_files(run_row(wildcards))["confounds"],
        log:
            f"{RESULTS}/logs/qc_figures/sub-{{subject}}/{{run_id}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/qc_figures/sub-{{subject}}/{{run_id}}.tsv",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            BF_ENV
        container:
            BF_IMAGE
        shell:
            "brainfoundry qc-figures --timeseries {input.timeseries:q} --timeseries-json {input.sidecar:q} "
            "--raw {input.raw:q} --confounds {params.confounds:q} --labels {input.labels:q} "
            "--title {wildcards.run_id} --out-fd {output.fd:q} --out-carpet {output.carpet:q} "
            "--out-fc {output.fc:q} > {log:q} 2>&1"
