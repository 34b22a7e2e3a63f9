"""Shards, manifest and normalization statistics (brainfoundry.shards)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainfoundry import runfiles, shards
from brainfoundry.cli import main as cli
from brainfoundry.errors import InputError
from brainfoundry.io import sha256_file
from brainfoundry.paths import Layout
from brainfoundry.runtable import finalize

N_PARCELS = 6


# -- a tiny dataset in the file contracts of docs/ARCHITECTURE.md ----------------------------------------
def write_inputs(root: Path, n_subjects: int = 12, n_parcels: int = N_PARCELS, lengths=(40, 55),
                 runs_per_subject: int = 1, n_buckets: int = 2, n_views: int = 3, seed: int = 7,
                 short_subjects: int = 0, zero_variance: bool = True) -> dict:
    """Per-run series parquet + sidecar + pFC parquet, the labels TSV and the finalized run table."""
    rng = np.random.default_rng(seed)
    config = {"results_dir": str(root / "results"), "space": "MNI", "atlas": {"name": "Toy"}, "seed": seed,
              "entry_point": "timeseries",
              "shards": {"n_buckets": n_buckets, "split_ratios": {"train": 0.6, "val": 0.2, "test": 0.2}}}
    layout = Layout.from_config(config)
    names = [f"P{i:02d}" for i in range(n_parcels)]
    labels = Path(layout.atlas_labels)
    labels.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"index": np.arange(1, n_parcels + 1), "name": names, "x": rng.normal(size=n_parcels) * 40,
                  "y": rng.normal(size=n_parcels) * 40, "z": rng.normal(size=n_parcels) * 30,
                  "n_voxels": 10, "network": ""}).to_csv(labels, sep="\t", index=False)
    rows, series = [], {}
    iu = np.triu_indices(n_parcels, k=1)
    for s in range(n_subjects):
        subject = f"{s:03d}"
        for r in range(runs_per_subject):
            run_id = f"sub-{subject}_task-rest" + (f"_run-{r + 1}" if runs_per_subject > 1 else "")
            n_t = int(rng.integers(*lengths)) if s >= short_subjects else 5
            x = (rng.normal(size=(n_t, n_parcels)) * (1 + np.arange(n_parcels)) + 10 * s).astype(np.float32)
            zero = []
            if zero_variance and s % 5 == 1:  # a constant parcel, as in some ABIDE runs
                x[:, 2] = 0.0
                zero = [names[2]]
            series[run_id] = x
            ts = Path(layout.timeseries.format(subject=subject, run_id=run_id))
            ts.parent.mkdir(parents=True, exist_ok=True)
            qc = {"mean_fd": float(rng.uniform(0.05, 0.3)), "fraction_censored": 0.1, "tsnr_median": None,
                  "zero_variance_parcels": zero}
            runfiles.write_series(ts, x, names, {"RepetitionTime": 2.0, "QC": qc})  # sidecar beside, with sha256
            with np.errstate(invalid="ignore", divide="ignore"):  # the constant parcel correlates as 0
                views = np.stack([np.nan_to_num(np.corrcoef(x[v:].T))[iu] for v in range(n_views)]).astype(np.float16)
            runfiles.write_relmat(layout.pfc.format(subject=subject, run_id=run_id), views=views,
                                  seeds=np.arange(n_views) + 1000 * s, n_kept=np.full(n_views, n_t - 1),
                                  keep_fraction=0.8, dtype="float16", sidecar={"NParcels": n_parcels})
            rows.append({"run_id": run_id, "subject": subject, "session": None, "task": "rest",
                         "run": str(r + 1) if runs_per_subject > 1 else None, "dataset": "toy",
                         "site": "A" if s % 2 else "B", "tr": 2.0,
                         "age": float(20 + s) if s % 4 else np.nan, "sex": ["male", "female"][s % 2],
                         "diagnosis": None if s % 3 == 0 else ["ASD", "control"][s % 2], "iq": 100.0 + s,
                         "timeseries_file": f"/somewhere/{run_id}.1D"})
    runs = finalize(pd.DataFrame(rows), config)
    return {"config": config, "layout": layout, "runs": runs, "labels": labels, "names": names,
            "series": series}


def rewrite_series(data: dict, run_id: str, x: np.ndarray, names: list[str] | None = None) -> str:
    """Replace one run's series through the per-run writer (its sidecar keeps its keys, new sha256)."""
    row = data["runs"].loc[run_id]
    ts = data["layout"].timeseries.format(subject=row["subject"], run_id=run_id)
    sidecar = runfiles.read_series_sidecar(runfiles.sidecar_of(ts))
    runfiles.write_series(ts, x, names or data["names"], sidecar)
    return ts


