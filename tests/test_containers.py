"""Image definitions, conda env and the workflow's container/conda directives.

- the Dockerfiles and Apptainer definition files parse (dockerfile-parse, spython) and are pinned;
- the pins agree: containers/requirements.txt == envs/brainfoundry.yaml, torch in the Dockerfiles, the
  .def tests, the env and the Makefile, Python in the base image and the env; every pin satisfies
  pyproject.toml's range and every dependency is pinned;
- every rule of the workflow (all three entry points, read through Snakemake's own API) names a
  container (our image, or the pinned upstream fMRIPrep image for fmriprep) and a conda env from envs/;
- optionally (podman present and working): our CPU image builds from a local root filesystem and runs
  a brainfoundry step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

CONTAINERS = REPO / "containers"
DOCKERFILES = {"cpu": CONTAINERS / "Dockerfile.cpu", "gpu": CONTAINERS / "Dockerfile.gpu"}
DEFS = {"cpu": CONTAINERS / "brainfoundry-cpu.def", "gpu": CONTAINERS / "brainfoundry-gpu.def"}
ENV_FILE = REPO / "envs" / "brainfoundry.yaml"
REQUIREMENTS = CONTAINERS / "requirements.txt"


def _project() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _dockerfile(path: Path):
    from dockerfile_parse import DockerfileParser

    with open(path, "rb") as fh:
        parser = DockerfileParser(fileobj=fh)
        # Read everything while the file is open; the parser reads lazily.
        return parser.structure, parser.baseimage, parser.args


def _pins_from_lines(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = str(line).split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{line!r} is not an exact pin"
        pins[req.name.lower().replace("_", "-")] = specs[0].version
    return pins


def _requirements_pins() -> dict[str, str]:
    return _pins_from_lines(REQUIREMENTS.read_text().splitlines())


def _env() -> dict:
    return yaml.safe_load(ENV_FILE.read_text())


def _env_pip_lines() -> list[str]:
    for dep in _env()["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            return dep["pip"]
    raise AssertionError(f"{ENV_FILE}: no pip section")


def _env_conda_pins() -> dict[str, str]:
    pins = {}
    for dep in _env()["dependencies"]:
        if isinstance(dep, str):
            name, _, version = dep.partition("=")
            pins[name] = version
    return pins


def _makefile_torch() -> str:
    match = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile: TORCH_SPEC ?= torch==<version> not found"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------
# Image definitions parse and are pinned


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_parses_and_is_pinned(flavour):
    structure, base, args = _dockerfile(DOCKERFILES[flavour])
    instructions = [i["instruction"] for i in structure if i["instruction"] != "COMMENT"]
    # Only ARGs may come before the first FROM; exactly one stage.
    first_from = instructions.index("FROM")
    assert set(instructions[:first_from]) <= {"ARG"}
    assert instructions.count("FROM") == 1
    # The base image is a full, versioned tag, never latest.
    assert re.fullmatch(r"docker\.io/library/python:3\.\d+\.\d+-slim-bookworm", base), base
    assert args["TORCH_VERSION"] == _makefile_torch()
    # Every COPY source exists in the build context (the repository root).
    for instr in structure:
        if instr["instruction"] == "COPY":
            *sources, _dest = instr["value"].split()
            for src in sources:
                assert (REPO / src).exists(), f"{DOCKERFILES[flavour].name}: COPY source {src} missing"
    # The build checks itself: dependencies consistent and the CLI starts.
    run_steps = " ".join(i["value"] for i in structure if i["instruction"] == "RUN")
    assert "pip check" in run_steps and "brainfoundry --help" in run_steps
    assert "containers/requirements.txt" in run_steps
    if flavour == "cpu":
        assert "whl/cpu" in args["TORCH_SOURCE"]
    else:
        assert "whl/${TORCH_CUDA}" in args["TORCH_SOURCE"] and args["TORCH_CUDA"].startswith("cu")


@pytest.mark.parametrize("flavour", sorted(DEFS))
def test_apptainer_definition_parses_and_builds_from_our_image(flavour):
    from spython.main.parse.parsers import SingularityParser

    text = DEFS[flavour].read_text()
    recipe = SingularityParser(str(DEFS[flavour])).recipe["spython-base"]
    version = _project()["version"]
    assert recipe.fromHeader == f"brainfoundry/brainfoundry-{flavour}:{version}"
    assert re.search(r"^Bootstrap:\s*(docker-daemon|docker-archive|localimage)\s*$", text, re.M)
    # The image self-test pins the same torch as everything else.
    tests = " ".join(recipe.install)
    assert f"== '{_makefile_torch()}'" in tests
    assert recipe.cmd and "brainfoundry" in recipe.cmd
    # The tag the definition bootstraps from is the one the Dockerfile's header says to build.
    assert f"-t brainfoundry/brainfoundry-{flavour}:{version}" in DOCKERFILES[flavour].read_text()


# ---------------------------------------------------------------------------------------------------
# Pins agree


def test_requirements_and_conda_env_pin_the_same_versions():
    env_pins = _pins_from_lines(_env_pip_lines())
    torch = env_pins.pop("torch")
    assert Version(torch).public == _makefile_torch(), f"{ENV_FILE}: torch {torch}"
    assert Version(torch).local == "cpu", f"{ENV_FILE}: torch must be the CPU build"
    assert env_pins == _requirements_pins()


def test_pins_satisfy_pyproject_and_cover_every_dependency():
    pins = _requirements_pins() | {"torch": _makefile_torch()}
    deps = [Requirement(d) for d in _project()["dependencies"]]
    names = {d.name.lower().replace("_", "-") for d in deps}
    assert names == set(pins), f"pinned {sorted(set(pins) ^ names)} differ from pyproject dependencies"
    for dep in deps:
        pinned = pins[dep.name.lower().replace("_", "-")]
        assert dep.specifier.contains(pinned, prereleases=True), f"{dep} excludes the pinned {pinned}"


def test_python_version_agrees_between_images_and_env():
    env_python = _env_conda_pins()["python"]
    for path in DOCKERFILES.values():
        _, base, _ = _dockerfile(path)
        assert base.split(":")[1].startswith(env_python + "-"), f"{path.name}: {base} vs env python {env_python}"
    requires = _project()["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(env_python)


# ---------------------------------------------------------------------------------------------------
# Every rule names a container and a conda env


def _synthetic_run_table(path: Path, n_subjects: int = 3) -> Path:
    rows = []
    for i in range(n_subjects):
        sub = f"{i + 1:02d}"
        rows.append(
            {
                "run_id": f"sub-{sub}_task-rest",
                "subject": sub,
                "session": None,
                "task": "rest",
                "run": None,
                "dataset": "synthetic",
                "site": "A",
                "tr": 2.0,
                "bold": f"/nonexistent/sub-{sub}_bold.nii.gz",
                "mask": f"/nonexistent/sub-{sub}_mask.nii.gz",
                "confounds": f"/nonexistent/sub-{sub}_confounds.tsv",
                "raw_bold": f"/nonexistent/raw/sub-{sub}_bold.nii.gz",
                "timeseries_file": f"/nonexistent/sub-{sub}.1D",
                "age": 30.0 + i,
                "sex": "F",
                "diagnosis": ["ASD", "control"][i % 2],
            }
        )
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _load_rules(entry_point: str, run_table: Path, workdir: Path, atlas: dict) -> dict:
    """The parsed rules of the workflow for one entry point, through Snakemake's API."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    config = {"entry_point": entry_point, "run_table": str(run_table), "atlas": atlas}
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"], config=config),
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        workflow = workflow_api._workflow  # the parsed workflow; rules are read, nothing runs
        rules = {}
        for rule in workflow.rules:
            env = rule.conda_env
            if env is not None and not str(env).startswith("/"):
                env = Path(str(rule.snakefile)).parent / str(env)  # relative to the rule's file
            rules[rule.name] = {
                "container": rule.container_img,
                "conda": None if env is None else Path(str(env).removeprefix("file://")).resolve(),
                # `run:` blocks execute inside Snakemake itself: no container or env can apply.
                "runs_in_snakemake": rule.is_run or rule.norun,
                "local": workflow.is_local(rule),
            }
        return rules


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    table = _synthetic_run_table(tmp / "runs.parquet")
    # The start-up checks (brainfoundry.checks) want the configured atlas to exist: the demo's, written here.
    from brainfoundry import demo

    demo.write_demo_dataset(tmp / "demo_data", n_subjects=2, n_volumes=12, two_run_subjects=0)
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["atlas"]
    atlas = {key: str(tmp / "demo_data" / "atlas" / Path(base[key]).name) for key in ("path", "labels")}
    rules: dict = {}
    cwd = os.getcwd()
    try:
        for entry in ("raw", "derivatives", "timeseries"):
            os.chdir(REPO)
            rules.update(_load_rules(entry, table, REPO, atlas))
    finally:
        os.chdir(cwd)
    return rules


