"""The ``brainfoundry`` command: one sub-command per workflow step.

Each sub-command lives in the module that owns the concern and is imported only when called, so
``brainfoundry parcellate`` does not pay for importing torch. A sub-command is a function
``main(argv: list[str]) -> int | None`` that parses its own arguments.
"""

from __future__ import annotations

import importlib
import sys

from brainfoundry.errors import BrainfoundryError

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("brainfoundry.initconfig:cli_main", "inspect a folder (BIDS, fMRIPrep, series + table) and write a config"),
    "demo-data": ("brainfoundry.demo:cli_main", "write the embedded demo dataset (raw BIDS + fMRIPrep derivatives)"),
    "index": ("brainfoundry.bids:cli_main", "index a BIDS / derivatives / time-series dataset into the run table"),
    "fmriprep-cmd": ("brainfoundry.fmriprep:cli_main", "build (and optionally run) the fMRIPrep command for one subject"),
    "atlas-prepare": ("brainfoundry.atlas:cli_main", "fetch/verify an atlas and resample it to a BOLD grid once"),
    "parcellate": ("brainfoundry.parcellate:cli_main", "denoise one run and average it within parcels"),
    "import-timeseries": ("brainfoundry.timeseries:cli_main", "import already parcellated series (ABIDE .1D, TSV, NPY)"),
    "pfc": ("brainfoundry.pfc:cli_main", "pseudo functional-connectivity views for one run"),
    "shard": ("brainfoundry.shards:cli_main_shard", "write one parquet shard bucket"),
    "manifest": ("brainfoundry.shards:cli_main_manifest", "write the shard manifest and normalization statistics"),
    "train": ("brainfoundry.train:cli_main", "pretrain a model family on the shards"),
    "evaluate": ("brainfoundry.evaluate:cli_main", "evaluate a model on one downstream task"),
    "perturb": ("brainfoundry.perturb:cli_main", "BrainLM in-silico perturbation between two groups of runs"),
    "export-model": ("brainfoundry.models.export:cli_main", "write a model as a publishable folder (Hugging Face Hub layout)"),
    "convert-model": ("brainfoundry.models.files:cli_main", "rewrite a trusted torch.save model file as safetensors + JSON"),
    "qc-figures": ("brainfoundry.qc:cli_main", "per-run QC figures for the report"),
    "status": ("brainfoundry.status:cli_main", "per subject and step: done / failed / pending / out of date (nothing runs)"),
    "walltime": ("brainfoundry.walltime:cli_main", "wall time, CPU time and memory by workflow step (benchmark TSVs)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: brainfoundry <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        from brainfoundry import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"brainfoundry: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except BrainfoundryError as err:
        # Expected bad input: one clear line naming the file/key, no traceback.
        print(f"brainfoundry {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
