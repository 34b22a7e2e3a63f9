"""Phenotype and diagnosis prediction from frozen embeddings, fine-tuning, and the FC baseline.

One row per subject (runs averaged). Every method is scored on the saved folds (`protocol.make_folds`),
with scaling and hyper-parameters fitted inside training folds. Classes: AUC and balanced accuracy;
continuous values: MAE and Pearson r. The baseline always shown beside the models: a logistic (classes)
or ridge (continuous) model on Fisher-z FC upper triangles.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import pandas as pd

from brainfoundry.evaluate.adapters import Embeddings, ModelAdapter, subject_means, window_starts
from brainfoundry.evaluate.baselines import fc_features
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.evaluate.protocol import (REGRESSION_TWIN, TaskSkipped, classification_metrics, cross_validate_probe,
                                            iter_folds, permutation_scores, regression_metrics)
from brainfoundry.evaluate.settings import EvalSettings


def target_values(evalset: EvalSet, target: str, settings: EvalSettings) -> tuple[pd.Series, bool]:
    """Per-subject target values (nulls dropped) and whether the target is a classification one."""
    if target not in evalset.runs.columns:
        raise TaskSkipped(f"phenotype column '{target}' is not in the data (columns: "
                          f"{[c for c in evalset.runs.columns if c not in ('timeseries', 'pfc')]})")
    per_subject = evalset.runs.groupby("subject", sort=True)[target].first()
    per_subject = per_subject[per_subject.notna() & (per_subject.astype(str) != "")]
    if per_subject.empty:
        raise TaskSkipped(f"phenotype '{target}' has no values")
    classification = target not in settings.regression_targets
    if per_subject.nunique() < 2:
        raise TaskSkipped(f"phenotype '{target}' is constant ({per_subject.iloc[0]!r}) over the "
                          f"{len(per_subject)} subjects that have it; nothing to predict")
    if not classification:
        per_subject = pd.to_numeric(per_subject, errors="coerce").dropna()
    return per_subject, classification


def encode_labels(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    classes = sorted(values.astype(str).unique())
    return np.array([classes.index(v) for v in values.astype(str)]), classes


def fc_subject_features(evalset: EvalSet) -> tuple[np.ndarray, np.ndarray]:
    """Fisher-z FC upper triangles averaged over each subject's runs."""
    feats = np.stack([fc_features(s) for s in evalset.series])
    return subject_means(feats, evalset.runs["subject"].to_numpy())


def _tidy(rows: pd.DataFrame, method: str, target: str, split: str) -> pd.DataFrame:
    if rows.empty:
        return rows
    rows = rows.copy()
    rows.insert(0, "method", method)
    rows["target"] = target
    rows["split"] = split
    return rows


# FC baselines by probe (``evaluate.fc_probes``): logistic / ridge, linear SVM / SVR, RBF SVM / SVR.
FC_METHODS = {"logistic": "fc_linear", "svm": "fc_svm_linear", "svm_rbf": "fc_svm_rbf", "mlp": "fc_mlp"}


