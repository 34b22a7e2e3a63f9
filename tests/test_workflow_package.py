"""brainfoundry.workflow: nothing Snakemake imports while it builds the DAG imports torch.

A ``torch`` package that raises on import is put first on PYTHONPATH; the rule helpers, the trainer's
settings and the model registry still import, and ``snakemake -n`` still plans the demo (every Slurm
job re-parses the workflow, so torch there would cost each job seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainfoundry import demo
from conftest import REPO, bin_path

RULE_FILES = sorted(p.stem for p in (REPO / "workflow" / "rules").glob("*.smk"))
MESSAGE = "torch imported while Snakemake builds the DAG"


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict[str, str]:
    """An environment whose `import torch` raises."""
    root = tmp_path_factory.mktemp("no_torch")
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(f"raise ImportError({MESSAGE!r})\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _python(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_the_stand_in_torch_raises(no_torch):
    """The check can fail: the trainer itself needs torch, and gets the stand-in."""
    result = _python(no_torch, "import brainfoundry.train")
    assert result.returncode != 0 and MESSAGE in result.stderr, result.stderr[-2000:]


def test_one_helper_module_per_rule_file():
    helpers = {p.stem for p in (REPO / "src" / "brainfoundry" / "workflow").glob("*.py")} - {"__init__"}
    # pfc.smk needs no helper; evaluate.smk's are brainfoundry.evaluate.workflow (its own package).
    assert helpers == set(RULE_FILES) - {"pfc", "evaluate"}, (helpers, RULE_FILES)


def test_helpers_settings_and_registry_import_without_torch(no_torch):
    modules = [f"brainfoundry.workflow.{name}" for name in RULE_FILES if name not in ("pfc", "evaluate")]
    modules += ["brainfoundry.evaluate.workflow", "brainfoundry.evaluate.settings", "brainfoundry.train_settings",
                "brainfoundry.models"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "from brainfoundry.models import FAMILIES\n"
            "from brainfoundry.train_settings import TrainConfig, resolve_settings\n"
            "from brainfoundry.workflow.pretrain import check_workflow_settings\n"
            "assert sorted(FAMILIES) == ['brainlm', 'brainmass', 'lcm', 'scmbm'] and 'lcm' in FAMILIES\n"
            "TrainConfig(steps=3).validate()\n"
            "resolve_settings('brainlm', {'pretrain': {'trainer': {'steps': 3}}})\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    result = _python(no_torch, code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_trainer_keys_are_still_checked_at_parse_time(no_torch):
    code = ("from brainfoundry.errors import ConfigError\n"
            "from brainfoundry.workflow.pretrain import check_workflow_settings\n"
            "for bad, key in (({'trainer': {'stepz': 3}}, 'pretrain.trainer'), ({'families': ['gpt']}, 'pretrain.families')):\n"
            "    try:\n"
            "        check_workflow_settings({'pretrain': bad})\n"
            "    except ConfigError as error:\n"
            "        assert key in str(error), error\n"
            "    else:\n"
            "        raise AssertionError(bad)\n"
            "print('ok')\n")
    result = _python(no_torch, code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_train_module_re_exports_the_same_settings():
    pytest.importorskip("torch")
    from brainfoundry import train, train_settings

    assert train.TrainConfig is train_settings.TrainConfig and train.resolve_settings is train_settings.resolve_settings


@pytest.mark.workflow
@pytest.mark.parametrize("entry", ["derivatives", "raw"])
def test_snakemake_plans_the_demo_without_torch(no_torch, tmp_path, entry):
    demo.write_demo_dataset(tmp_path / "demo_data", n_subjects=2, n_volumes=12, two_run_subjects=0)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if entry == "raw":
        (tmp_path / "license.txt").write_text("not a license: nothing runs\n")
        config.update(entry_point="raw", derivatives_dir="derivatives/fmriprep")
        config["fmriprep"]["fs_license"] = str(tmp_path / "license.txt")
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = subprocess.run([bin_path("snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(configfile), "--cores", "2"],
                            capture_output=True, text=True, env=no_torch, timeout=600, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert MESSAGE not in log
    for rule in ("parcellate", "pfc", "shard", "pretrain", "evaluate_task") + (("fmriprep",) if entry == "raw" else ()):
        assert f"\n{rule} " in log, (rule, log[-3000:])
