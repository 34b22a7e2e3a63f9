"""The fMRIPrep command line for one subject (raw entry point).

Two runners (``config["fmriprep"]["runner"]``):

- ``apptainer``: the workflow rule runs under Snakemake's ``container:`` directive with the upstream
  image (``config["fmriprep"]["image"]``), so the shell calls ``fmriprep`` itself. TemplateFlow home
  and the FreeSurfer license are host paths that must be visible in the container: pass
  ``--apptainer-args "--bind <paths>"`` (see :func:`apptainer_binds`) where they are not under a
  directory Apptainer binds by default.
- ``docker``: the ``fmriprep-docker`` wrapper on the host, which mounts the inputs itself.

Only full option strings are emitted (argparse silently accepts abbreviations, so a typo-length
prefix would still "work" until fMRIPrep adds a clashing option); the tests parse every command with
fMRIPrep's own parser and fmriprep-docker's.

Each subject gets its own work directory (a shared one races between concurrent subjects), removed
after success and kept after a failure for debugging.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from brainfoundry.errors import ConfigError, InputError

log = logging.getLogger(__name__)

DEFAULTS = {
    "runner": "apptainer",
    "fs_license": "/opt/freesurfer/license.txt",
    "templateflow_home": None,
    "output_spaces": ["MNI152NLin2009cAsym:res-2"],
    "work_dir": "work/fmriprep",
    "fs_no_reconall": True,
    "extra_args": [],
}
# fMRIPrep's OpenMP pool per process; more than 8 rarely helps (fMRIPrep's own guidance).
MAX_OMP_THREADS = 8


def _settings(config: dict) -> dict:
    settings = {**DEFAULTS, **(config.get("fmriprep") or {})}
    if settings["runner"] not in ("apptainer", "docker"):
        raise ConfigError("fmriprep.runner", f"must be 'apptainer' or 'docker', got {settings['runner']!r}")
    for key in ("bids_dir", "derivatives_dir"):
        if not config.get(key):
            raise ConfigError(key, "required to run fMRIPrep (raw entry point)")
    return settings


def subject_label(subject: str) -> str:
    return str(subject).removeprefix("sub-")


def work_dir_for(config: dict, subject: str) -> str:
    """The subject's own fMRIPrep work directory."""
    return str(Path(_settings(config)["work_dir"]) / f"sub-{subject_label(subject)}")


def build_fmriprep_command(config: dict, subject: str, threads: int, mem_mb: int, work_dir: str | None = None,
                           runner: str | None = None) -> list[str]:
    """The argv that runs fMRIPrep on one subject.

    Parameters
    ----------
    config : dict
        Workflow config (``bids_dir``, ``derivatives_dir``, ``fmriprep`` section).
    subject : str
        Participant label, with or without ``sub-``.
    threads, mem_mb : int
        From the rule's ``threads`` and ``resources.mem_mb``.
    work_dir : str, optional
        Defaults to :func:`work_dir_for` (``<fmriprep.work_dir>/sub-<label>``).
    runner : {"apptainer", "docker"}, optional
        Defaults to ``config["fmriprep"]["runner"]``.
    """
    settings = _settings(config)
    runner = runner or settings["runner"]
    threads, mem_mb = int(threads), int(mem_mb)
    if threads < 1 or mem_mb < 1:
        raise ConfigError("fmriprep", f"threads and mem_mb must be positive (got {threads}, {mem_mb})")
    work_dir = work_dir or work_dir_for(config, subject)
    if runner == "apptainer":
        command = ["fmriprep"]
        mem_flag = "--mem-mb"
    elif runner == "docker":
        command = ["fmriprep-docker"]
        # fmriprep-docker asks interactively (and a job has no terminal) unless it sees exactly
        # "--mem_mb"; both spellings are full option strings of fMRIPrep's parser for the same option.
        mem_flag = "--mem_mb"
    else:
        raise ConfigError("fmriprep.runner", f"must be 'apptainer' or 'docker', got {runner!r}")
    command += [str(config["bids_dir"]), str(config["derivatives_dir"]), "participant"]
    if runner == "docker":
        # Wrapper options: the image from config (docker:// stripped) and no TTY (jobs have none).
        command += ["--image", str(config["fmriprep"].get("image", "")).removeprefix("docker://"), "--no-tty"]
    command += [
        "--participant-label", subject_label(subject),
        "--output-spaces", *settings["output_spaces"],
        "--nthreads", str(threads),
        "--omp-nthreads", str(min(threads, MAX_OMP_THREADS)),
        mem_flag, str(mem_mb),
        "--work-dir", str(work_dir),
        "--fs-license-file", str(settings["fs_license"]),
    ]
    if settings["fs_no_reconall"]:
        command.append("--fs-no-reconall")
    # bids_index has already checked what this workflow needs; the validator costs minutes per job.
    command += ["--skip-bids-validation", "--notrack"]
    command += [str(arg) for arg in settings["extra_args"]]
    return command