def build_shards(data: dict, row_group_size: int = 3, compression: str = "zstd", manifest: bool = True) -> list[Path]:
    """Bucket run tables, shards and (optionally) manifest + norm stats, as the workflow does."""
    layout, runs = data["layout"], data["runs"]
    out = []
    for bucket in sorted(runs["bucket"].unique()):
        runs_path = layout.bucket_runs.format(bucket=bucket)
        shards.write_bucket_runs(shards.bucket_rows_json(runs, bucket), runs_path)
        shard = Path(layout.shard.format(bucket=bucket))
        shards.write_shard(shards.read_bucket_runs(runs_path), shard, labels=data["labels"], atlas="Toy",
                           timeseries_pattern=layout.timeseries, pfc_pattern=layout.pfc,
                           row_group_size=row_group_size, compression=compression,
                           config=shards.shard_config(data["config"]), bucket=int(bucket))
        out.append(shard)
    if manifest:
        shards.write_manifest(out, layout.manifest, layout.norm_stats)
    return out


@pytest.fixture()
def data(tmp_path) -> dict:
    return write_inputs(tmp_path)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


# -- bucket run tables ---------------------------------------------------------------------------------------
def test_bucket_rows_change_only_for_the_bucket_of_a_new_subject(data):
    runs = data["runs"]
    before = {b: shards.bucket_rows_json(runs, b) for b in range(2)}
    assert before == {b: shards.bucket_rows_json(runs, b) for b in range(2)}  # deterministic
    extra = write_inputs(Path(data["layout"].results).parent / "more", n_subjects=13)
    new_runs = extra["runs"]
    new_bucket = int(new_runs.loc["sub-012_task-rest", "bucket"])
    after = {b: shards.bucket_rows_json(new_runs, b) for b in range(2)}
    for b in range(2):
        payload_before, payload_after = json.loads(before[b]), json.loads(after[b])
        if b == new_bucket:
            assert len(payload_after["rows"]) == len(payload_before["rows"]) + 1
        else:
            assert payload_after["rows"] == payload_before["rows"]
    assert "timeseries_file" not in json.loads(before[0])["columns"]  # paths stay out of shards


def test_bucket_runs_round_trip_keeps_types(data, tmp_path):
    runs = data["runs"]
    path = tmp_path / "b.runs.parquet"
    shards.write_bucket_runs(shards.bucket_rows_json(runs, 0), path)
    back = shards.read_bucket_runs(path)
    expected = runs[runs["bucket"] == 0]
    assert back["run_id"].tolist() == sorted(expected.index)
    assert back.attrs["kinds"]["age"] == "number" and back.attrs["kinds"]["sex"] == "string"
    np.testing.assert_array_equal(back.set_index("run_id")["iq"].to_numpy(),
                                  expected.sort_index()["iq"].to_numpy())


