"""Parcellation benchmark: brainfoundry's streamed parcellate vs nilearn's NiftiLabelsMasker.

Writes a seeded 97x115x97xT float32 ``.nii.gz`` on fMRIPrep's MNI152NLin2009cAsym res-2 grid with a
brain mask and an fMRIPrep-style confounds TSV/JSON, prepares the A424 atlas from ../shared/data
(else a synthetic 424-parcel atlas) on that grid, then measures, each in its own child process
(so the peak memory is that method's, as ``ru_maxrss``), interleaved and repeated:

- ``nilearn_file``: ``load_confounds`` + ``NiftiLabelsMasker(...).fit_transform(path, confounds, sample_mask)``
- ``ours_file``: ``brainfoundry.parcellate.parcellate_run`` (the real step: confounds, streaming
  means, sha256 of the input for provenance, cleaning; output writing excluded)
- ``ours_file_nochecksum`` (informative): the same without the input's sha256
- ``gunzip_*``: decompressing the image into a reused buffer with stdlib gzip, ISA-L ``igzip`` and
  ISA-L ``igzip_threaded``; the fastest is the floor
- ``nilearn_loaded`` (once, informative): the masker on an image already in memory

Times are the best of ``--repeats`` (``--nilearn-repeats`` for nilearn; the machine is shared and the
minimum is the least disturbed run).
Run: ``python benchmarks/bench_parcellate.py [--volumes 300] [--repeats 3]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))
SPACE = "MNI152NLin2009cAsym_res-2"
DENOISE = {  # the demo config's denoising (motion 24 + WM/CSF + aCompCor + cosine + scrubbing + band-pass)
    "strategy": ["motion", "wm_csf", "high_pass", "compcor", "scrub", "non_steady_state"],
    "motion": "full", "wm_csf": "basic", "global_signal": None, "compcor": "anat_combined", "n_compcor": 5,
    "fd_threshold": 0.5, "std_dvars_threshold": None, "scrub_min_segment": 5, "detrend": True,
    "standardize": False, "high_pass": 0.01, "low_pass": 0.1, "target_tr": None, "min_volumes": 50,
}
TR = 2.0


# -- data -------------------------------------------------------------------------------------------

def make_atlas(work: Path) -> tuple[Path, Path, str]:
    """A424 resampled to the BOLD grid (or a synthetic 424-parcel atlas), via atlas.prepare_atlas."""
    import nibabel as nib

    from brainfoundry.atlas import KNOWN_GRIDS, prepare_atlas

    grid = KNOWN_GRIDS[SPACE]
    a424 = SHARED / "atlases" / "A424" / "A424+2mm.nii.gz"
    if a424.exists():
        src, labels, name = a424, SHARED / "atlases" / "A424" / "A424_Coordinates.dat", "A424"
    else:
        from scipy.spatial import cKDTree

        rng = np.random.default_rng(7)
        inside = np.argwhere(_ellipsoid(grid.shape, 0.9))
        seeds = inside[rng.choice(len(inside), 424, replace=False)]
        lab = np.zeros(grid.shape, np.int16)
        lab[tuple(inside.T)] = cKDTree(seeds).query(inside)[1] + 1
        src, labels, name = work / "synthetic_atlas.nii.gz", None, "Synthetic424"
        nib.save(nib.Nifti1Image(lab, grid.affine), src)
    dseg, tsv = work / f"space-{SPACE}_seg-{name}_dseg.nii.gz", work / f"space-{SPACE}_seg-{name}_dseg.tsv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_atlas(src, out_labels=tsv, out_json=work / "atlas.json", out_dseg=dseg, name=name, space=SPACE,
                      labels=labels, grid=grid)
    return dseg, tsv, name


def _ellipsoid(shape, scale):
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return (x / (0.8 * scale)) ** 2 + (y / (0.85 * scale)) ** 2 + (z / (0.75 * scale)) ** 2 < 1


def make_run(work: Path, n_vol: int, seed: int = 20261122) -> dict[str, Path]:
    """A seeded BOLD series with parcel-level structure and motion, its mask and its confounds."""
    import nibabel as nib
    import pandas as pd
    from isal import igzip

    from brainfoundry.atlas import KNOWN_GRIDS

    grid = KNOWN_GRIDS[SPACE]
    rng = np.random.default_rng(seed)
    mask = _ellipsoid(grid.shape, 1.0)
    flat_mask = mask.ravel(order="F")
    n_in = int(flat_mask.sum())
    x = np.linspace(-1, 1, grid.shape[0])[:, None, None]
    base = (700 + 300 * np.cos(2 * x) + np.zeros(grid.shape)).ravel(order="F")[flat_mask].astype(np.float32)
    # 12 smooth latent signals mixed into voxels: structure, not white noise.
    latent = np.cumsum(rng.standard_normal((n_vol, 12)), axis=0).astype(np.float32)
    latent -= latent.mean(0)
    loadings = rng.standard_normal((12, n_in), dtype=np.float32) * np.float32(0.004)
    motion = np.cumsum(rng.normal(0, 0.03, (n_vol, 6)), axis=0) * np.array([1, 1, 1, 0.01, 0.01, 0.01])
    motion[n_vol // 2: n_vol // 2 + 3] += 0.8  # a motion burst to censor
    paths = {"bold": work / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz",
             "mask": work / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz",
             "confounds": work / "sub-01_task-rest_desc-confounds_timeseries.tsv"}
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(grid.shape + (n_vol,))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(grid.affine, 1)
    hdr.set_sform(grid.affine, 1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["pixdim"][4] = TR
    hdr["vox_offset"] = 352
    volume = np.zeros(flat_mask.size, np.float32)
    glob = np.empty(n_vol)
    with igzip.open(paths["bold"], "wb", compresslevel=1) as out:  # level 1, nibabel's default
        out.write(hdr.binaryblock + b"\0" * 4)
        for t in range(n_vol):
            signal = base * (1 + latent[t] @ loadings + 0.01 * rng.standard_normal(n_in, dtype=np.float32))
            signal *= 1 + 0.02 * motion[t, 0] + (0.5 if t < 2 else 0.0)  # motion + non-steady state
            volume[flat_mask] = signal
            glob[t] = signal.mean()
            out.write(volume.tobytes())
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), grid.affine), paths["mask"])
    dm = np.diff(motion, axis=0)
    fd = np.concatenate([[np.nan], np.abs(dm[:, :3]).sum(1) + 50 * np.abs(dm[:, 3:]).sum(1)])
    cols = {"global_signal": glob, "csf": glob * 1.3 + rng.normal(0, 1, n_vol),
            "white_matter": glob * 0.8 + rng.normal(0, 1, n_vol), "framewise_displacement": fd,
            "std_dvars": np.concatenate([[np.nan], 1 + 0.1 * rng.standard_normal(n_vol - 1)])}
    for j, name in enumerate(["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]):
        d = np.concatenate([[np.nan], np.diff(motion[:, j])])
        cols.update({name: motion[:, j], f"{name}_derivative1": d, f"{name}_power2": motion[:, j] ** 2,
                     f"{name}_derivative1_power2": d ** 2})
    for name in ("csf", "white_matter"):
        d = np.concatenate([[np.nan], np.diff(cols[name])])
        cols.update({f"{name}_derivative1": d, f"{name}_power2": cols[name] ** 2, f"{name}_derivative1_power2": d ** 2})
    t = np.arange(n_vol)
    for k in range(1, int(2 * n_vol * TR / 128) + 1):
        cols[f"cosine_{k - 1:02d}"] = np.sqrt(2 / n_vol) * np.cos(np.pi * (2 * t + 1) * k / (2 * n_vol))
    meta = {}
    for k in range(6):
        cols[f"a_comp_cor_{k:02d}"] = rng.standard_normal(n_vol)
        meta[f"a_comp_cor_{k:02d}"] = {"Method": "aCompCor", "Mask": "combined", "Retained": True}
    for k in range(2):
        cols[f"non_steady_state_outlier_{k:02d}"] = (t == k).astype(int)
    pd.DataFrame(cols).to_csv(paths["confounds"], sep="\t", index=False, na_rep="n/a")
    paths["confounds"].with_suffix(".json").write_text(json.dumps(meta))
    return paths


# -- children ---------------------------------------------------------------------------------------

def child(method: str, work: Path) -> dict:
    """Run one method once in this process; report its seconds and this process's peak RSS."""
    if method == "generate":
        return generate(work, int(os.environ["BENCH_VOLUMES"]))
    spec = json.loads((work / "spec.json").read_text())
    bold, mask, conf, dseg, tsv = (spec[k] for k in ("bold", "mask", "confounds", "dseg", "labels"))
    warnings.simplefilter("ignore")
    if not method.startswith("gunzip_"):  # imports are not part of either timing
        import nilearn.interfaces.fmriprep  # noqa: F401
        import nilearn.maskers  # noqa: F401
        import nilearn.signal  # noqa: F401
        import scipy.interpolate  # noqa: F401
        import threadpoolctl  # noqa: F401
    result = None
    cpu_start = _cpu()  # reset below, just before each timed section
    if method.startswith("gunzip_"):
        import gzip

        from isal import igzip, igzip_threaded

        opener = {"gunzip_stdlib": lambda: gzip.open(bold, "rb"), "gunzip_isal": lambda: igzip.open(bold, "rb"),
                  "gunzip_isal_threaded": lambda: igzip_threaded.open(bold, "rb", threads=1)}[method]
        buffer = bytearray(16 << 20)
        cpu_start, start = _cpu(), time.perf_counter()
        with opener() as handle:
            while handle.readinto(buffer):
                pass
        seconds = time.perf_counter() - start
    elif method in ("ours_file", "ours_file_nochecksum"):
        from brainfoundry.parcellate import parcellate_run

        cpu_start, start = _cpu(), time.perf_counter()
        res = parcellate_run(bold, dseg, tsv, confounds_tsv=conf, tr=TR, denoise=DENOISE, mask=mask,
                             checksum=method == "ours_file")
        seconds = time.perf_counter() - start
        result = res.cleaned
    elif method in ("nilearn_file", "nilearn_loaded"):
        from nilearn.maskers import NiftiLabelsMasker

        from brainfoundry.confounds import load_run_confounds
        from brainfoundry.parcellate import clean_kwargs

        img = bold
        if method == "nilearn_loaded":
            import nibabel as nib

            img = nib.load(bold)
            img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        cpu_start, start = _cpu(), time.perf_counter()
        rc = load_run_confounds(conf, DENOISE, spec["volumes"])
        masker = NiftiLabelsMasker(dseg, mask_img=mask, **clean_kwargs(DENOISE, TR))
        result = masker.fit_transform(img, confounds=rc.regressors, sample_mask=rc.sample_mask)
        seconds = time.perf_counter() - start
    else:
        raise SystemExit(f"unknown method {method}")
    if result is not None:
        np.save(work / f"{method}.npy", np.asarray(result))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "seconds": seconds, "cpu_seconds": _cpu() - cpu_start, "peak_mb": peak_mb}


