"""DDP on gloo: 2 processes with half a batch each take the same steps as 1 process with the whole batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from brainfoundry.checkpoint import load_checkpoint
from brainfoundry.errors import ConfigError
from brainfoundry.models import read_model_file
from brainfoundry.pfc import pfc_views_torch
from brainfoundry.testing import ArraySource, write_synthetic_shards
from brainfoundry.train import TrainConfig, train

N, T, GLOBAL_BATCH, N_BATCHES = 12, 40, 8, 4
MODELS = {
    "brainlm": dict(window=T, patch_size=10, dim=32, depth=2, heads=4, decoder_dim=16, decoder_depth=1,
                    decoder_heads=2),
    "brainmass": dict(dim=32, depth=2, heads=4, proj_dim=16, proj_hidden=32, ema_momentum=0.9),
    "lcm": dict(dim=32, depth=1, heads=4, dropout=0.0),
}


def config(**changes) -> TrainConfig:
    values = dict(steps=6, batch_size=GLOBAL_BATCH, lr=3e-3, warmup_steps=2, log_every=3, checkpoint_every=3,
                  window=T, threads=1)
    values.update(changes)
    return TrainConfig(**values)


def make_data():
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(N_BATCHES):
        x = torch.randn(GLOBAL_BATCH, T, N, generator=g)
        batches.append({"x": x, "mask": torch.ones(GLOBAL_BATCH, T, dtype=torch.bool),
                        "pfc": pfc_views_torch(x, keep_fraction=0.8, n_views=4, generator=g, fisher_z=True),
                        "run_id": [f"sub-{b}x{i}_task-rest" for i in range(GLOBAL_BATCH)]})
    run_ids = [r for batch in batches for r in batch["run_id"]]
    phenotypes = {"run_id": run_ids, "age": [20.0 + i % 30 for i in range(len(run_ids))],
                  "sex": ["FM"[i % 2] for i in range(len(run_ids))],
                  "diagnosis": [("ASD", "TD")[i % 3 % 2] if i % 4 else None for i in range(len(run_ids))],
                  "site": ["AB"[i % 2] for i in range(len(run_ids))]}
    return ArraySource(batches, np.random.default_rng(0).uniform(-60, 60, (N, 3)), phenotypes)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    source = make_data()
    for family in MODELS:
        train(family, Path(root) / f"ddp_{family}", model_config=MODELS[family], train_config=config(), source=source,
              resume="never")
    try:  # a global batch that does not split over the ranks
        train("brainlm", Path(root) / "uneven", model_config=MODELS["brainlm"], train_config=config(batch_size=7),
              source=source)
    except ConfigError as err:
        (Path(root) / f"uneven_{rank}.txt").write_text(str(err))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    source = make_data()
    for family in MODELS:
        single = train(family, tmp_path / f"one_{family}", model_config=MODELS[family], train_config=config(),
                       source=source, resume="never")
        a = read_model_file(tmp_path / f"one_{family}" / "model.safetensors")
        b = read_model_file(tmp_path / f"ddp_{family}" / "model.safetensors")
        assert json.loads((tmp_path / f"ddp_{family}" / "summary.json").read_text())["world_size"] == 2
        for key, value in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=f"{family}: {key}")
        ddp_final = json.loads((tmp_path / f"ddp_{family}" / "summary.json").read_text())["final"]
        assert ddp_final["loss"] == pytest.approx(single["final"]["loss"], rel=1e-4)
    assert "does not split evenly over 2 ranks" in (tmp_path / "uneven_0.txt").read_text()
    assert (tmp_path / "uneven_1.txt").exists()


def test_torchrun_cli_on_shards(tmp_path):
    """The real launcher: ``torchrun --nproc_per_node 2`` runs the CLI with env:// and gloo on shards."""
    shards = write_synthetic_shards(tmp_path / "shards", n_subjects=20)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "brainfoundry.train", "--family", "brainmass", "--shards", str(shards), "--out", str(out),
           "--set", "trainer.steps=4", "--set", "trainer.batch_size=4", "--set", "trainer.checkpoint_every=2",
           "--set", "model.dim=32", "--set", "model.heads=4", "--set", "model.depth=1", "--set", "trainer.threads=1",
           "--set", "trainer.window=40"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    ckpt = load_checkpoint(out / "checkpoint.pt")  # weights_only: the RNG states of both ranks are plain values
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and len(ckpt["data"]["per_rank"]) == 2
    assert "trained brainmass" in done.stdout


def test_torchrun_on_shards_ends_equal_to_one_process_whatever_the_world_size(tmp_path):
    """On shards, trainer.partition "samples" (the default) gives each of the 2 ranks its slice of the
    one-process run's global batches, the epoch's short batch included (split 1 + 1), so both runs end
    with the same weights; "row_groups" (each rank reads its own row groups) does not, which is why it
    is not the default."""
    shards = write_synthetic_shards(tmp_path / "shards", n_subjects=12, row_group_size=2, n_timepoints=T)
    common = ["--family", "brainlm", "--shards", str(shards), "--resume", "never", "--set", "trainer.steps=4",
              "--set", "trainer.batch_size=6", "--set", "trainer.threads=1", "--set", "trainer.warmup_steps=2",
              "--set", "trainer.checkpoint_every=4", "--set", "trainer.eval_every=2"]
    common += [f"--set=model.{k}={v}" for k, v in MODELS["brainlm"].items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "brainfoundry.train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=240, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    weights = {}
    for partition in ("samples", "row_groups"):
        out = tmp_path / partition
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(_free_port()), "-m", "brainfoundry.train", *common, "--out", str(out),
                               "--set", f"trainer.partition={partition}"],
                              capture_output=True, text=True, env=env, timeout=240, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["world_size"] == 2
        weights[partition] = read_model_file(out / "model.safetensors")["state_dict"]
    single = read_model_file(tmp_path / "one" / "model.safetensors")["state_dict"]
    for key, value in single.items():
        torch.testing.assert_close(weights["samples"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    finals = [json.loads((tmp_path / d / "summary.json").read_text())["final"] for d in ("one", "samples")]
    assert finals[1]["loss"] == pytest.approx(finals[0]["loss"], rel=1e-4)
    assert finals[1]["val_loss"] == pytest.approx(finals[0]["val_loss"], rel=1e-4)
    # Each rank reading its own row groups sees other batches: the weights move apart.
    assert max(float((weights["row_groups"][k] - v).abs().max()) for k, v in single.items()) > 1e-3
