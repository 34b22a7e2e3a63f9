"""Shard reader: windows per second from parquet shards against the ``.npy`` floor, plus shard size/write speed.

    python benchmarks/bench_reader.py            # 1024 runs, N=424, T in [200, 300], window 200 (~1-2 min)

What is measured (same synthetic runs for every row; float32 AR(1) series like denoised BOLD):
- ``npy floor``: one ``.npy`` file per run, ``numpy.load`` + crop a window + contiguous copy, in one
  process: the least work any reader of these windows must do.
- ``shards <codec>``: ``brainfoundry.data`` end to end (row-group reads, bounded shuffle buffer, seeded
  crop, robust scaling, batching) through ``make_dataloader`` with 2 reader threads (the default
  backend) and batches of 64; for the default codec also with 2 DataLoader worker processes
  (``backend="process"``) and in one thread (the dataset iterated directly). Loader rates are steady state
  (from the first batch of an epoch to its end); the rate including worker start-up and the time
  to the first batch are printed beside them.
- ``naive random access``: reading the row group of each randomly chosen run to take one row (what a
  map-style dataset over parquet would do); the shuffle buffer exists to avoid exactly this.
- checksums: every row is read with parquet page-checksum verification (the reader's setting), and
  the sha256 of the shards, which a reader computes once per process against the manifest, is timed
  and printed as a fraction of one epoch's reading.
- shard bytes / raw float32 bytes and write MB/s per codec (raw array bytes per second of writing).
  With ``../shared/data`` present, the size ratio on real ABIDE CC200 series is printed too.

Rates are medians over interleaved rounds, so the ratios come from the same conditions. On a shared
machine wall-clock rates move with its load (printed), so each row also shows windows per CPU second
(this process's threads plus its finished worker processes, start-up included): the work per window,
which load barely changes. Peak memory is the maximum RSS of
this process and of its (worker) children. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from brainfoundry import shards  # noqa: E402
from brainfoundry.data import ShardDataset, make_dataloader  # noqa: E402
from brainfoundry.io import sha256_file  # noqa: E402
from brainfoundry.splits import split_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_runs(n_runs: int, n_parcels: int, t_min: int, t_max: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n_runs):
        t = int(rng.integers(t_min, t_max + 1))
        e = rng.standard_normal((t, n_parcels), dtype=np.float32)
        x = np.empty_like(e)
        x[0] = e[0]
        for i in range(1, t):  # AR(1), a crude stand-in for smooth BOLD
            x[i] = 0.7 * x[i - 1] + e[i]
        runs.append(x * rng.uniform(0.5, 20, n_parcels).astype(np.float32)
                    + rng.uniform(-100, 100, n_parcels).astype(np.float32))
    return runs


def write_shards(runs: list[np.ndarray], out: Path, codec: str, n_buckets: int, row_group_size: int,
                 names: list[str]) -> tuple[float, int]:
    """Shards of the runs with ``codec``; returns (seconds, raw bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    buckets = [[] for _ in range(n_buckets)]
    for i, x in enumerate(runs):
        buckets[i % n_buckets].append((i, x))
    raw = 0
    start = time.perf_counter()
    for b, rows in enumerate(buckets):
        pheno = {"age": pa.float64(), "sex": pa.string(), "diagnosis": pa.string()}
        with shards.ShardWriter(out / f"bucket-{b}.parquet", parcel_names=names, phenotypes=pheno,
                                row_group_size=row_group_size, compression=codec,
                                metadata={"atlas": "bench", "bucket": b}) as writer:
            for i, x in rows:
                subject = f"{i:05d}"
                writer.add({"run_id": f"sub-{subject}_task-rest", "subject": subject, "task": "rest",
                            "dataset": "bench", "site": "S", "split": split_of(subject, 0, {"train": .7, "val": .15,
                                                                                          "test": .15}),
                            "bucket": b, "tr": 2.0, "timeseries": x, "age": 30.0, "sex": "female"})
            raw += writer.raw_bytes
    return time.perf_counter() - start, raw


def dir_bytes(path: Path, pattern: str = "bucket-*.parquet") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def npy_floor(paths: list[Path], window: int, seed: int) -> tuple[float, float]:
    """(windows per wall second, windows per CPU second)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in order:
        x = np.load(paths[i])
        s = int(rng.integers(0, x.shape[0] - window + 1))
        np.ascontiguousarray(x[s:s + window])
    return len(paths) / (time.perf_counter() - start), len(paths) / (cpu_seconds() - cpu)


def loader_rate(shard_dir: Path, window: int, workers: int, batch: int, epoch: int,
                backend: str = "thread") -> tuple[float, dict]:
    ds = ShardDataset(shard_dir, split=None, window=window, seed=1, buffer_size=256)
    extra = {}
    if workers == 0:  # the plain dataset in this thread: its own counters are visible
        ds.batch_size = batch
        ds.set_epoch(epoch)
        batches = iter(ds)
        extra = {"n_units": len(ds.units), "resident_units": ds.resident_units}
    else:
        loader = make_dataloader(ds, batch_size=batch, num_workers=workers, pin_memory=False, backend=backend)
        loader.set_epoch(epoch)
        batches = iter(loader)
    start, cpu = time.perf_counter(), cpu_seconds()
    n, first, n_first = 0, None, 0
    for b in batches:
        n += len(b["run_id"])
        if first is None:  # worker start-up and the first row groups: reported apart
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    del batches  # lets DataLoader workers exit, so that their CPU time is counted
    cpu = cpu_seconds() - cpu
    return (n - n_first) / (end - first), {"startup_s": first - start, "with_startup": n / (end - start),
                                           "per_cpu_s": n / cpu, **extra, **(ds.stats if workers == 0 else {})}


def naive_random_rate(shard_dir: Path, n_samples: int, seed: int) -> float:
    """Map-style access: open the run's row group for every sample (no buffer)."""
    files = [pq.ParquetFile(p) for p in shards.find_shards(shard_dir)]
    index = [(f, g, r) for f in files for g in range(f.num_row_groups)
             for r in range(f.metadata.row_group(g).num_rows)]
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for k in rng.choice(len(index), size=n_samples, replace=False):
        f, g, r = index[k]
        table = f.read_row_group(g, columns=["timeseries"])
        table.column(0)[r].as_buffer()
    return n_samples / (time.perf_counter() - start)


def abide_ratios(codecs: list[str], n_files: int, tmp: Path) -> dict[str, float]:
    """Shard bytes / raw bytes on real ABIDE CC200 series (when ../shared/data is present)."""
    root = Path(os.environ.get("BRAINFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))
    files = sorted(glob.glob(str(root / "abide_pcp_cc200" / "rois_cc200" / "*.1D*")))[:n_files]
    if not files:
        return {}
    runs = [np.loadtxt(f, comments="#", dtype=np.float32) for f in files]
    names = [f"#{i + 1}" for i in range(runs[0].shape[1])]
    out = {}
    for codec in codecs:
        d = tmp / f"abide-{codec}"
        _, raw = write_shards(runs, d, codec, 1, 64, names)
        out[codec] = dir_bytes(d) / raw
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1024)
    parser.add_argument("--parcels", type=int, default=424)
    parser.add_argument("--t-min", type=int, default=200)
    parser.add_argument("--t-max", type=int, default=300)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--row-group-size", type=int, default=64)
    parser.add_argument("--codecs", default="none,lz4,zstd", help="comma list; 'none' is plain")
    parser.add_argument("--default-codec", default=None,
                        help="headline codec (default: shards.timeseries_compression of config/config.yaml)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--abide-files", type=int, default=64)
    args = parser.parse_args(argv)

    codecs = args.codecs.split(",")
    default = args.default_codec
    if default is None:
        import yaml

        cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["shards"]
        default = cfg.get("timeseries_compression") or cfg["compression"]
    if default not in codecs:
        codecs.append(default)
    if "none" not in codecs:
        codecs.insert(0, "none")
    tmp = Path(tempfile.mkdtemp(prefix="bench_reader_"))
    try:
        runs = make_runs(args.runs, args.parcels, args.t_min, args.t_max)
        names = [f"P{i:03d}" for i in range(args.parcels)]
        raw_series = sum(x.nbytes for x in runs)
        npy_dir = tmp / "npy"
        npy_dir.mkdir()
        npy_paths = []
        for i, x in enumerate(runs):
            npy_paths.append(npy_dir / f"{i:05d}.npy")
            np.save(npy_paths[-1], x)
        write_s, size_ratio, dirs = {}, {}, {}
        for codec in codecs:
            d = tmp / f"shards-{codec}"
            seconds, raw = write_shards(runs, d, codec, args.buckets, args.row_group_size, names)
            write_s[codec] = raw / seconds / 1e6
            size_ratio[codec] = dir_bytes(d) / raw
            dirs[codec] = d
        del runs
        start = time.perf_counter()
        shards.write_manifest(shards.find_shards(dirs[default]), dirs[default] / "manifest.parquet",
                              dirs[default] / "norm_stats.parquet")
        manifest_s = time.perf_counter() - start
        # What a reader pays once per process before its first batch: the sha256 of every shard,
        # checked against the manifest (shards.verify_shards; later datasets in the process reuse it).
        start = time.perf_counter()
        for path in shards.find_shards(dirs[default]):
            sha256_file(path)
        checksum_s = time.perf_counter() - start
        shard_bytes = dir_bytes(dirs[default])
        for codec in codecs:
            if codec != default:
                shutil.copy(dirs[default] / "norm_stats.parquet", dirs[codec] / "norm_stats.parquet")

        rates: dict[str, list[float]] = {"npy floor": [], "in-process": [], "process workers": []}
        for codec in codecs:
            rates[f"shards {codec}"] = []
        stats, startup, with_startup = {}, {}, {}
        cpu_rates: dict[str, list[float]] = {}
        loads = []
        for r in range(args.rounds):  # interleaved so that every row sees the same machine load
            loads.append(os.getloadavg()[0])
            wall, per_cpu = npy_floor(npy_paths, args.window, r)
            rates["npy floor"].append(wall)
            cpu_rates.setdefault("npy floor", []).append(per_cpu)
            for codec in codecs:
                rate, info = loader_rate(dirs[codec], args.window, args.workers, args.batch_size, r)
                rates[f"shards {codec}"].append(rate)
                cpu_rates.setdefault(f"shards {codec}", []).append(info["per_cpu_s"])
                startup.setdefault(codec, []).append(info["startup_s"])
                with_startup.setdefault(codec, []).append(info["with_startup"])
            rate, stats = loader_rate(dirs[default], args.window, 0, args.batch_size, r)
            rates["in-process"].append(rate)
            cpu_rates.setdefault("in-process", []).append(stats["per_cpu_s"])
            rate, info = loader_rate(dirs[default], args.window, args.workers, args.batch_size, r, backend="process")
            rates["process workers"].append(rate)
            cpu_rates.setdefault("process workers", []).append(info["per_cpu_s"])
        naive = naive_random_rate(dirs[default], min(64, args.runs), 0)
        med = {k: statistics.median(v) for k, v in rates.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu_rates.items()}
        floor = med["npy floor"]
        cpu_floor = cpu_med["npy floor"]

        print(f"{args.runs} runs, {args.parcels} parcels, T in [{args.t_min}, {args.t_max}], window {args.window}; "
              f"{raw_series / 1e6:.0f} MB float32; {args.buckets} shards, row groups of {args.row_group_size}; "
              f"median of {args.rounds} interleaved rounds")
        print(f"load average during the rounds: {', '.join(f'{v:.1f}' for v in loads)} ({os.cpu_count()} CPUs)")
        print(f"{'reader':34s} {'windows/s':>10s} {'/ npy floor':>12s} {'per CPU-s':>10s} {'/ floor':>8s}")

        def cpu_cols(key: str) -> str:
            return f" {cpu_med[key]:10.0f} {cpu_med[key] / cpu_floor:8.2f}"

        print(f"{'npy floor (1 thread)':34s} {floor:10.0f} {1.0:12.2f}" + cpu_cols("npy floor"))
        for codec in codecs:
            label = f"shards {codec} ({args.workers} threads)"
            print(f"{label:34s} {med[f'shards {codec}']:10.0f} {med[f'shards {codec}'] / floor:12.2f}"
                  + cpu_cols(f"shards {codec}"))
        print(f"{'  (incl. start-up: ' + default + ')':34s} {statistics.median(with_startup[default]):10.0f} "
              f"{statistics.median(with_startup[default]) / floor:12.2f}   first batch after "
              f"{statistics.median(startup[default]):.2f} s")
        for key, label in (("process workers", f"shards {default} ({args.workers} DataLoader procs)"),
                           ("in-process", f"shards {default} (1 thread)")):
            print(f"{label:34s} {med[key]:10.0f} {med[key] / floor:12.2f}" + cpu_cols(key))
        print(f"{'naive random row access':34s} {naive:10.0f} {naive / floor:12.3f}")
        print(f"row groups decoded per epoch: {stats['row_groups_read']} of {stats['n_units']} (each once); "
              f"shuffle buffer: {stats['resident_units']} resident row groups, at most "
              f"{stats['max_resident_rows']} decoded rows held")
        print(f"\n{'codec':8s} {'bytes/raw':>10s} {'write MB/s':>11s} {'x plain':>8s}")
        for codec in codecs:
            print(f"{codec:8s} {size_ratio[codec]:10.3f} {write_s[codec]:11.0f} {write_s[codec] / write_s['none']:8.2f}")
        abide = abide_ratios(codecs, args.abide_files, tmp) if args.abide_files else {}
        if abide:
            print("ABIDE CC200 (real series, first %d files) bytes/raw: %s" % (
                args.abide_files, ", ".join(f"{c} {v:.3f}" for c, v in abide.items())))
        print(f"manifest + train norm stats: {manifest_s:.1f} s")
        epoch_s = args.runs / med[f"shards {default}"]
        print(f"sha256 of the shards (once per process): {checksum_s:.2f} s for {shard_bytes / 1e6:.0f} MB "
              f"({shard_bytes / checksum_s / 1e6:.0f} MB/s), {checksum_s / epoch_s:.3f} of one epoch's reading")
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS: this process {peak_self:.0f} MB, largest worker {peak_children:.0f} MB")

        figures = {
            "windows_per_s": round(med[f"shards {default}"], 1),
            "fraction_of_npy_floor": round(med[f"shards {default}"] / floor, 3),
            "shard_bytes_ratio_vs_raw": round(size_ratio[default], 4),
            "codec": default,
            "npy_floor_windows_per_s": round(floor, 1),
            "windows_per_s_by_codec": {c: round(med[f"shards {c}"], 1) for c in codecs},
            "fraction_of_npy_floor_by_codec": {c: round(med[f"shards {c}"] / floor, 3) for c in codecs},
            "windows_per_cpu_s": round(cpu_med[f"shards {default}"], 1),
            "cpu_fraction_of_npy_floor": round(cpu_med[f"shards {default}"] / cpu_floor, 3),
            "cpu_fraction_of_npy_floor_by_codec": {c: round(cpu_med[f"shards {c}"] / cpu_floor, 3) for c in codecs},
            "load_average": [round(v, 2) for v in loads],
            "windows_per_s_incl_startup": round(statistics.median(with_startup[default]), 1),
            "first_batch_s": round(statistics.median(startup[default]), 3),
            "process_workers_windows_per_s": round(med["process workers"], 1),
            "process_workers_fraction_of_npy_floor": round(med["process workers"] / floor, 3),
            "in_process_windows_per_s": round(med["in-process"], 1),
            "in_process_fraction_of_npy_floor": round(med["in-process"] / floor, 3),
            "naive_random_access_fraction_of_npy_floor": round(naive / floor, 4),
            "bytes_ratio_vs_raw_by_codec": {c: round(v, 4) for c, v in size_ratio.items()},
            "write_MBps_by_codec": {c: round(v, 1) for c, v in write_s.items()},
            "write_speed_ratio_vs_plain": {c: round(write_s[c] / write_s["none"], 3) for c in codecs},
            "abide_bytes_ratio_vs_raw_by_codec": {c: round(v, 4) for c, v in abide.items()},
            "checksum_s": round(checksum_s, 3),
            "checksum_fraction_of_epoch": round(checksum_s / epoch_s, 4),
            "row_group_reads_per_unit": round(stats["row_groups_read"] / stats["n_units"], 3),
            "peak_rss_MB": round(peak_self, 1),
            "peak_worker_rss_MB": round(peak_children, 1),
            "runs": args.runs, "parcels": args.parcels, "window": args.window, "workers": args.workers,
        }
        print(json.dumps(figures))
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
