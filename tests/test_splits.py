"""Stable splits, and no empty split for small datasets (brainfoundry.splits.assign_splits)."""

from __future__ import annotations

import pytest

from brainfoundry.splits import SPLITS, assign_splits, split_of

RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


def test_small_datasets_get_every_split_whatever_the_seed():
    subjects = [f"{i:02d}" for i in range(1, 8)]
    empty_before = 0
    for seed in range(200):
        empty_before += len(set(SPLITS) - {split_of(s, seed, RATIOS) for s in subjects}) > 0
        out = assign_splits(subjects, seed, RATIOS, fill_empty=True)
        assert set(out.values()) == set(SPLITS), (seed, out)
        assert sum(v == "train" for v in out.values()) >= 1
    assert empty_before > 50  # the failure this fixes is common at 7 subjects


def test_large_datasets_keep_the_per_subject_hash():
    subjects = [f"s{i:04d}" for i in range(500)]
    out = assign_splits(subjects, 3, RATIOS, fill_empty=True)
    assert out == {s: split_of(s, 3, RATIOS) for s in subjects}


def test_moves_only_train_subjects_and_respects_holdout_sites():
    subjects = ["a", "b", "c", "d"]
    sites = {"a": "X", "b": "Y", "c": "Y", "d": "Y"}
    out = assign_splits(subjects, 1, RATIOS, sites, holdout_sites=["X"], fill_empty=True)
    assert out["a"] == "test" and set(out.values()) == set(SPLITS)
    plain = {s: split_of(s, 1, RATIOS, sites[s], ["X"]) for s in subjects}
    assert all(out[s] == plain[s] for s in subjects if plain[s] != "train")


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_subjects_are_left_to_the_start_up_check(n):
    subjects = [f"s{i}" for i in range(n)]
    assert assign_splits(subjects, 0, RATIOS, fill_empty=True) == {s: split_of(s, 0, RATIOS) for s in subjects}


def test_zero_ratio_splits_stay_empty():
    out = assign_splits([f"s{i}" for i in range(6)], 0, {"train": 0.8, "val": 0.0, "test": 0.2}, fill_empty=True)
    assert "val" not in out.values() and "test" in out.values()


def test_off_by_default_so_adding_a_subject_never_moves_another():
    ratios, seed = RATIOS, 20261122
    before = assign_splits(["01", "02", "03"], seed, ratios)
    after = assign_splits(["01", "02", "03", "04"], seed, ratios)
    assert before == {s: split_of(s, seed, ratios) for s in before} and all(after[s] == before[s] for s in before)
