"""The BIDS-Derivatives root of the results: ``results/dataset_description.json``.

With it, pybids (and any BIDS tool) reads the results folder as a derivatives dataset
(``BIDSLayout(raw, derivatives=results)``): ``DatasetType: derivative``, ``GeneratedBy`` (brainfoundry
with its version and the container image of its steps; fMRIPrep too when the workflow ran it) and
``SourceDatasets`` (the dataset the workflow read). Torch-free: the workflow's rule calls it while
Snakemake runs (workflow/rules/bids.smk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from brainfoundry.errors import InputError
from brainfoundry.io import write_json_atomic

# The BIDS version whose Derivatives rules the description follows (GeneratedBy, SourceDatasets).
BIDS_VERSION = "1.10.0"
DESCRIPTION = "dataset_description.json"


def source_dataset(config: dict[str, Any]) -> str | None:
    """The directory the workflow reads for its entry point (its dataset_description.json, if any)."""
    entry = config["entry_point"]
    if entry == "raw":
        return config.get("bids_dir")
    if entry == "derivatives":
        return config.get("derivatives_dir")
    return (config.get("timeseries") or {}).get("series_dir")


def _container(image: str | None) -> dict[str, str] | None:
    if not image:
        return None
    kind = "docker" if image.startswith("docker://") else "apptainer"
    return {"Type": kind, "Tag": image}


def _read_description(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"not a readable JSON file ({err})") from err
    if not isinstance(value, dict):
        raise InputError(path, "dataset_description.json must hold a JSON object")
    return value


def dataset_description(config: dict[str, Any], version: str, image: str | None) -> dict[str, Any]:
    """The description of the results of ``config``, made by brainfoundry ``version`` in ``image``."""
    generated = [{"Name": "brainfoundry", "Version": version,
                  "Description": "denoised parcel time series, pseudo-FC views, shards, pretrained models"}]
    if container := _container(image):
        generated[0]["Container"] = container
    if config["entry_point"] == "raw" and config.get("fmriprep"):
        fmriprep = {"Name": "fMRIPrep", "Version": config["fmriprep"]["version"]}
        if container := _container(config["fmriprep"].get("image")):
            fmriprep["Container"] = container
        generated.append(fmriprep)

    name = (config.get("bids") or {}).get("dataset_name") or (config.get("timeseries") or {}).get("dataset_name")
    sources = []
    source_dir = source_dataset(config)
    if source_dir:
        source = {"URL": Path(os.path.abspath(source_dir)).as_uri()}
        described = Path(source_dir) / DESCRIPTION
        if described.is_file():
            upstream = _read_description(described)
            name = name or upstream.get("Name")
            if upstream.get("DatasetDOI"):
                source["DOI"] = upstream["DatasetDOI"]
        sources.append(source)
    return {
        "Name": f"{name} (brainfoundry derivatives)" if name else "brainfoundry derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated,
        "SourceDatasets": sources,
    }


def source_description(config: dict[str, Any]) -> list[str]:
    """The source dataset's dataset_description.json when it has one (the rule's input)."""
    source_dir = source_dataset(config)
    path = Path(source_dir) / DESCRIPTION if source_dir else None
    return [str(path)] if path is not None and path.is_file() else []


def write_dataset_description(path: str | os.PathLike, config: dict[str, Any], version: str, image: str | None) -> Path:
    """Write the description atomically (temp name, then rename)."""
    return write_json_atomic(path, dataset_description(config, version, image))