# -- shard content ------------------------------------------------------------------------------------------
def test_shard_rows_match_inputs(data):
    paths = build_shards(data, row_group_size=2, manifest=False)
    runs, names = data["runs"], data["names"]
    seen = set()
    for path in paths:
        handle, meta = shards.open_shard(path)
        assert meta["schema_version"] == shards.SCHEMA_VERSION and meta["atlas"] == "Toy"
        assert meta["parcel_names"] == names
        assert meta["config_hash"] == shards.config_hash(shards.shard_config(data["config"]))
        labels = pd.read_csv(data["labels"], sep="\t")
        np.testing.assert_allclose(np.array(meta["parcel_coords"]), labels[["x", "y", "z"]].to_numpy())
        assert all(handle.metadata.row_group(i).num_rows <= 2 for i in range(handle.num_row_groups))
        table = handle.read()
        ranks = [shards.SPLIT_ORDER[s] for s in table.column("split").to_pylist()]
        assert ranks == sorted(ranks)  # rows grouped by split
        offsets, buf = shards.decode_binary(table.column("timeseries"))
        p_off, p_buf = shards.decode_binary(table.column("pfc"))
        for i, row in enumerate(table.drop_columns(["timeseries", "pfc"]).to_pylist()):
            rid = row["run_id"]
            seen.add(rid)
            src = runs.loc[rid]
            x = buf[offsets[i]:offsets[i + 1]].view("<f4").reshape(row["n_timepoints"], row["n_parcels"])
            np.testing.assert_array_equal(x, data["series"][rid])
            assert row["split"] == src["split"] and row["bucket"] == src["bucket"] and row["site"] == src["site"]
            assert row["tr"] == 2.0 and row["n_parcels"] == N_PARCELS
            assert row["sex"] == src["sex"] and row["iq"] == src["iq"]
            assert (row["age"] is None) == bool(np.isnan(src["age"]))
            assert (row["diagnosis"] is None) == pd.isna(src["diagnosis"]) and row["diagnosis"] != "nan"
            assert row["zero_variance"][2] == (int(src["subject"]) % 5 == 1)
            assert row["n_zero_variance"] == sum(row["zero_variance"])
            assert 0.05 <= row["mean_fd"] <= 0.3 and row["tsnr_median"] is None
            pfc = pq.read_table(data["layout"].pfc.format(subject=src["subject"], run_id=rid))
            views = p_buf[p_off[i]:p_off[i + 1]].view("<f2").reshape(row["pfc_n_views"], -1)
            np.testing.assert_array_equal(views, np.stack(pfc.column("pfc").to_numpy(zero_copy_only=False)))
            assert row["pfc_seed"] == pfc.column("seed").to_pylist()
            assert row["pfc_keep_fraction"] == pytest.approx(0.8)
    assert seen == set(runs.index)


def test_splits_are_per_subject(tmp_path):
    data = write_inputs(tmp_path, n_subjects=10, runs_per_subject=3)
    paths = build_shards(data, manifest=False)
    table = pa.concat_tables([pq.read_table(p, columns=["subject", "split"]) for p in paths]).to_pandas()
    assert len(table) == 30
    assert (table.groupby("subject")["split"].nunique() == 1).all()


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
def test_codecs_round_trip(data, codec):
    paths = build_shards(data, compression=codec, manifest=False)
    assert _check_codec(data, paths, codec, "timeseries") == data["series"].keys()


def test_series_codec_apart_from_the_rest(data):
    layout, runs = data["layout"], data["runs"]
    shards.write_bucket_runs(shards.bucket_rows_json(runs, 0), layout.bucket_runs.format(bucket=0))
    out = Path(layout.shard.format(bucket=0))
    shards.write_shard(shards.read_bucket_runs(layout.bucket_runs.format(bucket=0)), out, labels=data["labels"],
                       atlas="Toy", timeseries_pattern=layout.timeseries, pfc_pattern=layout.pfc,
                       compression="zstd", timeseries_compression="none")
    _check_codec(data, [out], "none", "timeseries")
    _check_codec(data, [out], "zstd", "pfc")


