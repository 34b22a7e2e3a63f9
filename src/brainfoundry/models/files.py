"""Model files: safetensors weights plus a JSON sidecar; nothing in them is ever executed.

A model file is a pair written by :func:`save_model` and read by :func:`read_model_file` /
:func:`load_model`:

``<name>.safetensors``
    The tensors of the state dict (safetensors: a JSON header and raw little-endian buffers, no
    pickle, so reading one cannot run code).
``<name>.json``
    The metadata: format and version, family, model config, parcel count and names, the atlas, the
    data fingerprint, the normalisation statistics the model was trained with, the training config,
    the software versions, non-tensor state (``extra_state``) and ``weights.sha256``: the checksum
    of the weights file. Every reader recomputes it on the bytes it parses, so a flipped bit stops
    the load with :class:`ModelChecksumError` instead of giving NaN or plausible wrong metrics.

A folder in Hugging Face Hub layout (``model.safetensors`` beside ``config.json``, what
:func:`brainfoundry.models.export.export_model` writes) is read the same way: pass the folder or
its ``model.safetensors``.

Files written by ``torch.save`` (the model files of brainfoundry before format 2, or anything
crafted to look like one) are refused with :class:`UnsafeModelFileError`: unpickling them could run
arbitrary code. ``brainfoundry convert-model --trust-pickle OLD NEW`` converts a file one trusts.
Training checkpoints (``checkpoint.pt``) stay torch files but are read with ``weights_only=True``
(:mod:`brainfoundry.checkpoint`).

This module imports torch and safetensors only when tensors are read or written, so the metadata
(:func:`read_model_metadata`) is available to torch-free code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from brainfoundry.errors import InputError
from brainfoundry.io import atomic_path, write_json_atomic

#: Version of the model-file layout; a reader refuses files from a newer one. 1 was a torch pickle.
MODEL_FORMAT_VERSION = 2
FORMAT_NAME = "brainfoundry-model"
WEIGHTS_SUFFIX = ".safetensors"
#: The trainer's model file in its output folder (``model.json`` beside it).
MODEL_FILE = "model.safetensors"
#: The sidecar name of a Hugging Face Hub folder (used when ``<name>.json`` is absent).
HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"

CONVERT_HINT = ("if you trust the file, convert it once with "
                "`brainfoundry convert-model --trust-pickle OLD NEW.safetensors`")


class UnsafeModelFileError(InputError):
    """A file that only a pickle loader could read (it could run code): refused, never unpickled."""


class ModelChecksumError(InputError):
    """The weights file's sha256 differs from the one recorded when it was written (corrupt or altered)."""


# -- where the two halves live ---------------------------------------------------------------------------------
def sidecar_path(weights: str | Path) -> Path:
    """The metadata file that :func:`save_model` writes beside ``weights``."""
    weights = Path(weights)
    return weights.with_suffix(".json")


def _is_pickle_like(head: bytes) -> bool:
    # torch.save writes a zip (PK\x03\x04); the legacy format and plain pickles start with the PROTO opcode.
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def _refuse_pickle(path: Path) -> UnsafeModelFileError:
    return UnsafeModelFileError(path, "is a torch.save (pickle) file; brainfoundry reads model files only as "
                                      "safetensors + JSON, because unpickling can run arbitrary code; " + CONVERT_HINT)


def resolve(path: str | Path) -> tuple[Path, Path]:
    """``(weights, metadata)`` of a model given as its weights file, its JSON sidecar or its folder."""
    path = Path(path)
    if path.is_dir():
        weights = path / HUB_WEIGHTS
        meta = weights.with_suffix(".json") if weights.with_suffix(".json").is_file() else path / HUB_CONFIG
        if not weights.is_file():
            raise InputError(path, f"model folder without {HUB_WEIGHTS}")
        return weights, meta
    if not path.is_file():
        raise InputError(path, "model file not found")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if _is_pickle_like(head):
        raise _refuse_pickle(path)
    if path.suffix == ".json":
        meta = _read_json(path)
        name = str(dict(meta.get("weights") or {}).get("file") or "")
        if not name or Path(name).name != name:
            raise InputError(path, "model metadata without a plain weights.file name")
        return path.parent / name, path
    if path.suffix != WEIGHTS_SUFFIX:
        raise InputError(path, f"not a model file (expected <name>{WEIGHTS_SUFFIX} with <name>.json beside it)")
    meta = sidecar_path(path)
    return path, meta if meta.is_file() else path.parent / HUB_CONFIG


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "model metadata not found (the JSON written beside the .safetensors weights)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"model metadata is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise InputError(path, "model metadata is not a JSON object")
    return value


