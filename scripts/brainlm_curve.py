"""BrainLM learning curves on ABIDE CC200, bounded by CPU seconds (the README's ABIDE learning curves).

    PYTHONPATH=src python scripts/brainlm_curve.py NAME CPU_SECONDS [trainer.k=v | model.k=v ...]

Reads ../shared/data/abide_pcp_cc200 directly (no shards needed): subject splits as the workflow draws
them (seed and ratios of config/abide.yaml), per-parcel robust scaling with training-split statistics,
CC200 centroids. Trains BrainLM with config/abide.yaml's settings plus the overrides, with the trainer's
optimizer, schedule and per-sample mask seeds, on 1 thread; every ``trainer.eval_every`` steps prints one
JSON line: validation loss and the zero predictor's loss on the same hidden tokens (64 centre windows of
validation subjects), and the held-out masked reconstruction R² at mask 0.5 (test subjects, 2 windows
per run, the evaluation's R² over masked points). Environment (measurement knobs only): ZRUN=1 z-scores
each run per parcel first (what `timeseries.standardize: zscore` does at import; cached separately),
TSTD=s / SSTD=s re-draw the learned time / parcel tables with std s, XAVIER=1 re-initialises every linear
layer but the patch embedding with Xavier-uniform. Results also go to /tmp/brainlm_curve/NAME.json.
"""
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml

from brainfoundry.atlas import parcel_centroids
from brainfoundry.evaluate.adapters import window_starts
from brainfoundry.evaluate.baselines import expand_mask, patch_mask
from brainfoundry.evaluate.reconstruction import r2_masked, stable_rng
from brainfoundry.models import build_model
from brainfoundry.splits import split_of
from brainfoundry.timeseries import read_series_file
from brainfoundry.train import (
    configure_optimizer,
    lr_multiplier,
    resolve_settings,
    sample_seeds,
)

CACHE = Path("/tmp/brainlm_curve")


def prepare() -> None:
    root = Path("../shared/data/abide_pcp_cc200")
    ph = pd.read_csv(root / "Phenotypic_V1_0b_preprocessed1.csv")
    ph = ph[ph.FILE_ID != "no_filename"]
    series, splits, subs = [], [], []
    for _, r in ph.iterrows():
        f = root / "rois_cc200" / f"{r.FILE_ID}_rois_cc200.1D.gz"
        if not f.exists():
            continue
        x, _ = read_series_file(f)
        if os.environ.get("ZRUN"):
            sd = x.std(0); x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
        sub = f"sub-{int(r.SUB_ID):07d}"
        series.append(x.astype(np.float32)); subs.append(sub)
        splits.append(split_of(sub, 20261122, {"train": 0.7, "val": 0.15, "test": 0.15}))
    splits = np.array(splits)
    tr = np.concatenate([s for s, sp in zip(series, splits) if sp == "train"])
    q25, med, q75 = np.nanpercentile(tr, [25, 50, 75], axis=0)
    iqr = np.where(q75 - q25 > 0, q75 - q25, 1.0)
    img = nib.load("../shared/data/atlases/cc200/CC200.nii.gz")
    coords = parcel_centroids(np.asarray(img.dataobj).astype(int), img.affine, list(range(1, 201)))
    lens = np.array([len(s) for s in series])
    np.savez(CACHE / ("abide_z.npz" if os.environ.get("ZRUN") else "abide.npz"), data=np.concatenate([(s - med) / iqr for s in series]).astype(np.float32),
             lens=lens, splits=splits, subs=np.array(subs), coords=coords)
    print(len(series), dict(zip(*np.unique(splits, return_counts=True))), (lens >= 100).sum(), coords.shape)


torch.set_num_threads(1)
name, budget = sys.argv[1], float(sys.argv[2])
cfg_all = yaml.safe_load(Path("config/abide.yaml").read_text())
mvals, tc = resolve_settings("brainlm", cfg_all, sys.argv[3:])
CACHE.mkdir(exist_ok=True)
if not (CACHE / ("abide_z.npz" if os.environ.get("ZRUN") else "abide.npz")).exists():
    prepare()
