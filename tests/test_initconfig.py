"""``brainfoundry init``: inspect a folder, guess the entry point and columns, write a valid config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from brainfoundry.checks import schema_errors
from brainfoundry.cli import main as cli
from brainfoundry.errors import InputError
from brainfoundry.initconfig import inspect_folder, write_config
from brainfoundry.models import make_config
from brainfoundry.train_settings import resolve_settings
from brainfoundry.workflow.pretrain import workflow_settings

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.schema.yaml").read_text())


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_fmriprep_derivatives(tmp_path):
    func = tmp_path / "deriv" / "sub-01" / "func"
    _touch(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz")
    _touch(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.json",
           json.dumps({"RepetitionTime": 0.8}))
    found = inspect_folder(tmp_path)
    assert found["entry_point"] == "derivatives" and found["derivatives_dir"] == str(tmp_path / "deriv")
    assert found["tr"] == 0.8
    config, notes = write_config(tmp_path, tmp_path / "my.yaml")
    assert schema_errors(yaml.safe_load((tmp_path / "my.yaml").read_text()), SCHEMA) == []
    assert config["atlas"]["path"] is None and any("atlas.path" in n for n in notes)


def test_raw_bids(tmp_path):
    _touch(tmp_path / "bids" / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_task-rest_bold.nii.gz")
    _touch(tmp_path / "bids" / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_task-rest_bold.json",
           json.dumps({"RepetitionTime": 2.0}))
    found = inspect_folder(tmp_path)
    assert found["entry_point"] == "raw" and found["bids_dir"] == str(tmp_path / "bids")


def test_series_and_table_with_file_ids_sites_and_phenotypes(tmp_path):
    series = tmp_path / "rois"
    series.mkdir()
    ids = ["NYU_0051", "NYU_0052", "UM_0061"]
    for i in ids:
        np.save(series / f"{i}_rois_cc200.npy", np.zeros((90, 6)))
    pd.DataFrame({"SUB_ID": [51, 52, 61], "FILE_ID": ids, "SITE_ID": ["NYU", "NYU", "UM"], "SEX": [1, 2, 1],
                  "AGE_AT_SCAN": [10.0, 11.0, 12.0]}).to_csv(tmp_path / "pheno.csv", index=False)
    config, _ = write_config(tmp_path, tmp_path / "cfg" / "my.yaml")
    ts = config["timeseries"]
    assert config["entry_point"] == "timeseries" and ts["file_pattern"] == "{file_id}_rois_cc200.npy"
    assert ts["columns"] == {"subject": "SUB_ID", "file_id": "FILE_ID", "site": "SITE_ID", "age": "AGE_AT_SCAN",
                             "sex": "SEX"}
    assert [e["name"] for e in config["pretrain"]["lcm"]["model"]["env"]] == ["age", "sex", "site"]
    assert config["shards"]["window"] == 90 == config["pretrain"]["brainlm"]["model"]["window"]
    assert 90 % config["pretrain"]["brainlm"]["model"]["patch_size"] == 0
    # Every family's model keys build its config, and each trains on the 90-point window.
    for family in config["pretrain"]["families"]:
        model, cfg = resolve_settings(family, workflow_settings(config, family))
        make_config(family, model)
        assert cfg.window == 90, family
    labels = pd.read_csv(config["atlas"]["labels"], sep="\t")  # written through runfiles: 6 parcels
    assert list(labels["name"]) == [f"parcel_{i}" for i in range(1, 7)]


def test_no_table_is_a_clear_error(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((10, 3)))
    with pytest.raises(InputError, match="no table"):
        inspect_folder(tmp_path)
    assert cli(["init", str(tmp_path), "--out", str(tmp_path / "x.yaml")]) == 1
    assert "brainfoundry init: error:" in capsys.readouterr().err
