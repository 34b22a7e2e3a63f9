"""Index a raw BIDS dataset or an fMRIPrep derivatives tree into the run table.

Discovery uses pybids (``BIDSLayout`` without validation or metadata indexing, which is what makes
pybids slow on large datasets); JSON sidecars are read here with the BIDS inheritance principle, and
``participants.tsv`` is joined with pandas.

Two entry points (``config["entry_point"]``):

- ``derivatives``: every ``desc-preproc_bold`` in the configured ``space`` (``MNI152NLin2009cAsym_res-2``
  means ``space-MNI152NLin2009cAsym`` and ``res-2``) with its ``desc-brain_mask`` and
  ``desc-confounds_timeseries.tsv``.
- ``raw``: every raw ``bold``; ``bold``/``mask``/``confounds`` are the paths fMRIPrep *will* write under
  ``derivatives_dir`` (so the fMRIPrep rule can declare them as outputs), ``raw_bold`` the input.

A run that cannot be used (bold without RepetitionTime, missing mask/confounds, a subject without bold)
raises :class:`~brainfoundry.errors.InputError` with ``bids.on_invalid: error``, or is logged (python
``logging``) and left out with ``skip``; so is a path pybids cannot index (:func:`scan_tree`: a file
name that is not UTF-8, an invalid ``sub-``/``ses-`` label, a symlink cycle). Dataset-level problems
(no ``dataset_description.json``, a participants column that is not there) are always errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.naming import parse_entities, run_prefix

log = logging.getLogger(__name__)

BOLD_EXTENSIONS = [".nii.gz", ".nii"]
# Entities that make a run_id; others (rec, dir, echo, ...) stay in the file name only.
_TABLE_ENTITIES = ("sub", "ses", "task", "acq", "run")


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def split_space(space: str) -> tuple[str, str | None]:
    """``MNI152NLin2009cAsym_res-2`` -> (``MNI152NLin2009cAsym``, ``2``); a space without res -> (space, None)."""
    name, _, res = space.partition("_res-")
    return name, (res or None)


def _strip(prefix: str, values: Iterable[Any] | None) -> list[str]:
    return [str(v)[len(prefix):] if str(v).startswith(prefix) else str(v) for v in (values or [])]


def _run_key(value: Any) -> str:
    """Runs compare as numbers where they are numbers ("01" == "1" == 1)."""
    text = str(value)
    return str(int(text)) if text.isdigit() else text


def _bold_stem(path: str | os.PathLike) -> str:
    """File name without ``_bold.nii[.gz]`` (the fMRIPrep output prefix of a raw bold)."""
    name = Path(path).name
    for ext in BOLD_EXTENSIONS:
        if name.endswith("_bold" + ext):
            return name[: -len("_bold" + ext)]
    raise InputError(path, "not a BIDS bold file name (expected *_bold.nii[.gz])")


def _require_description(root: Path, what: str) -> None:
    if not root.is_dir():
        raise InputError(root, f"{what} directory does not exist")
    if not (root / "dataset_description.json").is_file():
        raise InputError(root / "dataset_description.json", f"missing: {what} is not a BIDS dataset without it")
    try:
        json.loads((root / "dataset_description.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(root / "dataset_description.json", f"not valid JSON ({err})") from None


def sidecar_metadata(path: str | os.PathLike, root: str | os.PathLike) -> dict[str, Any]:
    """JSON metadata of a BIDS data file by the inheritance principle.

    Sidecars from the dataset root down to the file's directory apply when their entities are a subset
    of the file's and the suffix matches; deeper (more specific) ones override shallower ones.
    """
    path, root = Path(path).resolve(), Path(root).resolve()
    ents = parse_entities(path.name)
    suffix = path.name.split(".")[0].split("_")[-1]
    dirs = [root]
    for part in path.parent.relative_to(root).parts:
        dirs.append(dirs[-1] / part)
    merged: dict[str, Any] = {}
    for folder in dirs:
        candidates = []
        for json_path in folder.glob(f"*{suffix}.json"):
            stem = json_path.name[: -len(".json")]
            if stem.split("_")[-1] != suffix:
                continue
            j_ents = parse_entities(json_path.name)
            if all(ents.get(k) == v for k, v in j_ents.items()):
                candidates.append((len(j_ents), json_path))
        for _, json_path in sorted(candidates):
            try:
                merged.update(json.loads(json_path.read_text()))
            except ValueError as err:
                raise InputError(json_path, f"not valid JSON ({err})") from None
    return merged


def _as_configured(path: str, root: Path) -> str:
    """pybids returns resolved absolute paths; give them back under the root as configured, so a
    relative ``bids_dir`` gives relative paths (a portable run table, stable Snakemake targets)."""
    try:
        return str(root / Path(path).relative_to(root.resolve()))
    except ValueError:
        return path


def _layout(root: Path, derivative: bool, skipped: Iterable[str] = ()):
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    # Our own ignores are anchored regexes on the root-relative path (pybids would read a plain string
    # as a regex, and names here may hold regex characters); pybids' defaults stay.
    ignore = [*DEFAULT_LOCATIONS_TO_IGNORE,
              *(re.compile("^/" + re.escape(os.path.relpath(path, root)) + "(/|$)") for path in skipped)]
    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=ignore)
    kwargs = {"is_derivative": True, "config": ["bids", "derivatives"]} if derivative else {}
    return BIDSLayout(str(root), validate=False, indexer=indexer, **kwargs)


# --------------------------------------------------------------------------------------------------
# Names pybids cannot index
# --------------------------------------------------------------------------------------------------
_LABEL_FOLDER = re.compile(r"^(sub|ses)-(.*)$")
_VALID_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_PYBIDS_SKIPS_AT_ROOT = ("code", "models", "sourcedata", "stimuli", "derivatives")  # never indexed


def scan_tree(root: Path, problems: _Problems) -> list[str]:
    """Paths under ``root`` that pybids must not index, each reported to ``problems`` first.

    pybids fails on them without naming a path: a file name that is not valid UTF-8 (``UnicodeEncodeError``
    from its database), a ``sub-``/``ses-`` folder whose label is not letters and digits (``KeyError``
    later), a symlink to one of its own parent folders (pybids follows it until the OS refuses, and every
    run appears many times). With ``bids.on_invalid: error`` the first one raises; with ``skip`` it is
    logged and left out of the index. Walks what pybids walks (symlinks followed; dot-names and the
    top-level folders pybids ignores are skipped).
    """
    skipped: list[str] = []
    stack = [(str(root), frozenset({_dir_key(root)}), 0)]
    while stack:
        folder, ancestors, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            problems(folder, f"cannot list folder ({err.strerror})")
            skipped.append(folder)
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(".") or (depth == 0 and name.startswith(_PYBIDS_SKIPS_AT_ROOT)):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                problems(folder, f"file name {os.fsencode(name)!r} is not valid UTF-8 (rename it; "
                                 "bids.on_invalid: skip leaves it out)")
                skipped.append(entry.path)
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks, as pybids does
            except OSError:
                is_dir = False
            if not is_dir:
                continue
            label = _LABEL_FOLDER.match(name)
            if label and not _VALID_LABEL.match(label.group(2)):
                problems(entry.path, f"not a valid BIDS {label.group(1)} folder: the label "
                                     f"{label.group(2)!r} must be letters and digits only")
                skipped.append(entry.path)
                continue
            key = _dir_key(Path(entry.path))
            if key in ancestors:
                problems(entry.path, f"directory cycle: this symlink leads back to its own parent folder "
                                     f"{os.path.realpath(entry.path)}")
                skipped.append(entry.path)
                continue
            stack.append((entry.path, ancestors | {key}, depth + 1))
    return skipped


def _dir_key(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


# --------------------------------------------------------------------------------------------------
# Filters and problems
# --------------------------------------------------------------------------------------------------
class _Problems:
    """Collects per-run problems; raises on the first with ``error``, logs each with ``skip``."""

    def __init__(self, mode: str):
        if mode not in ("error", "skip"):
            raise ConfigError("bids.on_invalid", f"must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.skipped: list[str] = []

    def __call__(self, source: str | os.PathLike, problem: str) -> None:
        if self.mode == "error":
            raise InputError(source, problem)
        log.warning("skipping: %s: %s", source, problem)
        self.skipped.append(f"{source}: {problem}")


def _query_filters(bcfg: dict) -> dict[str, Any]:
    """pybids query arguments from the config's entity filters (empty lists mean all)."""
    query: dict[str, Any] = {}
    if bcfg.get("include_subjects"):
        query["subject"] = _strip("sub-", bcfg["include_subjects"])
    if bcfg.get("tasks"):
        query["task"] = _strip("task-", bcfg["tasks"])
    if bcfg.get("sessions"):
        query["session"] = _strip("ses-", bcfg["sessions"])
    return query


