"""BIDS / fMRIPrep-derivatives indexing into the run table."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from brainfoundry import bids, demo
from brainfoundry.errors import InputError
from brainfoundry.runtable import REQUIRED_COLUMNS, load_run_table
from conftest import REPO, bin_path

SPACE = "MNI152NLin2009cAsym_res-2"
SPACE_ENTS = "space-MNI152NLin2009cAsym_res-2"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bids_demo")
    demo.write_demo_dataset(out, n_subjects=3, n_volumes=12, two_run_subjects=1)
    return out


def _config(bids_dir, derivatives_dir, entry="derivatives", **bids_options) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(entry_point=entry, bids_dir=str(bids_dir) if bids_dir else None,
                  derivatives_dir=str(derivatives_dir) if derivatives_dir else None, run_table=None)
    config["bids"].update(bids_options)
    return config


def _demo_config(out: Path, entry="derivatives", **bids_options) -> dict:
    return _config(out / "bids", out / "derivatives" / "fmriprep", entry, **bids_options)


# -- a hand-made tree for the edge cases (indexing never opens the NIfTI files) ------------------------
def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _raw_tree(root: Path, runs: dict[str, list[str]], tr: float | None = 2.0, participants: bool = True) -> Path:
    """``runs``: subject -> bold prefixes below sub-<s>/ (e.g. 'ses-1/func/sub-01_ses-1_task-rest_run-1')."""
    _touch(root / "dataset_description.json", json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for subject, prefixes in runs.items():
        _touch(root / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
        for prefix in prefixes:
            _touch(root / f"sub-{subject}" / f"{prefix}_bold.nii.gz")
            meta = {"TaskName": "rest"} if tr is None else {"TaskName": "rest", "RepetitionTime": tr}
            _touch(root / f"sub-{subject}" / f"{prefix}_bold.json", json.dumps(meta))
    if participants:
        rows = "".join(f"sub-{s}\t{20 + i}\tF\tcontrol\tA\n" for i, s in enumerate(runs))
        _touch(root / "participants.tsv", "participant_id\tage\tsex\tdiagnosis\tsite\n" + rows)
    return root


def _deriv_tree(root: Path, raw_root: Path, mask: bool = True, confounds: bool = True) -> Path:
    """fMRIPrep-style files for every raw bold of ``raw_root``."""
    _touch(root / "dataset_description.json", json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "25.2.7"}]}))
    for raw in raw_root.rglob("*_bold.nii.gz"):
        paths = bids.expected_derivatives(root, raw, "MNI152NLin2009cAsym", "2")
        _touch(Path(paths["bold"]))
        _touch(Path(paths["bold"].replace(".nii.gz", ".json")), raw.with_name(raw.name.replace(".nii.gz", ".json")).read_text())
        if mask:
            _touch(Path(paths["mask"]))
        if confounds:
            _touch(Path(paths["confounds"]), "trans_x\n0\n")
    return root


# -- the demo dataset ------------------------------------------------------------------------------------
def test_derivatives_entry_on_demo(small_demo):
    table = bids.index_dataset(_demo_config(small_demo))
    assert table["run_id"].tolist() == ["sub-01_task-rest_run-1", "sub-01_task-rest_run-2",
                                        "sub-02_task-rest_run-1", "sub-03_task-rest_run-1"]
    for column in (*REQUIRED_COLUMNS, "bold", "mask", "confounds", "age", "sex", "diagnosis"):
        assert column in table.columns, column
    participants = pd.read_csv(small_demo / "bids" / "participants.tsv", sep="\t").set_index("participant_id")
    for _, row in table.iterrows():
        for column in ("bold", "mask", "confounds"):
            assert Path(row[column]).is_file()
        sidecar = json.loads(Path(row["bold"].replace(".nii.gz", ".json")).read_text())
        assert row["tr"] == sidecar["RepetitionTime"]
        expected = participants.loc[f"sub-{row['subject']}"]
        assert (row["age"], row["sex"], row["diagnosis"], row["site"]) == tuple(expected[["age", "sex", "diagnosis", "site"]])
        assert row["dataset"] == "brainfoundry-demo"
        assert row["task"] == "rest" and pd.isna(row["session"])
    assert "desc-brain_mask" in table.loc[0, "mask"] and SPACE_ENTS in table.loc[0, "mask"]
    finalized = load_run_table(_demo_config(small_demo))
    assert finalized.index.name == "run_id" and {"bucket", "split"} <= set(finalized.columns)


def test_raw_entry_expects_fmriprep_outputs(small_demo, tmp_path):
    deriv = tmp_path / "fmriprep_out"
    config = _config(small_demo / "bids", deriv, entry="raw")
    raw = bids.index_dataset(config)
    derived = bids.index_dataset(_demo_config(small_demo))
    assert raw["run_id"].tolist() == derived["run_id"].tolist()
    assert raw["tr"].tolist() == derived["tr"].tolist()
    for (_, r), (_, d) in zip(raw.iterrows(), derived.iterrows()):
        assert Path(r["raw_bold"]).is_file()
        for column in ("bold", "mask", "confounds"):
            # The same names fMRIPrep wrote in the demo tree, under the configured derivatives_dir.
            assert r[column] == str(deriv / Path(d[column]).relative_to(small_demo / "derivatives" / "fmriprep"))


def test_relative_dirs_give_relative_paths(small_demo, monkeypatch):
    monkeypatch.chdir(small_demo)
    table = bids.index_dataset(_config("bids", "derivatives/fmriprep"))
    assert table.loc[0, "bold"].startswith("derivatives/fmriprep/sub-01/func/")
    raw = bids.index_dataset(_config("bids", "derivatives/fmriprep", entry="raw"))
    assert raw.loc[0, "raw_bold"] == "bids/sub-01/func/sub-01_task-rest_run-1_bold.nii.gz"


# -- filters -------------------------------------------------------------------------------------------
@pytest.fixture()
def session_tree(tmp_path) -> tuple[Path, Path]:
    raw = _raw_tree(tmp_path / "raw", {
        "01": ["ses-1/func/sub-01_ses-1_task-rest_run-01", "ses-2/func/sub-01_ses-2_task-rest_run-01",
               "ses-1/func/sub-01_ses-1_task-nback_run-01"],
        "02": ["ses-1/func/sub-02_ses-1_task-rest_run-01", "ses-1/func/sub-02_ses-1_task-rest_run-02"],
        "03": ["ses-1/func/sub-03_ses-1_task-rest_acq-mb_run-01"],
    })
    return raw, _deriv_tree(tmp_path / "deriv", raw)


@pytest.mark.parametrize("entry", ["raw", "derivatives"])
@pytest.mark.parametrize("options, expected", [
    ({"tasks": []}, ["sub-01_ses-1_task-nback_run-01", "sub-01_ses-1_task-rest_run-01", "sub-01_ses-2_task-rest_run-01",
                     "sub-02_ses-1_task-rest_run-01", "sub-02_ses-1_task-rest_run-02",
                     "sub-03_ses-1_task-rest_acq-mb_run-01"]),
    ({"tasks": ["nback"]}, ["sub-01_ses-1_task-nback_run-01"]),
    ({"include_subjects": ["sub-02"]}, ["sub-02_ses-1_task-rest_run-01", "sub-02_ses-1_task-rest_run-02"]),
    ({"exclude_subjects": ["01", "sub-02"]}, ["sub-03_ses-1_task-rest_acq-mb_run-01"]),
    ({"sessions": ["2"]}, ["sub-01_ses-2_task-rest_run-01"]),
    ({"runs": [2]}, ["sub-02_ses-1_task-rest_run-02"]),
    ({"runs": ["02"], "include_subjects": ["02"]}, ["sub-02_ses-1_task-rest_run-02"]),
])
def test_entity_filters(session_tree, entry, options, expected):
    raw, deriv = session_tree
    table = bids.index_dataset(_config(raw, deriv, entry, **options))
    assert table["run_id"].tolist() == expected
    row = table.iloc[0]
    assert row["run_id"].startswith(f"sub-{row['subject']}_ses-{row['session']}_task-{row['task']}")
    assert row["run"] == "01" or row["run"] == "02"  # as written in the file name


# -- invalid datasets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["raw", "derivatives"])
def test_missing_dataset_description_is_an_error_even_with_skip(session_tree, entry):
    raw, deriv = session_tree
    root = raw if entry == "raw" else deriv
    (root / "dataset_description.json").unlink()
    with pytest.raises(InputError, match="dataset_description.json: missing"):
        bids.index_dataset(_config(raw, deriv, entry, on_invalid="skip"))


@pytest.mark.parametrize("entry", ["raw", "derivatives"])
def test_bold_without_repetition_time(tmp_path, entry, caplog):
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"], "02": ["func/sub-02_task-rest_run-1"]})
    sidecar = raw / "sub-02" / "func" / "sub-02_task-rest_run-1_bold.json"
    sidecar.write_text(json.dumps({"TaskName": "rest"}))
    deriv = _deriv_tree(tmp_path / "deriv", raw)
    with pytest.raises(InputError, match=r"sub-02_task-rest_run-1.*_bold\.nii\.gz: bold has no valid RepetitionTime"):
        bids.index_dataset(_config(raw, deriv, entry, on_invalid="error"))
    with caplog.at_level(logging.WARNING, logger="brainfoundry.bids"):
        table = bids.index_dataset(_config(raw, deriv, entry, on_invalid="skip"))
    assert table["run_id"].tolist() == ["sub-01_task-rest_run-1"]
    assert "RepetitionTime" in caplog.text and "sub-02" in caplog.text


def test_subject_without_bold(tmp_path, caplog):
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"], "02": []})
    config = _config(raw, tmp_path / "deriv", "raw")
    with pytest.raises(InputError, match=r"sub-02: subject has no bold run"):
        bids.index_dataset(config)
    config["bids"]["on_invalid"] = "skip"
    with caplog.at_level(logging.WARNING, logger="brainfoundry.bids"):
        assert bids.index_dataset(config)["subject"].tolist() == ["01"]
    assert "sub-02" in caplog.text
    config["bids"]["exclude_subjects"] = ["02"]  # an excluded subject is not a problem
    config["bids"]["on_invalid"] = "error"
    assert bids.index_dataset(config)["subject"].tolist() == ["01"]


@pytest.mark.parametrize("missing, message", [("mask", "no brain mask"), ("confounds", "no confounds file")])
def test_missing_derivatives_files(tmp_path, missing, message, caplog):
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"]})
    deriv = _deriv_tree(tmp_path / "deriv", raw, **{missing: False})
    with pytest.raises(InputError, match=message):
        bids.index_dataset(_config(raw, deriv))
    with pytest.raises(InputError, match="no usable bold runs"), caplog.at_level(logging.WARNING):
        bids.index_dataset(_config(raw, deriv, on_invalid="skip"))
    assert message in caplog.text


def test_missing_participants_column_names_file_and_column(small_demo):
    config = _demo_config(small_demo, on_invalid="skip")
    config["bids"]["participants_columns"] = {"age": "age", "diagnosis": "dx_group"}
    with pytest.raises(InputError) as err:
        bids.index_dataset(config)
    assert "participants.tsv" in str(err.value) and "'dx_group'" in str(err.value)


def test_participants_mapping_and_extra_columns(tmp_path):
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"], "02": ["func/sub-02_task-rest_run-1"]},
                    participants=False)
    _touch(raw / "participants.tsv", "participant_id\tAGE_AT_SCAN\tgroup\tsite_id\tiq\n"
                                     "sub-01\t31.5\tASD\tNYU\t101\nsub-03\t40\tTD\tUM\tn/a\n")
    config = _config(raw, tmp_path / "deriv", "raw")
    config["bids"]["participants_columns"] = {"age": "AGE_AT_SCAN", "diagnosis": "group", "site": "site_id"}
    table = bids.index_dataset(config).set_index("subject")
    assert table.loc["01", "age"] == 31.5 and table.loc["01", "diagnosis"] == "ASD" and table.loc["01", "site"] == "NYU"
    assert table.loc["01", "iq"] == 101
    assert pd.isna(table.loc["02", "age"]) and pd.isna(table.loc["02", "site"])  # not in participants.tsv
    assert pd.isna(table.loc["02", "sex"])


def test_sidecar_inheritance(tmp_path):
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"], "02": ["func/sub-02_task-rest_run-1"]},
                    tr=None)
    _touch(raw / "task-rest_bold.json", json.dumps({"RepetitionTime": 2.5, "TaskName": "rest"}))
    _touch(raw / "sub-02" / "sub-02_task-rest_bold.json", json.dumps({"RepetitionTime": 0.8}))
    table = bids.index_dataset(_config(raw, tmp_path / "deriv", "raw")).set_index("subject")
    assert table.loc["01", "tr"] == 2.5 and table.loc["02", "tr"] == 0.8
    # A sidecar for another task does not apply.
    assert bids.sidecar_metadata(raw / "sub-01" / "func" / "sub-01_task-rest_run-1_bold.nii.gz", raw)["TaskName"] == "rest"
    _touch(raw / "task-nback_bold.json", json.dumps({"RepetitionTime": 9.0}))
    assert bids.sidecar_metadata(raw / "sub-01" / "func" / "sub-01_task-rest_run-1_bold.nii.gz", raw)["RepetitionTime"] == 2.5


def test_split_space():
    assert bids.split_space("MNI152NLin2009cAsym_res-2") == ("MNI152NLin2009cAsym", "2")
    assert bids.split_space("MNI152NLin6Asym") == ("MNI152NLin6Asym", None)


# -- command line and rule -----------------------------------------------------------------------------
def test_cli_index_writes_parquet_and_checks_hash(small_demo, tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(_demo_config(small_demo)))
    out = tmp_path / "runs.parquet"
    cmd = [sys.executable, "-m", "brainfoundry.cli", "index", "--config", str(config_file), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    table = pd.read_parquet(out)
    expected = load_run_table(_demo_config(small_demo))
    assert table["run_id"].tolist() == expected.index.tolist()
    columns = ["subject", "task", "run", "tr", "bold", "mask", "confounds", "age", "sex", "diagnosis", "site", "bucket", "split"]
    pd.testing.assert_frame_equal(table.set_index("run_id")[columns], expected[columns], check_dtype=False)
    bad = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "x.parquet"), "--expect-hash", "0" * 16],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "dataset changed" in bad.stderr
    assert not (tmp_path / "x.parquet").exists()


def _env_with_venv() -> dict:
    """The rule's shell calls `brainfoundry`: put this interpreter's scripts first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.workflow
