"""The fMRIPrep command line: validated with fMRIPrep's and fmriprep-docker's own parsers, the rule's
shell line (work directory kept on failure only), and one fMRIPrep job per subject in `snakemake -n`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from brainfoundry import demo, fmriprep
from brainfoundry.errors import InputError
from conftest import REPO, bin_path


@pytest.fixture(scope="module")
def fmriprep_parser():
    """fMRIPrep's real argument parser (from the fmriprep PyPI package; works offline)."""
    parser_module = pytest.importorskip("fmriprep.cli.parser")
    return parser_module._build_parser()


@pytest.fixture()
def dirs(tmp_path) -> dict[str, Path]:
    paths = {"bids": tmp_path / "bids", "deriv": tmp_path / "deriv", "work": tmp_path / "work",
             "license": tmp_path / "fs" / "license.txt", "tf": tmp_path / "templateflow"}
    paths["bids"].mkdir()
    (paths["bids"] / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    paths["license"].parent.mkdir()
    paths["license"].write_text("license\n")
    return paths


def _config(dirs, **fmriprep_options) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(entry_point="raw", bids_dir=str(dirs["bids"]), derivatives_dir=str(dirs["deriv"]))
    config["fmriprep"].update(fs_license=str(dirs["license"]), templateflow_home=str(dirs["tf"]),
                              work_dir=str(dirs["work"]), **fmriprep_options)
    return config


def _assert_full_flags(argv, parser):
    options = set(parser._option_string_actions)
    for token in argv:
        if token.startswith("-"):
            assert token in options, f"{token} is not a full option string of {parser.prog}"


def test_command_parses_with_fmriprep_parser(dirs, fmriprep_parser):
    argv = fmriprep.build_fmriprep_command(_config(dirs), "sub-01", threads=4, mem_mb=8000)
    assert argv[0] == "fmriprep"
    _assert_full_flags(argv[1:], fmriprep_parser)
    opts = fmriprep_parser.parse_args(argv[1:])
    assert Path(opts.bids_dir).resolve() == dirs["bids"].resolve()
    assert Path(opts.output_dir) == dirs["deriv"]
    assert opts.analysis_level == "participant"
    assert opts.participant_label == ["01"]
    assert [str(ref) for ref in opts.output_spaces.references] == ["MNI152NLin2009cAsym:res-2"]
    assert opts.nprocs == 4 and opts.omp_nthreads == 4
    assert opts.memory_gb == pytest.approx(8.0)
    assert Path(opts.fs_license_file).resolve() == dirs["license"].resolve()
    assert opts.run_reconall is False
    assert Path(opts.work_dir) == dirs["work"] / "sub-01"
    assert opts.skip_bids_validation and opts.notrack


def test_command_options_follow_config(dirs, fmriprep_parser):
    config = _config(dirs, fs_no_reconall=False, output_spaces=["MNI152NLin2009cAsym:res-2", "T1w"],
                     extra_args=["--dummy-scans", "3", "--stop-on-first-crash"])
    argv = fmriprep.build_fmriprep_command(config, "02", threads=16, mem_mb=32000)
    _assert_full_flags(argv[1:], fmriprep_parser)
    opts = fmriprep_parser.parse_args(argv[1:])
    assert opts.run_reconall is True
    assert [str(ref) for ref in opts.output_spaces.references] == ["MNI152NLin2009cAsym:res-2", "T1w"]
    assert opts.nprocs == 16 and opts.omp_nthreads == fmriprep.MAX_OMP_THREADS
    assert opts.memory_gb == pytest.approx(32.0)
    assert opts.dummy_scans == 3 and opts.stop_on_first_crash


def test_docker_command_parses_with_wrapper_and_fmriprep(dirs, fmriprep_parser):
    docker_main = pytest.importorskip("fmriprep_docker.__main__")
    config = _config(dirs, runner="docker")
    argv = fmriprep.build_fmriprep_command(config, "01", threads=2, mem_mb=6000)
    assert argv[0] == "fmriprep-docker"
    wrapper = docker_main.get_parser()
    opts, passed_on = wrapper.parse_known_args(argv[1:])
    assert opts.image == "nipreps/fmriprep:25.2.7" and opts.no_tty
    assert Path(opts.work_dir) == (dirs["work"] / "sub-01").resolve()
    assert Path(opts.fs_license_file) == dirs["license"].resolve()
    assert opts.output_spaces == ["MNI152NLin2009cAsym:res-2"]
    assert (opts.bids_dir, opts.output_dir) == (str(dirs["bids"].resolve()), str(dirs["deriv"].resolve()))
    # What the wrapper passes on must be full fMRIPrep flags, with the exact "--mem_mb" it looks for
    # before asking interactively about memory.
    assert "--mem_mb" in passed_on
    wrapper_options = set(wrapper._option_string_actions)
    for token in passed_on:
        if token.startswith("-"):
            assert token in fmriprep_parser._option_string_actions and token not in wrapper_options, token
    # The command the wrapper runs inside the container, with its mounts replaced by the host paths.
    inner = [str(dirs["bids"]), str(dirs["deriv"]), "participant", *passed_on,
             "--output-spaces", *opts.output_spaces, "--work-dir", str(dirs["work"]),
             "--fs-license-file", str(dirs["license"])]
    parsed = fmriprep_parser.parse_args(inner)
    assert parsed.participant_label == ["01"] and parsed.nprocs == 2 and parsed.memory_gb == pytest.approx(6.0)
    assert parsed.run_reconall is False


def _fake_fmriprep(bin_dir: Path, record: Path, exit_code: int) -> None:
    """An executable named fmriprep that records its argv and exits with ``exit_code``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "fmriprep"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(record))}\n"
                      f"echo \"TEMPLATEFLOW_HOME=$TEMPLATEFLOW_HOME\" >> {shlex.quote(str(record))}.env\n"
                      f"exit {exit_code}\n")
    script.chmod(0o755)


@pytest.mark.parametrize("exit_code", [0, 3])
def test_shell_line_removes_work_dir_only_on_success(dirs, tmp_path, exit_code):
    config = _config(dirs)
    record = tmp_path / "argv.txt"
    _fake_fmriprep(tmp_path / "bin", record, exit_code)
    line = fmriprep.build_shell_command(config, "01", threads=2, mem_mb=4000)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", f"set -euo pipefail; {line}"], env=env, capture_output=True, text=True)
    assert result.returncode == exit_code
    assert record.read_text().splitlines() == fmriprep.build_fmriprep_command(config, "01", 2, 4000)[1:]
    assert f"TEMPLATEFLOW_HOME={dirs['tf']}" in Path(str(record) + ".env").read_text()
    work = dirs["work"] / "sub-01"
    assert work.exists() == (exit_code != 0)


@pytest.mark.parametrize("exit_code", [0, 1])
def test_run_keeps_work_dir_on_failure(dirs, tmp_path, monkeypatch, exit_code):
    record = tmp_path / "argv.txt"
    _fake_fmriprep(tmp_path / "bin", record, exit_code)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(_config(dirs)))
    code = fmriprep.cli_main(["--config", str(config_file), "--subject", "01", "--threads", "3", "--mem-mb", "5000",
                              "--run"])
    assert code == exit_code
    assert "--nthreads\n3\n" in record.read_text()
    assert (dirs["work"] / "sub-01").exists() == (exit_code != 0)


def test_run_without_license_names_the_file(dirs, tmp_path):
    config = _config(dirs)
    dirs["license"].unlink()
    with pytest.raises(InputError, match=r"license.txt: FreeSurfer license file not found"):
        fmriprep.run_fmriprep(config, "01", 1, 1000)


def test_cli_print(dirs, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(_config(dirs)))
    assert fmriprep.cli_main(["--config", str(config_file), "--subject", "07", "--threads", "2", "--mem-mb", "3000",
                              "--print"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == fmriprep.build_fmriprep_command(_config(dirs), "07", 2, 3000)
    assert fmriprep.cli_main(["--config", str(config_file), "--subject", "07", "--threads", "1", "--mem-mb", "1",
                              "--binds"]) == 0
    binds = capsys.readouterr().out.strip().split(",")
    assert str(dirs["license"].resolve()) in binds and str(dirs["tf"].resolve()) in binds


# -- the workflow: one fMRIPrep rule on {subject}, one job per subject in raw mode ---------------------
def test_subject_report_is_fmriprep_s_report_path(tmp_path):
    assert fmriprep.subject_report(tmp_path, "sub-07") == str(tmp_path / "sub-07.html")
    assert fmriprep.subject_report("derivatives/fmriprep", "{subject}") == "derivatives/fmriprep/sub-{subject}.html"


@pytest.fixture(scope="module")
def raw_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmriprep_demo")
    demo.write_demo_dataset(out, n_subjects=3, n_volumes=12, two_run_subjects=1)
    return out


def _raw_config(raw_demo: Path, workdir: Path, runner: str) -> Path:
    license_file = workdir / "license.txt"
    license_file.write_text("license\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(entry_point="raw", bids_dir=str(raw_demo / "bids"), derivatives_dir="derivatives/fmriprep")
    config["fmriprep"].update(fs_license=str(license_file), work_dir="work/fmriprep", runner=runner)
    config["atlas"].update(path=str(raw_demo / "atlas" / "atlas-Demo100_dseg.nii.gz"),
                           labels=str(raw_demo / "atlas" / "atlas-Demo100_dseg.tsv"))
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file


def _dry_run(raw_demo: Path, workdir: Path, runner: str, *extra: str) -> str:
    config_file = _raw_config(raw_demo, workdir, runner)
    result = subprocess.run([bin_path("snakemake"), "-n", "-p", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(workdir), "--configfile", str(config_file), "--cores", "4", *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return result.stdout


def _fmriprep_commands(out: str) -> dict[str, str]:
    commands = [line for line in out.splitlines() if "--participant-label" in line]
    by_subject = {re.search(r"--participant-label (\S+) ", c).group(1): c for c in commands}
    assert len(by_subject) == len(commands), commands
    return by_subject


@pytest.mark.workflow
@pytest.mark.parametrize("runner", ["apptainer", "docker"])
def test_dry_run_lists_one_fmriprep_job_per_subject(raw_demo, tmp_path, runner):
    out = _dry_run(raw_demo, tmp_path, runner)
    counts = dict(re.findall(r"^(fmriprep\S*)\s+(\d+)$", out, flags=re.MULTILINE))
    assert counts == {"fmriprep": "3"}, out[:3000]
    commands = _fmriprep_commands(out)
    assert sorted(commands) == ["01", "02", "03"]
    head = "fmriprep-docker" if runner == "docker" else "fmriprep"
    for subject, line in commands.items():
        assert f" {head} " in line and f"rm -rf work/fmriprep/sub-{subject})" in line
        assert "--nthreads 4 " in line  # the rule's 8 threads, capped by --cores 4
        assert ("--mem_mb 16000" if runner == "docker" else "--mem-mb 16000") in line
    # The job's one output is the subject's report; each run's parcellation waits for it.
    block = out[out.index("rule fmriprep:"):]
    block = block[:block.index("\n\n")]
    assert "output: derivatives/fmriprep/sub-" in block and ".html" in block, block
    parcellate = [b for b in out.split("\n\n") if "rule parcellate:" in b]
    assert len(parcellate) == 4  # sub-01 has two runs
    for job in parcellate:
        subject = re.search(r"subject=(\w+)", job).group(1)
        (inputs,) = re.findall(r"^\s+input: (.*)$", job, flags=re.MULTILINE)
        assert f"derivatives/fmriprep/sub-{subject}.html" in inputs.split(", "), job


@pytest.mark.workflow
def test_set_threads_and_set_resources_reach_fmriprep(raw_demo, tmp_path):
    """--set-threads/--set-resources name the one rule and change every subject's command line."""
    out = _dry_run(raw_demo, tmp_path, "apptainer", "--set-threads", "fmriprep=3",
                   "--set-resources", "fmriprep:mem_mb=1234")
    commands = _fmriprep_commands(out)
    assert len(commands) == 3
    for line in commands.values():
        assert "--nthreads 3 " in line and "--omp-nthreads 3 " in line and "--mem-mb 1234 " in line, line


@pytest.mark.workflow
def test_slurm_profile_resources_reach_fmriprep(raw_demo, tmp_path):
    """The Slurm profile's set-threads/set-resources for `fmriprep` (values changed so that they differ
    from the rule's own) are what a job of the rule plans with: no Slurm needed for a dry run."""
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert "fmriprep" in profile["set-threads"] and "fmriprep" in profile["set-resources"]
    profile["set-threads"]["fmriprep"] = 3
    profile["set-resources"]["fmriprep"]["mem_mb"] = "1111 * attempt"
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir()
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(profile))
    out = _dry_run(raw_demo, tmp_path, "apptainer", "--profile", str(profile_dir))
    commands = _fmriprep_commands(out)
    assert len(commands) == 3
    for line in commands.values():
        assert "--nthreads 3 " in line and "--mem-mb 1111 " in line, line