def test_every_rule_names_its_container_and_conda_env(workflow_rules):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    fmriprep_image = config["fmriprep"]["image"]
    assert re.fullmatch(r"docker://nipreps/fmriprep:\d+\.\d+\.\d+", fmriprep_image), fmriprep_image
    assert fmriprep_image.endswith(":" + config["fmriprep"]["version"])
    assert config["fmriprep"]["runner"] == "apptainer", "the fmriprep container is checked for the apptainer runner"
    version = _project()["version"]
    ours = re.compile(rf"docker://brainfoundry/brainfoundry-(cpu|gpu):{re.escape(version)}")
    env_file = ENV_FILE.resolve()
    problems, checked = [], 0
    for name, rule in sorted(workflow_rules.items()):
        if rule["runs_in_snakemake"]:
            # Target rules and small `run:` blocks execute in the Snakemake process; they must stay
            # local rules so that they never become cluster jobs that would run outside any image.
            if not rule["local"]:
                problems.append(f"{name}: a run: block / no-op rule that is not a local rule")
            continue
        checked += 1
        if name.startswith("fmriprep"):
            # The upstream image, pinned by version; fMRIPrep (FSL, ANTs, AFNI, FreeSurfer) has no conda env.
            if rule["container"] != fmriprep_image:
                problems.append(f"{name}: container {rule['container']} is not the pinned {fmriprep_image}")
            continue
        if not rule["container"]:
            problems.append(f"{name}: no container")
        elif not ours.fullmatch(str(rule["container"])):
            problems.append(f"{name}: container {rule['container']} is not our image at version {version}")
        if rule["conda"] is None:
            problems.append(f"{name}: no conda env")
        elif rule["conda"] != env_file:
            problems.append(f"{name}: conda env {rule['conda']} is not {env_file}")
    assert not problems, "\n".join(problems)
    # The workflow has real rules for every stage the container check must cover.
    assert {"parcellate", "pfc", "shard", "manifest", "atlas_prepare"} <= set(workflow_rules), sorted(workflow_rules)
    assert any(n.startswith("fmriprep") for n in workflow_rules), "the raw entry point's fMRIPrep rules were not loaded"
    assert checked >= 6


