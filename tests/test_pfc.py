"""pFC views: numpy.corrcoef as the reference, exact regeneration from seeds, torch == numpy, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_io import flip_byte

from brainfoundry import pfc, shards
from brainfoundry.cli import main as cli
from brainfoundry.errors import InputError
from brainfoundry.timeseries import import_run

TOL = 1e-5


def _series(t=240, n=48, seed=0):
    """Correlated parcels with different offsets and scales (as real parcel means have)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) / np.sqrt(n)
    x = rng.standard_normal((t, n)) @ (np.eye(n) + 0.8 * mix)
    return (x * rng.uniform(0.5, 40, n) + rng.uniform(-500, 10000, n)).astype(np.float32)


def _reference(series, mask):
    """numpy.corrcoef (float64) of the kept points, upper triangle; NaN where a parcel is constant."""
    iu = np.triu_indices(series.shape[1], k=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(series[mask].astype(np.float64), rowvar=False)[iu]


def _write_series(path, series, names=None):
    names = names or [f"p{i}" for i in range(series.shape[1])]
    pq.write_table(pa.table({n: series[:, i] for i, n in enumerate(names)}), path)
    return path


@pytest.mark.parametrize("method", pfc.METHODS)
@pytest.mark.parametrize("keep_fraction", [0.8, 0.5, 1.0])
def test_every_view_equals_corrcoef_on_kept_points(method, keep_fraction):
    x = _series()
    seeds = pfc.view_seeds(7, "01", "sub-01_task-rest", 12)
    masks = pfc.keep_masks(x.shape[0], seeds, keep_fraction)
    views = pfc.pfc_views(x, masks, method=method)
    assert views.dtype == np.float32 and views.shape == (12, 48 * 47 // 2)
    for k in range(len(seeds)):
        np.testing.assert_allclose(views[k], _reference(x, masks[k]), rtol=0, atol=TOL)


def test_views_with_different_kept_counts():
    # Masks need not keep the same number of points.
    x = _series(t=150, n=20, seed=3)
    rng = np.random.default_rng(1)
    masks = rng.random((9, 150)) < rng.uniform(0.3, 0.95, (9, 1))
    for method in pfc.METHODS:
        views = pfc.pfc_views(x, masks, method=method)
        for k in range(9):
            np.testing.assert_allclose(views[k], _reference(x, masks[k]), rtol=0, atol=TOL)


def test_fisher_z_is_arctanh_of_r_and_finite_for_duplicate_parcels():
    x = _series(t=200, n=12)
    x[:, 5] = x[:, 4] * 3 + 1  # r = 1 exactly
    masks = pfc.keep_masks(200, pfc.view_seeds(1, "a", "sub-a_task-rest", 4), 0.8)
    r = pfc.pfc_views(x, masks)
    z = pfc.pfc_views(x, masks, fisher_z=True)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, np.arctanh(np.clip(r, -pfc.FISHER_Z_CLIP, pfc.FISHER_Z_CLIP)), rtol=1e-6)
    iu, ju = np.triu_indices(12, k=1)
    dup = np.flatnonzero((iu == 4) & (ju == 5))[0]
    np.testing.assert_allclose(z[:, dup], np.arctanh(np.float32(pfc.FISHER_Z_CLIP)), rtol=1e-6)


def test_zero_variance_parcels_give_zero_not_nan():
    x = _series(t=120, n=10)
    x[:, 2] = 0.0        # all-zero parcel (ABIDE ROIs outside the mask)
    x[:, 6] = 1234.5     # constant parcel
    seeds = pfc.view_seeds(2, "z", "sub-z_task-rest", 6)
    masks = pfc.keep_masks(120, seeds, 0.8)
    x[masks[0], 8] = -3.0  # constant on view 0's kept points only
    iu, ju = np.triu_indices(10, k=1)
    for method in pfc.METHODS:
        views = pfc.pfc_views(x, masks, method=method, fisher_z=True)
        assert np.isfinite(views).all()
        touches = lambda p: (iu == p) | (ju == p)
        assert (views[:, touches(2) | touches(6)] == 0).all()
        assert (views[0, touches(8)] == 0).all() and (views[1:, touches(8)] != 0).any()
        others = ~(touches(2) | touches(6) | touches(8))
        np.testing.assert_allclose(np.tanh(views[0, others]), _reference(x, masks[0])[others], atol=1e-4)
    assert pfc.zero_variance_parcels(x).tolist() == [i in (2, 6) for i in range(10)]


def test_seeds_are_stable_distinct_and_regenerate_views_exactly():
    a = pfc.view_seeds(20261122, "0050142", "sub-0050142_task-rest", 32)
    assert a.dtype == np.int64 and (a >= 0).all() and len(set(a.tolist())) == 32
    np.testing.assert_array_equal(a, pfc.view_seeds(20261122, "0050142", "sub-0050142_task-rest", 32))
    # Any input of the hash changes the seed.
    assert a[0] != pfc.derive_seed(20261123, "0050142", "sub-0050142_task-rest", 0)
    assert a[0] != pfc.derive_seed(20261122, "0050143", "sub-0050142_task-rest", 0)
    assert a[0] != pfc.derive_seed(20261122, "0050142", "sub-0050142_task-rest_run-2", 0)
    kept = pfc.keep_indices(300, int(a[3]), 0.8)
    assert len(kept) == 240 and len(np.unique(kept)) == 240 and (np.diff(kept) > 0).all()
    assert not np.array_equal(kept, pfc.keep_indices(300, int(a[4]), 0.8))

    x = _series(t=300, n=16)
    views = pfc.pfc_views(x, pfc.keep_masks(300, a, 0.8), fisher_z=True)
    for k in (0, 3, 31):
        np.testing.assert_array_equal(pfc.regenerate_view(x, int(a[k]), 0.8, fisher_z=True), views[k])


def test_written_views_regenerate_from_their_stored_seed(tmp_path):
    x = _series(t=180, n=14)
    src = _write_series(tmp_path / "ts.parquet", x)
    out, side = tmp_path / "pfc.parquet", tmp_path / "pfc.json"
    pfc.write_run(src, out, side, subject="01", run_id="sub-01_task-rest", global_seed=5, n_views=8,
                  keep_fraction=0.8, fisher_z=True, dtype="float16")
    table = pq.read_table(out)
    assert table.schema.field("view").type == pa.int32()
    assert table.schema.field("seed").type == pa.int64()
    assert table.schema.field("keep_fraction").type == pa.float32()
    assert table.schema.field("n_kept").type == pa.int32()
    assert table.schema.field("pfc").type == pa.list_(pa.float16(), 14 * 13 // 2)
    rows = table.to_pydict()
    assert rows["view"] == list(range(8)) and set(rows["n_kept"]) == {144}
    for view, seed, values in zip(rows["view"], rows["seed"], rows["pfc"]):
        again = pfc.regenerate_view(x, seed, 0.8, fisher_z=True).astype(np.float16)
        np.testing.assert_array_equal(np.asarray(values, dtype=np.float16), again)
    meta = json.loads(side.read_text())
    assert meta["NParcels"] == 14 and meta["FisherZ"] is True and meta["NViews"] == 8
    assert meta["Sources"][0]["path"].endswith("ts.parquet") and meta["ConfigHash"]


def test_torch_path_equals_numpy_path():
    torch = pytest.importorskip("torch")
    xs = [_series(t=160, n=30, seed=s) for s in (0, 1)]
    xs[1][:, 4] = 0.0
    masks = [pfc.keep_masks(160, pfc.view_seeds(9, str(s), f"sub-{s}_task-rest", 5), 0.8) for s in (0, 1)]
    for fz in (False, True):
        got = pfc.pfc_views_torch(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(masks)), fisher_z=fz)
        assert got.shape == (2, 5, 30 * 29 // 2) and got.dtype == torch.float32
        for b in range(2):
            np.testing.assert_allclose(got[b].numpy(), pfc.pfc_views(xs[b], masks[b], fisher_z=fz), atol=TOL, rtol=0)
    # single [T, N] series, and views drawn on the fly from a generator
    one = pfc.pfc_views_torch(torch.from_numpy(xs[0]), torch.from_numpy(masks[0]))
    np.testing.assert_allclose(one.numpy(), pfc.pfc_views(xs[0], masks[0]), atol=TOL, rtol=0)
    gen = lambda: torch.Generator().manual_seed(3)
    drawn = pfc.random_keep_mask(2, 4, 160, 0.8, gen())
    assert (drawn.sum(-1) == 128).all()
    fly = pfc.pfc_views_torch(torch.from_numpy(np.stack(xs)), keep_fraction=0.8, n_views=4, generator=gen())
    np.testing.assert_allclose(fly[1, 2].numpy(), pfc.pfc_views(xs[1], drawn[1].numpy())[2], atol=TOL, rtol=0)


def test_too_short_series_is_an_error_naming_the_file(tmp_path):
    src = _write_series(tmp_path / "short.parquet", _series(t=11, n=5))  # keeps 9 < 10
    with pytest.raises(InputError, match="short.parquet.*too short for pFC"):
        pfc.write_run(src, tmp_path / "o.parquet", tmp_path / "o.json", subject="1", run_id="sub-1_task-rest",
                      global_seed=0, keep_fraction=0.8, min_kept=10)
    assert not (tmp_path / "o.parquet").exists() and not list(tmp_path.glob(".o.parquet*"))
    src3 = _write_series(tmp_path / "three.parquet", _series(t=3, n=5))
    with pytest.raises(InputError, match="three.parquet"):  # fewer than 3 kept points, whatever min_kept
        pfc.write_run(src3, tmp_path / "o.parquet", tmp_path / "o.json", subject="1", run_id="sub-1_task-rest",
                      global_seed=0, keep_fraction=0.8, min_kept=3)


def test_nan_in_series_is_an_error_naming_the_file(tmp_path, capsys):
    x = _series(t=50, n=6)
    x[10, 3] = np.nan
    src = _write_series(tmp_path / "nan.parquet", x)
    code = cli(["pfc", str(src), "--out", str(tmp_path / "o.parquet"), "--sidecar", str(tmp_path / "o.json"),
                "--subject", "1", "--run-id", "sub-1_task-rest", "--seed", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "nan.parquet" in err and "NaN/inf" in err and "volume 10" in err
    assert not (tmp_path / "o.parquet").exists()


def test_cli_writes_float32_views_equal_to_corrcoef(tmp_path):
    x = _series(t=100, n=8)
    src = _write_series(tmp_path / "ts.parquet", x)
    code = cli(["pfc", str(src), "--out", str(tmp_path / "o.parquet"), "--sidecar", str(tmp_path / "o.json"),
                "--subject", "1", "--run-id", "sub-1_task-rest", "--seed", "4", "--n-views", "3",
                "--dtype", "float32", "--fisher-z", "false", "--method", "direct"])
    assert code == 0
    rows = pq.read_table(tmp_path / "o.parquet").to_pydict()
    for seed, values in zip(rows["seed"], rows["pfc"]):
        mask = np.zeros(100, dtype=bool)
        mask[pfc.keep_indices(100, seed, 0.8)] = True
        np.testing.assert_allclose(values, _reference(x, mask), atol=TOL, rtol=0)


def test_real_abide_run_with_constant_rois(shared_data):
    from brainfoundry.timeseries import read_series_file

    files = sorted((shared_data / "abide_pcp_cc200" / "rois_cc200").glob("Caltech_*_rois_cc200.1D.gz"))
    if not files:
        pytest.skip("no Caltech ABIDE files in shared data")
    for path in files:  # the first Caltech run with constant ROIs (several have them)
        x, _ = read_series_file(path)
        if pfc.zero_variance_parcels(x).any():
            break
    else:
        pytest.skip("no Caltech run with constant ROIs")
    x = x.astype(np.float32)
    masks = pfc.keep_masks(len(x), pfc.view_seeds(1, "c", "sub-c_task-rest", 4), 0.8)
    views = pfc.pfc_views(x, masks)
    assert np.isfinite(views).all()
    for k in range(4):
        ref = _reference(x, masks[k])
        ok = np.isfinite(ref)
        assert (~ok).any() and (views[k][~ok] == 0).all()
        np.testing.assert_allclose(views[k][ok], ref[ok], atol=TOL, rtol=0)


# -- corrupt files: issue 15 ("bits flipped in a pFC parquet changed 37 values with no error") ----------
RID = "sub-01_task-rest"


def _workflow_run(tmp_path, n_t=200, n_p=20):
    """One run's files as the workflow writes them: import-timeseries, then pfc (checksums recorded)."""
    names = [f"P{i:02d}" for i in range(n_p)]
    labels = tmp_path / "labels.tsv"
    pd.DataFrame({"index": np.arange(1, n_p + 1), "name": names, "x": 0.0, "y": 0.0, "z": 0.0, "n_voxels": 5,
                  "network": ""}).to_csv(labels, sep="\t", index=False)
    np.save(tmp_path / "src.npy", _series(t=n_t, n=n_p))
    files = {"labels": labels, "ts": tmp_path / "ts.parquet", "ts_json": tmp_path / "ts.json",
             "pfc": tmp_path / "pfc.parquet", "pfc_json": tmp_path / "pfc.json"}
    import_run(tmp_path / "src.npy", labels, files["ts"], files["ts_json"], tr=2.0, run_id=RID, atlas="T", space="X")
    return files


def _pfc(files):
    pfc.write_run(files["ts"], files["pfc"], files["pfc_json"], subject="01", run_id=RID, global_seed=1, n_views=8)


def _shard(files, out):
    runs = pd.DataFrame({"run_id": [RID], "subject": ["01"], "split": ["train"], "bucket": [0], "tr": [2.0]})
    return shards.write_shard(runs, out, labels=files["labels"], atlas="T", timeseries_pattern=str(files["ts"]),
                              sidecar_pattern=str(files["ts_json"]), pfc_pattern=str(files["pfc"]))


def test_flipped_bit_in_a_series_parquet_is_a_named_error(tmp_path):
    files = _workflow_run(tmp_path)
    before = pq.read_table(files["ts"])
    flip_byte(files["ts"], "P05")
    assert not pq.read_table(files["ts"]).equals(before)  # plain pyarrow: changed values, no error
    with pytest.raises(InputError, match=r"ts\.parquet: checksum mismatch") as err:
        _pfc(files)
    assert err.value.source == str(files["ts"]) and not files["pfc"].exists()


def test_flipped_bit_in_a_pfc_parquet_is_a_named_error(tmp_path):
    files = _workflow_run(tmp_path)
    _pfc(files)
    assert _shard(files, tmp_path / "ok.parquet")["n_rows"] == 1
    before = pq.read_table(files["pfc"])
    flip_byte(files["pfc"], "pfc")
    assert not pq.read_table(files["pfc"]).equals(before)  # plain pyarrow: changed values, no error
    with pytest.raises(InputError, match=r"pfc\.parquet: checksum mismatch.*pfc\.json") as err:
        _shard(files, tmp_path / "bucket-0.parquet")
    assert err.value.source == str(files["pfc"]) and not (tmp_path / "bucket-0.parquet").exists()
