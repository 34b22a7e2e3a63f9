# Downstream evaluation: one fold table shared by everyone, one embedding cache per model, one job per
# model x task (models and the 'baseline' pseudo-model), one merge into the tidy metrics table, the
# summary page, the verdict and the plots of the report's Results section.
# A task a model cannot do (no decoder, constant phenotype, too few subjects for the folds) still
# finishes: its table is empty and its .json sidecar says why; the summary lists it.
# Helpers and the settings' defaults live in brainfoundry.evaluate.workflow.

import json

from brainfoundry.evaluate import workflow as evalwf

EVAL = evalwf.eval_settings(config, globals().get("PRETRAIN_FAMILIES"))
EVAL_DIR = f"{RESULTS}/evaluation"
EVAL_OPTIONS = evalwf.options_json(EVAL)
# The models and their random-init controls (<model>_random_init, evaluate.controls).
EVAL_MODELS = evalwf.evaluated_models(EVAL)
EVALUATION_TARGETS = evalwf.evaluation_targets(EVAL_DIR, EVAL)
# The LCM's trainer settings (as the pretrain rule passes them, evaluate.pseudo_label_trainer on top),
# reused for its pseudo-label fine-tuning.
PSEUDO_LABEL_SETTINGS = json.dumps(evalwf.pseudo_label_settings(config, EVAL), sort_keys=True)


rule evaluate_lcm_pseudolabel:
    input:
        model=evalwf.model_file(RESULTS, "lcm"),
        manifest=LAYOUT.manifest,
        norm_stats=LAYOUT.norm_stats,
    output:
        model=evalwf.pseudo_label_file(RESULTS, "{target}"),
        model_meta=evalwf.model_metadata(evalwf.pseudo_label_file(RESULTS, "{target}")),
    params:
        shards=lambda wildcards, input: str(Path(input.manifest).parent),
        out=lambda wildcards, output: str(Path(output.model).parent),
        settings=lambda wildcards: PSEUDO_LABEL_SETTINGS,
    log:
        f"{RESULTS}/logs/evaluate/lcm_pseudolabel_{{target}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/lcm_pseudolabel_{{target}}.tsv",
    wildcard_constraints:
        target="[A-Za-z0-9_]+",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry train --family lcm --mode finetune --init {input.model:q} --shards {params.shards:q} "
        "--out {params.out:q} --config-json {params.settings:q} --set trainer.target={wildcards.target} "
        "--set trainer.threads={threads} --resume auto > {log:q} 2>&1"


rule evaluate_folds:
    input:
        manifest=LAYOUT.manifest,
        norm_stats=LAYOUT.norm_stats,
    output:
        folds=f"{EVAL_DIR}/folds.parquet",
        sidecar=f"{EVAL_DIR}/folds.json",
    params:
        shards=lambda wildcards, input: str(Path(input.manifest).parent),
        options=lambda wildcards: EVAL_OPTIONS,  # JSON holds braces: keep it out of wildcard formatting
    log:
        f"{RESULTS}/logs/evaluate/folds.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/folds.tsv",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry evaluate --threads {threads} folds --shards {params.shards:q} --options {params.options:q} "
        "--out {output.folds:q} > {log:q} 2>&1"


rule evaluate_embed:
    input:
        manifest=LAYOUT.manifest,
        norm_stats=LAYOUT.norm_stats,
        checkpoint=lambda wildcards: evalwf.model_file(RESULTS, wildcards.model),
    output:
        f"{EVAL_DIR}/embeddings/{{model}}.npz",
    params:
        shards=lambda wildcards, input: str(Path(input.manifest).parent),
        options=lambda wildcards: EVAL_OPTIONS,
    log:
        f"{RESULTS}/logs/evaluate/embed_{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/embed_{{model}}.tsv",
    wildcard_constraints:
        model="|".join(EVAL_MODELS) or "none",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry evaluate --threads {threads} embed --model {wildcards.model} --checkpoint {input.checkpoint:q} "
        "--shards {params.shards:q} --options {params.options:q} --out {output:q} > {log:q} 2>&1"