def _check_codec(data, paths, codec, column):
    """Series decode to the inputs and ``column`` uses ``codec``; returns the run ids decoded."""
    decoded = {row["run_id"]: x for path in paths for row, x in shards.iter_series(path, columns=["run_id"])}
    assert decoded
    for rid, x in decoded.items():
        np.testing.assert_array_equal(x, data["series"][rid])
    # the codec is really applied to the column
    meta = pq.ParquetFile(paths[0]).metadata.row_group(0)
    col = [meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column][0]
    assert col.compression.lower() == {"none": "uncompressed", "zstd": "zstd", "lz4": "lz4"}[codec]
    return decoded.keys()


# -- bad input -------------------------------------------------------------------------------------------------
def _write_first_bucket(data, **kwargs):
    layout, runs = data["layout"], data["runs"]
    bucket = int(runs["bucket"].iloc[0])
    rows = runs[runs["bucket"] == bucket]
    shards.write_bucket_runs(shards.bucket_rows_json(runs, bucket), layout.bucket_runs.format(bucket=bucket))
    out = Path(layout.shard.format(bucket=bucket))
    shards.write_shard(shards.read_bucket_runs(layout.bucket_runs.format(bucket=bucket)), out, labels=data["labels"],
                       atlas="Toy", timeseries_pattern=layout.timeseries, pfc_pattern=layout.pfc,
                       row_group_size=2, **kwargs)
    return out, rows


def _victim(data) -> tuple[str, str]:
    """The last run of the first bucket (so earlier rows were already written when it fails)."""
    runs = data["runs"]
    rows = runs[runs["bucket"] == int(runs["bucket"].iloc[0])]
    order = sorted(rows.index, key=lambda r: (shards.SPLIT_ORDER[rows.loc[r, "split"]], r))
    rid = order[-1]
    return rid, rows.loc[rid, "subject"]


def test_inconsistent_parcel_count_is_named_and_nothing_written(data):
    rid, subject = _victim(data)
    ts = rewrite_series(data, rid, data["series"][rid][:, :-1], data["names"][:-1])
    with pytest.raises(InputError, match="parcel") as err:
        _write_first_bucket(data)
    assert err.value.source == ts and f"{N_PARCELS - 1} parcel columns" in str(err.value)
    shard_dir = Path(data["layout"].shard_dir)
    assert not list(shard_dir.glob("bucket-*[0-9].parquet")) and _leftovers(shard_dir) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_series_is_named_and_nothing_written(data, bad):
    rid, subject = _victim(data)
    x = data["series"][rid].copy()
    x[3, 1] = bad
    ts = rewrite_series(data, rid, x)
    with pytest.raises(InputError, match="NaN/inf") as err:
        _write_first_bucket(data)
    assert err.value.source == ts and "volume 3" in str(err.value)
    shard_dir = Path(data["layout"].shard_dir)
    assert not list(shard_dir.glob("bucket-*[0-9].parquet")) and _leftovers(shard_dir) == []


def test_pfc_of_wrong_size_is_named(data):
    rid, subject = _victim(data)
    path = data["layout"].pfc.format(subject=subject, run_id=rid)
    good = runfiles.read_relmat(path, N_PARCELS)
    runfiles.write_relmat(path, views=np.zeros((len(good["seed"]), 4)), seeds=good["seed"], n_kept=good["n_kept"],
                          keep_fraction=good["keep_fraction"], dtype="float16", sidecar={})
    with pytest.raises(InputError, match="expected 15") as err:
        _write_first_bucket(data)
    assert err.value.source == path


def test_newer_schema_shard_is_refused_everywhere(data, tmp_path):
    paths = build_shards(data, manifest=False)
    table = pq.read_table(paths[0])
    meta = json.loads(table.schema.metadata[shards.METADATA_KEY])
    meta["schema_version"] = shards.SCHEMA_VERSION + 1
    pq.write_table(table.replace_schema_metadata({shards.METADATA_KEY: json.dumps(meta)}), paths[0])
    with pytest.raises(InputError, match="newer schema version") as err:
        shards.open_shard(paths[0])
    assert err.value.source == str(paths[0])
    out = tmp_path / "m"
    with pytest.raises(InputError, match="newer schema version"):
        shards.write_manifest(paths, out / "manifest.parquet", out / "norm.parquet")
    assert not out.exists() or not any(out.iterdir())
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(InputError, match="not a brainfoundry shard"):
        shards.open_shard(plain)


