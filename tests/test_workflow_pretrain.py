"""brainfoundry.workflow.pretrain: the pretrain job's launcher command and its Slurm node resources.

The multi-node command itself runs on the local two-node Slurm in tests/test_slurm.py; here its
command line, the shell's reading of it, and the resources that snakemake-executor-plugin-slurm turns
into the sbatch request.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from brainfoundry.errors import ConfigError
from brainfoundry.workflow.pretrain import (
    check_nodes_fit,
    gpus_per_node,
    launcher,
    node_resources,
    partition_node_limit,
    pretrain_nodes,
)


def test_one_node_launchers_are_unchanged():
    assert launcher(0) == launcher(1) == launcher(1, nodes=1) == "brainfoundry train"
    assert launcher(4) == "torchrun --standalone --nproc-per-node=4 -m brainfoundry.train"
    assert node_resources(1) == {}


def test_multi_node_launcher_is_srun_torchrun_with_a_c10d_rendezvous():
    words = shlex.split(launcher(4, nodes=3))
    assert words[0] == "srun" and "torchrun" in words
    srun, torchrun = words[:words.index("torchrun")], words[words.index("torchrun"):]
    assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--gres=gpu:4", "--kill-on-bad-exit=1"} <= set(srun)
    assert torchrun[-2:] == ["-m", "brainfoundry.train"]
    assert {"--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-id=$SLURM_JOB_ID"} <= set(torchrun)
    # The endpoint: the job's first node (its NodeAddr), at a port of the job id.
    endpoint = launcher(4, nodes=3).split("--rdzv-endpoint=")[1].split(" --rdzv-id")[0]
    assert "squeue -h -j" in endpoint and "NodeAddr" in endpoint and endpoint.endswith("SLURM_JOB_ID % 20000))")
    # CPU nodes: one process per node (gloo), no GPU request for the step.
    cpu = shlex.split(launcher(0, nodes=2))
    assert "--nproc-per-node=1" in cpu and not any(w.startswith("--gres") for w in cpu)


def test_multi_node_launcher_is_valid_shell_and_says_it_needs_a_slurm_job():
    command = launcher(0, nodes=2) + " --family brainlm"
    assert subprocess.run(["bash", "-n", "-c", command], check=False).returncode == 0
    done = subprocess.run(["env", "-u", "SLURM_JOB_ID", "bash", "-c", command], capture_output=True, text=True,
                          check=False)
    assert done.returncode != 0 and "pretrain.nodes > 1 runs inside a Slurm job" in done.stderr


def test_node_resources_ask_the_plugin_for_one_task_per_node():
    assert node_resources(2) == {"nodes": 2, "tasks": 2, "tasks_per_gpu": 0, "mpi": "srun"}


def test_gpus_per_node_reads_the_profiles_gres():
    assert gpus_per_node({"gres": "gpu:4", "gpu": 0}) == 4
    assert gpus_per_node({"gres": "gpu:a100:2"}) == 2
    assert gpus_per_node({"gpu": 3}) == 3
    assert gpus_per_node({}) == 0


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5, True])
def test_pretrain_nodes_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="pretrain.nodes"):
        pretrain_nodes({"pretrain": {"nodes": bad}})
    assert pretrain_nodes({"pretrain": {"nodes": 2}}) == 2 and pretrain_nodes({}) == 1


SCONTROL = ("PartitionName=debug AllowGroups=ALL Default=YES MaxNodes=UNLIMITED Nodes=vm-[1-2] State=UP TotalNodes=2\n"
            "PartitionName=gpu Default=NO MaxNodes=4 Nodes=g[01-16] State=UP TotalNodes=16\n")


def test_partition_node_limit_reads_scontrol():
    assert partition_node_limit(SCONTROL, None) == ("debug", 2)  # the default partition
    assert partition_node_limit(SCONTROL, "gpu") == ("gpu", 4)  # MaxNodes below TotalNodes
    assert partition_node_limit(SCONTROL, "nosuch") is None


def test_more_nodes_than_the_partition_has_is_an_error_naming_the_key():
    """On the local Slurm when it runs (two nodes): 2 fit, 3 do not."""
    done = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True, check=False) \
        if shutil.which("scontrol") else None
    if done is None or done.returncode != 0 or partition_node_limit(done.stdout, None) is None:
        pytest.skip("no Slurm controller answers here (scripts/slurm_local.sh start)")
    _, most = partition_node_limit(done.stdout, None)
    check_nodes_fit(most, environ={})
    check_nodes_fit(1, environ={})
    with pytest.raises(ConfigError, match=r"pretrain.nodes.*at most"):
        check_nodes_fit(most + 1, environ={})
