# Pretraining: one job per model family on all shards of the atlas -> results/models/<family>/
# (model.safetensors + model.json, metrics.csv, learning_curve.png in the report). GPUs come from the
# `gpu` resource locally (config pretrain.gpus; 0 = CPU, the demo) and from the Slurm profile's `gres`
# (GPUs per node) on a cluster; with more than one GPU the job runs torchrun on its node (DDP over
# env://, NCCL). With pretrain.nodes > 1 the job asks Slurm for that many nodes and starts one torchrun
# per node with srun (c10d rendezvous; brainfoundry.workflow.pretrain.launcher).
# A killed job resumes from results/models/<family>/checkpoint.pt when it is run again (--resume
# auto); a checkpoint of other settings or data is not resumed (the log says why): training starts over.
import json
import os

from brainfoundry.workflow.pretrain import (FAMILY_NAMES, check_nodes_fit, check_workflow_settings, gpus_per_node,
                                            launcher, node_resources, pretrain_nodes, workflow_settings)

PRETRAIN = dict(config.get("pretrain", {}) or {})
# Unknown families and trainer keys stop the run here, naming the key, not hours into a job (torch-free:
# model keys are checked by the pretrain job before it reads a shard).
PRETRAIN_FAMILIES = check_workflow_settings(config)
PRETRAIN_NODES = pretrain_nodes(config)
check_nodes_fit(PRETRAIN_NODES)  # Slurm would leave a job of more nodes than the partition has pending for ever
MODELS_DIR = f"{RESULTS}/models"
PRETRAIN_TARGETS = [f"{MODELS_DIR}/{family}/{name}" for family in PRETRAIN_FAMILIES
                    for name in ("model.safetensors", "model.json", "metrics.csv", "learning_curve.png")]


wildcard_constraints:
    family="|".join(FAMILY_NAMES),


rule pretrain:
    input:
        shards=lambda wildcards: [LAYOUT.shard.format(bucket=b) for b in buckets()],
        manifest=LAYOUT.manifest,
        norm_stats=LAYOUT.norm_stats,
    output:
        model=f"{MODELS_DIR}/{{family}}/model.safetensors",
        model_meta=f"{MODELS_DIR}/{{family}}/model.json",
        metrics=f"{MODELS_DIR}/{{family}}/metrics.csv",
        curve=report(
            f"{MODELS_DIR}/{{family}}/learning_curve.png",
            caption="../report/learning_curve.rst",
            category="Pretraining",
            subcategory="{family}",
            labels={"model": "{family}", "figure": "learning curve"},
        ),
    params:
        shards=lambda wildcards, input: os.path.dirname(input.manifest),
        out=lambda wildcards, output: os.path.dirname(output.model),
        settings=lambda wildcards: json.dumps(workflow_settings(config, wildcards.family), sort_keys=True),
        launcher=lambda wildcards, resources: launcher(gpus_per_node(resources), PRETRAIN_NODES),
    log:
        f"{RESULTS}/logs/pretrain/{{family}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{family}}.tsv",
    threads: int(PRETRAIN.get("threads", 2))
    resources:
        gpu=int(PRETRAIN.get("gpus", 0)),
        mem_mb=int(PRETRAIN.get("mem_mb", 4000)),
        runtime=int(PRETRAIN.get("runtime", 60)),
        **node_resources(PRETRAIN_NODES),
    conda:
        BF_ENV
    container:
        BF_GPU_IMAGE
    shell:
        "{params.launcher} --family {wildcards.family} --shards {params.shards:q} --out {params.out:q} "
        "--config-json {params.settings:q} --resume auto > {log:q} 2>&1"
