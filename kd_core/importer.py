"""Bring weights trained elsewhere in as a self-describing checkpoint (``python -m kd_core import``).

A state dict is read from ``.safetensors``, or from ``.pt``/``.pth`` with
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary unpickling.
Training scripts wrap it in common ways (``{"state_dict": ...}``, ``{"model": ...}``, and key
prefixes such as ``module.`` from ``DataParallel``/DDP, ``model.``, ``_orig_mod.`` from
``torch.compile``); those are unwrapped, and the names are fitted to the architecture (a timm
model's own names go under the zoo wrapper's ``model.``). Every tensor's name and shape is then
checked, with an error naming the mismatches. The model is evaluated on the data set's test split
and written like any trained checkpoint, so the CLI, the studies and the dashboard take it as a
teacher.
"""
from __future__ import annotations

import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__, models
from .checkpoint import file_sha256, save_checkpoint
from .data import load_data
from .evaluation import classification_report, predict
from .profile import count_macs, count_parameters

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "backbone.")


class WeightsError(ValueError):
    """Weights that cannot be brought in; the message says what is wrong with them."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors``, ``.pt`` or ``.pth`` file, unwrapped from a training
    checkpoint's dict where needed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path.name} is not a readable safetensors file: {error}") from None
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise WeightsError(f"{path.name}: weights must be .safetensors, .pt or .pth")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise WeightsError(f"{path.name} is not a state dict that loads without unpickling code "
                           f"(torch.load(weights_only=True) refused it): {str(error).splitlines()[0]}") from None
    return _unwrap(loaded, path.name)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _unwrap(loaded: Any, name: str) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if _is_tensor_dict(loaded.get(key)):
                return dict(loaded[key])
        keys = ", ".join(map(str, list(loaded)[:8]))
        raise WeightsError(f"{name} holds a dict without a state dict in it (keys: {keys}); expected tensors "
                           f"by parameter name, or one of them under {', '.join(WRAPPER_KEYS)}")
    raise WeightsError(f"{name} holds a {type(loaded).__name__}, not a state dict (tensors by parameter name)")


def fit_names(tensors: Mapping[str, torch.Tensor], expected: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``tensors`` renamed to match ``expected`` as far as removing wrapper prefixes (stacked, as in
    ``module._orig_mod.``) and adding the architecture's own common prefix allow, and what was done
    ("" when nothing)."""
    expected = set(expected)
    stripped, removed = dict(tensors), []
    while prefix := next((p for p in PREFIXES if all(k.startswith(p) for k in stripped)), None):
        stripped = {k.removeprefix(prefix): v for k, v in stripped.items()}
        removed.append(prefix)
    common = _common_prefix(expected)
    candidates = [(dict(tensors), [])]
    if removed:
        candidates.append((stripped, [f"removed {''.join(removed)!r}"]))
    if common:
        candidates += [({common + k: v for k, v in found.items()}, how + [f"added {common!r}"])
                       for found, how in list(candidates)]
    found, how = max(candidates, key=lambda candidate: len(expected & set(candidate[0])))  # first of equals
    return found, ", ".join(how)


def _common_prefix(names: set[str]) -> str:
    """``"model."`` when every name starts with that one component (a wrapper such as the timm
    models'), else ``""``."""
    firsts = {name.split(".", 1)[0] for name in names}
    return f"{firsts.pop()}." if len(firsts) == 1 and all("." in name for name in names) else ""


def check_fit(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], arch: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{name} {tuple(tensors[name].shape)} (needs {tuple(expected[name].shape)})"
             for name in sorted(set(expected) & set(tensors)) if tensors[name].shape != expected[name].shape]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{label} ({len(names)}): {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    if problems:
        raise WeightsError(f"the weights do not fit {arch}: " + "; ".join(problems))


@dataclass
class Imported:
    path: Path
    meta: dict[str, Any]


def import_weights(arch: str, weights: str | Path, data: str, output: str | Path, name: str | None = None,
                   arch_args: Mapping[str, Any] | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, classes: Sequence[str] | None = None,
                   role: str = "teacher", cache_dir: str | Path | None = None) -> Imported:
    """Build ``arch`` for ``data``, load ``weights`` into it (checked), evaluate it on the test
    split and write the checkpoint ``output``."""
    weights, output = Path(weights), Path(output)
    models.factory(arch)  # an unknown architecture fails before any data is loaded
    tensors = read_state_dict(weights)
    bundle = load_data(data, cache_dir=cache_dir)
    mean, std = list(mean or bundle.mean), list(std or bundle.std)
    classes = list(classes or bundle.classes)
    channels = bundle.input_shape[0]
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise WeightsError(f"--{label} needs {channels} value(s), one per channel, got {len(values)}")
    if len(classes) != len(bundle.classes):
        raise WeightsError(f"--classes names {len(classes)} classes, the data set has {len(bundle.classes)}")
    args = models.arch_args_for(arch, len(classes), bundle.input_shape, **dict(arch_args or {}))
    model = models.create(arch, **args)
    tensors, renamed = fit_names(tensors, model.state_dict().keys())
    check_fit(model, tensors, arch)
    model.load_state_dict(tensors)
    model.eval()
    started = time.time()
    report = classification_report(predict(model, bundle.test.images, mean, std), bundle.test.labels)
    meta = {
        "name": name or output.stem, "role": role, "arch": arch, "arch_args": args,
        "data": {"source": data, "classes": classes, "input_size": list(bundle.input_shape), "mean": mean,
                 "std": std, "train_size": len(bundle.train), "test_size": len(bundle.test)},
        "method": "imported", "recipe": None, "config": {}, "teacher": None,
        "imported_from": {"file": weights.name, "sha256": file_sha256(weights), "renamed": renamed or None},
        "metrics": {"test_top1": round(report["top1"], 2), "test_top5": round(report["top5"], 2),
                    "per_class": [round(value, 2) for value in report["per_class"]],
                    "confusion": report["confusion"], "params": count_parameters(model),
                    "macs": count_macs(model, bundle.input_shape)},
        "train_seconds": 0.0, "wall_seconds": round(time.time() - started, 1),
        "versions": {"kd_core": __version__, "torch": torch.__version__, **models.arch_versions(arch)},
    }
    return Imported(save_checkpoint(output, model, meta), meta)
