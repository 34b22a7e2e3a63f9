"""Tasks end to end on a synthetic set with known structure.

The strongest check that every model is scored exactly like its baseline: an adapter that *is* a
baseline (reconstructs by linear interpolation, forecasts by persistence, embeds a run as its FC) must
get exactly the baseline's numbers, although model and baseline rows are computed in separate calls
(same held-out windows, same masks, same folds, same probes).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainfoundry.evaluate.adapters import ModelAdapter, embed_runs, load_embeddings, save_embeddings, window_starts
from brainfoundry.evaluate.baselines import expand_mask, fc_features, fc_rows, interpolate_masked, persistence
from brainfoundry.evaluate.runner import folds_for, run_task
from brainfoundry.evaluate.settings import EvalSettings
from brainfoundry.evaluate.synthetic import synthetic_evalset
from brainfoundry.evaluate.table import merge, plot_all, plot_verdict, verdict, write_html
from brainfoundry.evaluate.runner import write_task_output


class InterpolatingModel(ModelAdapter):
    """Reconstructs like the interpolation baseline and forecasts like persistence."""

    name = "interp"
    window, min_length, patch = 200, 200, 20
    capabilities = frozenset({"reconstruct", "forecast"})

    def reconstruct(self, x, mask):
        return np.stack([interpolate_masked(w, expand_mask(m, self.patch)) for w, m in zip(x, mask)])

    def forecast(self, context, horizon):
        return persistence(context, horizon)


class FCModel(ModelAdapter):
    """Embeds a whole series as its Fisher-z FC (pooled) and FC rows (per parcel), like the baselines."""

    name = "fcmodel"
    window, min_length = None, 50
    capabilities = frozenset({"embed", "parcel_embed"})

    def embed(self, windows):
        return np.stack([fc_features(w) for w in windows]), np.stack([fc_rows(w) for w in windows])


@pytest.fixture(scope="module")
def evs():
    return synthetic_evalset(n_subjects=20, n_runs=2, n_timepoints=220, n_parcels=16, seed=0)


@pytest.fixture(scope="module")
def settings():
    return EvalSettings.from_dict({
        "models": ["interp", "fcmodel"], "seeds": [0], "mask_ratios": [0.2, 0.75], "probes": ["logistic"], "n_permutations": 0,
        "targets": ["diagnosis", "sex", "age"], "network_runs": 8, "max_windows_per_run": 2,
        "cv": {"n_folds": 4, "seeds": [0], "n_inner": 2},
        "forecast_baselines": {"lstm_epochs": 1, "lstm_max_samples": 500, "max_train_windows": 40},
    })


@pytest.fixture(scope="module")
def folds(evs, settings):
    return folds_for(evs, settings)


def _agg(table, method=None):
    t = table[table["fold"] == "all"]
    return t if method is None else t[t["method"] == method]


def test_reconstruction_model_equals_interpolation_baseline(evs, settings):
    base, info_b = run_task("reconstruction", "baseline", evs, settings)
    model, info_m = run_task("reconstruction", "interp", evs, settings, adapter=InterpolatingModel())
    assert info_b["status"] == info_m["status"] == "ok"
    b = _agg(base, "linear_interpolation").set_index("condition")["value"]
    m = _agg(model, "masked_autoencoder").set_index("condition")["value"]
    assert list(m.index) == ["mask=0.2", "mask=0.75"]
    np.testing.assert_allclose(m.to_numpy(), b.reindex(m.index).to_numpy(), rtol=0, atol=1e-12)
    # smooth synthetic series: interpolation is informative (R² > 0) and degrades with more masking
    assert b["mask=0.2"] > b["mask=0.75"] > 0
    assert set(_agg(base)["method"]) == {"linear_interpolation", "parcel_mean", "ridge_visible"}
    assert (_agg(base)["ci_low"] <= _agg(base)["value"]).all()


def test_forecasting_model_equals_persistence_and_ar_beats_it(evs, settings):
    base, _ = run_task("forecasting", "baseline", evs, settings)
    model, info = run_task("forecasting", "interp", evs, settings, adapter=InterpolatingModel())
    assert info["status"] == "ok"
    b = _agg(base).set_index(["method", "metric"])["value"]
    m = _agg(model).set_index(["method", "metric"])["value"]
    for metric in ("r2", "pearson_r", "mse"):
        assert m[("future_masking", metric)] == pytest.approx(b[("persistence", metric)], abs=1e-12)
    assert b[("ridge_ar", "mse")] < b[("persistence", "mse")]
    assert {"persistence", "ridge_ar", "lstm"} <= set(b.index.get_level_values(0))


def test_embedding_tasks_equal_fc_baselines_when_the_embedding_is_fc(evs, settings, folds, tmp_path):
    emb = embed_runs(FCModel(), evs, max_windows=2, parcel_runs=settings.network_runs)
    save_embeddings(emb, tmp_path / "emb.npz")
    emb = load_embeddings(tmp_path / "emb.npz")  # the cache round-trips
    assert emb.pooled.shape == (len(evs.series), 16 * 15 // 2)
    assert emb.parcels.shape == (settings.network_runs, 16, 16)

    base, _ = run_task("phenotype", "baseline", evs, settings, folds)
    model, info = run_task("phenotype", "fcmodel", evs, settings, folds, adapter=FCModel(), embeddings=emb)
    assert info["status"] == "ok", info
    per_fold = lambda t, meth: t[(t["method"] == meth) & (t["fold"] != "all") & (t["split"] == "cv")].set_index(
        ["target", "fold", "seed", "metric"])["value"].sort_index()
    b, m = per_fold(base, "fc_linear"), per_fold(model, "logistic_probe")
    assert len(b) and b.index.equals(m.index)
    np.testing.assert_allclose(m.to_numpy(), b.to_numpy(), atol=1e-6)
    # the synthetic diagnosis changes a network coupling: FC finds it
    # Both scopes for the model and the baseline: all subjects ('cv') and those outside the pretraining
    # split ('cv_heldout', fewer test subjects on the same folds).
    for table, method in ((base, "fc_linear"), (model, "logistic_probe")):
        scopes = _agg(table, method).groupby("split")["n"].max()
        assert set(scopes.index) == {"cv", "cv_heldout"} and scopes["cv_heldout"] < scopes["cv"]
    auc = _agg(base[base["split"] == "cv"], "fc_linear").set_index(["target", "metric"])["value"]
    assert auc[("diagnosis", "auc")] > 0.8
    assert {("age", "mae"), ("age", "r")} <= set(auc.index)

    fb, _ = run_task("fingerprint", "baseline", evs, settings)
    fm, _ = run_task("fingerprint", "fcmodel", evs, settings, embeddings=emb)
    assert _agg(fm, "embedding")["value"].iloc[0] == pytest.approx(_agg(fb, "fc")["value"].iloc[0])
    assert _agg(fb, "fc")["value"].iloc[0] > 2 * _agg(fb, "chance")["value"].iloc[0]

    nb, _ = run_task("networks", "baseline", evs, settings)
    nm, info = run_task("networks", "fcmodel", evs, settings, embeddings=emb)
    assert info["status"] == "ok", info
    fc_row = _agg(nb, "fc_row").set_index("metric")["value"]
    probe = _agg(nm, "parcel_embedding_probe").set_index("metric")["value"]
    assert probe["balanced_accuracy"] == pytest.approx(fc_row["balanced_accuracy"], abs=0.02)
    assert fc_row["balanced_accuracy"] > _agg(nb, "chance").set_index("metric")["value"]["balanced_accuracy"]


def test_missing_capability_is_a_clear_skip_and_other_tasks_run(evs, settings, folds):
    table, info = run_task("reconstruction", "fcmodel", evs, settings, adapter=FCModel())
    assert info["status"] == "skipped" and table.empty
    assert "needs 'reconstruct', which model 'fcmodel' does not provide" in info["notes"][0]
    _, info = run_task("fingerprint", "baseline", evs, settings)
    assert info["status"] == "ok"
    _, info = run_task("networks", "fcmodel", evs, settings)  # no embeddings at all
    assert info["status"] == "skipped" and "no embeddings" in info["notes"][0]


def test_constant_phenotype_is_noted_and_the_other_targets_run(evs, settings, folds):
    evs2 = evs.subset(np.ones(len(evs.series), bool))
    evs2.runs["sex"] = "F"
    table, info = run_task("phenotype", "baseline", evs2, settings, folds)
    assert info["status"] == "ok"
    assert any("'sex' is constant" in n for n in info["notes"])
    assert "sex" not in set(table["target"]) and {"diagnosis", "age"} <= set(table["target"])


def test_too_few_subjects_for_the_folds_skips_phenotypes_only(settings):
    small = synthetic_evalset(n_subjects=3, n_runs=1, n_timepoints=220, n_parcels=8, n_sites=3)
    from brainfoundry.evaluate.protocol import TaskSkipped

    with pytest.raises(TaskSkipped, match="4 folds were asked but only 3"):
        folds_for(small, settings)
    table, info = run_task("phenotype", "baseline", small, settings, None,
                           folds_note="4 folds were asked but only 3 subjects are available")
    assert info["status"] == "skipped" and "only 3 subjects" in info["notes"][0]
    _, info = run_task("networks", "baseline", small, settings)  # tasks without subject folds still run
    assert info["status"] == "ok"


def test_no_network_labels_is_a_clear_skip(evs, settings):
    evs2 = evs.subset(np.ones(len(evs.series), bool))
    evs2.networks = None
    _, info = run_task("networks", "baseline", evs2, settings)
    assert info["status"] == "skipped" and "no network labels" in info["notes"][0]


def test_embed_runs_windows_halves_and_short_runs():
    evs = synthetic_evalset(n_subjects=4, n_runs=1, n_timepoints=500, n_parcels=6)
    evs.series[0] = evs.series[0][:150]  # too short for a 200-point window

    class Mean(ModelAdapter):
        name, window, min_length = "mean", 200, 200
        capabilities = frozenset({"embed", "parcel_embed"})
        calls = []

        def embed(self, w):
            self.calls.append(w.shape)
            return w.mean(1), np.repeat(w.mean(1)[:, :, None], 2, axis=2)

    emb = embed_runs(Mean(), evs, max_windows=8, parcel_runs=2)
    assert np.isnan(emb.pooled[0]).all() and "1 runs shorter than 200" in emb.notes[0]
    # a 500-point run: windows at 0, 200 and 300 (end-aligned); halves of 250 points: one window each (+ end)
    assert window_starts(500, 200) == [0, 200, 300]
    x = evs.normalized(1)
    np.testing.assert_allclose(emb.pooled[1], np.mean([x[s:s + 200].mean(0) for s in (0, 200, 300)], axis=0), rtol=1e-5)
    np.testing.assert_allclose(emb.halves[1, 1], np.mean([x[250:450].mean(0), x[300:500].mean(0)], axis=0), rtol=1e-5)
    assert all(shape[1] == 200 for shape in Mean.calls)


def test_merge_writes_table_summary_and_plots(evs, settings, folds, tmp_path):
    files = []
    for model, task, adapter in [("baseline", "reconstruction", None), ("interp", "reconstruction", InterpolatingModel()),
                                 ("fcmodel", "reconstruction", FCModel())]:
        table, info = run_task(task, model, evs, settings, adapter=adapter)
        out = tmp_path / model / f"{task}.parquet"
        write_task_output(table, info, out)
        files.append(out)
    table, status = merge(files)
    assert set(table["model"]) == {"baseline", "interp"}
    assert list(status["status"]) == ["ok", "ok", "skipped"]
    ver = verdict(table)
    assert set(ver["condition"]) == {"mask=0.2", "mask=0.75"}
    # identical numbers: never "better" or "worse"
    assert (ver["verdict"] == "no clear difference").all()
    write_html(table, status, tmp_path / "summary.html")
    page = (tmp_path / "summary.html").read_text()
    assert "Did pretraining help?" in page and "does not provide" in page
    plots = plot_all(table, tmp_path / "plots", ["reconstruction", "forecasting"])
    assert all(p.stat().st_size > 1000 for p in plots)
    plot_verdict(table, tmp_path / "verdict.png")
    assert (tmp_path / "verdict.png").stat().st_size > 1000


def test_verdict_compares_on_subjects_outside_pretraining_when_scored_there():
    """A model scored on all subjects and on those outside its pretraining split is judged on the latter,
    against the baseline on the same scope (not the baseline's best scope, not the model's best)."""
    from brainfoundry.evaluate.table import tidy

    def row(split, value, lo, hi):
        return {"method": "m", "target": "diagnosis", "condition": "", "split": split, "fold": "all", "seed": -1,
                "metric": "auc", "value": value, "ci_low": lo, "ci_high": hi, "n": 10}

    model = tidy(pd.DataFrame([row("cv", 0.90, 0.85, 0.95), row("cv_heldout", 0.60, 0.55, 0.65)]),
                 "brainlm", "phenotype", False)
    base = tidy(pd.DataFrame([row("cv", 0.70, 0.66, 0.74), row("cv_heldout", 0.75, 0.70, 0.80)]),
                "baseline", "phenotype", True)
    ver = verdict(pd.concat([model, base], ignore_index=True)).iloc[0]
    assert (ver["split"], ver["model_value"], ver["baseline_value"], ver["verdict"]) == ("cv_heldout", 0.60, 0.75, "worse")
    # Without a held-out scope the all-subject rows are compared.
    ver = verdict(pd.concat([model[model["split"] == "cv"], base], ignore_index=True)).iloc[0]
    assert (ver["split"], ver["model_value"], ver["baseline_value"], ver["verdict"]) == ("cv", 0.90, 0.70, "better")


# -- issue 10: FC + SVM, FC + embedding, clinical-variable normalisation, external sites --------------
def test_fc_svm_baselines_and_fc_plus_embedding_on_the_same_folds(evs, settings, folds):
    emb = embed_runs(FCModel(), evs, max_windows=2, parcel_runs=0)
    base, _ = run_task("phenotype", "baseline", evs, settings, folds)
    model, info = run_task("phenotype", "fcmodel", evs, settings, folds, adapter=FCModel(), embeddings=emb)
    assert info["status"] == "ok", info
    assert {"fc_linear", "fc_svm_linear", "fc_svm_rbf"} <= set(base["method"])
    assert {"fc_alone", "fc_plus_embedding", "logistic_probe"} <= set(model["method"])
    per_fold = lambda t, meth: t[(t["method"] == meth) & (t["fold"] != "all") & (t["split"] == "cv")].set_index(
        ["target", "fold", "seed", "metric"])["value"].sort_index()
    # FC alone in the model's table is the baseline's FC logistic on the same subjects and folds
    np.testing.assert_allclose(per_fold(model, "fc_alone").to_numpy(), per_fold(base, "fc_linear").to_numpy(), atol=1e-6)
    assert model.loc[model["method"] == "fc_alone", "is_baseline"].all()
    assert not model.loc[model["method"] == "fc_plus_embedding", "is_baseline"].any()
    auc = _agg(base[base["split"] == "cv"]).set_index(["method", "target", "metric"])["value"]
    for method in ("fc_svm_linear", "fc_svm_rbf"):
        assert auc[(method, "diagnosis", "auc")] > 0.7  # the synthetic effect is in FC: every FC model finds it
        # age through SVR on the z-scored target (evaluate.target_normalization default): mse beside mae
        assert (method, "age", "mse") in auc.index and (method, "age", "mae") in auc.index


def _external_settings(**over):
    values = {"models": ["fcmodel"], "seeds": [0], "probes": ["logistic"], "fc_probes": ["logistic"], "n_permutations": 0,
              "targets": ["diagnosis", "sex", "age"], "fc_concat": False, "external_sites": ["site0"],
              "cv": {"n_folds": 3, "seeds": [0], "n_inner": 2}}
    return EvalSettings.from_dict({**values, **over})


def test_external_sites_are_their_own_split_with_bootstrap_intervals(evs, folds):
    table, info = run_task("phenotype", "baseline", evs, _external_settings(), folds)
    assert info["status"] == "ok", info
    ext = table[(table["split"] == "external") & (table["method"] == "fc_linear")].set_index(["target", "metric"])
    n_ext = evs.runs.loc[evs.runs["site"] == "site0", "subject"].nunique()
    assert (ext["n"] == n_ext).all()
    assert {("diagnosis", "auc"), ("age", "mae"), ("age", "mse")} <= set(ext.index)
    assert ext.loc[("diagnosis", "auc"), "value"] > 0.7  # the synthetic effect transfers to an unseen site
    row = ext.loc[("age", "mae")]
    assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    assert {"cv", "cv_heldout", "external"} <= set(table["split"])  # beside the site-grouped CV


def test_external_bad_input_is_a_named_reason_and_other_tasks_run(evs, folds):
    table, info = run_task("phenotype", "baseline", evs, _external_settings(external_sites=["nowhere"]), folds)
    assert info["status"] == "ok" and "external" not in set(table["split"]) and "cv" in set(table["split"])
    assert any("evaluate.external_sites ['nowhere']: none of them is a site" in n for n in info["notes"])

    one = evs.subset(np.ones(len(evs.series), bool))
    one.runs = one.runs.copy()
    one.runs.loc[one.runs["site"] == "site0", "diagnosis"] = one.runs["diagnosis"].iloc[0]
    table, info = run_task("phenotype", "baseline", one, _external_settings(), folds)
    assert any("diagnosis/external: the external sites have one class only" in n for n in info["notes"])
    ext = table[table["split"] == "external"]
    assert "diagnosis" not in set(ext["target"]) and {"sex", "age"} <= set(ext["target"])  # the others still run


# -- BrainLM's forecasting fine-tune and CLS-attention network identification -------------------------------
def _tiny_brainlm(evs, window=40, patch=10, seed=0):
    import torch

    from brainfoundry.evaluate.families import TorchModelAdapter
    from brainfoundry.models import build_model

    torch.manual_seed(seed)
    model = build_model("brainlm", {"n_parcels": evs.n_parcels, "window": window, "patch_size": patch, "dim": 16,
                                    "depth": 2, "heads": 2, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
                                    "mask_ratio": 0.5}, coords=evs.parcel_coords)
    return TorchModelAdapter(model, "tinylm")


def test_forecasting_finetuned_head_beats_the_zero_shot_decoder(evs, settings):
    s = EvalSettings.from_dict({**settings.to_dict(), "window": 40, "patch": 10, "context": 30, "horizon": 10})
    adapter = _tiny_brainlm(evs)  # random init: the fine-tune must work for the control too
    table, info = run_task("forecasting", "tinylm", evs, s, adapter=adapter)
    assert info["status"] == "ok", info
    r2 = _agg(table).set_index(["method", "metric"])["value"]
    assert {"future_masking", "finetuned_head"} <= set(r2.index.get_level_values(0))
    # Smooth synthetic series: even a random encoder's tokens carry the recent values a linear head reads.
    assert r2[("finetuned_head", "r2")] > 0.1 > r2[("future_masking", "r2")]
    assert any("finetuned_head: ridge penalty" in n for n in info["notes"])


def test_forecasting_head_needs_the_feature_capability(evs, settings):
    from brainfoundry.evaluate import forecasting
    from brainfoundry.evaluate.protocol import TaskSkipped

    with pytest.raises(TaskSkipped, match="forecast_features"):
        forecasting.fit_forecast_head(InterpolatingModel(), np.zeros((2, 180, 16)), np.zeros((2, 20, 16)))


class AttentionModel(FCModel):
    """FC embeddings plus a CLS attention per parcel given by ``weights(parcel index)``."""

    window = 40
    capabilities = frozenset({"embed", "parcel_embed", "cls_attention"})

    def __init__(self, weights):
        self.weights = weights

    def cls_attention(self, windows):
        w = self.weights(np.arange(windows.shape[2]), windows)
        return w / w.sum(1, keepdims=True)


def test_networks_cls_attention_probe_reads_networks_from_attention(evs, settings):
    emb = embed_runs(FCModel(), evs, max_windows=2, parcel_runs=settings.network_runs)
    net = np.arange(evs.n_parcels) % 4  # the synthetic networks
    informative = AttentionModel(lambda p, w: np.tile(1.0 + net[p], (len(w), 1)))
    rng = np.random.default_rng(0)
    noise = AttentionModel(lambda p, w: rng.uniform(0.5, 1.5, (len(w), len(p))))
    scores = {}
    for name, model in (("informative", informative), ("noise", noise)):
        table, info = run_task("networks", "att", evs, settings, adapter=model, embeddings=emb)
        assert info["status"] == "ok", info
        agg = _agg(table, "cls_attention_probe").set_index("metric")
        assert agg.loc["balanced_accuracy", "n"] == evs.n_parcels  # one sample per parcel
        scores[name] = agg.loc["balanced_accuracy", "value"]
        assert {"parcel_embedding_probe", "cls_attention_probe"} <= set(table["method"])
    assert scores["informative"] > 0.9 and scores["noise"] < 0.6


def test_networks_cls_attention_of_a_real_brainlm_runs(evs, settings):
    emb = embed_runs(FCModel(), evs, max_windows=2, parcel_runs=settings.network_runs)
    table, info = run_task("networks", "tinylm", evs, settings, adapter=_tiny_brainlm(evs), embeddings=emb)
    assert info["status"] == "ok", info
    values = _agg(table, "cls_attention_probe").set_index("metric")["value"]
    assert 0.0 <= values["balanced_accuracy"] <= 1.0


def test_one_patch_brainlm_reconstructs_but_skips_forecasting(evs, settings):
    import torch

    from brainfoundry.evaluate.families import TorchModelAdapter
    from brainfoundry.models import build_model

    torch.manual_seed(0)
    model = build_model("brainlm", {"n_parcels": evs.n_parcels, "window": 40, "patch_size": 40, "dim": 16, "depth": 1,
                                    "heads": 2, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
                                    "mask_ratio": 0.5, "future_patches": 0, "future_prob": 0.0},
                        coords=evs.parcel_coords)
    adapter = TorchModelAdapter(model, "onepatch")
    assert "reconstruct" in adapter.capabilities and "forecast" not in adapter.capabilities
    s = EvalSettings.from_dict({**settings.to_dict(), "window": 40, "patch": 40, "context": 30, "horizon": 10})
    _, info = run_task("reconstruction", "onepatch", evs, s, adapter=adapter)
    assert info["status"] == "ok", info
    _, info = run_task("forecasting", "onepatch", evs, s, adapter=adapter)
    assert info["status"] == "skipped" and "forecast" in " ".join(info["notes"])
