"""The published-form LCM on ABIDE beside FC logistic, on the same site-grouped held-out subjects.

    nice -n 10 timeout 900 python scripts/lcm_abide.py --root ../shared/data/abide_pcp_cc200 \
        --config config/abide.yaml --folds 5 --out results/lcm_abide.json

For each site-grouped outer fold (``brainfoundry.evaluate.protocol.make_folds``, stratified by
diagnosis, seed 0): target statistics from the training subjects only; the LCM of the config's
``pretrain.lcm.model`` section trained with its trainer settings (steps, batch, lr, warm-up, cosine,
AdamW) on random windows of the training subjects' runs, multitask over diagnosis/sex/age; scored on
the test subjects' whole-run FC (as the evaluation adapter reads it). The FC baseline (L2 logistic on
the Fisher-z upper triangle, C chosen by an inner site-grouped split) is fitted on the same training
subjects. One torch thread. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from brainfoundry.evaluate.baselines import fc_features
from brainfoundry.evaluate.dataset import load_abide
from brainfoundry.evaluate.protocol import FoldSpec, binary_auc, fit_nested, make_folds, scores_of
from brainfoundry.models import build_model
from brainfoundry.models.lcm import default_env, fit_env_stats, value_key
from brainfoundry.train import TrainConfig, configure_optimizer, lr_multiplier, resolve_settings


def train_lcm(evs, train_idx, model_values, cfg: TrainConfig, seed: int):
    runs = evs.runs.iloc[train_idx]
    env = fit_env_stats({c: runs[c].tolist() for c in runs.columns}, model_values.get("env") or default_env())
    model = build_model("lcm", {**model_values, "n_parcels": evs.n_parcels, "env": env})
    opt = configure_optimizer(model, cfg, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg))
    rng = np.random.default_rng(seed)
    series = [evs.normalized(i) for i in train_idx]
    usable = [k for k, s in enumerate(series) if len(s) >= cfg.window]
    model.train()
    curve = []
    for step in range(cfg.steps):
        pick = rng.choice(usable, cfg.batch_size)
        wins = []
        for k in pick:
            start = rng.integers(0, len(series[k]) - cfg.window + 1)
            wins.append(series[k][start:start + cfg.window])
        batch = {"x": torch.from_numpy(np.stack(wins).astype(np.float32))}
        for name in ("diagnosis", "sex", "age"):
            batch[name] = runs[name].iloc[pick].tolist()
        loss, _ = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            curve.append((step + 1, round(loss.item(), 4)))
    return model.eval(), curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/abide_pcp_cc200")
    ap.add_argument("--config", default="config/abide.yaml")
    ap.add_argument("--folds", type=int, default=5, help="outer folds run (of 5)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = yaml.safe_load(Path(args.config).read_text())
    model_values, cfg = resolve_settings("lcm", config, args.overrides)
    t0 = time.perf_counter()
    evs = load_abide(args.root)
    table = evs.runs.reset_index(drop=True)
    subjects = table["subject"].astype(str).to_numpy()
    folds = make_folds(evs.runs.set_index("subject")[["site", "diagnosis"]],
                       FoldSpec(n_folds=5, seeds=(0,), group_by="site", stratify_by="diagnosis"))
    fold_of = dict(zip(folds["subject"].astype(str), folds["fold"]))
    X = np.stack([fc_features(s) for s in evs.series])
    results = {"lcm": {"diagnosis": [], "sex": []}, "fc_logistic": {"diagnosis": [], "sex": []}}
    per_fold, curves = [], []
    for fold in range(args.folds):
        te = np.array([fold_of[s] == fold for s in subjects])
        tr_idx, te_idx = np.flatnonzero(~te), np.flatnonzero(te)
        model, curve = train_lcm(evs, tr_idx, model_values, cfg, seed=cfg.seed + fold)
        curves.append(curve)
        with torch.no_grad():
            preds = [model.predict_env({"x": torch.from_numpy(evs.normalized(i)[None].astype(np.float32))})
                     for i in te_idx]
        row = {"fold": fold, "n_train": len(tr_idx), "n_test": len(te_idx)}
        for target in ("diagnosis", "sex"):
            _, spec = model.spec(target)
            y_raw = [value_key(v) for v in table[target].iloc[te_idx]]
            ok = np.array([v in spec.classes for v in y_raw])
            y = np.array([spec.classes.index(v) if v in spec.classes else -1 for v in y_raw])[ok]
            score = np.array([float(p[target][0, 1]) for p in preds])[ok]
            lcm_auc = binary_auc(y, score)
            ytr_raw = [value_key(v) for v in table[target].iloc[tr_idx]]
            keep_tr = np.array([v in spec.classes for v in ytr_raw])
            ytr = np.array([spec.classes.index(v) for v, k in zip(ytr_raw, keep_tr) if k])
            groups = table["site"].iloc[tr_idx].to_numpy()[keep_tr]
            est, _ = fit_nested("logistic", X[tr_idx][keep_tr], ytr, groups, classification=True)
            fc_auc = binary_auc(y, scores_of(est, X[te_idx][ok]))
            results["lcm"][target].append(lcm_auc)
            results["fc_logistic"][target].append(fc_auc)
            row[f"{target}_lcm_auc"], row[f"{target}_fc_auc"] = round(lcm_auc, 4), round(fc_auc, 4)
        per_fold.append(row)
        print(json.dumps(row), flush=True)
    summary = {m: {t: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "folds": [round(a, 4) for a in v]}
                   for t, v in r.items()} for m, r in results.items()}
    out = {"benchmark": "lcm_abide", "n_subjects": len(subjects), "folds": args.folds, "group_by": "site",
           "model": model_values, "trainer": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                                              "window": cfg.window, "seed": cfg.seed},
           "loss_curves": curves, "per_fold": per_fold, "auc": summary,
           "wall_s": round(time.perf_counter() - t0, 1), "threads": 1}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("benchmark", "n_subjects", "folds", "auc", "wall_s")}))


if __name__ == "__main__":
    main()