def _keep(ents: dict[str, str], bcfg: dict) -> bool:
    """Filters pybids does not apply for us: excluded subjects and runs (compared numerically)."""
    if ents.get("sub") in set(_strip("sub-", bcfg.get("exclude_subjects"))):
        return False
    runs = {_run_key(r) for r in _strip("run-", bcfg.get("runs"))}
    return not runs or _run_key(ents.get("run", "")) in runs


def _row(path: str, ents: dict[str, str], dataset: str) -> dict[str, Any]:
    return {
        "run_id": run_prefix(ents["sub"], ents.get("task", ""), ents.get("ses"), ents.get("run"), ents.get("acq")),
        "subject": ents["sub"],
        "session": ents.get("ses"),
        "task": ents.get("task"),
        "acquisition": ents.get("acq"),
        "run": ents.get("run"),
        "dataset": dataset,
    }


def _repetition_time(meta: dict, source, problems: _Problems) -> float | None:
    tr = meta.get("RepetitionTime")
    try:
        tr = float(tr) if tr is not None else None
    except (TypeError, ValueError):
        tr = None
    if tr is None or not tr > 0:
        problems(source, "bold has no valid RepetitionTime in its JSON sidecar(s)")
        return None
    return tr


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def index_dataset(config: dict) -> pd.DataFrame:
    """The run table (before buckets/splits) for the ``raw`` or ``derivatives`` entry point.

    Returns a DataFrame with ``run_id`` as a column and the contract columns of
    :mod:`brainfoundry.runtable`, plus ``acquisition`` and every participants.tsv column.
    """
    bcfg = dict(config.get("bids") or {})
    entry = config["entry_point"]
    problems = _Problems(bcfg.get("on_invalid", "error"))
    space_name, res = split_space(config["space"])
    if entry == "derivatives":
        if not config.get("derivatives_dir"):
            raise ConfigError("derivatives_dir", "required for the derivatives entry point")
        rows = _index_derivatives(Path(config["derivatives_dir"]), space_name, res, bcfg, problems)
    elif entry == "raw":
        for key in ("bids_dir", "derivatives_dir"):
            if not config.get(key):
                raise ConfigError(key, "required for the raw entry point")
        rows = _index_raw(Path(config["bids_dir"]), Path(config["derivatives_dir"]), space_name, res, bcfg, problems)
    else:
        raise ConfigError("entry_point", f"bids indexing handles raw and derivatives, not {entry!r}")
    if not rows:
        source = config.get("derivatives_dir") if entry == "derivatives" else config.get("bids_dir")
        raise InputError(source, f"no usable bold runs found (filters: {_query_filters(bcfg) or 'none'}"
                                 + (f"; {len(problems.skipped)} skipped" if problems.skipped else "") + ")")
    table = pd.DataFrame(rows)
    table = _join_participants(table, config, bcfg, problems)
    return table.sort_values("run_id").reset_index(drop=True)


