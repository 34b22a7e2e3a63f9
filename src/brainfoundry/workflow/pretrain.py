"""Helpers of ``workflow/rules/pretrain.smk``: what the pretrain job is handed, checked at parse time.

Torch-free (the trainer's settings are :mod:`brainfoundry.train_settings`, the model registry is
lazy), so the trainer keys of a config are checked while Snakemake parses the workflow, naming the
key, without importing torch. Model keys are checked by each family's config class, which lives with
its torch module: the pretrain job checks them first thing (``brainfoundry train``), before it reads
any shard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from brainfoundry.errors import ConfigError
from brainfoundry.models import FAMILIES, MODEL_WINDOWS
from brainfoundry.train_settings import resolve_settings

FAMILY_NAMES = tuple(FAMILIES)


def workflow_settings(config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The pretrain section the workflow hands the trainer for ``family``.

    The workflow's ``seed`` and the shards' ``window``/``short_runs`` are the trainer's defaults (the
    window only for families whose model does not set it, ``MODEL_WINDOWS``); ``pretrain.threads`` is
    its torch thread count unless ``pretrain.trainer.threads`` is set.
    """
    section = dict(config.get("pretrain") or {})
    shards = dict(config.get("shards") or {})
    defaults = {"seed": int(config.get("seed", 0)), "short_runs": shards.get("short_runs", "skip")}
    if "window" in shards and family not in MODEL_WINDOWS:
        defaults["window"] = int(shards["window"])
    trainer = {**defaults, **dict(section.get("trainer") or {})}
    trainer.setdefault("threads", int(section.get("threads", 2)))
    return {"trainer": trainer, family: dict(section.get(family) or {})}


def check_workflow_settings(config: Mapping[str, Any]) -> list[str]:
    """The configured families, their names and trainer keys checked now (ConfigError naming the key)."""
    families = list((config.get("pretrain") or {}).get("families", FAMILY_NAMES))
    for family in families:
        if family not in FAMILIES:
            raise ConfigError("pretrain.families", f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
        resolve_settings(family, workflow_settings(config, family))
    return families


def pretrain_nodes(config: Mapping[str, Any]) -> int:
    """``pretrain.nodes``: Slurm nodes of each pretrain job (the schema's default is 1)."""
    nodes = (config.get("pretrain") or {}).get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError("pretrain.nodes", f"must be an integer >= 1, got {nodes!r}")
    return nodes


def partition_node_limit(text: str, partition: str | None) -> tuple[str, int] | None:
    """(partition, most nodes one job may have there) from ``scontrol show partition -o``: the named
    partition, or the default one; None when it is not listed."""
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "PartitionName" not in fields:
            continue
        if (partition and fields["PartitionName"] == partition) or (not partition and fields.get("Default") == "YES"):
            total = int(fields.get("TotalNodes", "0"))
            limit = fields.get("MaxNodes", "UNLIMITED")
            return fields["PartitionName"], total if not limit.isdigit() else min(total, int(limit))
    return None


def check_nodes_fit(nodes: int, environ: Mapping[str, str] | None = None) -> None:
    """ConfigError naming ``pretrain.nodes`` when the pretrain partition cannot give a job that many nodes.

    Slurm accepts such a job and leaves it pending for ever (reason PartitionNodeLimit), so Snakemake
    would wait for ever. The partition is the Slurm profile's (``BF_SLURM_GPU_PARTITION``, else
    ``BF_SLURM_PARTITION``, else the default one); nothing is checked for one node or where there is no
    ``scontrol``.
    """
    scontrol = shutil.which("scontrol")
    if nodes <= 1 or scontrol is None:
        return
    env = os.environ if environ is None else environ
    partition = env.get("BF_SLURM_GPU_PARTITION") or env.get("BF_SLURM_PARTITION") or None
    try:
        out = subprocess.run([scontrol, "show", "partition", "-o"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return
    found = partition_node_limit(out.stdout, partition) if out.returncode == 0 else None
    if found is not None and nodes > found[1]:
        raise ConfigError("pretrain.nodes", f"{nodes} nodes per pretrain job, but Slurm partition {found[0]!r} gives "
                                            f"a job at most {found[1]}")


def node_resources(nodes: int) -> dict[str, Any]:
    """Resources of a pretrain job on ``nodes`` nodes, for snakemake-executor-plugin-slurm (none for one).

    One task per node (``--nodes=M --ntasks=M``); ``mpi`` makes the plugin run the job's shell in the
    batch script itself rather than inside a one-task ``srun``, so the shell's own ``srun`` spans every
    node; ``tasks_per_gpu: 0`` keeps the plugin from turning the task count into ``--ntasks-per-gpu``.
    GPUs per node come from the profile's ``gres`` (per node in Slurm).
    """
    if nodes <= 1:
        return {}
    return {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun"}


def gpus_per_node(resources: Mapping[str, Any]) -> int:
    """GPUs of one node: the count of a ``gres`` of ``gpu[:type]:N`` (the Slurm profile), else ``gpu``."""
    gres = str(resources.get("gres") or "")
    if gres.startswith("gpu"):
        count = gres.split(":")[-1]
        return int(count) if count.isdigit() else 1
    return int(resources.get("gpu") or 0)


#: The c10d rendezvous port is this plus the Slurm job id modulo 20000, so that two pretrain jobs whose
#: first node is the same do not meet at one port.
RDZV_PORT_BASE = 20000


def launcher(gpus: int, nodes: int = 1) -> str:
    """The command that starts training.

    One node: ``brainfoundry train``, or torchrun over the node's GPUs when there are several. ``nodes``
    > 1 (inside a Slurm job of that many nodes): ``srun`` starts one torchrun agent per node, which meet
    by a c10d rendezvous on the job's first node and start ``max(gpus, 1)`` processes each (one per GPU;
    one on CPU nodes, with gloo). The node list is read from Slurm (``squeue``), since the executor
    plugin clears ``SLURM_*`` but the job id inside jobs.
    """
    gpus, nodes = int(gpus), int(nodes)
    if nodes <= 1:
        if gpus > 1:
            return f"torchrun --standalone --nproc-per-node={gpus} -m brainfoundry.train"
        return "brainfoundry train"
    per_node = max(gpus, 1)
    job = '${SLURM_JOB_ID:?pretrain.nodes > 1 runs inside a Slurm job: use the Slurm profile}'
    first = '$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)" | head -n1)'
    # NodeAddr: what the node answers on (its name, on most clusters).
    addr = f'$(scontrol show node "{first}" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")'
    port = f"$(({RDZV_PORT_BASE} + SLURM_JOB_ID % 20000))"
    gres = f" --gres=gpu:{gpus}" if gpus > 0 else ""
    return (f"srun --jobid={job} --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1{gres} --kill-on-bad-exit=1 "
            f"torchrun --nnodes={nodes} --nproc-per-node={per_node} --rdzv-backend=c10d "
            f"--rdzv-endpoint={addr}:{port} --rdzv-id=$SLURM_JOB_ID -m brainfoundry.train")
