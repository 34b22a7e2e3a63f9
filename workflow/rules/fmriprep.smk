# fMRIPrep, one job per subject (raw entry point only). Outputs are the derivatives files the run table
# expects for each of the subject's runs (bold, brain mask, confounds), so each run's parcellation
# depends on exactly its subject's job; a subject's run count varies, so there is one rule per subject
# (fmriprep_sub_<label>) rather than one wildcard rule. The command line comes from
# brainfoundry.fmriprep (full flag names, validated against fMRIPrep's own parser in tests); threads and
# memory come from this rule's threads/resources (override with --set-threads / --set-resources). Each
# subject has its own work directory, removed after success and kept after a failure.
#   runner apptainer: the upstream image via `container:` (run with --sdm apptainer; bind the license,
#       TemplateFlow home, data and work dirs with --apptainer-args "--bind ...", as listed by
#       `brainfoundry fmriprep-cmd --config C --subject S --threads 1 --mem-mb 1 --binds`).
#   runner docker: the fmriprep-docker wrapper on the host (pull the image first; it prompts otherwise).
from brainfoundry import fmriprep as bf_fmriprep

FMRIPREP = {**bf_fmriprep.DEFAULTS, **config.get("fmriprep", {})}
# .get: a timeseries-only config (config/abide.yaml run with --directory elsewhere) has no fmriprep section
FMRIPREP_IMAGE = FMRIPREP.get("image") if FMRIPREP["runner"] == "apptainer" else None

if ENTRY == "raw":
    for _subject in sorted(RUNS["subject"].unique()):

        rule:
            name:
                f"fmriprep_sub_{_subject}"
            input:
                raw=RUNS.loc[RUNS["subject"] == _subject, "raw_bold"].tolist(),
                license=FMRIPREP["fs_license"],
            output:
                bf_fmriprep.subject_outputs(RUNS, _subject),
            params:
                cmd=bf_fmriprep.shell_param(config, _subject),
            log:
                f"{RESULTS}/logs/fmriprep/sub-{_subject}.log",
            benchmark:
                f"{RESULTS}/benchmarks/fmriprep/sub-{_subject}.tsv",
            threads: 8
            resources:
                mem_mb=16000,
                runtime=24 * 60,
            container:
                FMRIPREP_IMAGE
            shell:
                "({params.cmd}) > {log:q} 2>&1"