def _index_derivatives(root: Path, space: str, res: str | None, bcfg: dict, problems: _Problems) -> list[dict]:
    _require_description(root, "fMRIPrep derivatives")
    layout = _layout(root, derivative=True, skipped=scan_tree(root, problems))
    query = {"space": space, **_query_filters(bcfg), "return_type": "filename"}
    if res:
        query["res"] = res
    def get(**kwargs):
        return [_as_configured(p, root) for p in layout.get(**kwargs)]

    bolds = get(suffix="bold", desc="preproc", extension=BOLD_EXTENSIONS, **query)
    masks = set(get(suffix="mask", desc="brain", extension=BOLD_EXTENSIONS, **query))
    query.pop("space")
    query.pop("res", None)
    confounds = set(get(suffix="timeseries", desc="confounds", extension=".tsv", **query))
    dataset = bcfg.get("dataset_name") or root.name
    rows = []
    for bold in sorted(bolds):
        ents = parse_entities(Path(bold).name)
        if not _keep(ents, bcfg):
            continue
        name = Path(bold).name
        ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
        base = name[: -len("_desc-preproc_bold" + ext)]
        mask = str(Path(bold).with_name(f"{base}_desc-brain_mask{ext}"))
        if mask not in masks and str(Path(bold).with_name(f"{base}_desc-brain_mask.nii.gz")) in masks:
            mask = str(Path(bold).with_name(f"{base}_desc-brain_mask.nii.gz"))
        prefix = base.split("_space-")[0]
        conf = str(Path(bold).with_name(f"{prefix}_desc-confounds_timeseries.tsv"))
        if mask not in masks:
            problems(bold, f"no brain mask beside it (expected {Path(mask).name})")
            continue
        if conf not in confounds:
            problems(bold, f"no confounds file beside it (expected {Path(conf).name})")
            continue
        tr = _repetition_time(sidecar_metadata(bold, root), bold, problems)
        if tr is None:
            continue
        rows.append({**_row(bold, ents, dataset), "tr": tr, "bold": bold, "mask": mask, "confounds": conf})
    space_query = {"space": space, **({"res": res} if res else {})}
    _subjects_without_bold(layout, root, bcfg, problems, f"no desc-preproc_bold in space {space}"
                           + (f" res {res}" if res else ""), suffix="bold", desc="preproc",
                           extension=BOLD_EXTENSIONS, **space_query)
    return rows


