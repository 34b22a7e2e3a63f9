"""BrainLM pretraining on a GPU: throughput, MFU and peak memory, bf16 eager and torch.compile.

    PYTHONPATH=src python3 benchmarks/bench_train_gpu.py [--json out.json]       # needs CUDA
    PYTHONPATH=src python3 benchmarks/bench_train_gpu.py --device cpu --quick    # CPU smoke test

The paper's BrainLM (424 parcels, window 200, patch 20: 4240 tokens; 512-d, 4 encoder layers;
256-d, 2 decoder layers; mask ratio 0.75, so the encoder sees 1060 tokens + CLS), in three kinds of
measurement, each ``MODE@BATCH`` (MODE ``eager`` or ``compile``; ``compile:MODE`` passes a
``torch.compile`` mode, ``+cudnn``/``+flash``/``+efficient`` pins the SDPA backend):

- ``matmul ceiling``: an 8192^3 bf16 matrix product on random data (median of timed runs), the
  achievable dense bf16 rate of this GPU.
- ``model`` (``--model-runs``): one full training step (bf16 autocast forward, loss, backward,
  gradient clipping, fused AdamW) on batches already on the GPU: no data path at all.
- ``part`` (``--part-runs``, ``encoder:MODE@B`` / ``decoder:MODE@B``): forward + backward of the
  encoder alone (1061 tokens x 512) or of the decoder's transformer blocks alone (4241 x 256) on
  random activations, for the MFU of each half.
- ``trainer`` (``--trainer-runs``): the real trainer (``brainfoundry.train.train``) reading synthetic
  shards (``brainfoundry.testing.write_synthetic_shards``) through the streaming reader with
  ``--workers`` reader threads: the whole step, data wait and host-to-device copies included.

Timing: ``--warmup`` steps first (compilation, allocator and cuDNN/cuBLAS warm-up), then
``--repeats`` blocks of ``--steps`` steps, each block timed by the host clock between
``torch.cuda.synchronize()`` calls; the median block is reported and the spread of the blocks is
shown. The trainer's own per-interval metrics are used for the trainer rows (``log_every`` =
``--warmup``, the first interval dropped). Peak memory is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` at the start of each row. An out-of-memory error is reported as such
and the next row runs.

MFU = model FLOPs per second / the GPU's dense bf16 peak (``brainfoundry.models.flops``: H100 SXM
989 TFLOP/s). Model FLOPs per sample are ``brainlm_flops(config)["train"]`` (3 x forward, matmuls
only, attention at 4 L^2 D per layer); tokens/s counts all 4240 input tokens of a sample (the
trainer's ``tokens_per_sample``). ``of ceiling`` divides by the measured matmul rate instead.
The last line printed is one JSON object (also written to ``--json``).

Measured on one H100 80GB HBM3 (SXM, 132 SMs), torch 2.11.0+cu130, defaults (5 warm-up steps,
2 x 10 timed steps); 259.5 GFLOP per sample per step (encoder 107.8, decoder blocks 150.5):

    matmul ceiling 8192^3 bf16      744 TFLOP/s (75 % of the 989 spec)
    row                 batch  samples/s  tokens/s  TFLOP/s   MFU  /ceil  peak GiB
    model eager           256      684.8    2.90e6    177.7  18.0%  23.9%    47.3
    model compile         256      823.9    3.49e6    213.8  21.6%  28.7%    42.8
    model eager/compile   512   out of memory (75.2 / 73.7 GiB allocated when it failed)
    encoder eager         512     2319.3    2.46e6    250.0  25.3%  33.6%    43.8
    encoder compile       512     2904.1    3.08e6    313.0  31.6%  42.0%    43.7
    decoder eager         512     1085.3    4.60e6    163.4  16.5%  21.9%    49.2
    decoder compile       512     1227.3    5.20e6    184.7  18.7%  24.8%    48.1
    trainer eager         256      669.8    2.84e6    173.8  17.6%  23.3%    47.2  (4 reader threads)

The whole step through the trainer ran at 0.98 x the model-only step (data wait 9.9 % of the wall
time, nearly all of it overlapped with queued GPU work). Pinning SDPA to cuDNN changed nothing
(encoder compile 31.7 %). Batch 512 does not fit in 80 GB in either mode (about 94 GiB eager and 85
GiB compiled by linear extrapolation from batch 256); the decoder's attention over 4241 tokens with
32-dim heads (43 % of the model's FLOPs) is what keeps the whole model below the encoder's MFU.

Batch 512 on one H200 (141 GB HBM3e, 132 SMs, torch 2.11.0+cu130, same defaults;
``--model-runs eager@512,compile@512 --part-runs '' --trainer-runs ''``), MFU against the same 989
TFLOP/s spec:

    matmul ceiling 8192^3 bf16      753 TFLOP/s (76 % of the 989 spec)
    row                 batch  samples/s  tokens/s  TFLOP/s   MFU  /ceil  peak GiB
    model eager           512      734.3    3.11e6    190.6  19.3%  25.3%    94.3
    model compile         512      870.9    3.69e6    226.0  22.8%  30.0%    85.3

The peaks match the extrapolation above (94 / 85 GiB); doubling the batch from 256 gains 7 % eager
and 6 % compiled (H200 vs H100, so the two machines' memory bandwidth differs as well).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from brainfoundry.models import build_model, make_config  # noqa: E402
from brainfoundry.models.flops import _linear, _transformer, brainlm_flops, peak_flops  # noqa: E402

PAPER = dict(window=200, patch_size=20, dim=512, depth=4, heads=8, decoder_dim=256, decoder_depth=2, decoder_heads=8,
             mask_ratio=0.75)
TINY = dict(window=200, patch_size=20, dim=64, depth=2, heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4,
            mask_ratio=0.75)
SDPA = ("cudnn", "flash", "efficient", "math")


# -- run specifications ------------------------------------------------------------------------------------
def parse_spec(text: str) -> dict[str, Any]:
    """``[part:]MODE[:compile-mode][+sdpa]@BATCH`` -> dict(part, compiled, mode, sdpa, batch, name)."""
    text = text.strip()
    head, sep, batch = text.rpartition("@")
    if not sep or not batch.isdigit():
        raise ValueError(f"run {text!r}: expected MODE@BATCH, e.g. eager@512 or compile@512")
    part = None
    if head.split(":", 1)[0] in ("encoder", "decoder"):
        part, head = head.split(":", 1)
    head, _, sdpa = head.partition("+")
    kind, _, mode = head.partition(":")
    if kind not in ("eager", "compile") or (sdpa and sdpa not in SDPA) or (mode and kind != "compile"):
        raise ValueError(f"run {text!r}: MODE is eager or compile[:torch-compile-mode], +sdpa one of {SDPA}")
    return {"part": part, "compiled": kind == "compile", "mode": mode or None, "sdpa": sdpa or None,
            "batch": int(batch), "name": text}


def spec_list(text: str) -> list[dict[str, Any]]:
    return [parse_spec(s) for s in text.split(",") if s.strip()]


def sdpa_context(name: str | None):
    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


# -- device helpers -------------------------------------------------------------------------------------------
class Device:
    def __init__(self, name: str):
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def autocast(self):
        # As the trainer: bf16 autocast on CUDA only.
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.dev) / 2**30 if self.cuda else None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def time_blocks(step: Callable[[], Any], device: Device, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    """Warm up, then ``repeats`` blocks of ``steps`` steps between synchronizations; median block."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    device.sync()
    warm_s = time.perf_counter() - t0
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        device.sync()
        blocks.append((time.perf_counter() - start) / steps)
    return {"step_s": statistics.median(blocks), "step_s_blocks": blocks,
            "spread": (max(blocks) - min(blocks)) / statistics.median(blocks), "warmup_s": warm_s}


