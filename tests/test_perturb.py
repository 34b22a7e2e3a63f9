"""In-silico perturbation on a tiny BrainLM and synthetic groups that differ in known parcels."""

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.evaluate.dataset import EvalSet
from brainfoundry.models import build_model
from brainfoundry.perturb import PerturbSettings, perturb, write_outputs

N, T = 8, 40
NETS = np.array(["A"] * 2 + ["B"] * 3 + ["C"] * 3)


def _model():
    torch.manual_seed(0)
    return build_model("brainlm", {"n_parcels": N, "window": 20, "patch_size": 10, "dim": 16, "depth": 1,
                                   "heads": 2, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
                                   "future_patches": 0, "spatial_embedding": "learned"})


def _evalset(shift: float, n_runs: int = 8) -> EvalSet:
    rng = np.random.default_rng(1)
    rows, series = [], []
    for i in range(2 * n_runs):
        group = 1 if i < n_runs else 2
        x = rng.standard_normal((T, N)).astype(np.float32)
        if group == 2:
            x[:, NETS == "A"] += shift  # the target differs only in network A
        rows.append({"run_id": f"r{i}", "subject": f"s{i}", "site": "x", "split": "train", "eye_status": group})
        series.append(x)
    return EvalSet(pd.DataFrame(rows).set_index("run_id"), series, [f"p{k}" for k in range(N)], networks=NETS)


SETTINGS = {"steps": 60, "lr": 0.1, "l2": 0.001, "n_permutations": 19, "seed": 0}


def test_outputs_are_written(tmp_path):
    res = perturb(_model(), _evalset(3.0), PerturbSettings(steps=5, n_permutations=2))
    assert len(res["parcels"]) == N and set(res["networks"]["network"]) == {"A", "B", "C"}
    assert np.isfinite(res["networks"]["p_value"]).all()
    write_outputs(res, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"parcels.tsv", "networks.tsv", "perturb.json", "networks.png"}


def test_identical_groups_give_no_network_beyond_the_null():
    res = perturb(_model(), _evalset(0.0), PerturbSettings(**SETTINGS))
    assert (res["networks"]["p_value"] > 0.05).all()


def test_bad_inputs_name_the_setting():
    evs, model = _evalset(1.0), _model()
    with pytest.raises(ConfigError, match="perturb.column"):
        perturb(model, evs, PerturbSettings(column="nope"))
    with pytest.raises(ConfigError, match="perturb.target"):
        perturb(model, evs, PerturbSettings(target=7))
    with pytest.raises(ConfigError, match="perturb.bogus"):
        PerturbSettings.from_dict({"bogus": 1})
    with pytest.raises(InputError, match="CLS"):
        perturb(build_model("brainmass", {"n_parcels": N, "dim": 16, "depth": 1, "heads": 2}), evs, PerturbSettings())