def test_shards_of_different_atlases_are_refused(data, tmp_path):
    paths = build_shards(data, manifest=False)
    table = pq.read_table(paths[1])
    meta = json.loads(table.schema.metadata[shards.METADATA_KEY])
    meta["parcel_names"] = meta["parcel_names"][::-1]
    pq.write_table(table.replace_schema_metadata({shards.METADATA_KEY: json.dumps(meta)}), paths[1])
    with pytest.raises(InputError, match="differ") as err:
        shards.manifest_table(paths)
    assert err.value.source == str(paths[1])



def test_flipped_bit_in_a_series_parquet_stops_the_shard_writer(data):
    from test_io import flip_byte

    rid, subject = _victim(data)
    ts = data["layout"].timeseries.format(subject=subject, run_id=rid)
    flip_byte(ts, data["names"][1])
    with pytest.raises(InputError, match="checksum mismatch") as err:
        _write_first_bucket(data)
    assert err.value.source == ts
    shard_dir = Path(data["layout"].shard_dir)
    assert not list(shard_dir.glob("bucket-*[0-9].parquet")) and _leftovers(shard_dir) == []

# -- manifest and normalization statistics ----------------------------------------------------------------------
def test_manifest_points_at_every_row(data):
    paths = build_shards(data, row_group_size=2)
    manifest = pq.read_table(data["layout"].manifest).to_pandas()
    assert sorted(manifest["run_id"]) == sorted(data["runs"].index)
    for row in manifest.itertuples():
        handle = pq.ParquetFile(Path(data["layout"].shard_dir) / row.shard)
        got = handle.read_row_group(row.row_group, columns=["run_id"]).column(0)[row.row_index].as_py()
        assert got == row.run_id
        assert row.bucket == data["runs"].loc[row.run_id, "bucket"] and row.split == data["runs"].loc[row.run_id, "split"]
        assert row.n_timepoints == len(data["series"][row.run_id])
    assert "timeseries" not in manifest.columns and "pfc" not in manifest.columns
    assert len(paths) == 2
    meta = json.loads(pq.read_schema(data["layout"].manifest).metadata[shards.METADATA_KEY])
    assert meta[shards.SHARD_CHECKSUMS_KEY] == {p.name: sha256_file(p) for p in paths}


def test_a_shard_changed_after_its_manifest_is_refused(data):
    paths = build_shards(data)
    shards.write_shard(shards.read_bucket_runs(data["layout"].bucket_runs.format(bucket=0)), paths[0],
                       labels=data["labels"], atlas="Toy", timeseries_pattern=data["layout"].timeseries,
                       pfc_pattern=data["layout"].pfc, row_group_size=2, bucket=0)  # other row groups
    with pytest.raises(InputError, match=r"bucket-0\.parquet: checksum mismatch.*manifest\.parquet") as err:
        shards.verify_shards(paths)
    assert err.value.source == str(paths[0])
    extra = paths[0].with_name("bucket-7.parquet")
    extra.write_bytes(paths[1].read_bytes())
    with pytest.raises(InputError, match=r"bucket-7\.parquet: not listed in .*manifest\.parquet"):
        shards.verify_shards([extra])


def _train_reference(data):
    runs = data["runs"]
    parts = []
    for rid, x in data["series"].items():
        if runs.loc[rid, "split"] != "train":
            continue
        x = x.astype(np.float64)
        x[:, np.ptp(x, axis=0) == 0] = np.nan
        parts.append(x)
    return np.nanquantile(np.concatenate(parts), [0.25, 0.5, 0.75], axis=0)


