# fMRIPrep, one job per subject (raw entry point only): one rule on {subject}, so that
# --set-threads fmriprep=N / --set-resources fmriprep:mem_mb=M (the Slurm profile) reach every subject's
# job. Its output is the subject's report sub-<label>.html, which fMRIPrep always writes whatever the
# subject's run count; the per-run rules take that report as input and the derivatives paths from the
# run table. The command line comes from brainfoundry.fmriprep (full flag names, validated against
# fMRIPrep's own parser in tests); threads and memory are the job's own. Each subject has its own work
# directory, removed after success and kept after a failure.
#   runner apptainer: the upstream image via `container:` (run with --sdm apptainer; bind the license,
#       TemplateFlow home, data and work dirs with --apptainer-args "--bind ...", as listed by
#       `brainfoundry fmriprep-cmd --config C --subject S --threads 1 --mem-mb 1 --binds`).
#   runner docker: the fmriprep-docker wrapper on the host (pull the image first; it prompts otherwise).
from brainfoundry.workflow import fmriprep as fmriprep_wf


if ENTRY == "raw":
    RAW_BOLD = fmriprep_wf.raw_inputs(RUNS)

    rule fmriprep:
        input:
            raw=lambda wildcards: RAW_BOLD.get(wildcards.subject, []),
            license=fmriprep_wf.settings(config)["fs_license"],
        output:
            fmriprep_wf.report_pattern(config),
        params:
            cmd=fmriprep_wf.shell_param(config),
        log:
            f"{RESULTS}/logs/fmriprep/sub-{{subject}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/fmriprep/sub-{{subject}}.tsv",
        threads: 8
        resources:
            mem_mb=16000,
            runtime=24 * 60,
        container:
            fmriprep_wf.image(config)
        shell:
            "({params.cmd}) > {log:q} 2>&1"