def expected_derivatives(derivatives_dir: str | os.PathLike, raw_bold: str | os.PathLike, space: str,
                         res: str | None) -> dict[str, str]:
    """The files fMRIPrep writes for one raw bold in ``space`` (``bold``, ``mask``, ``confounds``)."""
    ents = parse_entities(Path(raw_bold).name)
    folder = Path(derivatives_dir) / f"sub-{ents['sub']}"
    if ents.get("ses"):
        folder = folder / f"ses-{ents['ses']}"
    folder = folder / "func"
    # Multi-echo runs: fMRIPrep writes one (optimally combined) output without the echo entity.
    prefix = re.sub(r"_echo-[a-zA-Z0-9]+", "", _bold_stem(raw_bold))
    space_part = f"_space-{space}" + (f"_res-{res}" if res else "")
    return {
        "bold": str(folder / f"{prefix}{space_part}_desc-preproc_bold.nii.gz"),
        "mask": str(folder / f"{prefix}{space_part}_desc-brain_mask.nii.gz"),
        "confounds": str(folder / f"{prefix}_desc-confounds_timeseries.tsv"),
    }


def _index_raw(root: Path, derivatives_dir: Path, space: str, res: str | None, bcfg: dict,
               problems: _Problems) -> list[dict]:
    _require_description(root, "raw BIDS")
    layout = _layout(root, derivative=False, skipped=scan_tree(root, problems))
    query = {**_query_filters(bcfg), "return_type": "filename"}
    bolds = [_as_configured(p, root) for p in layout.get(suffix="bold", datatype="func", extension=BOLD_EXTENSIONS, **query)]
    dataset = bcfg.get("dataset_name") or root.name
    rows, seen = [], set()
    for bold in sorted(bolds):
        ents = parse_entities(Path(bold).name)
        if not _keep(ents, bcfg):
            continue
        row = _row(bold, ents, dataset)
        if row["run_id"] in seen:  # a further echo of a multi-echo run (the first stands for the run)
            continue
        seen.add(row["run_id"])
        tr = _repetition_time(sidecar_metadata(bold, root), bold, problems)
        if tr is None:
            continue
        rows.append({**row, "tr": tr,
                     **expected_derivatives(derivatives_dir, bold, space, res), "raw_bold": bold})
    _subjects_without_bold(layout, root, bcfg, problems, "no bold run",
                           suffix="bold", datatype="func", extension=BOLD_EXTENSIONS)
    return rows


def _subjects_without_bold(layout, root: Path, bcfg: dict, problems: _Problems, what: str, **bold_query) -> None:
    """A selected subject with no bold at all is a problem (one whose runs the task/session/run filters
    leave out is not: that is what the filters are for)."""
    selected = {"subject": _strip("sub-", bcfg["include_subjects"])} if bcfg.get("include_subjects") else {}
    subjects = set(layout.get_subjects(**selected))
    with_bold = set(layout.get(return_type="id", target="subject", **selected, **bold_query))
    excluded = set(_strip("sub-", bcfg.get("exclude_subjects")))
    for subject in sorted(subjects - with_bold - excluded):
        problems(root / f"sub-{subject}", f"subject has {what}")


# --------------------------------------------------------------------------------------------------
# participants.tsv
# --------------------------------------------------------------------------------------------------
def _participants_path(config: dict) -> Path | None:
    for key in ("bids_dir", "derivatives_dir"):
        if config.get(key) and (Path(config[key]) / "participants.tsv").is_file():
            return Path(config[key]) / "participants.tsv"
    return None


