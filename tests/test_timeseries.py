"""The timeseries entry point: phenotype table -> run table, series files -> per-run parquet + sidecar."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from brainfoundry.cli import main as cli
from brainfoundry.errors import ConfigError, InputError
from brainfoundry.timeseries import import_run, index_timeseries, read_series_file

N = 5
NAMES = [f"roi{i}" for i in range(1, N + 1)]


def _write_1d(path, data, header=None):
    header = header or [f"#{i}" for i in range(1, data.shape[1] + 1)]
    text = "\t".join(header) + "\n" + "\n".join("\t".join(f"{v:.6f}" for v in row) for row in data) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture()
def abide_like(tmp_path):
    """A small ABIDE-PCP-shaped dataset: .1D.gz series, phenotype CSV, labels TSV, config."""
    rng = np.random.default_rng(0)
    series_dir = tmp_path / "rois"
    series_dir.mkdir()
    pheno = pd.DataFrame({
        "SUB_ID": [50142, 50143, 51456, 51457, 51458],
        "SITE_ID": ["OHSU", "OHSU", "CALTECH", "CALTECH", "CALTECH"],
        "FILE_ID": ["OHSU_0050142", "OHSU_0050143", "Caltech_0051456", "no_filename", "Caltech_0051458"],
        "DX_GROUP": [1, 2, 1, 2, 2],
        "SEX": [1, 2, 1, 1, -9999],
        "AGE_AT_SCAN": [13.99, 13.79, 55.4, 22.9, 39.2],
        "FIQ": [124, -9999, 107, 93, 110],
        "func_mean_fd": [0.05, 0.07, np.nan, 0.1, 0.12],
    })
    pheno.to_csv(tmp_path / "pheno.csv", index=False)
    data = {}
    for fid in pheno["FILE_ID"]:
        if fid == "no_filename":
            continue
        x = rng.standard_normal((30, N)) * 10
        if fid == "Caltech_0051456":
            x[:, 1] = 0.0  # an all-zero ROI, as some ABIDE runs have
        data[fid] = x
        _write_1d(series_dir / f"{fid}_rois_cc200.1D.gz", x)
    labels = tmp_path / "labels.tsv"
    pd.DataFrame({"index": range(1, N + 1), "name": NAMES, "x": 0.0, "y": 0.0, "z": 0.0}).to_csv(
        labels, sep="\t", index=False)
    config = {
        "entry_point": "timeseries", "seed": 1,
        "timeseries": {
            "dataset_name": "ABIDE-PCP", "task": "rest", "format": "auto",
            "series_dir": str(series_dir), "file_pattern": "{file_id}_rois_cc200.1D.gz",
            "phenotypes": str(tmp_path / "pheno.csv"),
            "columns": {"file_id": "FILE_ID", "subject": "SUB_ID", "site": "SITE_ID", "age": "AGE_AT_SCAN",
                        "sex": "SEX", "diagnosis": "DX_GROUP", "mean_fd": "func_mean_fd"},
            "extra_columns": {"fiq": "FIQ"},
            "value_maps": {"sex": {1: "male", 2: "female"}, "diagnosis": {1: "ASD", 2: "control"}},
            "missing_values": [-9999], "no_file_values": ["no_filename"], "subject_zero_pad": 7,
            "tr_by_site": {"OHSU": 2.5, "CALTECH": 2.0},
        },
    }
    return {"config": config, "data": data, "labels": labels, "dir": series_dir, "tmp": tmp_path}


def _with(config, **changes):
    new = copy.deepcopy(config)
    new["timeseries"].update(changes)
    return new


def test_index_maps_phenotypes_sites_and_tr(abide_like):
    table = index_timeseries(abide_like["config"])
    assert list(table.index) == ["sub-0050142_task-rest", "sub-0050143_task-rest", "sub-0051456_task-rest",
                                 "sub-0051458_task-rest"]
    row = table.loc["sub-0050142_task-rest"]
    assert (row.subject, row.site, row.tr, row.task, row.dataset) == ("0050142", "OHSU", 2.5, "rest", "ABIDE-PCP")
    assert (row.sex, row.diagnosis, row.age, row.mean_fd, row.fiq) == ("male", "ASD", 13.99, 0.05, 124)
    assert row.timeseries_file.endswith("OHSU_0050142_rois_cc200.1D.gz") and row.timeseries_format == "abide_1d"
    assert table.loc["sub-0051456_task-rest", "tr"] == 2.0
    assert pd.isna(table.loc["sub-0050143_task-rest", "fiq"])  # -9999 is missing
    assert pd.isna(table.loc["sub-0051458_task-rest", "sex"])
    assert table["session"].isna().all() and table["run"].isna().all()
    assert table.attrs["dropped"] == [{"run_id": "sub-0051457_task-rest", "file_id": "no_filename",
                                       "reason": "no series file listed"}]


def test_index_goes_through_the_run_table_contract(abide_like):
    from brainfoundry.runtable import load_run_table

    table = load_run_table(abide_like["config"])
    assert {"bucket", "split", "timeseries_file", "tr", "site"} <= set(table.columns)
    assert table.index.name == "run_id" and len(table) == 4


def test_subset_options(abide_like):
    cfg = abide_like["config"]
    assert set(index_timeseries(_with(cfg, include_sites=["CALTECH"]))["site"]) == {"CALTECH"}
    assert list(index_timeseries(_with(cfg, include_subjects=[50143])).subject) == ["0050143"]
    assert list(index_timeseries(_with(cfg, include_files=["Caltech_0051458"])).subject) == ["0051458"]
    assert "0050142" not in set(index_timeseries(_with(cfg, exclude_subjects=["0050142"])).subject)
    capped = index_timeseries(_with(cfg, max_runs_per_site=1))
    assert sorted(capped["site"]) == ["CALTECH", "OHSU"]  # the no-file row does not use CALTECH's place


def test_tr_per_file_and_from_a_column(abide_like):
    cfg = _with(abide_like["config"], tr_by_file={"OHSU_0050143": 1.5})
    table = index_timeseries(cfg)
    assert table.loc["sub-0050143_task-rest", "tr"] == 1.5 and table.loc["sub-0050142_task-rest", "tr"] == 2.5
    pheno = pd.read_csv(abide_like["tmp"] / "pheno.csv").assign(TR=0.8)
    pheno.to_csv(abide_like["tmp"] / "pheno.csv", index=False)
    cfg["timeseries"]["columns"]["tr"] = "TR"
    assert set(index_timeseries(cfg)["tr"]) == {0.8}


def test_import_writes_the_parcellation_contract(abide_like):
    table = index_timeseries(abide_like["config"])
    row = table.loc["sub-0051456_task-rest"]
    out, side = abide_like["tmp"] / "ts.parquet", abide_like["tmp"] / "ts.json"
    import_run(row.timeseries_file, abide_like["labels"], out, side, tr=row.tr, run_id=row.name,
               atlas="CC200", space="MNI152NLin6Asym_res-3", mean_fd=0.2)
    ts = pq.read_table(out)
    assert ts.column_names == NAMES and all(str(t) == "float" for t in ts.schema.types)
    np.testing.assert_allclose(np.column_stack([c.to_numpy() for c in ts.columns]),
                               abide_like["data"]["Caltech_0051456"], atol=1e-5)
    meta = json.loads(side.read_text())
    assert meta["RepetitionTime"] == 2.0 and meta["NumberOfVolumes"] == 30 and meta["KeptVolumes"] == list(range(30))
    assert meta["ParcelNames"] == NAMES and meta["Atlas"] == "CC200"
    assert meta["QC"]["zero_variance_parcels"] == ["roi2"] and meta["QC"]["empty_parcels"] == ["roi2"]
    assert meta["QC"]["mean_fd"] == 0.2 and meta["QC"]["tsnr"] is None
    assert {s["path"] for s in meta["Sources"]} == {row.timeseries_file, str(abide_like["labels"])}


@pytest.mark.parametrize("fmt", ["tsv", "csv", "npy", "1D"])
def test_generic_formats(tmp_path, fmt):
    x = np.arange(24, dtype=float).reshape(6, 4) ** 1.5
    path = tmp_path / f"s.{fmt}"
    if fmt == "npy":
        np.save(path, x)
    elif fmt == "1D":
        _write_1d(path, x)
    else:
        sep = "\t" if fmt == "tsv" else ","
        header = sep.join(f"c{i}" for i in range(4)) + "\n" if fmt == "tsv" else ""
        path.write_text(header + "\n".join(sep.join(str(float(v)) for v in r) for r in x) + "\n")
    data, header = read_series_file(path)
    np.testing.assert_allclose(data, x, rtol=1e-6)
    assert header == ([1, 2, 3, 4] if fmt == "1D" else None)


# -- bad input: each a clear error naming the file ---------------------------------------------------------
def test_phenotype_table_missing_a_mapped_column(abide_like):
    cfg = copy.deepcopy(abide_like["config"])
    cfg["timeseries"]["columns"]["age"] = "AGE"
    with pytest.raises(InputError, match=r"pheno\.csv: missing mapped column\(s\) 'AGE' \(for age\)"):
        index_timeseries(cfg)


def test_phenotype_table_with_duplicate_subject_ids(abide_like):
    pheno = pd.read_csv(abide_like["tmp"] / "pheno.csv")
    pheno.loc[1, "SUB_ID"] = 50142
    pheno.to_csv(abide_like["tmp"] / "pheno.csv", index=False)
    with pytest.raises(InputError, match=r"pheno\.csv: duplicate subject ids.*sub-0050142_task-rest"):
        index_timeseries(abide_like["config"])


def test_unknown_code_and_missing_tr_and_missing_file(abide_like):
    cfg = abide_like["config"]
    with pytest.raises(InputError, match=r"pheno\.csv: column 'DX_GROUP' has values \['2'\]"):
        index_timeseries(_with(cfg, value_maps={"diagnosis": {1: "ASD"}}))
    with pytest.raises(ConfigError, match="no TR for OHSU_0050142"):
        index_timeseries(_with(cfg, tr_by_site={"CALTECH": 2.0}))
    (abide_like["dir"] / "OHSU_0050143_rois_cc200.1D.gz").unlink()
    with pytest.raises(InputError, match="OHSU_0050143_rois_cc200.1D.gz: series file .* not found"):
        index_timeseries(cfg)
    skipped = index_timeseries(_with(cfg, on_missing_file="skip"))
    assert "sub-0050143_task-rest" not in skipped.index
    assert any(d["reason"].startswith("file not found") for d in skipped.attrs["dropped"])


def test_nan_or_inf_in_a_series(abide_like, tmp_path):
    x = np.ones((10, N))
    x[4, 2] = np.inf
    bad = _write_1d(tmp_path / "bad_rois.1D", x)
    with pytest.raises(InputError, match=r"bad_rois\.1D: 1 NaN/inf values, first at volume 4, column 2"):
        import_run(bad, abide_like["labels"], tmp_path / "o.parquet", tmp_path / "o.json", tr=2.0,
                   run_id="sub-1_task-rest", atlas="CC200", space="X")
    x[4, 2] = np.nan
    bad = _write_1d(tmp_path / "nan_rois.1D", x)
    with pytest.raises(InputError, match=r"nan_rois\.1D: 1 NaN/inf"):
        read_series_file(bad)
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.json").exists()


def test_inconsistent_parcel_counts(abide_like, tmp_path, capsys):
    short = _write_1d(tmp_path / "four_rois.1D.gz", np.random.default_rng(0).standard_normal((10, N - 1)))
    args = ["import-timeseries", str(short), "--labels", str(abide_like["labels"]), "--out", str(tmp_path / "o.parquet"),
            "--sidecar", str(tmp_path / "o.json"), "--tr", "2", "--run-id", "sub-1_task-rest", "--atlas", "CC200",
            "--space", "X"]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "four_rois.1D.gz: 4 parcel columns, but atlas CC200" in err and "has 5 labels" in err
    assert not (tmp_path / "o.parquet").exists()


def test_header_labels_must_be_the_atlas_labels(abide_like, tmp_path):
    shuffled = _write_1d(tmp_path / "s_rois.1D", np.ones((4, N)) * np.arange(N), header=["#1", "#3", "#2", "#4", "#5"])
    with pytest.raises(InputError, match=r"s_rois\.1D: header label #3 at column 1"):
        import_run(shuffled, abide_like["labels"], tmp_path / "o.parquet", tmp_path / "o.json", tr=2.0,
                   run_id="sub-1_task-rest", atlas="CC200", space="X")
    ragged = tmp_path / "r_rois.1D"
    ragged.write_text("#1 #2\n1 2\n3\n")
    with pytest.raises(InputError, match=r"r_rois\.1D: cannot read abide_1d series"):
        read_series_file(ragged)


# -- the real ABIDE PCP data -------------------------------------------------------------------------------
def test_real_abide_index_and_import(shared_data, repo_root, tmp_path, monkeypatch):
    import yaml

    from brainfoundry.atlas import prepare_atlas

    cc200 = shared_data / "atlases" / "cc200" / "CC200.nii.gz"
    if not (shared_data / "abide_pcp_cc200").is_dir() or not cc200.exists():
        pytest.skip("ABIDE PCP CC200 data not in shared data")
    config = yaml.safe_load((repo_root / "config" / "abide.yaml").read_text())
    monkeypatch.chdir(repo_root)  # the config's paths are relative to the repository root
    table = index_timeseries(config)
    assert len(table) == 626 and table["site"].nunique() == 13 and table["subject"].is_unique
    assert len(table.attrs["dropped"]) == 62 and table["tr"].notna().all()
    assert set(table["diagnosis"]) == {"ASD", "control"} and set(table["sex"]) == {"male", "female"}

    labels = tmp_path / "labels.tsv"
    prepare_atlas(cc200, out_labels=labels, out_json=tmp_path / "labels.json", name="CC200",
                  space=config["space"], grid=None)
    for run_id in table.index[:: len(table) // 3][:3]:
        row = table.loc[run_id]
        meta = import_run(row.timeseries_file, labels, tmp_path / f"{run_id}.parquet", tmp_path / f"{run_id}.json",
                          tr=row.tr, run_id=run_id, atlas="CC200", space=config["space"], fmt="abide_1d")
        assert len(meta["ParcelNames"]) == 200 and meta["RepetitionTime"] == row.tr


def test_rule_options_from_a_run_table_row():
    from brainfoundry.timeseries import import_options

    row = pd.Series({"timeseries_format": "abide_1d", "mean_fd": 0.0512})
    assert import_options(row, {}) == "--format abide_1d --mean-fd 0.0512 --standardize zscore"
    assert import_options(row, {"timeseries": {"standardize": "none"}}).endswith("--standardize none")
    row["mean_fd"] = np.nan  # unknown FD is left out, not passed as nan
    assert import_options(row, {"timeseries": {"compute_tsnr": True}}) == "--format abide_1d --compute-tsnr --standardize zscore"


def test_abide_config_is_valid_alone_and_over_the_demo_config(repo_root):
    import yaml
    from snakemake.utils import update_config, validate

    abide = yaml.safe_load((repo_root / "config" / "abide.yaml").read_text())
    validate(copy.deepcopy(abide), str(repo_root / "config" / "config.schema.yaml"))
    merged = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    update_config(merged, abide)
    validate(merged, str(repo_root / "config" / "config.schema.yaml"))
    assert merged["atlas"]["labels"] is None and merged["entry_point"] == "timeseries"
    bad = copy.deepcopy(abide)
    bad["timeseries"]["tr_by_site"]["KKI"] = -2.5
    with pytest.raises(Exception, match="tr_by_site"):
        validate(bad, str(repo_root / "config" / "config.schema.yaml"))


# -- scale, shapes and the start-up checks of the index (issue 14) ------------------------------------------
@pytest.mark.parametrize("method", ["zscore", "demean", "none"])
def test_import_standardizes_per_parcel_and_records_it(tmp_path, method):
    from brainfoundry.runfiles import write_labels

    rng = np.random.default_rng(3)
    raw = 1e4 + 50 * rng.standard_normal((40, 3))
    raw[:, 2] = 7.0  # a constant parcel: z-scored to 0, not NaN
    src = tmp_path / "s.npy"
    np.save(src, raw)
    labels = tmp_path / "labels.tsv"
    write_labels(labels, pd.DataFrame({"index": [1, 2, 3], "name": ["a", "b", "c"], "x": np.nan, "y": np.nan,
                                       "z": np.nan, "n_voxels": np.nan, "network": ""}))
    meta = import_run(src, labels, tmp_path / "o.parquet", tmp_path / "o.json", tr=2.0, run_id="sub-1_task-rest",
                      atlas="A", space="S", standardize=method)
    x = pq.read_table(tmp_path / "o.parquet").to_pandas().to_numpy()
    assert meta["Standardize"]["method"] == method and meta["Standardize"]["centred"] is False
    assert meta["QC"]["zero_variance_parcels"] == ["c"]  # QC on the values as read
    if method == "none":
        np.testing.assert_allclose(x, raw, rtol=1e-6)
    else:
        np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-3)
        expected_std = [1, 1, 0] if method == "zscore" else list(raw.std(axis=0))
        np.testing.assert_allclose(x.std(axis=0), expected_std, rtol=1e-3, atol=1e-4)


def test_scale_check_tells_raw_from_centred_series():
    from brainfoundry.timeseries import scale_check

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((100, 5))
    assert scale_check(noise)["centred"] and not scale_check(1e4 + 100 * noise)["centred"]


@pytest.mark.parametrize("fmt", ["tsv", "csv", "npy", "1D", "1D.gz"])
def test_series_shape_reads_only_headers(tmp_path, fmt):
    from brainfoundry.timeseries import series_shape

    x = np.arange(35, dtype=float).reshape(7, 5) + 0.5
    path = tmp_path / f"s.{fmt}"
    if fmt == "npy":
        np.save(path, x)
    elif fmt.startswith("1D"):
        _write_1d(path, x)
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(sep.join(f"c{i}" for i in range(5)) + "\n" + "\n".join(sep.join(map(str, r)) for r in x) + "\n")
    assert series_shape(path) == (7, 5) == read_series_file(path)[0].shape


def _series_folder(tmp_path, lengths, widths=None):
    (tmp_path / "series").mkdir()
    for i, n_t in enumerate(lengths):
        np.save(tmp_path / "series" / f"s{i}.npy", np.zeros((n_t, (widths or {}).get(i, 4))))
    pd.DataFrame({"sid": [f"s{i}" for i in range(len(lengths))]}).to_csv(tmp_path / "p.csv", index=False)
    return {"timeseries": {"series_dir": str(tmp_path / "series"), "phenotypes": str(tmp_path / "p.csv"),
                           "file_pattern": "{subject}.npy", "columns": {"subject": "sid"}, "tr": 2.0},
            "shards": {"window": 50}}


def test_index_skips_series_shorter_than_the_window_by_name(tmp_path, caplog):
    config = _series_folder(tmp_path, [60, 30, 80])
    with caplog.at_level("WARNING"):
        table = index_timeseries(config)
    assert list(table.index) == ["sub-s0_task-rest", "sub-s2_task-rest"] and list(table["n_volumes"]) == [60, 80]
    assert "sub-s1_task-rest (30)" in caplog.text and "shards.window = 50" in caplog.text
    assert any(d["run_id"] == "sub-s1_task-rest" for d in table.attrs["dropped"])
    config["timeseries"]["short_series"] = "keep"
    assert len(index_timeseries(config)) == 3
    config["timeseries"]["short_series"] = "error"
    with pytest.raises(InputError, match="s1.npy.*timeseries.short_series"):
        index_timeseries(config)


def test_index_names_series_with_another_region_count(tmp_path):
    config = _series_folder(tmp_path, [60, 60, 60], widths={1: 3})
    with pytest.raises(InputError, match=r"s1.npy: 3"):
        index_timeseries(config)
