"""Trainer settings (:mod:`brainfoundry.train_settings`): one name and one default per setting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainfoundry.errors import ConfigError
from brainfoundry.evaluate.settings import (
    CVSettings,
    EvalSettings,
    FinetuneSettings,
    ForecastBaselineSettings,
)
from brainfoundry.models import FAMILIES, MODEL_WINDOWS
from brainfoundry.train_settings import TrainConfig, family_window, resolve_settings
from brainfoundry.workflow.pretrain import check_workflow_settings, workflow_settings

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "config" / "config.schema.yaml").read_text())["properties"]

#: Schema sections whose keys are the fields of a dataclass, which owns their defaults.
DATACLASS_SECTIONS = {
    ("pretrain", "trainer"): TrainConfig,
    **{("pretrain", family, "trainer"): TrainConfig for family in FAMILIES},
    ("evaluate",): EvalSettings,
    ("evaluate", "cv"): CVSettings,
    ("evaluate", "finetune"): FinetuneSettings,
    ("evaluate", "forecast_baselines"): ForecastBaselineSettings,
}


def _section(path: tuple[str, ...]) -> dict:
    node = {"properties": SCHEMA}
    for part in path:
        node = node["properties"][part]
    return node


def _dataclass_default(cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@pytest.mark.parametrize("path", sorted(DATACLASS_SECTIONS), ids=".".join)
def test_dataclass_sections_have_one_name_and_one_default(path):
    """Each key a dataclass field; no ``default:`` in the schema beside the dataclass's (which owns it)."""
    cls, node = DATACLASS_SECTIONS[path], _section(path)
    fields = {f.name for f in dataclasses.fields(cls)}
    properties = node.get("properties", {})
    assert not set(properties) - fields, f"{'.'.join(path)}: schema keys that {cls.__name__} lacks"
    both = {key: (spec["default"], _dataclass_default(cls, key)) for key, spec in properties.items()
            if isinstance(spec, dict) and "default" in spec}
    assert not both, (f"{'.'.join(path)}: defaults in the schema and in {cls.__name__} (schema, dataclass): "
                      f"{both}; keep the dataclass's")
    assert "default" not in node or node["default"] == {}, f"{'.'.join(path)}: a schema default for the section"


def test_brainlm_window_conflicts_name_both_keys():
    section = {"trainer": {"window": 100}, "brainlm": {"model": {"window": 120, "patch_size": 20}}}
    with pytest.raises(ConfigError, match=r"pretrain\.trainer\.window.*pretrain\.brainlm\.model\.window = 120"):
        resolve_settings("brainlm", {"pretrain": section})
    # Unset, the model's own default is what the trainer window is compared with.
    per_family = {"brainlm": {"trainer": {"window": 100}}}
    with pytest.raises(ConfigError, match=rf"pretrain\.brainlm\.trainer\.window.*model\.window \(default "
                                          rf"{MODEL_WINDOWS['brainlm'][1]}\)"):
        resolve_settings("brainlm", per_family)
    with pytest.raises(ConfigError, match=r"trainer\.window.*is 50"):
        resolve_settings("brainlm", {}, ["trainer.window=50"])
    # Agreeing keys are fine; a model.window override is the model key.
    _, cfg = resolve_settings("brainlm", {"pretrain": {**section, "trainer": {"window": 120}}})
    assert cfg.window == 120
    _, cfg = resolve_settings("brainlm", {"pretrain": section}, ["model.window=100"])
    assert cfg.window == 100


def test_scmbm_frame_points_conflict_with_its_own_trainer_window_only():
    with pytest.raises(ConfigError, match=r"pretrain\.scmbm\.trainer\.window.*pretrain\.scmbm\.model\.frame_points = 2"):
        resolve_settings("scmbm", {"scmbm": {"trainer": {"window": 8}, "model": {"frame_points": 2}}})
    # The shared series window is for the families without their own: an SC-MBM frame is not a series window.
    _, cfg = resolve_settings("scmbm", {"trainer": {"window": 120}, "scmbm": {"model": {"frame_points": 2}}})
    assert cfg.window == 2


def test_window_conflict_is_caught_at_parse_time_without_torch(tmp_path):
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('torch imported while parsing')\n")
    code = ("from brainfoundry.errors import ConfigError\n"
            "from brainfoundry.workflow.pretrain import check_workflow_settings\n"
            "config = {'shards': {'window': 60}, 'pretrain': {'families': ['brainlm', 'brainmass'],\n"
            "          'brainlm': {'trainer': {'window': 60}, 'model': {'window': 40}}}}\n"
            "try:\n"
            "    check_workflow_settings(config)\n"
            "except ConfigError as error:\n"
            "    print(error)\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO / 'src'}", "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain.brainlm.trainer.window" in done.stdout and "pretrain.brainlm.model.window = 40" in done.stdout


def test_shards_window_reaches_only_families_without_their_own():
    config = {"shards": {"window": 60}, "pretrain": {"brainlm": {"model": {"window": 40, "patch_size": 20}}}}
    assert check_workflow_settings(config) == list(FAMILIES)
    windows = {f: resolve_settings(f, workflow_settings(config, f))[1].window for f in FAMILIES}
    assert windows == {"brainlm": 40, "brainmass": 60, "lcm": 60, "scmbm": MODEL_WINDOWS["scmbm"][1]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unset_window_is_the_model_dataclass_default(family):
    pytest.importorskip("torch")
    model, cfg = resolve_settings(family, {})
    config_class = FAMILIES[family][0]
    if family in MODEL_WINDOWS:
        key = MODEL_WINDOWS[family][0]
        expected = getattr(config_class(), key)  # the dataclass default the family's model is built with
    else:
        expected = TrainConfig().window
    assert cfg.window == family_window(family, model, cfg) == expected
    assert family_window(family, {}, TrainConfig()) == expected


@pytest.mark.parametrize("name", ["config.yaml", "abide.yaml", "templates/timeseries.yaml", "templates/raw.yaml",
                                  "templates/derivatives.yaml"])
def test_shipped_configs_have_no_conflicting_window(name):
    config = yaml.safe_load((REPO / "config" / name).read_text())
    families = check_workflow_settings(config)
    for family in families:
        _, cfg = resolve_settings(family, workflow_settings(config, family))
        own = MODEL_WINDOWS.get(family)
        if own:
            assert cfg.window == dict(config["pretrain"].get(family, {}).get("model") or {}).get(own[0], own[1])