def matmul_ceiling(device: Device, n: int, repeats: int = 20) -> dict[str, Any]:
    """Dense matmul rate on random data: bf16 on CUDA, float32 on the CPU."""
    dtype = torch.bfloat16 if device.cuda else torch.float32
    a = torch.randn(n, n, device=device.dev, dtype=dtype)
    b = torch.randn(n, n, device=device.dev, dtype=dtype)
    for _ in range(3):
        a @ b
    device.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        device.sync()
        times.append(time.perf_counter() - start)
    del a, b
    best, med = min(times), statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2 * n**3 / med,
            "flops_per_s_best": 2 * n**3 / best}


# -- the measurements -----------------------------------------------------------------------------------------
def coords(n_parcels: int) -> torch.Tensor:
    return torch.randn(n_parcels, 3, generator=torch.Generator().manual_seed(0)) * 40


def model_step_run(spec: dict, model_values: dict, device: Device, args) -> dict[str, Any]:
    """Full training steps of the model on batches already on the device (no data path)."""
    from brainfoundry.train import TrainConfig, configure_optimizer, sample_seeds

    torch.manual_seed(0)
    b = spec["batch"]
    cfg = make_config("brainlm", model_values)
    model = build_model("brainlm", cfg, coords=coords(cfg.n_parcels)).to(device.dev)
    optimizer = configure_optimizer(model, TrainConfig(lr=1e-4), device.dev)
    net = compile_module(model, spec, args) if spec["compiled"] else model
    xs = [torch.randn(b, cfg.window, cfg.n_parcels, device=device.dev) for _ in range(2)]
    mask = torch.ones(b, cfg.window, dtype=torch.bool, device=device.dev)
    count = [0]
    losses = []

    def step():
        i = count[0]
        count[0] += 1
        batch = {"x": xs[i % 2], "mask": mask, "seed": sample_seeds(0, i, 0, b)}
        with device.autocast(), sdpa_context(spec["sdpa"]):
            loss, _ = net(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 8 == 0:
            losses.append(loss.detach())

    result = time_blocks(step, device, args.warmup, args.steps, args.repeats)
    result["final_loss"] = float(losses[-1])
    result["flops_per_sample"] = brainlm_flops(cfg)["train"]
    return result


def part_run(spec: dict, model_values: dict, device: Device, args) -> dict[str, Any]:
    """Forward + backward of the encoder (or the decoder's blocks) alone on random activations."""
    torch.manual_seed(0)
    b = spec["batch"]
    cfg = make_config("brainlm", model_values)
    model = build_model("brainlm", cfg, coords=coords(cfg.n_parcels))
    f = brainlm_flops(cfg)
    if spec["part"] == "encoder":
        module, tokens, dim = model.encoder, f["n_visible"] + 1, cfg.dim
        flops = f["encoder_train"]
    else:
        module, tokens, dim = model.decoder, f["n_tokens"] + 1, cfg.decoder_dim
        flops = 3 * _transformer(tokens, cfg.decoder_dim, cfg.decoder_depth, cfg.mlp_ratio)
    module = module.to(device.dev)
    del model
    net = compile_module(module, spec, args) if spec["compiled"] else module
    x = torch.randn(b, tokens, dim, device=device.dev, requires_grad=True)
    grad = torch.randn(b, tokens, dim, device=device.dev)

    def step():
        with device.autocast(), sdpa_context(spec["sdpa"]):
            y = net(x)
        y.backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None

    result = time_blocks(step, device, args.warmup, args.steps, args.repeats)
    result["flops_per_sample"] = flops
    result["tokens"] = tokens
    return result


def compile_module(module: torch.nn.Module, spec: dict, args) -> torch.nn.Module:
    torch._dynamo.reset()
    options = {"backend": args.compile_backend}
    if spec["mode"]:
        options["mode"] = spec["mode"]
    return torch.compile(module, **options)


def write_shards(root: Path, args, n_parcels: int, window: int) -> tuple[Path, float, int]:
    from brainfoundry.testing import write_synthetic_shards

    batch = max(s["batch"] for s in spec_list(args.trainer_runs))
    runs = args.runs or 2 * max(1, args.workers) * batch
    start = time.perf_counter()
    shards = write_synthetic_shards(root / "shards", n_subjects=runs, n_parcels=n_parcels,
                                    n_timepoints=window + args.extra_timepoints, n_buckets=4, row_group_size=16,
                                    pfc=False, rank=8, split_of=lambda i, n: "train")
    return shards, time.perf_counter() - start, runs


def trainer_run(spec: dict, model_values: dict, device: Device, args, shards: Path, out: Path) -> dict[str, Any]:
    """The real trainer on the shards: whole steps, data wait included (the first interval dropped)."""
    from brainfoundry.train import TrainConfig, train

    if spec["mode"] or spec["sdpa"]:
        raise ValueError("trainer runs take eager@B or compile@B only (the trainer has no compile mode/SDPA knob)")
    warm = max(1, args.warmup)
    steps = warm + max(warm, args.steps * args.repeats // warm * warm)
    cfg = TrainConfig(steps=steps, batch_size=spec["batch"], lr=1e-4, warmup_steps=warm, log_every=warm,
                      checkpoint_every=10**9, eval_every=0, eval_batches=1, window=model_values["window"],
                      num_workers=args.workers, drop_last=True, device=str(device.dev), dtype="bf16",
                      compile=spec["compiled"], compile_backend=args.compile_backend, seed=0)
    if spec["compiled"]:
        torch._dynamo.reset()
    train("brainlm", out, shards=shards, model_config=dict(model_values), train_config=cfg, resume="never",
          progress=False)
    with open(out / "metrics.csv") as handle:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(handle)]
    use = rows[1:] if len(rows) > 1 else rows
    seconds = sum(r["step_time_s"] * warm for r in use)
    wait = sum(r["data_wait_fraction"] * r["step_time_s"] * warm for r in use)
    blocks = [r["step_time_s"] for r in use]
    cfg_model = make_config("brainlm", model_values)
    return {"step_s": seconds / (warm * len(use)), "step_s_blocks": blocks,
            "spread": (max(blocks) - min(blocks)) / statistics.median(blocks),
            "warmup_s": rows[0]["step_time_s"] * warm if len(rows) > 1 else None,
            "data_wait_fraction": wait / seconds, "final_loss": rows[-1]["loss"],
            "trainer_mfu": statistics.median([r["mfu"] for r in use]) if all("mfu" in r for r in use) else None,
            "flops_per_sample": brainlm_flops(cfg_model)["train"], "steps_timed": warm * len(use)}


# -- reporting ---------------------------------------------------------------------------------------------------
def finish(row: dict, spec: dict, device: Device, peak: float | None, ceiling: float | None, tokens_per_sample: int):
    b = spec["batch"]
    sps = b / row["step_s"]
    achieved = row["flops_per_sample"] * sps
    row.update({"samples_per_s": sps, "tokens_per_s": sps * tokens_per_sample if not spec["part"] else
                sps * row["tokens"], "tflops_per_s": achieved / 1e12,
                "mfu": achieved / peak if peak else None, "of_ceiling": achieved / ceiling if ceiling else None,
                "peak_mem_gib": device.peak_gib()})
    return row


def run_all(kind: str, specs: list[dict], fn: Callable[[dict], dict], device: Device, results: list, args,
            peak, ceiling, tokens_per_sample, started: float, save: Callable[[], None]) -> None:
    for spec in specs:
        name = f"{spec['part'] or kind} {spec['name'].split(':', 1)[-1] if spec['part'] else spec['name']}"
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            results.append({"kind": spec["part"] or kind, "name": spec["name"], "batch": spec["batch"],
                            "status": "skipped (time budget)"})
            print(f"[{name}] skipped: time budget of {args.time_budget:.0f} s spent", flush=True)
            continue
        device.reset_memory()
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"kind": spec["part"] or kind, "name": spec["name"], "batch": spec["batch"]}
        error = None
        try:
            row = fn(spec)
            entry.update(finish(row, spec, device, peak, ceiling, tokens_per_sample))
            entry["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - report and go on to the next row
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            entry["status"] = "out of memory" if is_oom(err) else "failed"
            entry["error"] = error
            entry["peak_mem_gib"] = device.peak_gib()
            if not is_oom(err):
                import traceback

                traceback.print_exc()
            del err
        entry["wall_s"] = time.perf_counter() - t0
        device.reset_memory()
        results.append(entry)
        save()
        if entry["status"] == "ok":
            mfu = f"MFU {entry['mfu']:.1%}" if entry["mfu"] is not None else ""
            mem = f"peak {entry['peak_mem_gib']:.1f} GiB" if entry["peak_mem_gib"] is not None else ""
            print(f"[{name}] {entry['samples_per_s']:.1f} samples/s, step {entry['step_s'] * 1e3:.1f} ms "
                  f"(spread {entry['spread']:.1%}), {entry['tflops_per_s']:.1f} TFLOP/s {mfu} {mem} "
                  f"(warm-up {entry['warmup_s'] or 0:.1f} s, row {entry['wall_s']:.0f} s)", flush=True)
        else:
            print(f"[{name}] {entry['status']}: {error}", flush=True)


def table(summary: dict) -> str:
    lines = [f"{'row':<34}{'batch':>6}{'samples/s':>11}{'tokens/s':>11}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}"
             f"{'/ceil':>7}{'wait':>7}{'peak GiB':>10}"]
    for r in summary["rows"]:
        label = f"{r['kind']} {r['name'].split(':', 1)[-1] if r['kind'] in ('encoder', 'decoder') else r['name']}"
        if r.get("status") != "ok":
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            lines.append(f"{label:<34}{r['batch']:>6}  {r['status']} {'':>30}{mem:>10}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        ceil = f"{r['of_ceiling']:.1%}" if r.get("of_ceiling") is not None else "-"
        wait = f"{r['data_wait_fraction']:.1%}" if "data_wait_fraction" in r else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(f"{label:<34}{r['batch']:>6}{r['samples_per_s']:>11.1f}{r['tokens_per_s']:>11.3g}"
                     f"{r['step_s'] * 1e3:>9.1f}{r['tflops_per_s']:>9.1f}{mfu:>7}{ceil:>7}{wait:>7}{mem:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (smoke test only)")
    parser.add_argument("--config", choices=("paper", "tiny"), default=None, help="model size (default: paper; "
                                                                                   "tiny with --quick)")
    parser.add_argument("--parcels", type=int, default=424)
    parser.add_argument("--model-runs", default="eager@256,compile@256,eager@512,compile@512",
                        help="model-only steps, comma-separated MODE@BATCH")
    parser.add_argument("--part-runs", default="encoder:eager@512,encoder:compile@512,decoder:eager@512,"
                                               "decoder:compile@512",
                        help="encoder:/decoder: forward+backward alone, comma-separated")
    parser.add_argument("--trainer-runs", default="eager@256,compile@256",
                        help="the real trainer over synthetic shards, comma-separated MODE@BATCH")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=2, help="timed blocks (the median is reported)")
    parser.add_argument("--workers", type=int, default=2, help="trainer reader threads (trainer.num_workers)")
    parser.add_argument("--runs", type=int, default=0, help="synthetic runs (default 2 x workers x largest batch)")
    parser.add_argument("--extra-timepoints", type=int, default=0, help="run length beyond the window (crops)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager in --quick "
                                                                "on the CPU)")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul ceiling size (8192; 1024 on the CPU)")
    parser.add_argument("--time-budget", type=float, default=0, help="skip rows once this many seconds have passed")
    parser.add_argument("--json", default=None, help="also write the JSON summary here (updated after every row)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, batch 4, 1 + 2 steps")
    args = parser.parse_args(argv)

    device = Device(args.device)
    if device.cuda and not torch.cuda.is_available():
        print("bench_train_gpu: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a GPU machine, "
              "or pass --device cpu --quick for a smoke test.", file=sys.stderr)
        return 2
    if args.quick:
        args.config = args.config or "tiny"
        args.model_runs, args.trainer_runs = "eager@4,compile@4", "eager@4,compile@4"
        args.part_runs = "encoder:eager@4,decoder:compile@4"
        args.warmup, args.steps, args.repeats, args.workers = 1, 2, 1, 1
        if not device.cuda:
            args.compile_backend = args.compile_backend or "eager"
    args.compile_backend = args.compile_backend or "inductor"
    args.matmul_n = args.matmul_n or (8192 if device.cuda else 1024)
    model_values = {**(TINY if args.config == "tiny" else PAPER), "n_parcels": args.parcels}
    cfg = make_config("brainlm", model_values)
    flops = brainlm_flops(cfg)
    specs = {"model": spec_list(args.model_runs), "part": spec_list(args.part_runs),
             "trainer": spec_list(args.trainer_runs)}
    if any(s["part"] is None for s in specs["part"]) or any(s["part"] for s in specs["model"] + specs["trainer"]):
        parser.error("--part-runs take encoder:/decoder: prefixes, the other lists none")

    started = time.perf_counter()
    if device.cuda:
        if device.dev.index is None:
            device.dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device.dev)
        props = torch.cuda.get_device_properties(device.dev)
        info = {"gpu": props.name, "sms": props.multi_processor_count, "gpu_mem_gib": props.total_memory / 2**30,
                "cuda": torch.version.cuda}
    else:
        info = {"gpu": None, "cpu_threads": torch.get_num_threads()}
    peak = peak_flops(info["gpu"]) if device.cuda else None
    summary: dict[str, Any] = {
        "device": str(device.dev), **info, "torch": torch.__version__, "python": platform.python_version(),
        "config": {k: v for k, v in model_values.items()}, "n_parameters": None,
        "flops_per_sample": {k: flops[k] for k in ("forward", "train", "encoder_train")},
        "decoder_blocks_train_flops": 3 * _transformer(flops["n_tokens"] + 1, cfg.decoder_dim, cfg.decoder_depth,
                                                       cfg.mlp_ratio),
        "tokens_per_sample": flops["n_tokens"], "encoder_tokens": flops["n_visible"] + 1,
        "peak_bf16_flops_spec": peak, "compile_backend": args.compile_backend,
        "timing": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}, "rows": []}
    summary["n_parameters"] = build_model("brainlm", cfg).num_parameters()

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=1))

    print(f"BrainLM {args.config or 'paper'}: {summary['n_parameters']:,} parameters, {flops['n_tokens']} tokens "
          f"({flops['n_visible']} visible), {flops['train'] / 1e9:.1f} GFLOP per sample per training step "
          f"(encoder {flops['encoder_train'] / 1e9:.1f}); device {info['gpu'] or 'cpu'}; torch {torch.__version__}",
          flush=True)
    mm = matmul_ceiling(device, args.matmul_n)
    summary["matmul"] = mm
    ceiling = mm["flops_per_s"]
    print(f"[matmul] {mm['n']}^3 {mm['dtype']}: {ceiling / 1e12:.1f} TFLOP/s median, "
          f"{mm['flops_per_s_best'] / 1e12:.1f} best" + (f" ({ceiling / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s "
                                                         f"spec)" if peak else ""), flush=True)
    save()

    rows = summary["rows"]
    tps = flops["n_tokens"]
    run_all("model", specs["model"], lambda s: model_step_run(s, model_values, device, args), device, rows, args,
            peak, ceiling, tps, started, save)
    run_all("part", specs["part"], lambda s: part_run(s, model_values, device, args), device, rows, args,
            peak, ceiling, tps, started, save)
    if specs["trainer"]:
        with tempfile.TemporaryDirectory(prefix="bench_train_gpu_") as tmp:
            shards, write_s, n_runs = write_shards(Path(tmp), args, args.parcels, model_values["window"])
            summary["shards"] = {"runs": n_runs, "timepoints": model_values["window"] + args.extra_timepoints,
                                 "write_s": write_s, "workers": args.workers}
            print(f"[shards] {n_runs} synthetic runs written in {write_s:.1f} s; {args.workers} reader threads",
                  flush=True)
            counter = [0]

            def trainer_fn(spec):
                counter[0] += 1
                return trainer_run(spec, model_values, device, args, shards, Path(tmp) / f"train{counter[0]}")

            run_all("trainer", specs["trainer"], trainer_fn, device, rows, args, peak, ceiling, tps, started, save)

    # Whole step vs model-only at the same batch and mode: the data path's share of the step.
    by = {(r["kind"], r["name"]): r for r in rows if r.get("status") == "ok"}
    shares = {}
    for (kind, name), r in by.items():
        if kind == "trainer" and ("model", name) in by:
            m = by[("model", name)]
            shares[name] = {"whole_over_model_throughput": r["samples_per_s"] / m["samples_per_s"],
                            "data_path_share_of_step": 1 - m["step_s"] / r["step_s"]}
    summary["whole_step_vs_model"] = shares
    summary["wall_s"] = time.perf_counter() - started
    save()

    print()
    print(f"BrainLM ({args.config or 'paper'}) training on {info['gpu'] or 'cpu'}; "
          f"{flops['train'] / 1e9:.1f} GFLOP/sample (fwd+bwd = 3 x fwd); matmul ceiling {ceiling / 1e12:.1f} TFLOP/s"
          + (f"; MFU vs {peak / 1e12:.0f} TFLOP/s dense bf16 spec" if peak else ""))
    print(table(summary))
    for name, s in shares.items():
        print(f"{name}: whole step / model-only throughput {s['whole_over_model_throughput']:.2f} "
              f"(data path and loop overhead {s['data_path_share_of_step']:.1%} of the whole step)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