# ---------------------------------------------------------------------------------------------------
# Build and run the CPU image with podman (needs podman, root and a local base image: no registry here)

PODMAN = CONTAINERS / "podman.sh"
PODMAN_BASE = os.environ.get("BF_PODMAN_BASE", "localhost/bf-base:bookworm")


def _podman(*args, timeout=600):
    return subprocess.run(["bash", str(PODMAN), *args], capture_output=True, text=True, timeout=timeout)


def test_cpu_image_builds_and_runs_a_step_with_podman(tmp_path):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman); the definitions are checked above")
    if os.geteuid() != 0:
        pytest.skip("podman here needs root (a private mount namespace without /sys/fs/cgroup/unified)")
    if _podman("image", "exists", PODMAN_BASE).returncode != 0:
        pytest.skip(f"no local base image {PODMAN_BASE}: no registry is reachable; make one with "
                    "`containers/podman.sh base` (debootstrap, see containers/README.md)")
    tag = "localhost/brainfoundry-cpu:test"
    build = _podman("build", tag, timeout=1800)  # layers are cached: fast unless pins or sources change
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]

    # A real step inside the image, no network: the demo dataset, equal to the one written on the host.
    (tmp_path / "image").mkdir()
    run = _podman("run", "--rm", "--network=none", "-v", f"{tmp_path / 'image'}:/data", tag, "sh", "-c",
                  "brainfoundry --version && python3 -c 'import torch; print(torch.__version__)' && "
                  "brainfoundry demo-data /data/demo --n-subjects 1 --n-volumes 40 >/dev/null")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    version, torch_version = run.stdout.split()[:2]
    assert version == _project()["version"]
    assert Version(torch_version).public == _makefile_torch() and Version(torch_version).local == "cpu"
    host = subprocess.run([sys.executable, "-m", "brainfoundry.cli", "demo-data", str(tmp_path / "host"),
                           "--n-subjects", "1", "--n-volumes", "40"], capture_output=True, text=True)
    assert host.returncode == 0, host.stderr[-3000:]
    image_files = sorted(p.relative_to(tmp_path / "image" / "demo") for p in (tmp_path / "image" / "demo").rglob("*") if p.is_file())
    host_files = sorted(p.relative_to(tmp_path / "host") for p in (tmp_path / "host").rglob("*") if p.is_file())
    assert image_files == host_files and image_files
    # Same values up to floating-point rounding (the image's BLAS build and thread count differ).
    compared = 0
    for rel in image_files:
        mine, theirs = tmp_path / "image" / "demo" / rel, tmp_path / "host" / rel
        if rel.suffix == ".tsv":
            a, b = pd.read_csv(mine, sep="\t"), pd.read_csv(theirs, sep="\t")
            assert list(a.columns) == list(b.columns) and a.shape == b.shape, rel
            for col in a.columns:
                if pd.api.types.is_numeric_dtype(b[col]):
                    # float32 sums over ~1e5 voxels: compare relative to the column's scale.
                    scale = float(np.nanmax(np.abs(b[col].to_numpy(float)), initial=0.0))
                    np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{rel}:{col}")
                else:
                    assert a[col].equals(b[col]), f"{rel}:{col}"
            compared += 1
        elif rel.suffix == ".json":
            assert _close(json.loads(mine.read_text()), json.loads(theirs.read_text())), rel
            compared += 1
    assert compared >= 4


def _close(a, b) -> bool:
    """Equal JSON values, numbers within rel. 1e-5 (timings excepted)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(k == "seconds" or _close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
    return a == b
