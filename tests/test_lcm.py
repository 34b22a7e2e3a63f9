"""The published-form LCM: query layout, masked multitask loss, fine-tune queries, pseudo-label round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainfoundry.errors import ConfigError
from brainfoundry.models import build_model, load_model
from brainfoundry.models.lcm import (assign_pseudo_labels, balance_pseudo_labels, fisher_z_fc, fit_env_stats,
                                     pseudo_labels, query_layout, value_key)

torch.set_num_threads(1)
N, T = 10, 60
RECORDS = {"age": [20.0, 30.0, float("nan"), 40.0], "sex": ["F", "M", None, "M"],
           "diagnosis": ["ASD", "TD", "ASD", None], "site": ["A", "B", "A", "C"]}
SPECS = [{"name": "diagnosis", "kind": "categorical"}, {"name": "sex", "kind": "categorical"},
         {"name": "site", "kind": "categorical"}, {"name": "age", "kind": "continuous"}]


def lcm(**kw):
    return build_model("lcm", dict(n_parcels=N, dim=32, heads=4, depth=2, dropout=0.0,
                                   env=fit_env_stats(RECORDS, SPECS), **kw))


def series(b=4, seed=0):
    return torch.randn(b, T, N, generator=torch.Generator().manual_seed(seed))


# -- targets and queries ---------------------------------------------------------------------------------
def test_fit_env_stats_uses_only_the_given_records_and_skips_unusable():
    specs = [{"name": "age", "kind": "continuous"}, {"name": "sex", "kind": "categorical"},
             {"name": "iq", "kind": "continuous"}, {"name": "site", "kind": "categorical"}]
    with pytest.warns(UserWarning) as caught:
        fitted = fit_env_stats({**RECORDS, "site": ["A", "A", None, "A"]}, specs)
    messages = " ".join(str(w.message) for w in caught)
    assert "'iq' is not a column" in messages and "'site' has 1 class" in messages
    assert [f["name"] for f in fitted] == ["age", "sex"]
    assert fitted[0]["mean"] == pytest.approx(30.0) and fitted[0]["std"] == pytest.approx(np.std([20, 30, 40]))
    assert value_key(1.0) == value_key(1) == value_key("1") == "1"
    assert value_key(float("nan")) is None and value_key(-1) is None and value_key("n/a") is None


def test_one_query_per_class_plus_one_per_continuous_target_one_logit_each():
    model = lcm()
    assert model.layout == [("diagnosis", "ASD"), ("diagnosis", "TD"), ("sex", "F"), ("sex", "M"),
                            ("site", "A"), ("site", "B"), ("site", "C"), ("age", None)]
    assert model.queries.shape == (8, 32) and query_layout(model.specs) == model.layout
    logits = model.logits({"x": series()})
    assert logits.shape == (4, 8)
    probs = model.predict_env({"x": series()})
    assert probs["diagnosis"].shape == (4, 2) and probs["site"].shape == (4, 3) and probs["age"].shape == (4,)
    torch.testing.assert_close(probs["sex"].sum(1), torch.ones(4))
    # The sex probabilities are the softmax over the sex queries' logits only.
    torch.testing.assert_close(probs["sex"], model.logits({"x": series()})[:, 2:4].softmax(-1))


def test_node_tokens_are_fisher_z_fc_rows():
    x = series(2)
    fc = fisher_z_fc(x)
    r = np.corrcoef(x[0].numpy().T)
    expected = np.arctanh(np.clip(r, -0.999, 0.999))
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(fc[0].numpy(), expected, atol=1e-4)
    # Any atlas: a model of 7 parcels reads 7-parcel series.
    other = build_model("lcm", dict(n_parcels=7, dim=16, heads=2, env=fit_env_stats(RECORDS, SPECS[:2])))
    assert other.encode({"x": torch.randn(3, 30, 7)})["parcels"].shape == (3, 7, 16)


def test_missing_labels_are_masked_in_the_multitask_loss():
    model = lcm().eval()
    x = series()
    values, observed = model.env_values({"age": [25.0, float("nan")], "sex": ["M", "X"], "diagnosis": [None, "TD"]}, 2)
    assert observed.tolist() == [[False, True, False, True], [True, False, False, False]]  # site absent, X unseen
    # No label at all: loss exactly 0 (nothing imputed).
    loss, _ = model.loss({"x": x})
    assert loss.item() == 0.0
    full, _ = model.loss({"x": x, **RECORDS})
    assert full.item() > 0
    # A slot's label changes the loss only when observed: changing a masked (None) value changes nothing.
    a, _ = model.loss({"x": x, **RECORDS, "sex": ["F", "M", None, "M"]})
    b, _ = model.loss({"x": x, **RECORDS, "sex": ["F", "M", "n/a", "M"]})
    assert a.item() == b.item()
    c, _ = model.loss({"x": x, **RECORDS, "sex": ["M", "M", None, "M"]})
    assert c.item() != a.item()
    # Every target contributes: one scalar per (sample, target), averaged over B * V.
    only_sex, _ = model.loss({"x": x, "sex": RECORDS["sex"]})
    assert 0 < only_sex.item() < full.item()


def test_encode_reads_no_label_and_every_parameter_learns():
    model = lcm().eval()
    x = series()
    a = model.encode({"x": x, **RECORDS})
    b = model.encode({"x": x, "age": [90.0] * 4, "sex": ["F"] * 4, "diagnosis": ["TD"] * 4})
    torch.testing.assert_close(a["pooled"], b["pooled"])
    assert a["pooled"].shape == (4, 32) and a["tokens"].shape == (4, N, 32)
    model.train()
    loss, _ = model.loss({"x": x, **RECORDS})
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_needs_fitted_stats_and_bad_config():
    with pytest.raises(ConfigError, match="training-split statistics"):
        build_model("lcm", dict(n_parcels=N, dim=32, heads=4))
    with pytest.raises(ConfigError, match="model.heads"):
        build_model("lcm", dict(n_parcels=N, dim=30, heads=4, env=fit_env_stats(RECORDS, SPECS)))


# -- fine-tuning queries ----------------------------------------------------------------------------------
def test_finetune_reuses_known_queries_and_adds_new_ones(tmp_path):
    model = lcm()
    new = fit_env_stats({"handedness": ["L", "R", "R"], "diagnosis": ["ASD", "TD", "other"]},
                        [{"name": "handedness", "kind": "categorical"}, {"name": "diagnosis", "kind": "categorical"}])
    tuned = model.with_targets(new)
    # Every known (target, class) pair keeps its pretrained query; the new class and target get new ones.
    assert set(model.layout) < set(tuned.layout)
    assert set(tuned.layout) - set(model.layout) == {("diagnosis", "other"), ("handedness", "L"), ("handedness", "R")}
    old = {k: model.queries[i] for i, k in enumerate(model.layout)}
    for i, key in enumerate(tuned.layout):
        if key in old:
            torch.testing.assert_close(tuned.queries[i], old[key])
        else:
            assert not any(torch.equal(tuned.queries[i], v) for v in old.values())
    # The rest of the network is the pretrained one.
    torch.testing.assert_close(tuned.node_proj.weight, model.node_proj.weight)
    assert tuned.spec("diagnosis")[1].classes == ["ASD", "TD", "other"]
    # The extended model (its config lists the new targets) saves and reloads whole.
    path = tuned.save(tmp_path / "model.safetensors")
    again = load_model(path)
    assert again.layout == tuned.layout
    loss, metrics = tuned.finetune_loss({"x": series()}, "handedness", torch.tensor([0, 1, -1, 1]), torch.ones(4))
    assert torch.isfinite(loss) and float(metrics["n_labelled"]) == 3
    with pytest.raises(ConfigError, match="categorical"):
        tuned.finetune_loss({"x": series()}, "age", torch.zeros(4, dtype=torch.long), torch.ones(4))
    with pytest.raises(ConfigError, match="continuous in the pretrained"):
        model.with_targets([{"name": "age", "kind": "categorical", "classes": ["young", "old"]}])


# -- the pseudo-label round -------------------------------------------------------------------------------
def test_pseudo_labels_only_confident():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    labels, conf = pseudo_labels(probs, 0.9)
    assert labels.tolist() == [0, -1, 1, -1]
    torch.testing.assert_close(conf, torch.tensor([0.95, 0.6, 0.9, 0.5]))


def test_class_balance_keeps_the_most_confident_of_each_class():
    found = {"a": (0, 0.99), "b": (0, 0.95), "c": (0, 0.97), "d": (1, 0.93), "e": (1, 0.91)}
    kept = balance_pseudo_labels(found, 2, "equal")
    assert kept == {"a": (0, 0.99), "c": (0, 0.97), "d": (1, 0.93), "e": (1, 0.91)}
    assert balance_pseudo_labels(found, 2, "none") == found
    # One class never confident: a balanced round labels nobody.
    assert balance_pseudo_labels({"a": (0, 0.99)}, 2, "equal") == {}
    with pytest.raises(ConfigError, match="pseudo_balance"):
        balance_pseudo_labels(found, 2, "prior")


def test_assign_pseudo_labels_only_unlabelled_confident_training_runs():
    model = lcm()
    j, _ = model.spec("diagnosis")
    with torch.no_grad():  # a head certain of class TD for every run, whatever the input
        model.logit.weight.zero_()
        model.logit.bias.zero_()
        model.queries.zero_()
    sl = model.slices[j]
    orig = model.logits
    head = torch.tensor([-10.0, 10.0])

    def fixed(batch):
        out = orig(batch).clone()
        out[:, sl] = head
        return out

    model.logits = fixed
    b = {"x": series(), "diagnosis": ["ASD", None, None, None], "split": ["train", "train", "test", "train"],
         "run_id": ["r0", "r1", "r2", "r3"]}
    found, n_unlabelled = assign_pseudo_labels(model, [b], "diagnosis", threshold=0.99)
    assert sorted(found) == ["r1", "r3"] and n_unlabelled == 2  # r0 has a true label, r2 is a test run
    assert all(label == 1 and conf > 0.99 for label, conf in found.values())
    head.zero_()  # 50/50: nothing is confident, yet the unlabelled runs are counted
    assert assign_pseudo_labels(model, [b], "diagnosis", threshold=0.6) == ({}, 2)
    with pytest.raises(ConfigError, match="categorical"):
        assign_pseudo_labels(model, [b], "age", threshold=0.5)


# -- it learns ----------------------------------------------------------------------------------------------
def planted(n, rng):
    """Series whose parcels 0 and 1 co-fluctuate in class 1 only (an FC edge), sex planted in parcels 2-3."""
    xs, dx, sex = [], [], []
    for _ in range(n):
        d, s = int(rng.integers(2)), int(rng.integers(2))
        x = rng.standard_normal((T, N))
        shared = rng.standard_normal(T)
        if d:
            x[:, 0] += 1.5 * shared
            x[:, 1] += 1.5 * shared
        if s:
            x[:, 2] += 1.5 * shared
            x[:, 3] -= 1.5 * shared
        xs.append(x)
        dx.append("ASD" if d else "TD")
        sex.append("M" if s else "F")
    return torch.tensor(np.stack(xs), dtype=torch.float32), dx, sex


def test_learns_a_planted_fc_signal_above_chance():
    from brainfoundry.evaluate.protocol import binary_auc

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x_tr, dx_tr, sex_tr = planted(160, rng)
    x_te, dx_te, sex_te = planted(80, rng)
    env = fit_env_stats({"diagnosis": dx_tr, "sex": sex_tr}, SPECS[:2])
    model = build_model("lcm", dict(n_parcels=N, dim=32, heads=4, depth=1, dropout=0.0, env=env))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Half the diagnosis labels missing: the masked multitask loss still learns from the rest.
    dx_seen = [d if i % 2 else None for i, d in enumerate(dx_tr)]
    for step in range(150):
        idx = torch.randint(0, 160, (32,))
        loss, _ = model.loss({"x": x_tr[idx], "diagnosis": [dx_seen[i] for i in idx], "sex": [sex_tr[i] for i in idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        probs = model.predict_env({"x": x_te})
    dx_auc = binary_auc(np.array([d == "TD" for d in dx_te], int), probs["diagnosis"][:, 1].numpy())
    sex_auc = binary_auc(np.array([s == "M" for s in sex_te], int), probs["sex"][:, 1].numpy())
    assert dx_auc > 0.8 and sex_auc > 0.8, (dx_auc, sex_auc)


def test_a_pseudo_label_round_that_labels_nobody_or_a_family_without_heads_is_a_named_reason():
    from types import SimpleNamespace

    from brainfoundry.evaluate.phenotype import pseudo_label_skip_reason

    round_ = {"threshold": 0.9, "balance": "equal", "n_unlabelled": 40, "n_confident": 3, "n_assigned": 0}
    nobody = SimpleNamespace(name="lcm_pl", family="lcm", capabilities=frozenset({"env_heads"}),
                             finetuned_target="diagnosis", pseudo_round=round_)
    reason = pseudo_label_skip_reason(nobody)
    assert "labelled nobody" in reason and "3 of 40" in reason and "threshold 0.9" in reason
    assert pseudo_label_skip_reason(SimpleNamespace(**{**vars(nobody), "pseudo_round": {**round_, "n_assigned": 2}})) is None
    headless = SimpleNamespace(name="bl", family="brainlm", capabilities=frozenset({"embed"}), finetuned_target="diagnosis")
    assert "no phenotype query head" in pseudo_label_skip_reason(headless)