def _check_metadata(path: Path, meta: Mapping[str, Any]) -> None:
    if meta.get("format") != FORMAT_NAME or "family" not in meta or "config" not in meta:
        raise InputError(path, f"not brainfoundry model metadata (no format '{FORMAT_NAME}', family, config)")
    try:
        version = int(meta.get("format_version", 0))
    except (TypeError, ValueError):
        raise InputError(path, f"format_version {meta.get('format_version')!r} is not a number") from None
    if version > MODEL_FORMAT_VERSION:
        raise InputError(path, f"model file format {version} is newer than this brainfoundry reads "
                               f"({MODEL_FORMAT_VERSION})")
    sha = dict(meta.get("weights") or {}).get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise InputError(path, "model metadata without weights.sha256 (every model file records its checksum)")


# -- reading ------------------------------------------------------------------------------------------------------
def read_model_metadata(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The metadata of a model (no torch needed); ``verify`` checks the weights' sha256 too."""
    weights, meta_path = resolve(path)
    meta = _read_json(meta_path)
    _check_metadata(meta_path, meta)
    if verify:
        _verify(weights, meta, _read_weights_bytes(weights))
    return meta


def _read_weights_bytes(weights: Path) -> bytes:
    try:
        return weights.read_bytes()
    except FileNotFoundError:
        raise InputError(weights, "model weights not found (the .safetensors file beside the metadata)") from None


def _verify(weights: Path, meta: Mapping[str, Any], data: bytes) -> None:
    expected = meta["weights"]["sha256"]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelChecksumError(weights, f"sha256 {actual[:16]}... differs from {expected[:16]}... recorded in its "
                                          "metadata: the weights are corrupt or were changed after they were written")


def read_model_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Metadata plus ``state_dict`` (tensors on ``map_location``), checksum verified on the bytes parsed."""
    weights, meta_path = resolve(path)
    meta = _read_json(meta_path)
    _check_metadata(meta_path, meta)
    data = _read_weights_bytes(weights)
    if _is_pickle_like(data[:16]):
        raise _refuse_pickle(weights)
    _verify(weights, meta, data)
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
    except SafetensorError as err:
        raise InputError(weights, f"cannot read the safetensors weights ({err})") from None
    if map_location not in (None, "cpu"):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    state = {**tensors, **dict(meta.get("extra_state") or {})}
    return {**meta, "state_dict": state}


def load_model(path: str | Path, family: str | None = None, map_location: Any = "cpu"):
    """Rebuild a model from its file. ``family``, when given, must match the file's."""
    return model_from_payload(read_model_file(path, map_location), path, family)


def model_from_payload(payload: Mapping[str, Any], path: str | Path, family: str | None = None):
    """The model of a :func:`read_model_file` payload (``path`` names it in errors)."""
    from brainfoundry.models import build_model

    if family is not None and payload["family"] != family:
        raise InputError(path, f"holds a {payload['family']} model, not {family}")
    model = build_model(payload["family"], payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise InputError(path, f"weights do not fit the {payload['family']} config stored with them ({err})") from err
    return model


# -- writing ------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """The versions a model file records (brainfoundry, python, torch, safetensors, numpy)."""
    from brainfoundry.io import software_versions

    found = software_versions(["torch", "safetensors"])
    return {k: found[k] for k in ("brainfoundry", "python", "torch", "safetensors", "numpy") if k in found}


def split_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, extra_state)``: the tensors for safetensors, the rest (e.g. an EMA momentum) for JSON."""
    import torch

    tensors, extra = {}, {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            # safetensors wants contiguous CPU tensors that do not share storage.
            tensors[key] = value.detach().to("cpu").contiguous().clone()
        else:
            extra[key] = value
    json.dumps(extra)  # a non-JSON extra state must fail here, before anything is written
    return tensors, extra


def write_model_file(weights: str | Path, state_dict: Mapping[str, Any], metadata: Mapping[str, Any],
                     meta_path: str | Path | None = None) -> Path:
    """Write the weights, then the metadata with their sha256 (each atomically); returns the weights path.

    The metadata is written last: a crash between the two leaves new weights with old metadata, which
    the checksum reports, never a silently mixed model.
    """
    from safetensors.torch import save as save_safetensors

    weights = Path(weights)
    if weights.suffix != WEIGHTS_SUFFIX:
        raise InputError(weights, f"a model file is named <name>{WEIGHTS_SUFFIX}")
    tensors, extra = split_state(state_dict)
    blob = save_safetensors(tensors, metadata={"format": "pt"})  # "pt": the Hub's marker for torch tensors
    with atomic_path(weights) as tmp:
        Path(tmp).write_bytes(blob)
    meta = {k: v for k, v in dict(metadata).items() if k not in ("state_dict", "kind")}
    meta.update(format=FORMAT_NAME, format_version=MODEL_FORMAT_VERSION, extra_state=extra,
                weights={"file": weights.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)})
    meta.setdefault("versions", versions())
    write_json_atomic(meta_path or sidecar_path(weights), meta)
    return weights


def save_model(model, path: str | Path, **extra: Any) -> Path:
    """Write ``model``'s file at ``path`` (``.safetensors``; the JSON beside it); ``extra`` rides in the JSON."""
    payload = model.payload()
    return write_model_file(path, payload.pop("state_dict"), {**payload, **extra})


# -- converting a trusted pickle ---------------------------------------------------------------------------------
def convert_model(old: str | Path, new: str | Path, trust_pickle: bool = False) -> Path:
    """Rewrite a torch model file or training checkpoint as a safetensors model file.

    The file is read with ``weights_only=True`` (tensors and plain values only: a current checkpoint,
    many old model files); one that needs more is converted only with ``trust_pickle``, because it is
    then unpickled as is and could run code.
    """
    import torch

    from brainfoundry.models import build_model

    old = Path(old)
    if not old.is_file():
        raise InputError(old, "file not found")
    if trust_pickle:
        payload = torch.load(old, map_location="cpu", weights_only=False)
    else:
        from brainfoundry.checkpoint import read_torch_file

        try:
            payload = read_torch_file(old)
        except UnsafeModelFileError:
            raise UnsafeModelFileError(old, "holds Python objects that only a full unpickler reads, which can run "
                                            "arbitrary code: pass --trust-pickle only for a file you trust") from None
    if not isinstance(payload, dict) or "family" not in payload or "state_dict" not in payload:
        raise InputError(old, "not a brainfoundry model file (no family/state_dict)")
    model = build_model(payload["family"], payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise InputError(old, f"weights do not fit the {payload['family']} config stored with them ({err})") from err
    keep = ("parcel_names", "train_config", "atlas", "norm_stats", "pseudo_labels", "data", "training")
    extra = {k: payload[k] for k in keep if k in payload}
    if isinstance(extra.get("norm_stats"), str):
        extra["norm_stats"] = {"file": extra["norm_stats"]}
    if "pseudo_labels" in extra:
        extra["pseudo_labels"] = {str(k): [int(v[0]), float(v[1])] for k, v in extra["pseudo_labels"].items()}
    extra["converted_from"] = {"file": old.name, "format_version": int(payload.get("format_version", 1))}
    return save_model(model, new, **extra)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry convert-model", description=convert_model.__doc__)
    parser.add_argument("old", help="a torch.save model file (model.pt) or a training checkpoint")
    parser.add_argument("new", help="the model file to write (<name>.safetensors; <name>.json beside it)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle OLD as is (it can run code: only for a file you trust)")
    args = parser.parse_args(argv)
    path = convert_model(args.old, args.new, trust_pickle=args.trust_pickle)
    print(f"wrote {path} and {sidecar_path(path)}", file=sys.stdout)
    return 0