def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(work: Path, volumes: int) -> dict:
    start = time.perf_counter()
    dseg, tsv, atlas_name = make_atlas(work)
    paths = make_run(work, volumes)
    spec = {k: str(v) for k, v in paths.items()} | {"dseg": str(dseg), "labels": str(tsv), "volumes": volumes,
                                                     "atlas": atlas_name}
    (work / "spec.json").write_text(json.dumps(spec))
    return {"method": "generate", "seconds": time.perf_counter() - start, "cpu_seconds": 0.0, "peak_mb": 0.0}


def run_child(method: str, work: Path, env: dict | None = None) -> dict:
    # Every measurement runs in a fresh interpreter started from this lean parent, so ru_maxrss is
    # that method's own peak (it carries over from the parent across fork/exec otherwise).
    out = subprocess.run([sys.executable, __file__, "--child", method, "--workdir", str(work)],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_rel_err(ours: np.ndarray, ref: np.ndarray, dseg: str, tsv: str) -> float:
    """Relative error over the parcels nilearn returns (labels present in the image), in its order."""
    import nibabel as nib
    import pandas as pd

    present = np.unique(np.asarray(nib.load(dseg).dataobj))
    present = present[present != 0]
    order = {v: i for i, v in enumerate(pd.read_csv(tsv, sep="\t")["index"])}
    cols = [order[int(v)] for v in present]
    ours = ours[:, cols]
    if ours.shape != ref.shape:
        raise SystemExit(f"shape mismatch: ours {ours.shape}, nilearn {ref.shape}")
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300, help="at least denoise min_volumes (50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nilearn-repeats", type=int, default=2, help="nilearn is slow; fewer repeats")
    parser.add_argument("--workdir", type=Path, help="reuse/keep data here (default: a temporary directory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-loaded", action="store_true", help="skip the informative in-memory nilearn run")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_parcellate_")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        gen = run_child("generate", work, {"BENCH_VOLUMES": str(args.volumes)})
        spec = json.loads((work / "spec.json").read_text())
        dseg, tsv, atlas_name = spec["dseg"], spec["labels"], spec["atlas"]
        size_mb = Path(spec["bold"]).stat().st_size / 2**20
        print(f"data: {args.volumes} volumes 97x115x97 float32, {size_mb:.0f} MiB gzipped, atlas {atlas_name}, "
              f"written in {gen['seconds']:.1f} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

        methods = ["nilearn_file", "ours_file", "ours_file_nochecksum", "gunzip_stdlib", "gunzip_isal",
                   "gunzip_isal_threaded"]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):  # interleaved so load on the machine hits every method alike
            for method in methods:
                if method.startswith("nilearn") and rep >= args.nilearn_repeats:
                    continue
                runs[method].append(run_child(method, work))
            print(f"  repeat {rep + 1}: " + ", ".join(f"{m} {runs[m][-1]['seconds']:.2f} s" for m in methods),
                  flush=True)
        if not args.skip_loaded:
            runs["nilearn_loaded"] = [run_child("nilearn_loaded", work)]

        best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
        median = {m: float(np.median([r["seconds"] for r in rs])) for m, rs in runs.items()}
        peak = {m: max(r["peak_mb"] for r in rs) for m, rs in runs.items()}
        gunzips = [m for m in methods if m.startswith("gunzip_")]
        floor_method = min(gunzips, key=best.get)
        err = max_rel_err(np.load(work / "ours_file.npy"), np.load(work / "nilearn_file.npy"), dseg, tsv)

        cpu = {m: min(r["cpu_seconds"] for r in rs) for m, rs in runs.items()}
        # Paired per repeat (same moment, same load): less sensitive to load drifting between repeats.
        paired = [o["seconds"] / min(runs[g][i]["seconds"] for g in gunzips)
                  for i, o in enumerate(runs["ours_file"])]
        print(f"\n{'method':24s} {'best s':>8s} {'median s':>9s} {'CPU s':>7s} {'peak MiB':>9s} {'vs ours':>8s}")
        for m in runs:
            print(f"{m:24s} {best[m]:8.2f} {median[m]:9.2f} {cpu[m]:7.2f} {peak[m]:9.0f} "
                  f"{best[m] / best['ours_file']:7.2f}x")
        figures = {
            "speedup_vs_nilearn": round(best["nilearn_file"] / best["ours_file"], 3),
            "floor_ratio": round(best["ours_file"] / best[floor_method], 3),
            "peak_mem_ratio_vs_nilearn": round(peak["ours_file"] / peak["nilearn_file"], 3),
            "max_rel_err": err,
            "floor_method": floor_method,
            "floor_ratio_paired_median": round(float(np.median(paired)), 3),
            "cpu_ratio_vs_floor": round(cpu["ours_file"] / cpu[floor_method], 3),
            "cpu_seconds": {m: round(v, 3) for m, v in cpu.items()},
            "speedup_vs_nilearn_loaded": round(best["nilearn_loaded"] / best["ours_file"], 3) if "nilearn_loaded" in best else None,
            "seconds_best": {m: round(v, 3) for m, v in best.items()},
            "peak_mb": {m: round(v, 1) for m, v in peak.items()},
            "volumes": args.volumes, "atlas": atlas_name, "repeats": args.repeats, "cpus": os.cpu_count(),
            "load_average_end": round(os.getloadavg()[0], 2),
        }
        print(f"\nspeedup vs nilearn from file: {figures['speedup_vs_nilearn']}x (target >= 4); "
              f"floor ratio vs {floor_method}: {figures['floor_ratio']} (target <= 1.10); "
              f"peak memory ratio: {figures['peak_mem_ratio_vs_nilearn']} (target <= 0.5); max rel err {err:.2e}")
        print(json.dumps(figures))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
