"""Train or distil one model end to end: load data and teacher, run the engine, evaluate in
float32, write a self-describing checkpoint. The CLI and the dashboard's job runner call this.
In a distributed run (kd_core.distributed) every process calls it; rank 0 alone writes the checkpoint."""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from . import __version__, distributed, models
from .checkpoint import (LoadedCheckpoint, check_weights_dtype, file_sha256, load_checkpoint, round_weights,
                         save_checkpoint, weights_sha256)
from .data import DataBundle, load_data
from .data.sources import DataError, default_cache_dir, parse_source
from .evaluation import classification_report, predict_views
from .profile import count_macs, count_parameters
from .losses import needs_teacher
from .training import Callback, TrainConfig, Trainer, TrainResult
from .training.targets import teacher_targets
from .runtime import seed_everything


@dataclass
class RunSpec:
    arch: str                              # registry name of the model to train
    data: str                              # data source (see kd_core.data.load_data)
    config: TrainConfig
    output: Path                           # checkpoint to write
    teacher: Path | None = None            # teacher checkpoint, for distillation
    name: str | None = None
    role: str = "student"                  # teacher | student
    recipe: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    state_path: Path | None = None         # resumable state; None: not resumable
    cache_dir: Path | None = None
    weights_dtype: str = "float32"         # how the checkpoint stores parameters (kd_core.checkpoint)


def method_name(weights: dict[str, float]) -> str:
    """``{'ce': 1, 'kd': 1, 'cam': 0.5}`` -> ``'ce+kd+cam'`` (terms with weight 0 left out)."""
    order = ["ce", "kd", "dkd", "feature", "cam", "cosine", "at"]
    active = [name for name in order if weights.get(name, 0) > 0]
    active += sorted(name for name, weight in weights.items() if weight > 0 and name not in order)
    return "+".join(active)


def teacher_summary(teacher: LoadedCheckpoint) -> dict[str, Any]:
    return {"name": teacher.name, "arch": teacher.meta["arch"], "file": teacher.path.name,
            "sha256": file_sha256(teacher.path),
            "weights_sha256": weights_sha256(teacher.model), "test_top1": teacher.meta.get("metrics", {}).get("test_top1")}


def check_compatible(teacher: LoadedCheckpoint, data: DataBundle) -> None:
    if teacher.classes != data.classes:
        raise ValueError(f"teacher {teacher.name} was trained on classes {teacher.classes[:4]}..., "
                         f"the data set has {data.classes[:4]}...")
    if list(teacher.meta["data"]["input_size"]) != list(data.input_shape):
        raise ValueError(f"teacher {teacher.name} takes inputs {teacher.meta['data']['input_size']}, "
                         f"the data set has {list(data.input_shape)}")


class HeldOutLeak(ValueError):
    """A run scored on images held out of train/ would learn from a teacher that trained on them."""


def _same_source(a: str | None, b: str) -> bool:
    """Whether two data-source strings name the same data (folder paths compared resolved)."""
    if a is None:
        return False
    try:
        (kind_a, path_a), (kind_b, path_b) = parse_source(a), parse_source(b)
    except DataError:
        return a == b
    if path_a is None or path_b is None:
        return (kind_a, path_a) == (kind_b, path_b)
    return kind_a == kind_b and path_a.resolve() == path_b.resolve()


def check_held_out(teacher_meta: dict[str, Any], teacher_name: str, data: str, validation: int) -> None:
    """Refuse to distil from ``teacher_meta``'s model into a student scored on ``validation`` images
    held out of ``data``'s training split unless the teacher was trained with that same split held
    out: a teacher that trained on those images carries their answers in its soft labels, and KD's
    validation score is biased upward relative to a cross-entropy run's (measured here: deepnn ->
    lightnn scored 1.3 points higher on validation than on the test split, relative to its twin;
    docs/experiments.md). The split is fixed by its size, so the same ``--validation N`` on the same
    data is the same split. What a teacher's own teacher saw is not recorded and not checked."""
    if not validation:
        return
    source = teacher_meta.get("data", {}).get("source")
    config = teacher_meta.get("config")
    held_out = (config or {}).get("validation") or 0
    if not _same_source(source, data):
        if distributed.is_main():
            print(f"note: teacher {teacher_name} was trained on {source or 'data it does not record'}, not {data}; "
                  f"if those images include the {validation:,} held out here, KD's validation score is biased "
                  "upward", file=sys.stderr)
        return
    if held_out == validation:
        return
    if config is None or teacher_meta.get("method") == "imported":
        trained = "records no held-out split (imported, or trained before --validation existed)"
    elif held_out:
        trained = f"was trained with --validation {held_out}, another split than this run's"
    else:
        trained = "was trained on all of its training images"
    raise HeldOutLeak(
        f"teacher {teacher_name} {trained}, so it may have trained on the {validation:,} images this run holds out "
        "for validation: its soft labels would carry their answers and bias a distilled student's validation score "
        f"upward. Distil from a teacher trained with --validation {validation} on the same data, or score on the "
        "test split (no --validation)")


