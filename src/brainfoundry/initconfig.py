"""``brainfoundry init FOLDER --out my.yaml``: look at a folder, guess the entry point, write a config.

What it recognises (first match wins):

- fMRIPrep derivatives: ``*_desc-preproc_bold.nii[.gz]`` files -> ``entry_point: derivatives``;
- raw BIDS: ``sub-*/[ses-*/]func/*_bold.nii[.gz]`` -> ``entry_point: raw``;
- already parcellated series (``.1D[.gz]``, ``.tsv[.gz]``, ``.csv[.gz]``, ``.npy``) plus a table (CSV/TSV)
  with one row per series -> ``entry_point: timeseries``.

It guesses the TR (a BOLD JSON sidecar's ``RepetitionTime``, a TR column), the table's subject, site
and phenotype columns (by name) and the series' file pattern, and writes a config that validates
against ``config/config.schema.yaml``, with every key the demo config sets differently overridden
(``atlas.path``, the LCM's environment variables, the evaluation targets). Without phenotype columns the
LCM and the phenotype tasks are left out; without an atlas image or centroids the families use learned
spatial embeddings. Review it (the comments at the top list what was guessed), then
``snakemake -n --configfile my.yaml``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from brainfoundry.errors import InputError

SERIES_SUFFIXES = (".1d", ".1d.gz", ".tsv", ".tsv.gz", ".csv", ".csv.gz", ".npy")
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
SCHEMA = Path(__file__).resolve().parents[2] / "config" / "config.schema.yaml"
_NAMES = {  # contract name -> lower-case column names it is guessed from
    "subject": ("participant_id", "subject", "subject_id", "sub_id", "sub", "subid", "id"),
    "file_id": ("file_id", "filename", "file", "series", "series_file"),
    "site": ("site", "site_id", "site_name", "scanner", "center"),
    "session": ("session", "session_id", "ses"),
    "tr": ("tr", "repetition_time", "repetitiontime"),
    "age": ("age", "age_at_scan", "age_years"),
    "sex": ("sex", "gender"),
    "diagnosis": ("diagnosis", "dx", "dx_group", "group", "label", "diagnosis_group"),
}
_CATEGORICAL = ("sex", "diagnosis", "site")


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(SERIES_SUFFIXES))


def _repetition_time(jsons: list[Path]) -> float | None:
    for path in jsons[:20]:
        try:
            tr = json.loads(path.read_text()).get("RepetitionTime")
        except (OSError, ValueError):
            continue
        if isinstance(tr, (int, float)) and tr > 0:
            return float(tr)
    return None


def _find_column(columns: list[str], name: str) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in _NAMES[name] if n in lower), None)


def _read_table(path: Path) -> pd.DataFrame | None:
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, nrows=5000)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    return table if table.shape[1] >= 1 and len(table) else None


def _is_labels_table(table: pd.DataFrame) -> bool:
    return {"index", "name"} <= {c.lower() for c in table.columns}


def _code(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _pattern(table: pd.DataFrame, columns: dict[str, str], files: list[Path], series_dir: Path) -> str | None:
    """``timeseries.file_pattern`` that names the first rows' files, from {file_id} or {subject}."""
    names = {p.relative_to(series_dir).as_posix() for p in files}
    for key in ("file_id", "subject"):
        if key not in columns:
            continue
        values = [_code(v) for v in table[columns[key]].dropna().head(20)]
        for value in values:
            label = value[4:] if key == "subject" and value.startswith("sub-") else value
            for name in sorted(names):
                if label and label in name:
                    placeholder = "{" + key + "}"
                    pattern = name.replace(label, placeholder, 1)
                    hits = sum(pattern.replace(placeholder, (v[4:] if key == "subject" and v.startswith("sub-")
                                                             else v)) in names for v in values)
                    if hits >= max(1, len(values) // 2):
                        return pattern
    return None


def _dataset_root(bold: Path) -> str:
    """The BIDS (or derivatives) root of a BOLD file: the folder above its ``sub-*`` folder."""
    root = bold.parent
    while root.parent != root and not root.name.startswith("sub-"):
        root = root.parent
    return str(root.parent)


def inspect_folder(folder: str | Path) -> dict[str, Any]:
    """What the folder holds: ``entry_point``, the paths and guesses ``init`` writes, and ``notes``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    notes: list[str] = []
    preproc = sorted(folder.rglob("*_desc-preproc_bold.nii*"))
    if preproc:
        tr = _repetition_time(sorted(folder.rglob("*_desc-preproc_bold.json")))
        notes.append(f"fMRIPrep derivatives: {len(preproc)} preprocessed BOLD files")
        return {"entry_point": "derivatives", "derivatives_dir": _dataset_root(preproc[0]), "tr": tr, "notes": notes}
    bold = sorted(p for p in folder.rglob("*_bold.nii*") if "/func/" in p.as_posix())
    if bold:
        tr = _repetition_time(sorted(folder.rglob("*_bold.json")))
        notes.append(f"raw BIDS: {len(bold)} BOLD files (TR {tr} s from the sidecars; the index reads each run's)")
        return {"entry_point": "raw", "bids_dir": _dataset_root(bold[0]), "tr": tr, "notes": notes}

    tables, labels = [], None
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES):
        table = _read_table(path)
        if table is None:
            continue
        if _is_labels_table(table):
            labels = labels or path
        elif _find_column(list(table.columns), "subject") or _find_column(list(table.columns), "file_id"):
            tables.append((path, table))
    skip = {p for p, _ in tables} | ({labels} if labels else set())
    files = [p for p in _series_files(folder) if p not in skip]
    if not files:
        raise InputError(folder, "found no BIDS bold, fMRIPrep derivatives or series files "
                                 f"({', '.join(SERIES_SUFFIXES)})")
    if not tables:
        raise InputError(folder, f"found {len(files)} series files but no table (CSV/TSV) with a subject column "
                                 f"(one of {', '.join(_NAMES['subject'])}); add one row per series")
    pheno_path, table = tables[0]
    series_dir = Path(*_common_parts([p.parent for p in files]))
    columns = {name: col for name in ("subject", "file_id", "site", "session", "tr")
               if (col := _find_column(list(table.columns), name))}
    phenotypes = {name: col for name in ("age", "sex", "diagnosis")
                  if (col := _find_column(list(table.columns), name)) and table[col].notna().any()}
    if "subject" not in columns:
        columns["subject"] = columns["file_id"]
    pattern = _pattern(table, columns, files, series_dir)
    if pattern is None:
        notes.append("TODO: no file pattern matched the table's ids; set timeseries.file_pattern")
        pattern = "{file_id}" + "".join(files[0].suffixes)
    tr = None
    if "tr" not in columns:
        tr = _repetition_time(sorted(folder.rglob("*.json")))
        if tr is None:
            notes.append("TODO: no TR found (no TR column, no JSON RepetitionTime); set timeseries.tr (seconds)")
    from brainfoundry.timeseries import detect_format, series_shape

    n_t, n_parcels = series_shape(files[0], detect_format(files[0]))
    notes.append(f"timeseries: {len(files)} series files ({n_t} volumes x {n_parcels} parcels in {files[0].name}), "
                 f"table {pheno_path.name} with {len(table)} rows")
    notes.append(f"phenotype columns: {phenotypes or 'none'}")
    return {"entry_point": "timeseries", "series_dir": str(series_dir), "phenotypes": str(pheno_path),
            "columns": columns, "phenotype_columns": phenotypes, "file_pattern": pattern, "tr": tr,
            "labels": str(labels) if labels else None, "n_parcels": n_parcels, "n_volumes": n_t, "notes": notes}


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = list(paths[0].parts)
    for path in paths[1:]:
        other = path.parts
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return tuple(parts) or (".",)


def build_config(found: dict[str, Any], out: Path) -> tuple[dict[str, Any], list[str]]:
    """The config for what :func:`inspect_folder` found (and the notes to put at its top)."""
    from brainfoundry.runfiles import write_labels

    notes = list(found["notes"])
    entry = found["entry_point"]
    config: dict[str, Any] = {"entry_point": entry, "results_dir": "results", "seed": 0,
                              "space": "MNI152NLin2009cAsym_res-2"}
    env: list[dict[str, str]] = []
    targets: list[str] = []
    if entry == "timeseries":
        labels = found["labels"]
        if labels is None:
            labels = str(out.with_name(out.stem + "_labels.tsv"))
            n = int(found["n_parcels"])
            write_labels(labels, pd.DataFrame({"index": range(1, n + 1), "name": [f"parcel_{i}" for i in range(1, n + 1)],
                                               "x": float("nan"), "y": float("nan"), "z": float("nan"),
                                               "n_voxels": float("nan"), "network": ""}))
            notes.append(f"wrote {labels} (parcel_1..parcel_{n}, no centroids): replace with your atlas's labels")
        config["atlas"] = {"name": "Atlas", "path": None, "url": None, "labels": labels}
        ts: dict[str, Any] = {"series_dir": found["series_dir"], "phenotypes": found["phenotypes"],
                              "file_pattern": found["file_pattern"], "columns": dict(found["columns"])}
        ts["columns"].update(found["phenotype_columns"])
        if found["tr"] is not None:
            ts["tr"] = found["tr"]
        ts["standardize"] = "zscore"
        config["timeseries"] = ts
        names = list(found["phenotype_columns"]) + (["site"] if "site" in found["columns"] else [])
        env = [{"name": n, "kind": "categorical" if n in _CATEGORICAL else "continuous"} for n in names]
        targets = list(found["phenotype_columns"])
        window = max(2, min(120, int(found["n_volumes"])))
        if window < 120:
            notes.append(f"series have {found['n_volumes']} volumes: model window set to {window}")
    else:
        config[f"{'bids' if entry == 'raw' else 'derivatives'}_dir"] = found[f"{'bids' if entry == 'raw' else 'derivatives'}_dir"]
        config["atlas"] = {"name": "Atlas", "path": None, "url": None, "labels": None}
        notes.append("TODO: set atlas.path (a NIfTI label image) or atlas.url + atlas.sha256, and atlas.name")
        notes.append("TODO: map your participants.tsv columns in bids.participants_columns "
                     "(age, sex, diagnosis, site) and list them in evaluate.targets / pretrain.lcm.model.env")
        config["bids"] = {"participants_columns": {}}
        window = 120
    coords = entry != "timeseries" or _labels_have_coords(config["atlas"]["labels"])
    spatial = {} if coords else {"spatial_embedding": "learned"}
    families = ["brainlm", "brainmass"] + (["lcm"] if env else [])
    patch = 20 if window % 20 == 0 else max(1, window // 6)
    while window % patch:
        patch -= 1
    config["shards"] = {"window": window, "fill_empty_splits": True}
    pretrain: dict[str, Any] = {"families": families, "trainer": {"window": window},
                                "brainlm": {"model": {"window": window, "patch_size": patch, **spatial}},
                                "brainmass": {"model": dict(spatial)}}
    if env:
        pretrain["lcm"] = {"model": {"env": env}}  # FC-row tokens: its window is trainer.window, no coordinates
    else:
        notes.append("no phenotype columns: the LCM (which needs environment variables) and the phenotype "
                     "and fine-tuning evaluations are left out")
    config["pretrain"] = pretrain
    tasks = ["reconstruction", "forecasting", "networks", "fingerprint"] + (["phenotype", "finetune"] if targets else [])
    config["evaluate"] = {"tasks": tasks, "targets": targets,
                          "regression_targets": [t for t in targets if t == "age"],
                          "pseudo_label_targets": [t for t in targets if t in _CATEGORICAL],
                          "finetune": {"enabled": bool(targets), "targets": [t for t in targets if t in _CATEGORICAL]},
                          "cv": {"stratify_by": "diagnosis" if "diagnosis" in targets else None}}
    if not coords:
        notes.append("atlas without centroids: spatial_embedding: learned for every family")
    return config, notes


def _labels_have_coords(labels: str | None) -> bool:
    if not labels:
        return False
    from brainfoundry.atlas import read_labels_table

    return not read_labels_table(labels)[["x", "y", "z"]].isna().any(axis=None)


def write_config(folder: str | Path, out: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Inspect ``folder``, write the config to ``out`` (after checking it against the schema)."""
    import yaml

    from brainfoundry.checks import check_config
    from brainfoundry.io import write_text_atomic

    out = Path(out)
    config, notes = build_config(inspect_folder(folder), out)
    check_config(config, SCHEMA)
    header = [f"# Written by `brainfoundry init {folder}`: review, then `snakemake -n --configfile {out}`.",
              "# Keys not set here come from config/config.yaml (the demo's); see config/templates/."]
    header += [f"# {note}" for note in notes]
    write_text_atomic(out, "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False))
    return config, notes


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry init", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="BIDS dataset, fMRIPrep derivatives, or series files + a table")
    parser.add_argument("--out", required=True, help="config YAML to write")
    args = parser.parse_args(argv)
    config, notes = write_config(args.folder, args.out)
    print(f"{args.out}: entry_point {config['entry_point']}")
    for note in notes:
        print(f"  {note}")
    return 0