def apptainer_binds(config: dict) -> list[str]:
    """Host paths the fMRIPrep container must see (for ``--apptainer-args "--bind ..."``)."""
    settings = _settings(config)
    paths = [config["bids_dir"], config["derivatives_dir"], settings["work_dir"], settings["fs_license"]]
    if settings.get("templateflow_home"):
        paths.append(settings["templateflow_home"])
    return [str(Path(p).resolve()) for p in paths]


def build_shell_command(config: dict, subject: str, threads: int, mem_mb: int) -> str:
    """The rule's shell line: environment, fMRIPrep, then remove the work directory on success only."""
    settings = _settings(config)
    work_dir = work_dir_for(config, subject)
    argv = build_fmriprep_command(config, subject, threads, mem_mb, work_dir=work_dir)
    env = []
    if settings["runner"] == "apptainer" and settings.get("templateflow_home"):
        env.append(f"export TEMPLATEFLOW_HOME={shlex.quote(str(settings['templateflow_home']))};")
    quoted_work = shlex.quote(work_dir)
    return " ".join([*env, f"mkdir -p {quoted_work} &&", shlex.join(argv), f"&& rm -rf {quoted_work}"])


def subject_report(derivatives_dir: str | os.PathLike, subject: str) -> str:
    """``<derivatives_dir>/sub-<label>.html``: the report fMRIPrep writes for every subject it finishes.

    The workflow's fMRIPrep rule declares it as its one output (a subject's run count varies, the
    report is always there), and the per-run rules take it as their input.
    """
    return str(Path(derivatives_dir) / f"sub-{subject_label(subject)}.html")


def run_fmriprep(config: dict, subject: str, threads: int, mem_mb: int) -> int:
    """Run fMRIPrep for one subject here (the docker runner, or fmriprep on PATH); clean up on success."""
    settings = _settings(config)
    license_path = Path(settings["fs_license"])
    if not license_path.is_file():
        raise InputError(license_path, "FreeSurfer license file not found (fmriprep.fs_license); "
                                       "fMRIPrep needs it even with --fs-no-reconall")
    work_dir = Path(work_dir_for(config, subject))
    work_dir.mkdir(parents=True, exist_ok=True)
    argv = build_fmriprep_command(config, subject, threads, mem_mb, work_dir=str(work_dir))
    env = dict(os.environ)
    if settings.get("templateflow_home"):
        env["TEMPLATEFLOW_HOME"] = str(settings["templateflow_home"])
    if shutil.which(argv[0]) is None:
        raise InputError(argv[0], f"command not found on PATH (runner {settings['runner']!r})")
    log.info("running: %s", shlex.join(argv))
    code = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL).returncode
    if code == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        log.error("fMRIPrep failed (exit %d); work directory kept at %s", code, work_dir)
    return code


def cli_main(argv: list[str] | None = None) -> int:
    """``brainfoundry fmriprep-cmd --config C --subject S --threads N --mem-mb M [--print | --run]``."""
    from brainfoundry.bids import load_config

    parser = argparse.ArgumentParser(prog="brainfoundry fmriprep-cmd", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="workflow config YAML")
    source.add_argument("--config-json", help="workflow config as a JSON string (what the rule passes)")
    parser.add_argument("--subject", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--mem-mb", type=int, required=True)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print", action="store_true", help="print the command (default)")
    action.add_argument("--shell", action="store_true", help="print the rule's full shell line")
    action.add_argument("--binds", action="store_true", help="print the paths to bind into the container")
    action.add_argument("--run", action="store_true", help="run it, removing the work directory on success")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.config_json)
    if args.run:
        return run_fmriprep(config, args.subject, args.threads, args.mem_mb)
    if args.shell:
        print(build_shell_command(config, args.subject, args.threads, args.mem_mb))
    elif args.binds:
        print(",".join(apptainer_binds(config)))
    else:
        print(shlex.join(build_fmriprep_command(config, args.subject, args.threads, args.mem_mb)))
    sys.stdout.flush()
    return 0