rule evaluate_task:
    input:
        unpack(
            lambda wildcards: evalwf.task_inputs(
                wildcards,
                layout=LAYOUT,
                results=RESULTS,
                eval_dir=EVAL_DIR,
                ev=EVAL,
                entry=ENTRY,
                atlas_path=config["atlas"].get("path"),
            )
        ),
    output:
        table=f"{EVAL_DIR}/tasks/{{model}}/{{task}}.parquet",
        status=f"{EVAL_DIR}/tasks/{{model}}/{{task}}.json",
    params:
        shards=lambda wildcards, input: str(Path(input.manifest).parent),
        options=lambda wildcards: EVAL_OPTIONS,
        args=lambda wildcards, input: evalwf.task_args(input),
    log:
        f"{RESULTS}/logs/evaluate/{{model}}_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}_{{task}}.tsv",
    wildcard_constraints:
        model="|".join(EVAL_MODELS + ["baseline"]),
        task="|".join(EVAL["tasks"]),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry evaluate --threads {threads} task --task {wildcards.task} --model {wildcards.model} "
        "--shards {params.shards:q} {params.args} --options {params.options:q} --out {output.table:q} > {log:q} 2>&1"


rule evaluate_examples:
    input:
        manifest=LAYOUT.manifest,
        norm_stats=LAYOUT.norm_stats,
        checkpoint=lambda wildcards: evalwf.model_file(RESULTS, wildcards.model),
    output:
        reconstruction=report(
            f"{EVAL_DIR}/examples/{{model}}_reconstruction.png",
            caption="../report/results_examples.rst",
            category="Results",
            subcategory="Examples ({model})",
        ),
        forecast=report(
            f"{EVAL_DIR}/examples/{{model}}_forecast.png",
            caption="../report/results_examples.rst",
            category="Results",
            subcategory="Examples ({model})",
        ),
    params:
        shards=lambda wildcards, input: str(Path(input.manifest).parent),
        options=lambda wildcards: EVAL_OPTIONS,
    log:
        f"{RESULTS}/logs/evaluate/examples_{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/examples_{{model}}.tsv",
    wildcard_constraints:
        model="|".join(EVAL_MODELS) or "none",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry evaluate --threads {threads} examples --model {wildcards.model} "
        "--checkpoint {input.checkpoint:q} --shards {params.shards:q} --options {params.options:q} "
        "--out-reconstruction {output.reconstruction:q} --out-forecast {output.forecast:q} > {log:q} 2>&1"


rule evaluate_merge:
    input:
        tables=evalwf.task_tables(EVAL_DIR, EVAL),
        manifest=LAYOUT.manifest,
    output:
        metrics=f"{EVAL_DIR}/metrics.parquet",
        tsv=report(
            f"{EVAL_DIR}/metrics.tsv",
            caption="../report/results_table.rst",
            category="Results",
            subcategory="Metrics",
        ),
        status=f"{EVAL_DIR}/status.tsv",
        status_parquet=f"{EVAL_DIR}/status.parquet",
        summary=report(
            f"{EVAL_DIR}/summary.html",
            caption="../report/results_summary.rst",
            category="Results",
            subcategory="Metrics",
        ),
        verdict=report(
            f"{EVAL_DIR}/verdict.png",
            caption="../report/results_summary.rst",
            category="Results",
            subcategory="Did pretraining help?",
        ),
        headline=report(
            f"{EVAL_DIR}/headline.html",
            caption="../report/results_headline.rst",
            category="Results",
            subcategory="Did pretraining help?",
        ),
        headline_tsv=f"{EVAL_DIR}/headline.tsv",
        plots=[
            report(
                f"{EVAL_DIR}/plots/{task}.png",
                caption="../report/results_plot.rst",
                category="Results",
                subcategory="Tasks",
                labels={"task": task},
            )
            for task in evalwf.baseline_tasks(EVAL)
        ],
    params:
        out_dir=lambda wildcards, output: str(Path(output.metrics).parent),
        tasks=" ".join(evalwf.baseline_tasks(EVAL)),
        entry=ENTRY,
        data=evalwf.data_description(config),
    log:
        f"{RESULTS}/logs/evaluate/merge.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/merge.tsv",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry evaluate --threads {threads} merge {input.tables:q} --tasks {params.tasks} "
        "--manifest {input.manifest:q} --entry-point {params.entry} --data {params.data:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
