"""Per-run file contracts: one writer and one reader each (brainfoundry.runfiles)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_io import flip_byte

from brainfoundry import runfiles
from brainfoundry.errors import InputError
from brainfoundry.io import sha256_file

NAMES = ["A", "B", "C", "D"]


def _series(n_t: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_t, len(NAMES))).astype(np.float32)


def test_series_round_trip_records_the_sha256_of_every_parquet(tmp_path):
    x, raw = _series(), _series(60, seed=1)
    path, raw_path = tmp_path / "r_timeseries.parquet", tmp_path / "r_desc-raw_timeseries.parquet"
    info = runfiles.write_series(path, x, NAMES, {"RepetitionTime": 2.0}, raw=(raw_path, raw))
    sidecar = json.loads((tmp_path / "r_timeseries.json").read_text())
    assert sidecar == info and sidecar["RepetitionTime"] == 2.0
    assert sidecar["FileSha256"] == {path.name: sha256_file(path), raw_path.name: sha256_file(raw_path)}
    got, names = runfiles.read_series(path)
    np.testing.assert_array_equal(got, x)
    assert names == NAMES and got.dtype == np.float32 and got.flags.c_contiguous
    got_raw, _ = runfiles.read_series(raw_path, NAMES, sidecar=tmp_path / "r_timeseries.json", finite=False)
    np.testing.assert_array_equal(got_raw, raw)
    reordered, names = runfiles.read_series(path, ["C", "A", "D", "B"])
    np.testing.assert_array_equal(reordered, x[:, [2, 0, 3, 1]])
    meta = pq.ParquetFile(path).metadata.row_group(0)
    assert {meta.column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}  # one codec, one writer


def test_series_reader_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "r.parquet"
    x = _series()
    runfiles.write_series(path, x, NAMES, {})
    with pytest.raises(InputError, match=r"r\.parquet: 4 parcel columns, but the atlas labels have 3"):
        runfiles.read_series(path, NAMES[:3])
    with pytest.raises(InputError, match=r"r\.parquet: parcel columns \['D'\] are not atlas labels"):
        runfiles.read_series(path, ["A", "B", "C", "E"])
    x[3, 1] = np.nan
    runfiles.write_series(path, x, NAMES, {})
    with pytest.raises(InputError, match=r"r\.parquet: 1 NaN/inf values, first at volume 3, parcel 'B'"):
        runfiles.read_series(path)
    with pytest.raises(InputError, match=r"elsewhere\.json: JSON sidecar of the time-series parquet not found"):
        runfiles.read_series(path, sidecar=tmp_path / "elsewhere.json")


def test_series_with_a_flipped_bit_is_refused_with_or_without_its_sidecar(tmp_path):
    path = tmp_path / "r.parquet"
    runfiles.write_series(path, _series(500), NAMES, {})
    flip_byte(path, "B")
    with pytest.raises(InputError, match=r"r\.parquet: checksum mismatch.*recorded in .*r\.json"):
        runfiles.read_series(path)
    (tmp_path / "r.json").unlink()  # no recorded sha256: the page checksums still hold
    with pytest.raises(InputError, match=r"r\.parquet: corrupt time-series parquet: parquet page checksum"):
        runfiles.read_series(path)


def test_files_written_before_checksums_are_still_read(tmp_path):
    path = tmp_path / "old.parquet"
    pd.DataFrame(_series(), columns=NAMES).to_parquet(path)  # the old parcellate writer
    (tmp_path / "old.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    np.testing.assert_array_equal(runfiles.read_series(path)[0], _series())


def test_relmat_round_trip_and_corruption(tmp_path):
    n_p = 6
    views = np.random.default_rng(2).uniform(-1, 1, size=(5, n_p * (n_p - 1) // 2))
    path = tmp_path / "r_relmat.parquet"
    info = runfiles.write_relmat(path, views=views, seeds=np.arange(5) + 10, n_kept=np.full(5, 40), keep_fraction=0.8,
                                 dtype="float16", sidecar={"NParcels": n_p}, metadata={"run_id": "r"})
    assert info["FileSha256"] == {path.name: sha256_file(path)}
    assert json.loads(pq.read_schema(path).metadata[b"brainfoundry"]) == {"run_id": "r"}
    got = runfiles.read_relmat(path, n_p)
    np.testing.assert_array_equal(got["views"], views.astype(np.float16))
    assert got["seed"].tolist() == list(range(10, 15)) and got["keep_fraction"] == pytest.approx(0.8)
    with pytest.raises(InputError, match=r"r_relmat\.parquet: pFC views have 15 values each, expected 21"):
        runfiles.read_relmat(path, 7)
    flip_byte(path, "pfc")
    with pytest.raises(InputError, match=r"r_relmat\.parquet: checksum mismatch"):
        runfiles.read_relmat(path, n_p)


def test_labels_round_trip(tmp_path):
    table = pd.DataFrame({"index": [1, 2, 5], "name": ["NA", "b", "c"], "x": [1.5, np.nan, 3.0], "y": 0.0,
                          "z": 0.0, "n_voxels": [3, 0, 7], "network": ["Vis", "", "Default"]})
    path = runfiles.write_labels(tmp_path / "dseg.tsv", table)
    assert "n/a" in path.read_text()
    got = runfiles.read_labels(path)
    assert got.columns.tolist() == runfiles.LABEL_COLUMNS
    assert got["name"].tolist() == ["NA", "b", "c"]  # a parcel named NA stays a name
    assert got["network"].tolist() == ["Vis", "", "Default"] and np.isnan(got.loc[1, "x"])
    table.assign(name=["a", "a", "c"]).to_csv(tmp_path / "dup.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"dup\.tsv: atlas labels TSV has duplicate parcel names \['a'\]"):
        runfiles.read_labels(tmp_path / "dup.tsv")
    table.drop(columns="index").to_csv(tmp_path / "noindex.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"noindex\.tsv: atlas labels TSV lacks columns \['index'\]"):
        runfiles.read_labels(tmp_path / "noindex.tsv")
