"""Self-describing checkpoints: one ``.safetensors`` file per model.

The header's metadata holds, as JSON under the key ``kd_core``, everything needed to rebuild and
judge the model: architecture and arguments, data set (source, classes, input size,
normalization), method and training config, teacher, metrics and training time. Loading reads
tensors only; nothing is ever unpickled. Writes are atomic (temporary file, fsync, rename).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from . import models
from .files import write_atomically

FORMAT = "kd_core/1"
SUFFIX = ".safetensors"
# How a checkpoint stores its parameters (metadata key ``weights_dtype``; buffers such as batch-norm
# statistics always stay float32). float16 halves a large teacher's file; the model is rounded to it
# (round_weights) before it is evaluated, so the recorded metrics are those of the stored weights.
WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class MissingCheckpointError(CheckpointError):
    """The named checkpoint is not (or no longer) in its folder."""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a checkpoint's file stem: no folders, no dot files


def checkpoint_file(name: Any, folder: str | os.PathLike) -> Path:
    """The file of the checkpoint called ``name`` (a file stem as listed, ``.safetensors`` optional)
    inside ``folder``; :class:`CheckpointError` for a name that is not one, leads out of the folder
    (a symlink included), or is not there (:class:`MissingCheckpointError`). Messages name the
    checkpoint, never the folder's path on the server."""
    if not isinstance(name, str):
        raise CheckpointError(f"a checkpoint name must be text, not {type(name).__name__}")
    stem = name.removesuffix(SUFFIX)
    if not NAME.fullmatch(stem):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise CheckpointError(f"{shown!r} is not a checkpoint name: letters, digits, '.', '_' and '-' (at most "
                              "100, no folders), as listed")
    root = Path(folder).resolve()
    if not root.is_dir():
        raise CheckpointError("the checkpoints folder does not exist")
    resolved = (root / f"{stem}{SUFFIX}").resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointError(f"checkpoint {stem!r} links to a file outside the checkpoints folder; refused")
    if not resolved.is_file():
        available = sorted(path.stem for path in root.glob(f"*{SUFFIX}"))
        raise MissingCheckpointError(
            f"checkpoint {stem!r} is not in the checkpoints folder (deleted or renamed?); refresh the list. "
            f"Available: {', '.join(available) if available else 'none'}")
    return resolved


@dataclass
class LoadedCheckpoint:
    model: models.Classifier
    meta: dict[str, Any]
    path: Path

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.stem

    @property
    def mean(self) -> list[float]:
        return self.meta["data"]["mean"]

    @property
    def std(self) -> list[float]:
        return self.meta["data"]["std"]

    @property
    def classes(self) -> list[str]:
        return self.meta["data"]["classes"]


