"""Start-up checks (brainfoundry.checks): each problem a ConfigError/InputError naming the key or file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from brainfoundry.checks import (
    check_atlas,
    check_config,
    check_region_counts,
    check_run_table,
    schema_errors,
    short_series,
)
from brainfoundry.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "config.schema.yaml"


def _template(entry="timeseries"):
    return yaml.safe_load((REPO / "config" / "templates" / f"{entry}.yaml").read_text())


def test_schema_errors_name_the_key_and_the_nearest_valid_ones():
    config = _template()
    config["atlass"] = {}
    config["timeseries"]["standardise"] = "zscore"
    config["timeseries"]["standardize"] = "scale"
    config["shards"]["window"] = 1
    with pytest.raises(ConfigError) as err:
        check_config(config, SCHEMA)
    text = str(err.value)
    assert text.startswith("config key 'atlass': unknown key; did you mean atlas?")
    assert "'shards.window': 1 is less than the minimum of 2" in text
    assert len(text.splitlines()) <= 5 and "... and 1 more" in text


def test_unknown_key_without_a_near_one_lists_the_valid_keys():
    found = schema_errors({**_template(), "zzzz": 1}, yaml.safe_load(SCHEMA.read_text()))
    assert found[0][0] == "zzzz" and "valid keys here: atlas, bids" in found[0][1]


def test_the_demo_config_and_the_templates_validate():
    schema = yaml.safe_load(SCHEMA.read_text())
    for path in [REPO / "config" / "config.yaml", REPO / "config" / "abide.yaml",
                 *sorted((REPO / "config" / "templates").glob("*.yaml"))]:
        assert schema_errors(yaml.safe_load(path.read_text()), schema) == [], path


def _labels(tmp_path, coords=False):
    table = pd.DataFrame({"index": [1, 2], "name": ["a", "b"]})
    if coords:
        table["x"], table["y"], table["z"] = [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]
    path = tmp_path / "labels.tsv"
    table.to_csv(path, sep="\t", index=False)
    return str(path)


def test_atlas_requirements_per_entry_point(tmp_path):
    config = _template()
    config["atlas"].update(path=None, labels=None)
    with pytest.raises(ConfigError, match="atlas.labels.*atlas.path / atlas.url"):
        check_atlas(config)
    config["atlas"]["labels"] = _labels(tmp_path)
    check_atlas(config)  # learned embeddings in the template: labels alone are enough
    config["atlas"]["path"] = str(tmp_path / "none.nii.gz")
    with pytest.raises(ConfigError, match="'atlas.path'.*none.nii.gz.*atlas.path: null"):
        check_atlas(config)
    derivatives = _template("derivatives")
    derivatives["atlas"]["path"] = None
    with pytest.raises(ConfigError, match="'atlas.path'.*derivatives entry point"):
        check_atlas(derivatives)


def test_families_using_centroids_need_coordinates(tmp_path):
    config = _template()
    config["atlas"]["labels"] = _labels(tmp_path)
    config["pretrain"]["families"] = ["brainlm", "brainmass"]
    del config["pretrain"]["brainmass"]["model"]["spatial_embedding"]
    with pytest.raises(ConfigError, match=r"\['brainmass'\].*pretrain.brainmass.model.spatial_embedding: learned"):
        check_atlas(config)
    config["atlas"]["labels"] = _labels(tmp_path, coords=True)
    check_atlas(config)


def _runs(subjects, splits, **columns):
    return pd.DataFrame({"subject": subjects, "split": splits, "site": None, **columns},
                        index=[f"sub-{s}_task-rest" for s in subjects])


def test_run_table_checks(caplog):
    config = _template()
    empty = _runs([], [])
    empty.attrs["dropped"] = [{"run_id": "sub-1", "file_id": "1", "reason": "file not found: /x/1.tsv"}]
    with pytest.raises(ConfigError, match="no runs left.*1 phenotype rows.*1 file not found"):
        check_run_table(config, empty)
    with caplog.at_level("WARNING"):
        check_run_table(config, _runs(["1", "2", "3"], ["train", "train", "val"]))
    assert "'shards.split_ratios': the test split is empty (subjects: train 2, val 1, test 0 of 3" in caplog.text
    check_run_table(config, _runs(["1", "2", "3"], ["train", "val", "test"]))

    wants = {**config, "evaluate": {"tasks": ["phenotype"], "targets": ["diagnosis"], "pseudo_label_targets": []}}
    with pytest.raises(ConfigError, match=r"'evaluate.targets'.*\['diagnosis'\]"):
        check_run_table(wants, _runs(["1", "2", "3"], ["train", "val", "test"]))
    check_run_table(wants, _runs(["1", "2", "3"], ["train", "val", "test"], diagnosis=["a", "b", "a"]))
    lcm = {**config, "pretrain": {"families": ["lcm"], "lcm": {"model": {"env": [{"name": "age", "kind": "continuous"}]}}}}
    with pytest.raises(ConfigError, match=r"'pretrain.lcm.model.env'.*\['age'\]"):
        check_run_table(lcm, _runs(["1", "2", "3"], ["train", "val", "test"]))


def test_shape_checks():
    files = {"a": "/d/a.tsv", "b": "/d/b.tsv", "c": "/d/c.tsv"}
    config = {"pretrain": {"trainer": {"window": 100}}}
    check_region_counts({"a": (120, 5), "b": (90, 5), "c": (200, 5)}, files, config)
    with pytest.raises(InputError, match=r"than most files \(5\): /d/b.tsv: 4"):
        check_region_counts({"a": (120, 5), "b": (90, 4), "c": (200, 5)}, files, config)
    shapes = {"a": (120, 5), "b": (90, 5), "c": (200, 5)}
    assert short_series(shapes, files, config, "skip") == ["b"]
    assert short_series(shapes, files, config, "keep") == []
    with pytest.raises(InputError, match=r"/d/b.tsv.*pretrain.trainer.window = 100.*b \(90\)"):
        short_series(shapes, files, config, "error")