def test_bids_index_rule_runs(small_demo, tmp_path):
    config = _demo_config(small_demo)
    config["atlas"].update(path=str(small_demo / "atlas" / "atlas-Demo100_dseg.nii.gz"),
                           labels=str(small_demo / "atlas" / "atlas-Demo100_dseg.tsv"))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run([bin_path("snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(config_file), "--cores", "1", "results/bids_index/runs.parquet"],
                            capture_output=True, text=True, timeout=600, env=_env_with_venv())
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "results" / "bids_index" / "runs.parquet")
    assert len(table) == 4 and {"bucket", "split", "bold"} <= set(table.columns)


def test_derivatives_subject_without_preproc_bold(tmp_path, caplog):
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"], "02": ["func/sub-02_task-rest_run-1"]})
    deriv = _deriv_tree(tmp_path / "deriv", raw)
    for path in (deriv / "sub-02" / "func").glob("*desc-preproc_bold*"):
        path.unlink()  # e.g. fMRIPrep failed for this subject
    with pytest.raises(InputError, match=r"sub-02: subject has no desc-preproc_bold in space MNI152NLin2009cAsym res 2"):
        bids.index_dataset(_config(raw, deriv))
    with caplog.at_level(logging.WARNING, logger="brainfoundry.bids"):
        assert bids.index_dataset(_config(raw, deriv, on_invalid="skip"))["subject"].tolist() == ["01"]


def test_index_config_keeps_only_what_shapes_the_table(small_demo):
    config = _demo_config(small_demo)
    subset = bids.index_config(config)
    assert "pfc" not in subset and "denoise" not in subset and "atlas" not in subset
    assert bids.table_hash(load_run_table(subset)) == bids.table_hash(load_run_table(config))


def test_multi_echo_raw_runs_are_one_run(tmp_path):
    raw = _raw_tree(tmp_path / "raw", {"01": [f"func/sub-01_task-rest_run-1_echo-{e}" for e in (1, 2, 3)]})
    table = bids.index_dataset(_config(raw, tmp_path / "deriv", "raw"))
    assert table["run_id"].tolist() == ["sub-01_task-rest_run-1"]
    assert table.loc[0, "raw_bold"].endswith("sub-01_task-rest_run-1_echo-1_bold.nii.gz")
    assert table.loc[0, "bold"].endswith("sub-01_task-rest_run-1_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz")


# -- names pybids cannot index: each named, skipped or refused by bids.on_invalid ---------------------
def _two_subjects(tmp_path) -> tuple[Path, Path]:
    raw = _raw_tree(tmp_path / "raw", {"01": ["func/sub-01_task-rest_run-1"], "02": ["func/sub-02_task-rest_run-1"]})
    return raw, _deriv_tree(tmp_path / "deriv", raw)


@pytest.mark.parametrize("entry", ["raw", "derivatives"])
def test_non_utf8_file_name_is_named_by_its_folder(tmp_path, entry, caplog):
    raw, deriv = _two_subjects(tmp_path)
    folder = (raw if entry == "raw" else deriv) / "sub-01" / "func"
    with open(os.fsencode(folder) + b"/notes\xff.txt", "wb"):  # e.g. a Latin-1 name on a UTF-8 system
        pass
    with pytest.raises(InputError, match=r"sub-01/func: file name b'notes\\xff.txt' is not valid UTF-8") as info:
        bids.index_dataset(_config(raw, deriv, entry))
    assert info.value.source == str(folder) and "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="brainfoundry.bids"):
        table = bids.index_dataset(_config(raw, deriv, entry, on_invalid="skip"))
    assert table["run_id"].tolist() == ["sub-01_task-rest_run-1", "sub-02_task-rest_run-1"]
    assert f"skipping: {folder}: file name" in caplog.text


@pytest.mark.parametrize("entry", ["raw", "derivatives"])
def test_invalid_subject_label_names_the_folder_and_injects_nothing(tmp_path, entry, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an injected `touch x` would land
    raw, deriv = _two_subjects(tmp_path)
    root = raw if entry == "raw" else deriv
    bad = root / "sub-11;touch x;"
    _touch(bad / "func" / "sub-11;touch x;_task-rest_run-1_bold.nii.gz")
    _touch(bad / "func" / f"sub-11;touch x;_task-rest_run-1_{SPACE_ENTS}_desc-preproc_bold.nii.gz")
    with pytest.raises(InputError, match=r"not a valid BIDS sub folder: the label '11;touch x;'") as info:
        bids.index_dataset(_config(raw, deriv, entry))
    assert info.value.source == str(bad)
    with caplog.at_level(logging.WARNING, logger="brainfoundry.bids"):
        table = bids.index_dataset(_config(raw, deriv, entry, on_invalid="skip"))
    assert table["subject"].tolist() == ["01", "02"]
    assert f"skipping: {bad}" in caplog.text
    assert not list(tmp_path.rglob("x"))


@pytest.mark.parametrize("entry", ["raw", "derivatives"])
def test_directory_cycle_is_reported_as_a_cycle(tmp_path, entry, caplog):
    raw, deriv = _two_subjects(tmp_path)
    link = (raw if entry == "raw" else deriv) / "sub-01" / "func" / "loop"
    link.symlink_to("..", target_is_directory=True)
    with pytest.raises(InputError, match=r"func/loop: directory cycle: this symlink leads back to its own parent "
                                         r"folder .*sub-01$") as info:
        bids.index_dataset(_config(raw, deriv, entry))
    assert info.value.source == str(link)
    with caplog.at_level(logging.WARNING, logger="brainfoundry.bids"):
        table = bids.index_dataset(_config(raw, deriv, entry, on_invalid="skip"))
    assert table["run_id"].tolist() == ["sub-01_task-rest_run-1", "sub-02_task-rest_run-1"]