d = dict(np.load(CACHE / ("abide_z.npz" if os.environ.get("ZRUN") else "abide.npz")))
offs = np.concatenate([[0], np.cumsum(d["lens"])])
runs = [d["data"][offs[i]:offs[i + 1]] for i in range(len(d["lens"]))]
W = mvals.get("window", 100)
mvals = {**mvals, "n_parcels": 200}
model = build_model("brainlm", mvals, coords=d["coords"])
c = model.config
if os.environ.get("XAVIER"):
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not model.patch_embed:
            torch.nn.init.xavier_uniform_(m.weight)
if os.environ.get("SSTD"):
    for sp in (model.spatial, model.decoder_spatial):
        torch.nn.init.normal_(sp.table, std=float(os.environ["SSTD"]))
if os.environ.get("TSTD"):
    for p in (model.temporal, model.decoder_temporal):
        torch.nn.init.normal_(p, std=float(os.environ["TSTD"]))
by = {s: [r for r, sp in zip(runs, d["splits"]) if sp == s and len(r) >= W] for s in ("train", "val", "test")}
rng = np.random.default_rng(tc.seed)
def center(r): s = (len(r) - W) // 2; return r[s:s + W]
val = torch.tensor(np.stack([center(r) for r in by["val"][:tc.eval_batches * tc.batch_size]]))
test, tinfo = [], []
for i, r in enumerate(by["test"]):
    for s in window_starts(len(r), W, 2):
        test.append(r[s:s + W]); tinfo.append((i, s))
test = np.stack(test)
masks = np.stack([patch_mask(200, c.n_patches, 0.5, stable_rng("recon", 0, i, s, 0.5)) for i, s in tinfo])
opt = configure_optimizer(model, tc, torch.device("cpu"))
def evaluate():
    model.eval()
    with torch.no_grad():
        seeds = sample_seeds(tc.seed + 1, 10**9, 0, len(val))
        b = {"x": val, "seed": seeds}
        loss, _ = model.loss(b)
        hidden = model.random_mask(b, len(val))
        zero = ((model.patchify(val) ** 2) * hidden[..., None]).sum() / (hidden.sum() * c.patch_size)
        pred = np.concatenate([model.reconstruct(torch.tensor(test[k:k + 64]), torch.tensor(masks[k:k + 64])).numpy()
                               for k in range(0, len(test), 64)])
        r2 = np.nanmean([r2_masked(test[k], pred[k], expand_mask(masks[k], c.patch_size)) for k in range(len(test))])
    model.train()
    return float(loss), float(zero), float(r2)
t0 = time.time(); rows = []
for step in range(tc.steps):
    for g in opt.param_groups:
        g["lr"] = tc.lr * lr_multiplier(step, tc)
    idx = rng.integers(0, len(by["train"]), tc.batch_size)
    xs = []
    for i in idx:
        r = by["train"][i]; s = rng.integers(0, len(r) - W + 1); xs.append(r[s:s + W])
    batch = {"x": torch.tensor(np.stack(xs)), "seed": sample_seeds(tc.seed, step, 0, tc.batch_size)}
    loss, _ = model.loss(batch)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip); opt.step()
    last = step + 1 == tc.steps or time.process_time() > budget
    if (step + 1) % tc.eval_every == 0 or last:
        vl, zl, r2 = evaluate()
        rows.append({"step": step + 1, "s": round(time.time() - t0), "cpu": round(time.process_time()), "train": round(float(loss.detach()), 4),
                     "val": round(vl, 4), "zero": round(zl, 4), "r2_m0.5": round(r2, 4)})
        print(name, json.dumps(rows[-1]), flush=True)
    if last:
        break
(CACHE / f"{name}.json").write_text(json.dumps({"name": name, "args": sys.argv[3:], "rows": rows}))