def run(evalset: EvalSet, settings: EvalSettings, folds: pd.DataFrame, adapter: ModelAdapter | None = None,
        embeddings: Embeddings | None = None, targets: Sequence[str] | None = None,
        finetuned: Sequence[ModelAdapter] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Probe rows for every target; a target that cannot run (constant, missing) is a note, the others run.

    Frozen-embedding probes (or, for the baseline, the FC models of ``evaluate.fc_probes``), with
    ``evaluate.fc_concat`` FC + embedding concatenated ('fc_plus_embedding') beside FC alone ('fc_alone')
    on the same subjects and folds, permutation rows, the external-site split (``evaluate.external_sites``)
    and for the LCM its own phenotype heads on held-out subjects, pretrained and (``finetuned``: the
    trainer's pseudo-label fine-tuning, one model file per target) fine-tuned. Fine-tuning with an MLP head
    is the separate `run_finetune` (its own job: it costs far more than a probe).
    """
    notes: list[str] = []
    if adapter is None and embeddings is None:
        subjects, X = fc_subject_features(evalset)
        feature_sets = {FC_METHODS[p]: (p, X) for p in settings.fc_probes}
    else:
        if embeddings is None:
            raise TaskSkipped(f"model '{adapter.name}': no embeddings")
        subjects, X = subject_means(embeddings.pooled, embeddings.subjects)
        feature_sets = {f"{p}_probe": (p, X) for p in settings.probes}
        if settings.fc_concat:
            fc_subj, fc = fc_subject_features(evalset)
            fc = pd.DataFrame(fc, index=fc_subj).reindex(subjects).to_numpy(np.float32)
            # Both on the subjects the model embeds, so that the difference is the embedding's alone.
            feature_sets["fc_alone"] = ("logistic", fc)
            feature_sets["fc_plus_embedding"] = ("logistic", np.concatenate([fc, X], axis=1))
    finite = np.all([np.isfinite(x).all(axis=1) for _p, x in feature_sets.values()], axis=0)
    if not finite.all():
        notes.append(f"{(~finite).sum()} subjects without features (runs too short to embed) are left out")
    subjects, feats = subjects[finite], {k: (p, x[finite]) for k, (p, x) in feature_sets.items()}
    label_subjects = set(adapter.label_subjects) if adapter is not None else set()
    split = "cv_heldout" if label_subjects else "cv"
    pretrain_subjects = (evalset.runs.loc[evalset.runs["split"] == "train", "subject"].astype(str).unique()
                         if "split" in evalset.runs else np.array([], dtype=str))
    external, ext_note = external_subjects(evalset, settings, label_subjects)
    if ext_note:
        notes.append(ext_note)
    # A label-using model (LCM) is tested only on subjects outside the training split ('cv_heldout');
    # the baseline is then scored both ways so that it sits beside it on the same subjects.
    out = []
    for target in targets if targets is not None else settings.targets:
        try:
            values, classification = target_values(evalset, target, settings)
        except TaskSkipped as err:
            notes.append(str(err))
            continue
        keep = np.isin(subjects, values.index.to_numpy())
        subj = subjects[keep]
        y_raw = values.reindex(subj)
        y = encode_labels(y_raw)[0] if classification else y_raw.to_numpy(float)
        if classification:
            counts = np.bincount(y)
            if counts.min() < 2:
                notes.append(f"{target}: a class has fewer than 2 subjects ({dict(zip(encode_labels(y_raw)[1], counts))})")
                continue
        norm = None if classification else settings.target_normalization.get(target)
        test_mask = ~np.isin(subj, list(label_subjects)) if label_subjects else None
        if test_mask is not None and not test_mask.any():
            notes.append(f"{target}: every subject's label was seen by '{adapter.name}' in pretraining; "
                         "no subject is left to test it on")
            continue
        target_scopes = [(split, test_mask)]
        if not label_subjects and len(pretrain_subjects):
            # Self-supervised models saw the training split's series (not its labels) in pretraining: they
            # are also scored on the other subjects alone ('cv_heldout', the verdict's scope), and so is
            # the baseline, on the same folds.
            target_scopes.append(("cv_heldout", ~np.isin(subj, pretrain_subjects)))
        ext_ok = external is not None and _external_target_ok(target, subj, y, external, classification, notes)
        for method, (probe, Xall) in feats.items():
            kind = probe if classification else REGRESSION_TWIN[probe]
            try:
                for scope, mask in target_scopes:
                    if mask is not None and not mask.any():
                        continue
                    rows, fold_notes = cross_validate_probe(Xall[keep], y, list(subj), folds, kind, classification,
                                                            n_inner=settings.cv.n_inner, label=f"{target}/{method}",
                                                            test_mask=mask, normalization=norm)
                    notes += fold_notes if scope == split else []
                    out.append(_tidy(rows, method, target, scope))
                if ext_ok:
                    out.append(_tidy(external_probe(Xall[keep], y, subj, external, evalset, kind, classification,
                                                    settings, norm), method, target, "external"))
            except TaskSkipped as err:
                notes.append(f"{target}/{method}: {err}")
                continue
            # The chance check runs on the baseline's protocol (the same folds and probe as every model).
            if settings.n_permutations and method == "fc_linear":
                perm = permutation_scores(Xall[keep], y, list(subj), folds, kind, classification,
                                          n_permutations=settings.n_permutations, n_inner=2)
                metric = "auc" if classification else "r"
                out.append(pd.DataFrame({"method": method, "target": target, "split": "permuted", "seed": np.arange(len(perm)),
                                         "fold": "pooled", "metric": metric, "value": perm, "n": len(subj)}))
    if adapter is not None and "env_heads" in adapter.capabilities:
        rows, enotes = env_heads_heldout(adapter, evalset, settings, targets or settings.targets)
        notes += enotes
        out.append(rows)
    for ft in finetuned:
        reason = pseudo_label_skip_reason(ft)
        if reason:
            notes.append(reason)
            continue
        rows, enotes = env_heads_heldout(ft, evalset, settings, [ft.finetuned_target])
        notes += enotes
        out.append(rows)
    if adapter is None and "lcm" in settings.models and "fc_linear" in feats:
        # The LCM is scored on held-out subjects only (it saw the training split's labels): the baseline
        # is scored on the same subjects, trained on the training split.
        rows, hnotes = fc_heldout(evalset, settings, subjects, feats["fc_linear"][1], targets or settings.targets)
        notes += hnotes
        out.append(rows)
    frame = pd.concat([o for o in out if len(o)], ignore_index=True) if any(len(o) for o in out) else pd.DataFrame()
    return frame, notes


# -- external-site validation -----------------------------------------------------------------------
def external_subjects(evalset: EvalSet, settings: EvalSettings,
                      label_subjects=frozenset()) -> tuple[np.ndarray | None, str | None]:
    """Subjects of the external sites (``evaluate.external_sites``), or None and why there are none.

    A list naming no site of the data is a note (the external split is then left out; the
    cross-validation still runs). Subjects whose labels the model saw (``label_subjects``, the LCM's
    training split) are never external test subjects; with ``shards.holdout_sites`` there are none.
    """
    wanted = [str(s) for s in settings.external_sites or []]
    if not wanted:
        return None, None
    runs = evalset.runs
    if "site" not in runs:
        return None, f"evaluate.external_sites {wanted}: the data has no site column; no external split"
    site_of = runs.groupby("subject")["site"].first().astype(str)
    present = sorted(set(wanted) & set(site_of))
    if not present:
        return None, (f"evaluate.external_sites {wanted}: none of them is a site in the data (sites: "
                      f"{sorted(site_of.unique())[:20]}); no external split")
    note = None
    if len(present) < len(wanted):
        note = f"evaluate.external_sites: {sorted(set(wanted) - set(present))} are not sites in the data"
    ext = site_of.index[site_of.isin(present)].to_numpy().astype(str)
    seen = np.isin(ext, list(label_subjects))
    if seen.any():
        ext = ext[~seen]
        note = (note + "; " if note else "") + (f"evaluate.external_sites: {int(seen.sum())} external subjects "
                                                "whose labels the model saw are left out of the external test")
        if not len(ext):
            return None, note
    if len(ext) == len(site_of):
        return None, f"evaluate.external_sites {present} hold every subject; no development site is left"
    return ext, note


def _external_target_ok(target, subj, y, external, classification, notes) -> bool:
    is_ext = np.isin(subj, external)
    if is_ext.sum() < 4 or (~is_ext).sum() < 4:
        notes.append(f"{target}/external: {int(is_ext.sum())} external and {int((~is_ext).sum())} development "
                     "subjects with a value; too few for an external split")
        return False
    if classification:
        for part, name in ((is_ext, "external"), (~is_ext, "development")):
            if len(np.unique(y[part])) < 2:
                notes.append(f"{target}/external: the {name} sites have one class only "
                             f"({np.unique(y[part]).tolist()}); no external split for this target")
                return False
    return True


def external_probe(X: np.ndarray, y: np.ndarray, subj: np.ndarray, external: np.ndarray, evalset: EvalSet,
                   kind: str, classification: bool, settings: EvalSettings, norm: str | None) -> pd.DataFrame:
    """Train on the development sites (hyper-parameters by an inner split grouped by site), test on the
    external sites once; the interval is a bootstrap over external subjects."""
    from brainfoundry.evaluate.protocol import TargetScaler, fit_nested, scores_of

    is_ext = np.isin(subj, external)
    site_of = evalset.runs.groupby("subject")["site"].first().astype(str)
    groups = site_of.reindex(subj[~is_ext]).to_numpy()
    if len(np.unique(groups)) < 2:
        groups = subj[~is_ext]
    ytr = y[~is_ext]
    scaler = None if classification else TargetScaler(norm).fit(ytr)
    est, _ = fit_nested(kind, X[~is_ext], ytr if scaler is None else scaler.transform(ytr), groups,
                        n_inner=settings.cv.n_inner, classification=classification)
    pred = est.predict(X[is_ext])
    if classification:
        return _bootstrap_rows(y[is_ext], pred, scores_of(est, X[is_ext]), True, settings.ci_level)
    rows = _bootstrap_rows(y[is_ext], scaler.inverse(pred), None, False, settings.ci_level)
    if scaler.kind != "none":
        z = scaler.transform(y[is_ext])
        rows = pd.concat([rows, _bootstrap_mse(z, pred, settings.ci_level)], ignore_index=True)
    return rows


def _bootstrap_mse(z_true, z_pred, level=0.95, n_boot=500, seed=0) -> pd.DataFrame:
    sq = (np.asarray(z_true) - np.asarray(z_pred)) ** 2
    rng = np.random.default_rng(seed)
    boot = sq[rng.integers(0, len(sq), (n_boot, len(sq)))].mean(1)
    lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return pd.DataFrame([{"seed": 0, "fold": "all", "metric": "mse", "value": float(sq.mean()), "ci_low": float(lo),
                          "ci_high": float(hi), "n": len(sq)}])


def external_folds(subjects: Sequence[str], external: np.ndarray, seeds: Sequence[int]) -> pd.DataFrame:
    """A fold table with the external subjects as fold 0 and the development subjects as fold 1."""
    subjects = np.asarray(subjects).astype(str)
    fold = np.where(np.isin(subjects, external), 0, 1)
    return pd.concat([pd.DataFrame({"subject": subjects, "site": None, "group": subjects, "group_by": "external",
                                    "seed": int(s), "fold": fold}) for s in seeds], ignore_index=True)


# -- fine-tuning the encoder with an MLP head -------------------------------------------------------
def run_finetune(evalset: EvalSet, settings: EvalSettings, folds: pd.DataFrame,
                 adapter: ModelAdapter) -> tuple[pd.DataFrame, list[str]]:
    """Fine-tuning rows (method ``finetune_mlp``) for ``evaluate.finetune.targets`` on the saved folds."""
    adapter.require("finetune", "finetune")
    notes, out = [], []
    subjects = np.array(sorted(evalset.runs["subject"].astype(str).unique()))
    label_subjects = set(adapter.label_subjects)
    external, ext_note = external_subjects(evalset, settings, label_subjects)
    if ext_note:
        notes.append(ext_note)
    split = "cv_heldout" if label_subjects else "cv"
    for target in settings.finetune.targets:
        try:
            values, classification = target_values(evalset, target, settings)
        except TaskSkipped as err:
            notes.append(str(err))
            continue
        subj = subjects[np.isin(subjects, values.index.to_numpy())]
        y_raw = values.reindex(subj)
        y = encode_labels(y_raw)[0] if classification else y_raw.to_numpy(float)
        if classification and np.bincount(y).min() < 2:
            notes.append(f"{target}: a class has fewer than 2 subjects")
            continue
        test_mask = ~np.isin(subj, list(label_subjects)) if label_subjects else None
        norm = None if classification else settings.target_normalization.get(target)
        rows, fnotes = finetune_cv(adapter, evalset, subj, y, classification, folds, settings, test_mask, norm=norm)
        notes += [f"{target}/finetune_mlp: {n}" for n in fnotes]
        out.append(_tidy(rows, "finetune_mlp", target, split))
        if external is not None and _external_target_ok(target, subj, y, external, classification, notes):
            # The same fine-tuning trained on the development sites, tested once on the external ones.
            collect: list = []
            ext_folds = external_folds(subj, external, settings.finetune.seeds[:1])
            finetune_cv(adapter, evalset, subj, y, classification, ext_folds, settings, None, norm=norm,
                        test_folds={0}, collect=collect)
            if collect:
                test, pred, score, z_true, z_pred = collect[0]
                ext_rows = _bootstrap_rows(y[test], pred, score, classification, settings.ci_level)
                if z_true is not None:
                    ext_rows = pd.concat([ext_rows, _bootstrap_mse(z_true, z_pred, settings.ci_level)], ignore_index=True)
                out.append(_tidy(ext_rows, "finetune_mlp", target, "external"))
    out = [o for o in out if len(o)]
    return (pd.concat(out, ignore_index=True) if out else pd.DataFrame()), notes


def _subject_windows(adapter: ModelAdapter, evalset: EvalSet, subjects: Sequence[str], max_windows: int,
                     window: int):
    """Per subject, a stack of its runs' windows [k, W, N] (normalized as the model sees them).

    ``window`` is the model's own window, or for whole-series models (``adapter.window is None``) the
    evaluation window, so that fine-tuning batches have one length.
    """
    by_subject: dict[str, list[np.ndarray]] = {}
    run_subjects = evalset.runs["subject"].to_numpy()
    for i in range(len(evalset.series)):
        s = run_subjects[i]
        if s not in subjects:
            continue
        x = evalset.normalized(i)
        starts = window_starts(len(x), window, max_windows)
        if starts:
            by_subject.setdefault(s, []).append(np.stack([x[t:t + window] for t in starts]))
    return {s: np.concatenate(v) for s, v in by_subject.items()}


def finetune_cv(adapter: ModelAdapter, evalset: EvalSet, subjects: np.ndarray, y: np.ndarray, classification: bool,
                folds: pd.DataFrame, settings: EvalSettings, test_mask: np.ndarray | None, norm: str | None = None,
                test_folds: set | None = None, collect: list | None = None):
    """Fine-tune the encoder plus an MLP head on each training fold (fixed hyper-parameters from config).

    Hyper-parameters are the config's, never tuned on test folds. Only ``finetune.seeds`` seeds of the fold
    table are used: fine-tuning costs far more than a probe. A continuous target is normalised by ``norm``
    (`TargetScaler`, default z-score, fitted on the training part); ``mse`` rows are on that scale.
    ``test_folds`` limits the folds tested; ``collect`` receives (test, pred, score, z_true, z_pred) per fold.
    """
    import torch

    from brainfoundry.evaluate.protocol import TargetScaler

    ft = settings.finetune
    wins = _subject_windows(adapter, evalset, set(subjects), ft.max_windows_per_run, adapter.window or settings.window)
    rows, notes = [], []
    n_classes = int(y.max()) + 1 if classification else 1
    chosen = folds[folds["seed"].isin(ft.seeds)]
    if chosen.empty:
        chosen = folds[folds["seed"] == folds["seed"].min()]
    for seed, fold, train, test in iter_folds(chosen, list(subjects)):
        if test_folds is not None and fold not in test_folds:
            continue
        if test_mask is not None:
            test = test[test_mask[test]]
        if len(test) == 0 or (classification and len(np.unique(y[train])) < 2):
            notes.append(f"fold {fold} (seed {seed}) skipped: no test subject or one class in training")
            continue
        torch.manual_seed(seed)
        encoder = copy.deepcopy(adapter.finetune_encoder())
        dim = adapter.embedding_dim
        head = torch.nn.Sequential(torch.nn.Linear(dim, ft.hidden), torch.nn.GELU(), torch.nn.Linear(ft.hidden, n_classes))
        opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": ft.lr},
                                 {"params": head.parameters(), "lr": ft.head_lr}], weight_decay=0.01)
        xs = np.concatenate([wins[subjects[i]] for i in train if subjects[i] in wins])
        ys = np.concatenate([np.full(len(wins[subjects[i]]), y[i]) for i in train if subjects[i] in wins])
        scaler = None if classification else TargetScaler(norm or "zscore").fit(y[train])
        xt = torch.from_numpy(xs.astype(np.float32))
        yt = torch.from_numpy(ys.astype(np.int64) if classification else scaler.transform(ys).astype(np.float32))
        rng = np.random.default_rng(seed)
        encoder.train()
        head.train()
        for _ in range(ft.epochs):
            order = rng.permutation(len(xt))
            for s in range(0, len(order), ft.batch_size):
                idx = torch.from_numpy(order[s:s + ft.batch_size])
                out = head(encoder(xt[idx]))
                loss = (torch.nn.functional.cross_entropy(out, yt[idx]) if classification
                        else torch.nn.functional.mse_loss(out[:, 0], yt[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        encoder.eval()
        head.eval()
        test = np.array([i for i in test if subjects[i] in wins])
        with torch.no_grad():
            outs = [head(encoder(torch.from_numpy(wins[subjects[i]].astype(np.float32)))).mean(0).numpy() for i in test]
        outs = np.stack(outs)
        if classification:
            proba = torch.softmax(torch.from_numpy(outs), dim=1).numpy()
            pred = proba.argmax(1)
            score = proba[:, 1] if n_classes == 2 else proba
            metrics = classification_metrics(y[test], pred, score)
            z_true = z_pred = None
        else:
            z_true, z_pred = scaler.transform(y[test]), outs[:, 0].astype(float)
            pred = score = scaler.inverse(z_pred)
            metrics = regression_metrics(y[test], pred)
            metrics["mse"] = float(np.mean((z_true - z_pred) ** 2))
        if collect is not None:
            collect.append((test, pred, score, z_true, z_pred))
        for name, value in metrics.items():
            rows.append({"seed": seed, "fold": str(fold), "metric": name, "value": value, "n": len(test), "inner_cv": False})
    return pd.DataFrame(rows), notes


def _bootstrap_rows(y, pred, score, classification, level=0.95, n_boot=500, seed=0):
    """Metrics on one held-out set with a subject bootstrap interval (resamples with both classes)."""
    base = classification_metrics(y, pred, score) if classification else regression_metrics(y, pred)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in base}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if classification and len(np.unique(y[idx])) < 2:
            continue
        m = classification_metrics(y[idx], pred[idx], score[idx]) if classification else regression_metrics(y[idx], pred[idx])
        for k, v in m.items():
            draws[k].append(v)
    rows = []
    for name, value in base.items():
        vals = np.asarray([v for v in draws[name] if np.isfinite(v)])
        lo, hi = (np.quantile(vals, [0.5 - level / 2, 0.5 + level / 2]) if len(vals) > 10 else (np.nan, np.nan))
        rows.append({"seed": 0, "fold": "all", "metric": name, "value": value, "ci_low": float(lo),
                     "ci_high": float(hi), "n": len(y)})
    return pd.DataFrame(rows)


def _heldout_subjects(evalset: EvalSet, settings: EvalSettings) -> np.ndarray:
    runs = evalset.runs
    return runs.loc[runs["split"].astype(str) == settings.heldout_split, "subject"].astype(str).unique()


def pseudo_label_skip_reason(adapter) -> str | None:
    """Why a pseudo-label fine-tuned model gives no row: a family without query heads, or a
    semi-supervised round that labelled nobody (its record in the model file says why)."""
    target = getattr(adapter, "finetuned_target", None)
    if "env_heads" not in adapter.capabilities:
        return (f"{target}/pseudo_label_finetune: model '{adapter.name}' ({getattr(adapter, 'family', '?')}) has no "
                "phenotype query head; pseudo-label fine-tuning needs an LCM")
    record = getattr(adapter, "pseudo_round", None)
    # No unlabelled training run at all: nothing to label, the fine-tune used the true labels (a row).
    if record and int(record.get("n_unlabelled", 0)) > 0 and int(record.get("n_assigned", 0)) == 0:
        hint = "lower trainer.threshold" + (" or set trainer.pseudo_balance: none" if record.get("balance") != "none" else "")
        return (f"{target}/pseudo_label_finetune: the pseudo-label round labelled nobody ({record.get('n_confident')} of "
                f"{record.get('n_unlabelled')} unlabelled training runs reached threshold {record.get('threshold')}, "
                f"balance {record.get('balance')!r}); {hint}")
    return None


def env_heads_heldout(adapter, evalset: EvalSet, settings: EvalSettings, targets: Sequence[str]):
    """The LCM's own phenotype heads on held-out subjects: pretrained ('env_head') or after pseudo-label
    fine-tuning ('pseudo_label_finetune', the model file of the trainer's finetune mode)."""
    from brainfoundry.models.lcm import value_key

    notes, out = [], []
    heldout = set(_heldout_subjects(evalset, settings))
    specs = {s.name: s for s in adapter.env_specs()}
    wins = _subject_windows(adapter, evalset, heldout, settings.max_windows_per_run, adapter.window or settings.window)
    for target in targets:
        if target not in specs:
            notes.append(f"{target}: not a phenotype head of '{adapter.name}' (heads: {sorted(specs)})")
            continue
        try:
            values, classification = target_values(evalset, target, settings)
        except TaskSkipped as err:
            notes.append(str(err))
            continue
        subj = np.array(sorted(s for s in values.index if s in wins))
        method = "pseudo_label_finetune" if getattr(adapter, "finetuned_target", None) == target else "env_head"
        if len(subj) < 4:
            notes.append(f"{target}/{method}: {len(subj)} held-out subjects with a label; too few")
            continue
        spec = specs[target]
        preds = [adapter.env_predict(wins[s])[target].mean(0) for s in subj]
        if classification:
            y_raw = values.reindex(subj)
            y, classes = encode_labels(y_raw)
            cols = [spec.classes.index(value_key(c)) if value_key(c) in (spec.classes or []) else -1 for c in classes]
            if len(np.unique(y)) < 2 or min(cols) < 0:
                notes.append(f"{target}/{method}: held-out classes {classes} vs the head's {spec.classes}")
                continue
            proba = np.stack(preds)[:, cols]
            proba = proba / proba.sum(1, keepdims=True)
            rows = _bootstrap_rows(y, proba.argmax(1), proba[:, 1] if proba.shape[1] == 2 else proba, True,
                                   settings.ci_level)
        else:
            y = values.reindex(subj).to_numpy(float)
            rows = _bootstrap_rows(y, np.asarray(preds, float).ravel(), None, False, settings.ci_level)
        out.append(_tidy(rows, method, target, "heldout"))
    frame = pd.concat(out, ignore_index=True) if out else pd.DataFrame()
    return frame, notes


def fc_heldout(evalset: EvalSet, settings: EvalSettings, subjects: np.ndarray, X: np.ndarray, targets: Sequence[str]):
    """FC baseline trained on the training split, scored on the held-out split (beside the LCM's heads)."""
    from brainfoundry.evaluate.protocol import fit_nested, scores_of

    notes, out = [], []
    runs = evalset.runs
    split_of = runs.groupby("subject")["split"].first().astype(str)
    site_of = runs.groupby("subject")["site"].first().astype(str) if "site" in runs else None
    for target in targets:
        try:
            values, classification = target_values(evalset, target, settings)
        except TaskSkipped:
            continue
        keep = np.isin(subjects, values.index.to_numpy())
        subj, Xk = subjects[keep], X[keep]
        sp = split_of.reindex(subj).to_numpy()
        tr, te = sp == "train", sp == settings.heldout_split
        if tr.sum() < 4 or te.sum() < 4:
            notes.append(f"{target}/fc_linear heldout: {tr.sum()} training and {te.sum()} held-out subjects; too few")
            continue
        y_raw = values.reindex(subj)
        y = encode_labels(y_raw)[0] if classification else y_raw.to_numpy(float)
        if classification and (len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2):
            notes.append(f"{target}/fc_linear heldout: a split has one class only")
            continue
        groups = site_of.reindex(subj[tr]).to_numpy() if site_of is not None else subj[tr]
        if len(np.unique(groups)) < 2:
            groups = subj[tr]
        est, _ = fit_nested("logistic" if classification else "ridge", Xk[tr], y[tr], groups, n_inner=settings.cv.n_inner,
                            classification=classification)
        pred = est.predict(Xk[te])
        score = scores_of(est, Xk[te]) if classification else None
        out.append(_tidy(_bootstrap_rows(y[te], pred, score, classification, settings.ci_level), "fc_linear", target,
                         "heldout"))
    return (pd.concat(out, ignore_index=True) if out else pd.DataFrame()), notes