def test_norm_stats_are_exact_train_quantiles(data):
    build_shards(data)
    stats = pq.read_table(data["layout"].norm_stats).to_pandas()
    q25, median, q75 = _train_reference(data)
    np.testing.assert_allclose(stats["median"], median, rtol=1e-12)
    np.testing.assert_allclose(stats["iqr"], q75 - q25, rtol=1e-12)
    assert stats["parcel"].tolist() == data["names"]
    meta = json.loads(pq.read_schema(data["layout"].norm_stats).metadata[shards.METADATA_KEY])
    assert meta["splits"] == ["train"] and meta["n_runs"] == int((data["runs"]["split"] == "train").sum())


def test_norm_stats_ignore_val_and_test_rows(data):
    build_shards(data)
    before = pq.read_table(data["layout"].norm_stats).to_pandas()
    runs, layout = data["runs"], data["layout"]
    assert {"val", "test"} & set(runs["split"])
    for rid, row in runs[runs["split"] != "train"].iterrows():  # wildly different held-out data
        rewrite_series(data, rid, data["series"][rid] * 1000 + 5000)
    build_shards(data)
    after = pq.read_table(layout.norm_stats).to_pandas()
    pd.testing.assert_frame_equal(before, after)


def test_zero_iqr_becomes_one(tmp_path):
    data = write_inputs(tmp_path, zero_variance=False)
    for rid, x in data["series"].items():  # parcel 0 is mostly one constant: varies per run, zero IQR
        x[:, 0] = 3.0
        x[0, 0] = 4.0
        rewrite_series(data, rid, x)
    build_shards(data)
    stats = pq.read_table(data["layout"].norm_stats).to_pandas()
    assert stats.loc[0, "iqr_raw"] == 0 and stats.loc[0, "iqr"] == 1.0 and stats.loc[0, "median"] == 3.0


