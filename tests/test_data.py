"""The streaming reader (brainfoundry.data) over shards written by brainfoundry.shards."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from brainfoundry import shards
from brainfoundry.data import ShardDataset, ShardLoader, make_dataloader
from brainfoundry.errors import InputError
from test_shards import build_shards, write_inputs

WINDOW = 30


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """40 subjects (4 of them with runs shorter than the window), 3 buckets, 3-row row groups."""
    root = tmp_path_factory.mktemp("data")
    data = write_inputs(root, n_subjects=40, n_buckets=3, lengths=(31, 70), short_subjects=4)
    data["paths"] = build_shards(data, row_group_size=3)
    data["stats"] = pq.read_table(data["layout"].norm_stats).to_pandas()
    return data


def _dataset(built, **kwargs) -> ShardDataset:
    kwargs.setdefault("window", WINDOW)
    kwargs.setdefault("seed", 11)
    kwargs.setdefault("buffer_size", 8)
    return ShardDataset(built["layout"].shard_dir, **kwargs)


def _runs_of(built, splits, min_len=0):
    runs = built["runs"]
    return {rid for rid, row in runs.iterrows()
            if (splits is None or row["split"] in splits) and len(built["series"][rid]) >= min_len}


def _collect(loader_or_ds) -> list[dict]:
    out = []
    for item in loader_or_ds:
        if isinstance(item["run_id"], list):  # a batch
            for i, rid in enumerate(item["run_id"]):
                out.append({"run_id": rid, "x": item["x"][i], "start": int(item["start"][i])})
        else:
            out.append(item)
    return out


# -- coverage across workers and ranks -----------------------------------------------------------------------
def test_two_workers_two_ranks_cover_every_run_once(built):
    seen = []
    for rank in range(2):
        ds = _dataset(built, split=None, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        seen += [s["run_id"] for s in _collect(loader)]
    counts = Counter(seen)
    assert max(counts.values()) == 1
    assert set(counts) == _runs_of(built, None, min_len=WINDOW)
    assert len(ds.units) >= 8  # enough row groups that every one of the 4 readers had work


def test_split_filter(built):
    for split in ("train", "val", "test"):
        ds = _dataset(built, split=split, shuffle=False)
        got = {s["run_id"] for s in ds}
        assert got == _runs_of(built, {split}, min_len=WINDOW) and got
        assert {s["split"] for s in ds} == {split}
    both = _dataset(built, split=["val", "test"])
    assert {s["run_id"] for s in both} == _runs_of(built, {"val", "test"}, min_len=WINDOW)


# -- shuffling --------------------------------------------------------------------------------------------------
def test_shuffle_buffer_is_bounded_and_reads_row_groups_once(built):
    ds = _dataset(built, split=None, buffer_size=6)  # row groups of 3 rows: 2 resident at a time
    assert ds.resident_units == 2
    units = ds.units_for(0, 1, 0, 1)
    stream = [int(r) for u in units for r in ds.units[u]]
    plan = ds.plan(units, 0, 0, 1)
    assert sorted(plan) == sorted(stream) and plan != stream
    # Every draw comes from the first R row groups (in read order) not yet exhausted: bounded buffer.
    position = {u: i for i, u in enumerate(units)}
    left = {u: len(ds.units[u]) for u in units}
    for ref in plan:
        u = int(ds.unit_of[ref])
        open_units = [v for v in units if left[v] > 0][: ds.resident_units]
        assert u in open_units, (position[u], [position[v] for v in open_units])
        left[u] -= 1
    samples = list(ds)
    assert [s["run_id"] for s in samples] == [str(ds.run_ids[r]) for r in plan]
    assert ds.stats["row_groups_read"] == len(units)  # sequential row-group reads, none per sample
    assert ds.stats["max_resident_row_groups"] <= ds.resident_units
    assert ds.stats["max_resident_rows"] <= ds.resident_units * max(len(ds.units[u]) for u in units)


def test_batches_equal_samples(built):
    samples = list(_dataset(built, split=None))
    batches = list(_dataset(built, split=None, batch_size=7))
    assert [len(b["run_id"]) for b in batches][:-1] == [7] * (len(batches) - 1)
    assert [rid for b in batches for rid in b["run_id"]] == [s["run_id"] for s in samples]
    x = torch.cat([b["x"] for b in batches])
    assert torch.equal(x, torch.stack([s["x"] for s in samples]))
    for key in ("mask", "age", "sex", "diagnosis", "site", "zero_variance", "start", "n_timepoints"):
        got = torch.cat([b[key] for b in batches])
        want = torch.stack([torch.as_tensor(s[key]) for s in samples])
        assert torch.equal(got.isnan() if key == "age" else got, want.isnan() if key == "age" else want), key
    dropped = list(_dataset(built, split=None, batch_size=7, drop_last=True))
    assert all(len(b["run_id"]) == 7 for b in dropped) and len(dropped) == len(samples) // 7


def test_shuffle_depends_on_seed_and_epoch(built):
    ds = _dataset(built, split="train")
    first = [s["run_id"] for s in ds]
    assert first == [s["run_id"] for s in ds]  # same epoch, same order
    ds.set_epoch(1)
    second = [s["run_id"] for s in ds]
    assert sorted(first) == sorted(second) and first != second
    other = _dataset(built, split="train", seed=12)
    assert [s["run_id"] for s in other] != first


# -- windows and scaling ----------------------------------------------------------------------------------------
def test_window_crop_is_deterministic_and_scaled_with_train_stats(built):
    stats = built["stats"]
    median, iqr = stats["median"].to_numpy(np.float32), stats["iqr"].to_numpy(np.float32)
    a = {s["run_id"]: s for s in _dataset(built, split=None)}
    b = {s["run_id"]: s for s in _dataset(built, split=None, buffer_size=3)}  # other order, same crops
    starts = set()
    for rid, s in a.items():
        assert s["x"].shape == (WINDOW, len(built["names"])) and s["x"].dtype == torch.float32
        assert bool(s["mask"].all())
        assert torch.equal(s["x"], b[rid]["x"]) and s["start"] == b[rid]["start"]
        raw = built["series"][rid][s["start"]:s["start"] + WINDOW]
        np.testing.assert_allclose(s["x"].numpy(), (raw - median) / iqr, rtol=1e-5, atol=1e-5)
        starts.add(s["start"])
    assert len(starts) > 3  # random offsets, not always 0
    ds = _dataset(built, split=None)
    ds.set_epoch(3)
    moved = {s["run_id"]: s["start"] for s in ds}
    assert any(moved[r] != a[r]["start"] for r in a)  # new epoch, new windows
    centre = {s["run_id"]: s["start"] for s in _dataset(built, split=None, crop="center")}
    assert all(centre[r] == (len(built["series"][r]) - WINDOW) // 2 for r in centre)


def test_scaling_uses_the_stored_train_statistics(built, tmp_path):
    """Reference: quantiles of the training runs only, computed here with numpy."""
    runs = built["runs"]
    parts = []
    for rid, x in built["series"].items():
        if runs.loc[rid, "split"] == "train":
            x = x.astype(np.float64)
            x[:, np.ptp(x, axis=0) == 0] = np.nan
            parts.append(x)
    q25, med, q75 = np.nanquantile(np.concatenate(parts), [0.25, 0.5, 0.75], axis=0)
    ds = _dataset(built, split="val", crop="start")
    np.testing.assert_allclose(ds.median, med, rtol=1e-6)
    np.testing.assert_allclose(1 / ds.inv_iqr, q75 - q25, rtol=1e-6)
    sample = next(iter(ds))
    raw = built["series"][sample["run_id"]][:WINDOW].astype(np.float64)
    np.testing.assert_allclose(sample["x"].numpy(), (raw - med) / (q75 - q25), rtol=1e-5, atol=1e-5)
    unscaled = next(iter(_dataset(built, split="val", crop="start", scale=False)))
    np.testing.assert_array_equal(unscaled["x"].numpy(), built["series"][unscaled["run_id"]][:WINDOW])


# -- short runs ------------------------------------------------------------------------------------------------
def test_short_runs_skip_counts_them(built):
    ds = _dataset(built, split=None, short_runs="skip")
    short = {rid for rid, x in built["series"].items() if len(x) < WINDOW}
    assert len(short) == 4
    assert ds.n_short_skipped == 4 and set(ds.short_run_ids) == short
    assert not short & {s["run_id"] for s in ds}


def test_short_runs_pad_with_mask(built):
    ds = _dataset(built, split=None, short_runs="pad")
    samples = {s["run_id"]: s for s in ds}
    assert ds.n_short_skipped == 0 and len(samples) == len(built["series"])
    stats = built["stats"]
    for rid, x in built["series"].items():
        s = samples[rid]
        n = min(len(x), WINDOW)
        assert s["mask"].sum() == n and bool(s["mask"][:n].all())
        if len(x) < WINDOW:
            assert s["start"] == 0 and torch.count_nonzero(s["x"][n:]) == 0
            expect = (x - stats["median"].to_numpy()) / stats["iqr"].to_numpy()
            np.testing.assert_allclose(s["x"][:n].numpy(), expect, rtol=1e-5, atol=1e-5)


# -- resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,num_workers", [("thread", 0), ("thread", 2), ("process", 2)])
def test_resume_continues_exactly(built, backend, num_workers):
    def loader():
        return make_dataloader(_dataset(built, split=None), batch_size=3, num_workers=num_workers, backend=backend)

    full = loader()
    expected = [(s["run_id"], s["start"]) for s in _collect(full)]
    assert full.epoch == 1  # exhausting an epoch advances it
    first = loader()
    got = []
    it = iter(first)
    for _ in range(4):
        batch = next(it)
        got += list(zip(batch["run_id"], batch["start"].tolist()))
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    got += [(s["run_id"], s["start"]) for s in _collect(resumed)]
    assert got == expected
    # the next epoch after a resumed one starts from its beginning
    again = loader()
    again.set_epoch(1)
    assert [(s["run_id"], s["start"]) for s in _collect(again)] == [(s["run_id"], s["start"]) for s in _collect(resumed)]


def test_resume_refuses_other_worker_count(built):
    ds = _dataset(built, split=None)
    loader = ShardLoader(ds, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="num_workers"):
        loader.load_state_dict({"epoch": 0, "num_workers": 2, "per_worker": [1, 1]})


def test_dataset_state_in_process(built):
    ds = _dataset(built, split="train")
    expected = [s["run_id"] for s in ds]
    ds.set_epoch(0)
    it = iter(ds)
    head = [next(it)["run_id"] for _ in range(5)]
    state = ds.state_dict()
    assert state == {"epoch": 0, "per_worker": [5]}
    fresh = _dataset(built, split="train")
    fresh.load_state_dict(state)
    assert head + [s["run_id"] for s in fresh] == expected


# -- other fields ----------------------------------------------------------------------------------------------
def test_phenotypes_metadata_and_pfc(built):
    ds = _dataset(built, split=None, pfc=True, shuffle=False)
    assert ds.parcel_names == built["names"] and ds.parcel_coords.shape == (len(built["names"]), 3)
    assert ds.vocab["sex"] == ["female", "male"] and ds.vocab["diagnosis"] == ["ASD", "control"]
    runs = built["runs"]
    for s in ds:
        row = runs.loc[s["run_id"]]
        assert np.isnan(row["age"]) == bool(torch.isnan(s["age"])) and (np.isnan(row["age"]) or s["age"] == row["age"])
        assert s["diagnosis"] == (-1 if pd.isna(row["diagnosis"]) else ds.vocab["diagnosis"].index(row["diagnosis"]))
        assert ds.vocab["sex"][s["sex"]] == row["sex"] and ds.vocab["site"][s["site"]] == row["site"]
        assert bool(s["zero_variance"][2]) == (int(row["subject"]) % 5 == 1)
        pfc = pq.read_table(built["layout"].pfc.format(subject=row["subject"], run_id=s["run_id"]))
        np.testing.assert_array_equal(s["pfc"].numpy(), np.stack(pfc.column("pfc").to_numpy(zero_copy_only=False)))
    batch = next(iter(make_dataloader(_dataset(built, split=None), batch_size=5, num_workers=0)))
    assert batch["x"].shape == (5, WINDOW, len(built["names"])) and batch["sex"].dtype == torch.int64
    assert batch["age"].dtype == torch.float32 and batch["mask"].shape == (5, WINDOW)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_loader_length_matches_batches(built, backend):
    for workers in (0, 2):
        loader = make_dataloader(_dataset(built, split=None), batch_size=4, num_workers=workers, backend=backend)
        n = len(loader)
        assert n == sum(1 for _ in loader)


def test_thread_and_process_backends_agree(built):
    """Same per-worker plans and the same round-robin interleave: identical batches."""
    runs = {}
    for backend in ("thread", "process"):
        loader = make_dataloader(_dataset(built, split=None), batch_size=4, num_workers=2, backend=backend)
        runs[backend] = [(b["run_id"], b["x"].clone(), b["worker"].tolist()) for b in loader]
    assert [r for r, _, _ in runs["thread"]] == [r for r, _, _ in runs["process"]]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(runs["thread"], runs["process"]))
    assert {w for _, _, ws in runs["thread"] for w in ws} == {0, 1}


def test_two_reader_threads_two_ranks_cover_every_run_once(built):
    seen = []
    for rank in range(2):
        loader = make_dataloader(_dataset(built, split=None, rank=rank, world_size=2), batch_size=4, num_workers=2)
        seen += [rid for b in loader for rid in b["run_id"]]
    assert sorted(seen) == sorted(_runs_of(built, None, min_len=WINDOW))


def test_reader_thread_errors_reach_the_consumer(built, tmp_path):
    import shutil

    shard_dir = tmp_path / "shards"
    shutil.copytree(built["layout"].shard_dir, shard_dir)
    ds = ShardDataset(shard_dir, split=None, window=WINDOW)
    for path in ds.paths:  # truncated after indexing: decoding fails inside a reader thread
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot open the shard") as err:
        list(make_dataloader(ds, batch_size=4, num_workers=2))
    assert err.value.source in ds.paths


def test_reader_refuses_newer_schema(built, tmp_path):
    path = built["paths"][0]
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[shards.METADATA_KEY])
    meta["schema_version"] = 99
    bad = tmp_path / "bucket-0.parquet"
    pq.write_table(table.replace_schema_metadata({shards.METADATA_KEY: json.dumps(meta)}), bad)
    with pytest.raises(InputError, match="schema version 99") as err:
        ShardDataset([bad], scale=False)
    assert err.value.source == str(bad)


def test_missing_norm_stats_is_an_error(built, tmp_path):
    with pytest.raises(InputError) as err:
        ShardDataset(built["paths"], norm_stats=tmp_path / "absent.parquet")
    assert "absent.parquet" in str(err.value)


def test_from_config_uses_the_shards_settings(built):
    config = {**built["config"], "shards": {**built["config"]["shards"], "window": 35, "short_runs": "pad",
                                            "shuffle_buffer": 3}}
    ds = ShardDataset.from_config(config, split="val")
    assert (ds.window, ds.short_runs, ds.buffer_size, ds.seed) == (35, "pad", 3, config["seed"])
    assert ds.splits == {"val"} and ds.n_samples == len(_runs_of(built, {"val"}))
    assert next(iter(ds))["x"].shape == (35, len(built["names"]))


# -- corrupt shards: issue 15 ("bits flipped in a shard changed 100 values with no error") ---------------
def test_flipped_bit_in_a_shard_is_a_named_error(tmp_path):
    from brainfoundry.testing import write_synthetic_shards
    from test_io import flip_byte

    out = write_synthetic_shards(tmp_path / "shards", n_subjects=8, n_parcels=16, n_timepoints=80, pfc=False)
    shard = out / "bucket-0.parquet"
    before = pq.read_table(shard, columns=["timeseries"])
    flip_byte(shard, "timeseries")
    assert not pq.read_table(shard, columns=["timeseries"]).equals(before)  # plain pyarrow: no error
    with pytest.raises(InputError, match=r"bucket-0\.parquet: checksum mismatch.*manifest\.parquet") as err:
        ShardDataset(out, split=None, window=20)
    assert err.value.source == str(shard)
    # Without a manifest (no sha256 recorded) the page checksums still refuse the changed row group.
    (out / "manifest.parquet").unlink()
    ds = ShardDataset(out, split=None, window=20, scale=False, shuffle=False)
    with pytest.raises(InputError, match=r"bucket-0\.parquet: corrupt shard \(row group 0\): parquet page checksum"):
        list(ds)


def test_page_checksums_are_skipped_only_for_shards_whose_sha256_was_checked(tmp_path):
    import os

    from brainfoundry.testing import write_synthetic_shards
    from test_io import flip_byte

    out = write_synthetic_shards(tmp_path / "shards", n_subjects=8, n_parcels=16, n_timepoints=80, pfc=False)
    shard = out / "bucket-0.parquet"
    ds = ShardDataset(out, split=None, window=20, scale=False, shuffle=False)
    assert shards.sha256_verified(shard)
    first = [b["x"].clone() for b in ds]
    # Changed after the check (new mtime): no longer counted as verified, so the page CRCs apply again.
    flip_byte(shard, "timeseries")
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert not shards.sha256_verified(shard)
    with pytest.raises(InputError, match=r"bucket-0\.parquet: corrupt shard \(row group 0\): parquet page checksum"):
        list(ds)
    assert len(first) == ds.n_samples


def test_shards_are_hashed_once_per_process(built, tmp_path):
    import shutil

    shard_dir = tmp_path / "shards"
    shutil.copytree(built["layout"].shard_dir, shard_dir)
    paths = shards.find_shards(shard_dir)
    assert shards.verify_shards(paths) == len(paths)
    assert shards.verify_shards(paths) == 0  # already checked in this process
    ShardDataset(shard_dir, split=None, window=WINDOW)  # the dataset reuses the check
    assert shards.verify_shards(paths) == 0
    paths[0].write_bytes(paths[0].read_bytes())  # rewritten (new mtime): checked again
    assert shards.verify_shards(paths) == 1


# -- partition="samples": the global batches of the one-process stream, on any number of ranks -------------
@pytest.mark.parametrize("world,num_workers", [(2, 0), (3, 2)])
def test_samples_partition_gives_each_rank_its_slice_of_the_one_process_batches(built, world, num_workers):
    local = 2

    def batches(rank, size):
        ds = _dataset(built, split=None, rank=rank, world_size=size, partition="samples")
        return [list(zip(b["run_id"], b["start"].tolist()))  # one process: the whole global batch
                for b in make_dataloader(ds, batch_size=local * world // size, num_workers=num_workers)]

    one = batches(0, 1)
    ranks = [batches(r, world) for r in range(world)]
    positions = [[b["position"].tolist() for b in make_dataloader(
        _dataset(built, split=None, rank=r, world_size=world, partition="samples"), batch_size=local,
        num_workers=num_workers)] for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes as many steps (no collective waits forever)
    for step, parts in enumerate(zip(*ranks)):
        merged = [s for part in parts for s in part]
        if len(one[step]) == local * world:
            assert [len(p) for p in parts] == [local] * world
        assert merged == one[step], step  # the same samples, windows and order as the one-process batch
        # each sample's index in the global batch (the trainer seeds its masks with it)
        assert [i for mine in positions for i in mine[step]] == list(range(len(one[step])))
    assert len(ranks[0]) == len(one)
    # plan_sizes (the trainer's "every rank has data" check) counts what each rank yields
    ds = _dataset(built, split=None, rank=0, world_size=world, partition="samples")
    ds.batch_size = local
    assert ds.plan_sizes(num_workers).sum(axis=1).tolist() == [sum(map(len, r)) for r in ranks]


def test_samples_partition_resumes_exactly(built):
    def loader(rank):
        return make_dataloader(_dataset(built, split=None, rank=rank, world_size=2, partition="samples"),
                               batch_size=3, num_workers=0)

    full = [list(zip(b["run_id"], b["start"].tolist())) for b in loader(1)]
    first = loader(1)
    it = iter(first)
    got = [list(zip(b["run_id"], b["start"].tolist())) for b in (next(it), next(it), next(it))]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(1)
    resumed.load_state_dict(state)
    got += [list(zip(b["run_id"], b["start"].tolist())) for b in resumed]
    assert got == full
    with pytest.raises(Exception, match="partition"):
        _dataset(built, partition="rows")