def evaluate_final(model: models.Classifier, data: DataBundle, device: torch.device) -> dict[str, Any]:
    """Float32 test metrics: the numbers a checkpoint records and CI re-checks (and, for a net that
    predicts with test-time augmentation, its single-view top-1 beside them)."""
    logits, single = predict_views(model, data.test.images, data.mean, data.std, device=device)
    report = classification_report(logits, data.test.labels)
    if single is not None:  # the net predicts with test-time augmentation: its one-pass top-1 beside it
        report["top1_single_view"] = classification_report(single, data.test.labels)["top1"]
    return report


def run(spec: RunSpec, callbacks: Iterable[Callback] = (), stop_hook=None) -> tuple[TrainResult, Path | None]:
    """Train per ``spec``; write the checkpoint unless the run was stopped early.

    ``stop_hook(trainer)`` is called once the trainer exists (signal handlers use it).
    """
    spec.config.validate()
    check_weights_dtype(spec.weights_dtype)  # an unknown dtype fails before any data is loaded
    with distributed.main_first():  # rank 0 decodes and caches the data set; the others read the cache
        data = load_data(spec.data, cache_dir=spec.cache_dir)
    if spec.config.validation:
        data = data.with_validation(spec.config.validation)
    teacher = None
    if spec.teacher is not None:
        teacher = load_checkpoint(spec.teacher)
        check_compatible(teacher, data)
        if needs_teacher(spec.config.loss_weights):
            check_held_out(teacher.meta, teacher.name, spec.data, spec.config.validation)
    arch_args = models.arch_args_for(spec.arch, len(data.classes), data.input_shape, **spec.arch_args)
    seed_everything(spec.config.seed)  # the student's initial weights are part of a reproducible run
    model = models.create(spec.arch, **arch_args)
    teacher_model = teacher.model if teacher else None
    targets = teacher_targets(teacher_model, spec.config, needs_teacher(spec.config.loss_weights),
                              bank_dir=spec.cache_dir or default_cache_dir())
    trainer = Trainer(model, data, spec.config, teacher=teacher_model, callbacks=callbacks,
                      state_path=spec.state_path, targets=targets)
    if stop_hook is not None:
        stop_hook(trainer)
    started = time.time()
    result = trainer.fit()
    if result.stopped:
        return result, None
    if not distributed.is_main():  # rank 0 evaluates and writes the checkpoint; the others learn where
        path, result.test_top1, result.evaluated_on = distributed.broadcast_object(None)
        return result, path
    final = result.model.float().eval()
    shipped_arch, shipped_args, trained_as = spec.arch, arch_args, None
    if hasattr(final, "reparameterize"):  # trained in a richer form: ship the plain net it folds into
        shipped_arch, shipped_args, final = final.reparameterize()
        final = final.to(trainer.device).eval()
        trained_as = {"arch": spec.arch, "arch_args": arch_args, "params": count_parameters(result.model)}
    round_weights(final, spec.weights_dtype)  # evaluate exactly what the checkpoint will hold
    report = evaluate_final(final, data, trainer.device)
    final = final.cpu().to(memory_format=torch.contiguous_format)
    split = data.evaluated_on  # "test", or "validation": a pilot scored on images held out of train/
    meta = {
        "name": spec.name or spec.output.stem,
        "role": spec.role,
        "arch": shipped_arch,
        "arch_args": shipped_args,
        **({"trained_as": trained_as} if trained_as else {}),
        "data": {"source": spec.data, "classes": data.classes, "input_size": list(data.input_shape),
                 "mean": list(data.mean), "std": list(data.std), "train_size": len(trainer.train_split),
                 f"{split}_size": len(data.test), **({"split": data.split} if data.split else {})},
        "method": method_name(spec.config.loss_weights),
        "recipe": spec.recipe,
        "config": spec.config.to_dict(),
        "weights_dtype": spec.weights_dtype,
        "teacher": teacher_summary(teacher) if teacher else None,
        "metrics": {f"{split}_top1": round(report["top1"], 2), f"{split}_top5": round(report["top5"], 2),
                    **({f"{split}_top1_single_view": round(report["top1_single_view"], 2)}
                       if "top1_single_view" in report else {}),  # a net predicting with TTA: one pass too
                    **({"evaluated_on": "validation"} if split == "validation" else {}),
                    "per_class": [round(value, 2) for value in report["per_class"]],
                    "confusion": report["confusion"],
                    "params": count_parameters(final), "macs": count_macs(final, data.input_shape)},
        "history": [{"epoch": info.epoch + 1, "loss": round(info.train["loss"], 4),
                     "train_top1": round(info.train["train_top1"], 2),
                     **({f"{split}_top1": round(info.test["test_top1"], 2)} if "test_top1" in info.test else {})}
                    for info in result.history],
        "train_seconds": round(result.train_seconds, 1),
        "teacher_bank_seconds": round(result.bank_seconds, 3),  # its build, here or by the run that cached it
        **({"teacher_bank_reused": True} if result.bank_reused else {}),
        "wall_seconds": round(time.time() - started, 1),
        "device": str(trainer.device) + (f" ({torch.cuda.get_device_name()})" if trainer.device.type == "cuda" else
                                         f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        **({"processes": distributed.world_size()} if distributed.world_size() > 1 else {}),  # under torchrun
        "versions": {"kd_core": __version__, "torch": torch.__version__, **models.arch_versions(spec.arch)},
    }
    path = save_checkpoint(spec.output, final, meta)
    result.test_top1, result.evaluated_on = report["top1"], split
    distributed.broadcast_object((path, result.test_top1, split))
    return result, path
