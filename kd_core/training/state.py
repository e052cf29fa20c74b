"""Resumable training state in one safetensors file (no pickle): model, EMA, loss adapters,
optimizer buffers and RNG states as tensors; epoch, history and optimizer groups as JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_path


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, buffers in state["state"].items():
        for name, value in buffers.items():
            key = f"optimizer/{index}/{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    items = list(tensors.items()) + list(meta["scalars"].items())
    for key, value in items:
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
               rng: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous state intact."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            tensors[f"{prefix}/{name}"] = tensor.detach().cpu().contiguous()
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    tensors.update({f"rng/{name}": value.cpu() for name, value in rng.items()})
    metadata = {"info": json.dumps(info), "optimizer": json.dumps(optimizer_meta)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_state(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore modules and optimizer in place; return the RNG tensors and the info dict."""
    with safe_open(str(path), "pt", device="cpu") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for prefix, module in modules.items():
        module.load_state_dict({key[len(prefix) + 1:]: value for key, value in tensors.items()
                                if key.startswith(prefix + "/")})
    optimizer_tensors = {key: value.to(device) if not key.endswith("/step") else value
                         for key, value in tensors.items() if key.startswith("optimizer/")}
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, json.loads(metadata["optimizer"])))
    rng = {key[len("rng/"):]: value for key, value in tensors.items() if key.startswith("rng/")}
    return rng, json.loads(metadata["info"])


def read_state_info(path: Path) -> dict[str, Any]:
    """The JSON part of a state file (epoch, config, history) without loading tensors."""
    with safe_open(str(path), "pt", device="cpu") as handle:
        return json.loads(handle.metadata()["info"])
