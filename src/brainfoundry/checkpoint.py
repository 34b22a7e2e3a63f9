"""Training checkpoints: everything needed to resume a run exactly, written atomically.

A checkpoint is the model part of a model file (:meth:`brainfoundry.models.base.FoundationModel.payload`:
family, config, state dict) plus the optimizer and scheduler states, the RNG states of python, numpy
and torch (CPU and CUDA) of every rank, each rank's data position, the metrics history and the
training config. :func:`check_resumable` refuses a checkpoint of another family, model config,
parcel set or trajectory-shaping training setting and says which keys differ.

It is a ``torch.save`` zip read back with ``torch.load(weights_only=True)``: only tensors and plain
Python values (dict, list, tuple, str, int, float, bool, None) are unpickled, so a crafted file
cannot run code; everything saved is kept in that form (the numpy RNG state as a list of ints), so
no global has to be allowlisted. Before unpickling, every member's CRC-32 (which the zip format
records) is checked, so a flipped bit is reported instead of resuming from corrupt weights. A
checkpoint is not a model file for sharing: ``brainfoundry convert-model checkpoint.pt model.safetensors``
turns one into a model file.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from brainfoundry.errors import InputError
from brainfoundry.io import atomic_path
from brainfoundry.models.files import CONVERT_HINT, ModelChecksumError, UnsafeModelFileError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT_VERSION = 2  # 1: numpy RNG state as a numpy tuple (needed unpickling numpy objects)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and every CUDA device) as plain values."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {"bit_generator": str(np_state["bit_generator"]),
                       "state": {"key": [int(v) for v in np_state["state"]["key"]], "pos": int(np_state["state"]["pos"])},
                       "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` to a temporary name and rename it onto ``path``."""
    with atomic_path(path) as tmp:
        torch.save({**dict(payload), "kind": "checkpoint", "format_version": CHECKPOINT_FORMAT_VERSION}, tmp)
    return Path(path)


def _refused_global(err: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f" (it holds {found.group(1)})" if found else ""


def read_torch_file(path: str | Path) -> Any:
    """A ``torch.save`` zip's content, its CRCs checked, unpickled with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    data = path.read_bytes()
    if data[:4] != b"PK\x03\x04":
        if data[:1] == b"\x80":
            raise UnsafeModelFileError(path, "is a plain pickle, not a torch checkpoint; unpickling it could run "
                                             "code; " + CONVERT_HINT)
        if path.suffix in (".safetensors", ".json"):
            raise InputError(path, "is a model file, not a training checkpoint (no optimizer/RNG/data state)")
        raise InputError(path, "cannot read the checkpoint file (not a torch.save zip archive)")
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise InputError(path, f"cannot read the checkpoint file ({err})") from None
    if bad is not None:
        raise ModelChecksumError(path, f"member {bad} fails its CRC-32 check: the file is corrupt")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeModelFileError(path, "holds Python objects beyond tensors and plain values" + _refused_global(err) +
                                         "; unpickling it could run code (a file of an older brainfoundry, or "
                                         "crafted); " + CONVERT_HINT) from None
    except Exception as err:  # torch raises several types for damaged archives
        raise InputError(path, f"cannot read the checkpoint file ({err})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's payload (:func:`read_torch_file`: CRCs checked, ``weights_only=True``)."""
    if not Path(path).is_file():
        raise InputError(path, "checkpoint not found")
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or "family" not in payload or "state_dict" not in payload:
        raise InputError(path, "not a brainfoundry checkpoint (no family/state_dict)")
    if payload.get("kind") != "checkpoint":
        raise InputError(path, "is a model file, not a training checkpoint (no optimizer/RNG/data state)")
    return payload


def _diff(prefix: str, old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    keys = (set(old) | set(new)) - set(ignore)
    return [f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(keys) if old.get(k) != new.get(k)]


def check_resumable(path: str | Path, checkpoint: Mapping[str, Any], *, family: str, model_config: Mapping[str, Any],
                    train_config: Mapping[str, Any], parcel_names: Sequence[str] | None, world_size: int,
                    ignore_train_keys: Sequence[str] = ()) -> None:
    """Raise ``InputError`` naming the checkpoint when it cannot continue this run exactly."""
    if checkpoint["family"] != family:
        raise InputError(path, f"checkpoint of a {checkpoint['family']} model; this run trains {family} "
                               "(use another --out, or --resume never to start over)")
    problems = _diff("model.", checkpoint["config"], model_config)
    problems += _diff("trainer.", checkpoint.get("train_config", {}), train_config, ignore_train_keys)
    saved_names = checkpoint.get("parcel_names")
    if parcel_names is not None and saved_names is not None and list(saved_names) != list(parcel_names):
        problems.append(f"parcels: {len(saved_names)} in the checkpoint, {len(parcel_names)} in the shards")
    if int(checkpoint.get("world_size", 1)) != world_size:
        problems.append(f"world size: {checkpoint.get('world_size')} -> {world_size}")
    if problems:
        raise InputError(path, "checkpoint does not match this run (" + "; ".join(problems) +
                               "); use --resume never to start over")
