"""SC-MBM embedding-dimension ablation on ABIDE (CC200): masked frame reconstruction and an ASD probe.

    nice -n 10 timeout 420 python scripts/scmbm_ablation.py --dim 64 --steps 1500 --out /tmp/scmbm_d64.json

Reads the ABIDE PCP CC200 series from ../shared/data directly (no shards needed), splits subjects 70/30
with a seed, scales each parcel by the training subjects' median/IQR, cuts runs into frames of
``frame_points`` points and pretrains :class:`brainfoundry.models.scmbm.SCMBM` on the training subjects'
frames only. Then

- reconstruction: held-out subjects' frames, 75 % of the patches hidden (seeded masks), R2 over the hidden
  parcels of each frame, beside a parcel-mean predictor and a spatial ridge (the conditional mean of the
  hidden parcels given the visible ones under the training frames' covariance, ridge-shrunk);
- ASD vs control: a run's embedding is the CLS embedding averaged over its frames; an L2 logistic probe
  (standardised features, C from an inner 3-fold search) scored by AUC on site-grouped 5-fold CV over all
  subjects, beside the Fisher-z FC baseline and the same architecture at its random initialisation, on the
  same folds.

The last line printed is one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

DATA = Path("../shared/data/abide_pcp_cc200")
CACHE = Path("/tmp/scmbm_abide_cc200.npz")


def load_abide(data: Path = DATA) -> tuple[list[np.ndarray], pd.DataFrame]:
    if CACHE.is_file():
        z = np.load(CACHE, allow_pickle=False)
        series = np.split(z["values"], z["offsets"][1:-1])
        return series, pd.read_json(io.StringIO(str(z["table"])), dtype={"subject": str})
    pheno = pd.read_csv(data / "Phenotypic_V1_0b_preprocessed1.csv")
    pheno = pheno[pheno["FILE_ID"] != "no_filename"]
    series, rows = [], []
    for _, r in pheno.iterrows():
        path = data / "rois_cc200" / f"{r['FILE_ID']}_rois_cc200.1D.gz"
        if not path.is_file():
            continue
        with gzip.open(path, "rt") as handle:
            x = np.loadtxt(handle, comments="#", dtype=np.float32)
        series.append(x)
        rows.append({"file_id": r["FILE_ID"], "subject": str(r["SUB_ID"]), "site": r["SITE_ID"],
                     "asd": int(r["DX_GROUP"] == 1)})
    table = pd.DataFrame(rows)
    offsets = np.cumsum([0] + [len(s) for s in series])
    np.savez(CACHE, values=np.concatenate(series), offsets=offsets, table=table.to_json())
    return series, table


def split_subjects(table: pd.DataFrame, seed: int) -> np.ndarray:
    """True for training subjects: a seeded hash of the subject id keeps 70 %."""
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{s}".encode()).digest()[:8], "big") / 2**64
                  for s in table["subject"]])
    return u < 0.7


def frames_of(x: np.ndarray, k: int) -> np.ndarray:
    n = len(x) // k
    return x[:n * k].reshape(n, k, -1)


def znorm(f: np.ndarray) -> np.ndarray:
    return (f - f.mean(1, keepdims=True)) / np.maximum(f.std(1, keepdims=True), 1e-6)


def r2(y: np.ndarray, p: np.ndarray) -> float:
    ss = np.sum((y - y.mean()) ** 2)
    return float(1 - np.sum((y - p) ** 2) / ss) if ss > 0 else float("nan")


def ridge_predict(cov: np.ndarray, mean: np.ndarray, f: np.ndarray, vis: np.ndarray, alpha: float) -> np.ndarray:
    """Hidden parcels from visible ones: mean_H + C_HV (C_VV + alpha I)^-1 (f_V - mean_V)."""
    hid = ~vis
    cvv = cov[np.ix_(vis, vis)] + alpha * np.eye(vis.sum())
    beta = np.linalg.solve(cvv, f[vis] - mean[vis])
    out = f.copy()
    out[hid] = mean[hid] + cov[np.ix_(hid, vis)] @ beta
    return out


def probe_auc(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> tuple[float, list[float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    aucs = []
    for tr, te in folds.split(X, y, groups):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        search = GridSearchCV(pipe, {"logisticregression__C": [1e-3, 1e-2, 1e-1, 1.0]}, scoring="roc_auc",
                              cv=StratifiedKFold(3, shuffle=True, random_state=seed))
        search.fit(X[tr], y[tr])
        aucs.append(float(roc_auc_score(y[te], search.predict_proba(X[te])[:, 1])))
    return float(np.mean(aucs)), aucs


def note(t0: float, what: str) -> None:
    print(f"[{time.time() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--frame-points", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-recon-frames", type=int, default=3000)
    ap.add_argument("--fc-baseline", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    from brainfoundry.models import build_model

    series, table = load_abide()
    note(t0, f"{len(series)} runs loaded")
    train_mask = split_subjects(table, args.seed)
    stacked = np.concatenate([s for s, t in zip(series, train_mask) if t])
    med = np.median(stacked, 0)
    q75, q25 = np.percentile(stacked, [75, 25], 0)
    iqr = np.where(q75 - q25 > 0, q75 - q25, 1.0)
    scaled = [((s - med) / iqr).astype(np.float32) for s in series]
    k = args.frame_points
    windows = [frames_of(s, k) for s in scaled]
    train_w = np.concatenate([w for w, t in zip(windows, train_mask) if t])
    n = train_w.shape[-1]
    cfg = dict(n_parcels=n, patch_size=args.patch, dim=args.dim, depth=args.depth, heads=4, mlp_ratio=1.0,
               decoder_dim=128, decoder_depth=2, decoder_heads=4, mask_ratio=0.75, frame_points=k, mix_prob=0.5)
    torch.manual_seed(args.seed)
    model = build_model("scmbm", cfg)
    control = build_model("scmbm", cfg)
    control.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warm = max(1, args.steps // 20)
    # linear warm-up, then cosine decay to 0.1 x lr (the trainer's schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (
        1 + np.cos(np.pi * min(1.0, (s - warm) / max(1, args.steps - warm)))))
    rng = np.random.default_rng(args.seed)
    model.train()
    losses = []
    for step in range(args.steps):
        idx = rng.integers(0, len(train_w), args.batch)
        batch = {"x": torch.from_numpy(train_w[idx]), "seed": torch.arange(args.batch) + step * args.batch}
        loss, _ = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        opt.step()
        sched.step()
        losses.append(float(loss))
    t_train = time.time() - t0
    note(t0, f"trained {args.steps} steps, loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f}")
    model.eval()

    # -- reconstruction of held-out subjects' frames at mask 0.75 --
    train_frames = znorm(train_w.mean(1))
    mean, cov = train_frames.mean(0), np.cov(train_frames, rowvar=False)
    test_w = np.concatenate([w for w, t in zip(windows, train_mask) if not t])
    test_subj = np.concatenate([[s] * len(w) for w, s, t in zip(windows, table["subject"], train_mask) if not t])
    pick = np.random.default_rng(1).choice(len(test_w), min(args.max_recon_frames, len(test_w)), replace=False)
    test_w, test_subj = test_w[pick], test_subj[pick]
    frames = znorm(test_w.mean(1)).astype(np.float32)
    seeds = torch.arange(len(frames)) + 10**9
    hidden, _ = model.draw_masks({"seed": seeds}, len(frames))
    patch_of = model.parcel_patch().numpy()
    hid_parcel = hidden.numpy()[:, patch_of]                                    # [F, N]
    # alpha for the ridge: chosen on 300 training frames with the same kind of masks
    val = train_frames[np.random.default_rng(2).choice(len(train_frames), 300, replace=False)]
    vh, _ = model.draw_masks({"seed": torch.arange(300) + 2 * 10**9}, 300)
    vh = vh.numpy()[:, patch_of]
    alphas = [0.01, 0.1, 1.0, 10.0]
    alpha = max(alphas, key=lambda a: np.nanmean([r2(f[h], ridge_predict(cov, mean, f, ~h, a)[h])
                                                   for f, h in zip(val, vh)]))
    with torch.no_grad():
        preds = []
        for s in range(0, len(frames), 256):
            preds.append(model.reconstruct_frames(torch.from_numpy(frames[s:s + 256]), hidden[s:s + 256]).numpy())
        pred = np.concatenate(preds)
        # the control: the same architecture at its initial weights, the same masks
        pred_ctrl = np.concatenate([control.eval().reconstruct_frames(torch.from_numpy(frames[s:s + 256]),
                                                                       hidden[s:s + 256]).numpy()
                                    for s in range(0, len(frames), 256)])
    rec = {"scmbm": [], "random_init": [], "parcel_mean": [], "spatial_ridge": []}
    for f, h, p, pc in zip(frames, hid_parcel, pred, pred_ctrl):
        rec["scmbm"].append(r2(f[h], p[h]))
        rec["random_init"].append(r2(f[h], pc[h]))
        rec["parcel_mean"].append(r2(f[h], mean[h]))
        rec["spatial_ridge"].append(r2(f[h], ridge_predict(cov, mean, f, ~h, alpha)[h]))
    frame_df = pd.DataFrame({**rec, "subject": test_subj})
    by_subject = frame_df.groupby("subject").mean()
    recon = {m: {"r2_mean_frames": float(np.nanmean(v)), "r2_mean_subjects": float(by_subject[m].mean())}
             for m, v in rec.items()}

    note(t0, "reconstruction done")

    # -- ASD probe: CLS averaged over a run's frames --
    def run_embeddings(net) -> np.ndarray:
        out = []
        with torch.no_grad():
            for w in windows:
                out.append(net.encode({"x": torch.from_numpy(w)})["pooled"].mean(0).numpy())
        return np.stack(out)

    y, groups = table["asd"].to_numpy(), table["site"].to_numpy()
    probe = {}
    probe["scmbm"] = probe_auc(run_embeddings(model), y, groups, args.seed)
    probe["random_init"] = probe_auc(run_embeddings(control), y, groups, args.seed)
    note(t0, "probes done")
    if args.fc_baseline:
        iu = np.triu_indices(n, 1)
        fc = []
        for s in scaled:
            c = np.corrcoef(s, rowvar=False)[iu]
            fc.append(np.arctanh(np.clip(np.nan_to_num(c), -0.999, 0.999)))
        probe["fc_fisher_z"] = probe_auc(np.stack(fc).astype(np.float32), y, groups, args.seed)
    result = {"dim": args.dim, "patch_size": args.patch, "ratio": args.dim / args.patch, "depth": args.depth,
              "steps": args.steps, "batch": args.batch, "frame_points": k, "seed": args.seed,
              "n_parameters": model.num_parameters(), "n_runs": len(series), "n_train_runs": int(train_mask.sum()),
              "n_train_frames": len(train_w), "n_recon_frames": len(frames), "ridge_alpha": alpha,
              "loss_first100": float(np.mean(losses[:100])), "loss_last100": float(np.mean(losses[-100:])),
              "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
              "reconstruction_mask0.75": recon,
              "asd_auc_site_cv5": {m: {"mean": v[0], "folds": v[1]} for m, v in probe.items()}}
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
