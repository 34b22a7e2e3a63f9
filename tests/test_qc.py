"""Per-run QC figures from the parcellate outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_parcellate import DENOISE, make_run, run_ours

from brainfoundry.errors import InputError
from brainfoundry.parcellate import write_outputs
from brainfoundry.qc import _corr, _network_order, cli_main, qc_figures, run_fd
from brainfoundry.runfiles import write_series

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_outputs(tmp_path):
    paths = make_run(tmp_path / "in")
    result = run_ours(paths)
    out = tmp_path / "out"
    files = {"timeseries": out / "ts.parquet", "sidecar": out / "ts.json", "raw": out / "raw.parquet"}
    write_outputs(result, out=files["timeseries"], out_json=files["sidecar"], out_raw=files["raw"],
                  inputs={"bold": paths["bold"], "confounds": paths["confounds"]}, config={"denoise": DENOISE},
                  atlas="S", space="X")
    return paths, files, result


def test_three_figures(tmp_path, run_outputs):
    paths, files, _ = run_outputs
    figs = {k: tmp_path / "fig" / f"{k}.png" for k in ("fd", "carpet", "fc")}
    assert cli_main(["--timeseries", str(files["timeseries"]), "--timeseries-json", str(files["sidecar"]),
                     "--raw", str(files["raw"]), "--confounds", str(paths["confounds"]),
                     "--labels", str(paths["labels"]), "--title", "sub-01_task-rest",
                     "--out-fd", str(figs["fd"]), "--out-carpet", str(figs["carpet"]),
                     "--out-fc", str(figs["fc"])]) == 0
    for path in figs.values():
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["carpet.png", "fc.png", "fd.png"]


def test_fd_recomputed_when_absent(tmp_path):
    paths = make_run(tmp_path, n_vol=30, fd=False)
    with_fd = make_run(tmp_path / "b", n_vol=30)
    np.testing.assert_allclose(run_fd(paths["confounds"], 30)[1:], run_fd(with_fd["confounds"], 30)[1:], rtol=1e-6)
    with pytest.raises(InputError, match="rows"):
        run_fd(paths["confounds"], 31)


def test_raw_rows_must_match_sidecar(tmp_path, run_outputs):
    paths, files, result = run_outputs
    # A consistent set of files (checksums recorded) whose raw means lack the last volume.
    sidecar = json.loads(files["sidecar"].read_text())
    write_series(files["timeseries"], result.cleaned, result.names, sidecar, sidecar_path=files["sidecar"],
                 raw=(files["raw"], result.raw[:-1]))
    with pytest.raises(InputError, match="input volumes"):
        qc_figures(timeseries=files["timeseries"], timeseries_json=files["sidecar"], raw=files["raw"],
                   confounds=paths["confounds"], out_fd=tmp_path / "a.png", out_carpet=tmp_path / "b.png",
                   out_fc=tmp_path / "c.png")
    assert not (tmp_path / "a.png").exists()


def test_denoising_lowers_motion_driven_correlation(run_outputs):
    """What the FC figure shows: the shared motion artefact inflates raw correlations; cleaning removes it."""
    _, files, result = run_outputs
    kept = json.loads(files["sidecar"].read_text())["KeptVolumes"]
    iu = np.triu_indices(5, k=1)
    before = np.abs(_corr(result.raw[kept][:, :5])[iu]).mean()
    after = np.abs(_corr(result.cleaned[:, :5])[iu]).mean()
    assert after < before


def test_network_order_groups_parcels():
    labels = pd.DataFrame({"name": ["a", "b", "c", "d"], "network": ["Vis", "", "Default", "Vis"]})
    order, groups = _network_order(["a", "b", "c", "d"], labels)
    assert order.tolist() == [2, 0, 3, 1]
    assert groups == [(0, "Default"), (1, "Vis"), (3, "other")]
    order, groups = _network_order(["a", "b"], None)
    assert order.tolist() == [0, 1] and groups == []
