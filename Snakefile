# brainfoundry: raw BIDS fMRI -> parcellated series -> pFC -> shards -> pretraining -> evaluation.
# Rules are thin: each calls the brainfoundry CLI; the logic lives in src/brainfoundry/.
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults live beside the Snakefile so `--directory elsewhere` still finds them; --configfile overrides.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# Schema errors in a few lines naming the key (and the nearest valid ones), then Snakemake's validate
# fills the schema defaults; the atlas keys the entry point needs are checked before any indexing.
from brainfoundry.checks import check_atlas, check_config, check_run_table

# current_basedir: this file's folder, also when another Snakefile includes this one.
check_config(config, os.path.join(workflow.current_basedir, "config", "config.schema.yaml"))
validate(config, "config/config.schema.yaml")
check_atlas(config)


# Before Snakemake takes its lock: say whether one already here belongs to a live run or a killed one.
if workflow.is_main_process:
    from brainfoundry.locks import explain_lock

    explain_lock()


report: "workflow/report/workflow.rst"


wildcard_constraints:
    subject="[A-Za-z0-9]+",
    run_id="sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*",
    bucket="[0-9]+",


include: "workflow/rules/common.smk"


# Zero runs, empty splits, phenotypes nobody provides: said now, not after the DAG ran (brainfoundry.checks).
check_run_table(config, RUNS)


include: "workflow/rules/bids.smk"
include: "workflow/rules/fmriprep.smk"
include: "workflow/rules/atlas.smk"
include: "workflow/rules/parcellate.smk"
include: "workflow/rules/timeseries.smk"
include: "workflow/rules/pfc.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        all_targets(),
    default_target: True


# The run ends with its answer: the headline table the evaluation wrote (read, never recomputed here).
onsuccess:
    from brainfoundry.evaluate.table import print_headline

    print_headline(f"{RESULTS}/evaluation/headline.tsv", f"{RESULTS}/report.html")