@pytest.mark.parametrize("bins,cap", [(4096, 4096), (8, 4), (2, 1)])
def test_streaming_quantiles_equal_numpy(bins, cap):
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((int(rng.integers(1, 200)), 6)).astype(np.float32) for _ in range(25)]
    for c in chunks:
        c[:, 1] = np.round(c[:, 1] * 2)  # heavy duplicates
        c[:, 2] = 0.0                    # constant column
        c[:4, 3] = np.nan                # missing values
        c[:, 5] = np.nan                 # a column without values
    chunks[4][0, 0] = 1e7                # an outlier stretching the range
    values, counts = shards.streaming_quantiles(lambda: iter(chunks), 6, bins=bins, collect_cap=cap)
    full = np.concatenate(chunks).astype(np.float64)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        ref = np.nanquantile(full, [0.25, 0.5, 0.75], axis=0)
    np.testing.assert_allclose(values, ref, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(counts, np.isfinite(full).sum(axis=0))


# -- command line -----------------------------------------------------------------------------------------------
def test_cli_shard_and_manifest(data, capsys):
    layout, runs = data["layout"], data["runs"]
    outs = []
    for bucket in sorted(runs["bucket"].unique()):
        runs_path = layout.bucket_runs.format(bucket=bucket)
        shards.write_bucket_runs(shards.bucket_rows_json(runs, bucket), runs_path)
        out = layout.shard.format(bucket=bucket)
        cfg = json.dumps(shards.shard_config(data["config"]))
        assert cli(["shard", "--runs", runs_path, "--labels", str(data["labels"]), "--atlas", "Toy",
                    "--timeseries-pattern", layout.timeseries, "--pfc-pattern", layout.pfc, "--out", out,
                    "--bucket", str(bucket), "--row-group-size", "4", "--config-json", cfg]) == 0
        outs.append(out)
    assert cli(["manifest", *outs, "--manifest", layout.manifest, "--norm-stats", layout.norm_stats]) == 0
    assert pq.read_table(layout.manifest).num_rows == len(runs)
    # bad input: one line naming the file, exit status 1
    rid, subject = _victim(data)
    ts = layout.timeseries.format(subject=subject, run_id=rid)
    Path(ts).write_bytes(b"not parquet")
    bucket = int(runs.loc[rid, "bucket"])
    capsys.readouterr()
    assert cli(["shard", "--runs", layout.bucket_runs.format(bucket=bucket), "--labels", str(data["labels"]),
                "--atlas", "Toy", "--timeseries-pattern", layout.timeseries, "--out",
                str(Path(layout.shard_dir) / "x.parquet")]) == 1
    assert ts in capsys.readouterr().err


# -- the Snakemake rules (workflow/rules/shards.smk), run for real -------------------------------------------
_SNAKEFILE = """
from pathlib import Path
from snakemake.utils import validate
configfile: "config.yaml"
validate(config, "{repo}/config/config.schema.yaml")
include: "{repo}/workflow/rules/common.smk"
if not (Path("{repo}") / "envs" / "brainfoundry.yaml").exists():  # the env file belongs to another step
    BF_ENV = None
include: "{repo}/workflow/rules/shards.smk"
rule all:
    input: LAYOUT.manifest, LAYOUT.norm_stats
"""


def _copy_subject(src: dict, dst: dict, subject: str) -> None:
    """Copy one subject's per-run files from one write_inputs tree to another (new files only)."""
    import shutil

    src_dir, dst_dir = Path(src["layout"].results) / f"sub-{subject}", Path(dst["layout"].results) / f"sub-{subject}"
    shutil.copytree(src_dir, dst_dir)


def _planned(result) -> list[tuple[str, str]]:
    jobs, rule = [], None
    for line in result.stdout.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
            jobs.append((rule, ""))
        elif line.strip().startswith("wildcards:") and rule:
            jobs[-1] = (rule, line.split(":", 1)[1].strip())
    return sorted(jobs)


@pytest.mark.workflow
def test_workflow_adding_a_subject_rewrites_one_bucket(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    import yaml

    from conftest import bin_path

    data = write_inputs(tmp_path / "w", n_subjects=8, n_buckets=3)
    bigger = write_inputs(tmp_path / "more", n_subjects=9, n_buckets=3)  # same first 8 subjects, plus one
    workdir = tmp_path / "w"
    config = {**data["config"], "run_table": str(workdir / "runs.parquet"),
              "shards": {**data["config"]["shards"], "row_group_size": 2, "compression": "zstd"}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "Snakefile").write_text(_SNAKEFILE.format(repo=repo_root))
    data["runs"].drop(columns=["bucket", "split"]).reset_index().to_parquet(workdir / "runs.parquet")

    def snakemake(*extra):
        cmd = [bin_path("snakemake"), "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
               "--cores", "1", *extra]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    snakemake()
    layout = data["layout"]
    manifest = pq.read_table(layout.manifest).to_pandas()
    assert sorted(manifest["run_id"]) == sorted(data["runs"].index)
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.find_shards(layout.shard_dir)}

    new_run = "sub-008_task-rest"
    new_bucket = int(bigger["runs"].loc[new_run, "bucket"])
    _copy_subject(bigger, data, "008")
    bigger["runs"].drop(columns=["bucket", "split"]).reset_index().to_parquet(workdir / "runs.parquet")
    planned = _planned(snakemake("-n"))
    assert planned == sorted([("all", ""), ("bucket_runs", f"bucket={new_bucket}"),
                              ("manifest", ""), ("shard", f"bucket={new_bucket}")])
    snakemake()
    after = {p.name: p.stat().st_mtime_ns for p in shards.find_shards(layout.shard_dir)}
    changed = {name for name in after if after[name] != mtimes.get(name)}
    assert changed == {f"bucket-{new_bucket}.parquet"}
    assert new_run in pq.read_table(layout.manifest).column("run_id").to_pylist()