def read_participants(path: str | os.PathLike, columns: dict[str, str]) -> pd.DataFrame:
    """participants.tsv indexed by subject label (without ``sub-``), contract columns renamed.

    ``columns`` maps contract names (age, sex, diagnosis, site) to the file's column names; a mapped
    column that is not in the file is an :class:`InputError` naming the file and the column.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype={"participant_id": str}, na_values=["n/a", "N/A", ""],
                            keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot be read as a TSV ({err})") from None
    if "participant_id" not in table.columns:
        raise InputError(path, f"has no participant_id column (columns: {list(table.columns)})")
    for name, column in columns.items():
        if column not in table.columns:
            raise InputError(path, f"column '{column}' (bids.participants_columns.{name}) not found; "
                                   f"columns are {list(table.columns)}")
    table["subject"] = table["participant_id"].str.strip().str.removeprefix("sub-")
    if table["subject"].duplicated().any():
        dup = table.loc[table["subject"].duplicated(), "participant_id"].tolist()[:5]
        raise InputError(path, f"duplicate participant_id values {dup}")
    renamed = {column: name for name, column in columns.items()}
    extra = [c for c in table.columns if c not in renamed and c not in ("participant_id", "subject")]
    out = table.set_index("subject")
    result = pd.DataFrame(index=out.index)
    for column, name in renamed.items():
        result[name] = out[column]
    for column in extra:
        if column not in result.columns:
            result[column] = out[column]
    return result


def _join_participants(table: pd.DataFrame, config: dict, bcfg: dict, problems: _Problems) -> pd.DataFrame:
    columns = dict(bcfg.get("participants_columns") or {})
    path = _participants_path(config)
    reserved = set(table.columns)
    if path is None:
        if columns:
            where = config.get("bids_dir") or config.get("derivatives_dir")
            problems(Path(str(where)) / "participants.tsv", "missing; phenotype columns will be empty")
        for name in ("age", "sex", "diagnosis", "site"):
            table[name] = None
        return table
    participants = read_participants(path, columns)
    participants = participants.rename(columns={c: f"participants_{c}" for c in participants.columns if c in reserved})
    missing = sorted(set(table["subject"]) - set(participants.index))
    if missing:
        log.warning("%s: no row for subjects %s; their phenotypes are empty", path, missing[:10])
    table = table.join(participants, on="subject")
    for name in ("age", "sex", "diagnosis", "site"):
        if name not in table.columns:
            table[name] = None
    table["site"] = table["site"].astype("string")
    return table


# --------------------------------------------------------------------------------------------------
# Config keys that shape the run table (entry point, inputs, filters, buckets and splits). The
# bids_index rule passes only these, so changing e.g. pFC or training settings does not re-index.
INDEX_CONFIG_KEYS = ("entry_point", "bids_dir", "derivatives_dir", "run_table", "space", "seed", "bids",
                     "shards", "timeseries")


def index_config(config: dict) -> dict:
    """The part of the workflow config the run table depends on."""
    return {key: config[key] for key in INDEX_CONFIG_KEYS if key in config}


def table_hash(table: pd.DataFrame) -> str:
    """A short hash of a run table's content (the bids_index rule re-runs when it changes)."""
    import hashlib

    blob = table.reset_index().to_json(orient="split", date_format="iso", default_handler=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config(path: str | None = None, text: str | None = None) -> dict:
    """A workflow config from a YAML/JSON file or a JSON string (what rules pass)."""
    import yaml

    if text is not None:
        try:
            return json.loads(text)
        except ValueError as err:
            raise InputError("--config-json", f"not valid JSON ({err})") from None
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InputError(path, f"cannot read config ({err})") from None
    if not isinstance(config, dict):
        raise InputError(path, "config must be a mapping")
    return config


def cli_main(argv: list[str] | None = None) -> int:
    """``brainfoundry index --config CONFIG.yaml --out runs.parquet``."""
    from brainfoundry.runtable import load_run_table, write_run_table

    parser = argparse.ArgumentParser(prog="brainfoundry index", description="index a dataset into the run table")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="workflow config YAML")
    source.add_argument("--config-json", help="workflow config as a JSON string (what the rule passes)")
    parser.add_argument("--out", required=True, help="run table parquet to write")
    parser.add_argument("--expect-hash", help="fail unless the table hashes to this (the workflow's own table)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.config_json)
    table = load_run_table(config)
    if args.expect_hash and table_hash(table) != args.expect_hash:
        source = config.get("run_table") or config.get("derivatives_dir") or config.get("bids_dir")
        raise InputError(source, "the dataset changed since the workflow built its job graph; run it again")
    write_run_table(table, args.out)
    log.info("%s: %d runs of %d subjects", args.out, len(table), table["subject"].nunique())
    return 0