def _state_tensors(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    if dtype != torch.float32:
        for name, _ in model.named_parameters():
            if name in tensors and tensors[name].is_floating_point():
                tensors[name] = tensors[name].to(dtype)
    return tensors


def check_weights_dtype(weights_dtype: str) -> torch.dtype:
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    return WEIGHTS_DTYPES[weights_dtype]


@torch.no_grad()
def round_weights(model: torch.nn.Module, weights_dtype: str) -> torch.nn.Module:
    """Round ``model``'s floating parameters in place to what ``weights_dtype`` stores, so that the
    model in memory is exactly the one a checkpoint saved with that dtype loads back."""
    dtype = check_weights_dtype(weights_dtype)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            largest = parameter.abs().max().item() if parameter.numel() else 0.0
            if largest > torch.finfo(dtype).max:
                raise ValueError(f"parameter {name} reaches {largest:.3g}, beyond {weights_dtype}'s range")
            parameter.copy_(parameter.to(dtype))
    return model


def save_checkpoint(path: str | os.PathLike, model: models.Classifier, meta: dict[str, Any]) -> Path:
    """Write ``model`` with ``meta`` (must include ``arch``, ``arch_args`` and ``data``).

    ``meta["metrics"]["file_size"]`` is filled in with the exact size of the file written;
    ``meta["weights_dtype"]`` (default float32) says how the parameters are stored.
    """
    path = Path(path)
    for key in ("arch", "arch_args", "data"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    meta = json.loads(json.dumps(meta))  # a private, JSON-clean copy
    meta.setdefault("format", FORMAT)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("metrics", {})
    tensors = _state_tensors(model, check_weights_dtype(meta.setdefault("weights_dtype", "float32")))
    size = 0
    for _ in range(5):  # the size is part of the header, so iterate until it is a fixed point
        meta["metrics"]["file_size"] = size
        payload = serialize(tensors, metadata={"format": FORMAT, "kd_core": json.dumps(meta, sort_keys=True)})
        if len(payload) == size:
            break
        size = len(payload)
    write_atomically(path, payload)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint, from its header only (cheap)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated or another "
                              f"format): {error}") from None
    if header.get("format") != FORMAT or "kd_core" not in header:
        raise CheckpointError(f"{path.name} is a safetensors file without kd_core metadata "
                              f"(expected format {FORMAT})")
    try:
        meta = json.loads(header["kd_core"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path.name} has corrupt metadata: {error}") from None
    for key in ("arch", "arch_args", "data"):
        if key not in meta:
            raise CheckpointError(f"{path.name} metadata lacks {key!r}")
    return meta


def build_model(meta: dict[str, Any], where: str = "checkpoint") -> models.Classifier:
    try:
        factory = models.factory(meta["arch"])
    except KeyError as error:
        raise CheckpointError(f"{where} needs an architecture this kd_core does not have: {error.args[0]}") from None
    try:
        return factory(**meta["arch_args"])
    except (TypeError, ValueError) as error:  # arguments this kd_core's model does not take
        raise CheckpointError(f"{where}: cannot build {meta['arch']} from arch_args "
                              f"{meta['arch_args']}: {error}") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from the metadata and load its tensors; eval mode.

    Every way a file can be unusable raises :class:`CheckpointError` naming the problem.
    """
    path = Path(path)
    meta = read_metadata(path)
    model = build_model(meta, path.name)
    expected = model.state_dict()
    try:
        with safe_open(str(path), "pt", device="cpu") as handle:
            stored_names = set(handle.keys())
            missing = sorted(set(expected) - stored_names)
            unexpected = sorted(stored_names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{path.name} does not fit {meta['arch']}: "
                    + (f"missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "")
                    + ("; " if missing and unexpected else "")
                    + (f"unexpected tensors {', '.join(unexpected[:5])}" if unexpected else ""))
            tensors = {name: handle.get_tensor(name) for name in stored_names}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path.name} is damaged or went away while loading: {error}") from None
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"{meta['arch']} needs {tuple(expected[name].shape)}")
    model.load_state_dict(tensors)
    return LoadedCheckpoint(model.to(device).eval(), meta, path)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's tensors (names, dtypes, shapes, bytes in name order): the identity of
    its weights, unchanged when only a checkpoint's metadata is rewritten."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_state_tensors(model).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoints(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per ``.safetensors`` file: its name, path, size and metadata, or the error that
    makes it unusable (a broken file is listed, not fatal)."""
    rows = []
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        row: dict[str, Any] = {"name": path.stem, "path": str(path), "file_size": path.stat().st_size}
        try:
            row["meta"] = read_metadata(path)
        except CheckpointError as error:
            row["error"] = str(error)
        rows.append(row)
    return rows


def update_metadata(path: str | os.PathLike, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into a checkpoint's metadata (one level deep for dicts such as
    ``metrics``) and rewrite the file atomically; the tensors are copied unchanged."""
    path = Path(path)
    meta = read_metadata(path)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        else:
            meta[key] = value
    with safe_open(str(path), "pt", device="cpu") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}

    class _Tensors(torch.nn.Module):  # save_checkpoint takes a module; this one just holds tensors
        def state_dict(self, *args, **kwargs):
            return tensors

    save_checkpoint(path, _Tensors(), meta)
    return meta
