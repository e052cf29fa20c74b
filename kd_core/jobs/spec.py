"""What a distillation job asks for, and the checks it passes before it is queued.

A job names its teacher by checkpoint name only (``airnet``, never a path): the file is looked up
in the checkpoints folder and refused when the name would lead outside it.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import models
from ..checkpoint import SUFFIX, CheckpointError, read_metadata
from ..losses import LOSSES
from ..run import method_name
from ..training import TrainConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class JobSpec:
    teacher: str                   # checkpoint name in the checkpoints folder
    student: str                   # model-zoo architecture
    data: str                      # cifar10 | mnist | folder:PATH
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 0.25, "kd": 0.75})
    temperature: float = 4.0
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 256
    seed: int = 0
    limit: int | None = None       # train on a random subset of this many images
    teacher_views: int = 0         # 0: teacher at every step; N: a teacher bank of N views per image
    name: str | None = None        # checkpoint name; default <student>-<terms>, made unique

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "JobSpec":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown job settings: {', '.join(unknown)}")
        missing = sorted(name for name in ("teacher", "student", "data") if values.get(name) in (None, ""))
        if missing:
            raise ValueError(f"{', '.join(missing)}: required")
        return cls(**values)


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
            or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _weights(weights: Any) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must map loss terms to numbers, got {weights!r}")
    checked = {}
    for term, weight in weights.items():
        if term not in LOSSES:
            raise ValueError(f"weights: unknown loss term {term!r}; choose from {', '.join(LOSSES.names())}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ValueError(f"weights: {term} must be a number >= 0, got {weight!r}")
        if weight > 0:
            checked[term] = float(weight)
    if not checked:
        raise ValueError("weights: at least one loss weight must be positive")
    return checked


def teacher_path(name: Any, checkpoints_dir: Path) -> Path:
    """The checkpoint file called ``name`` inside ``checkpoints_dir``; ``ValueError`` for anything else."""
    stem = name.removesuffix(SUFFIX) if isinstance(name, str) else ""
    if not NAME.fullmatch(stem):
        raise ValueError(f"teacher: {name!r} is not a checkpoint name (letters, digits, '.', '_', '-'; no folders)")
    root = checkpoints_dir.resolve()
    path = (root / f"{stem}{SUFFIX}").resolve()
    if path.parent != root:
        raise ValueError(f"teacher: {name!r} leads outside the checkpoints folder")
    if not path.is_file():
        available = ", ".join(file.stem for file in sorted(root.glob(f"*{SUFFIX}"))) or "none"
        raise ValueError(f"teacher: no checkpoint {stem!r} in {root} (available: {available})")
    try:
        read_metadata(path)
    except CheckpointError as error:
        raise ValueError(f"teacher: {error}") from None
    return path


def _check_data(source: Any, offered: Sequence[str] | None) -> str:
    if not isinstance(source, str):
        raise ValueError(f"data must be a source name, got {source!r}")
    if offered is not None and source not in offered:
        raise ValueError(f"data: {source!r} is not one of the offered data sets ({', '.join(offered)})")
    if source in ("cifar10", "mnist"):
        return source
    if source.startswith("folder:"):
        path = Path(source[len("folder:"):]).expanduser()
        if not path.exists():
            raise ValueError(f"data: {str(path)!r} does not exist")
        return source
    raise ValueError(f"data: unknown source {source!r}; use cifar10, mnist or folder:PATH")


def validate_spec(spec: JobSpec, checkpoints_dir: Path, data_sources: Sequence[str] | None = None) -> JobSpec:
    """The spec with numbers normalized, or ``ValueError`` whose message starts with the field."""
    if not isinstance(spec.student, str) or spec.student not in models.MODELS:
        raise ValueError(f"student: unknown architecture {spec.student!r}; choose one of "
                         f"{', '.join(models.list_models())}")
    if spec.name is not None and not (isinstance(spec.name, str) and NAME.fullmatch(spec.name)):
        raise ValueError(f"name: {spec.name!r} is not a checkpoint name (letters, digits, '.', '_', '-')")
    teacher_path(spec.teacher, checkpoints_dir)
    checked = JobSpec(
        teacher=spec.teacher.removesuffix(SUFFIX), student=spec.student,
        data=_check_data(spec.data, data_sources), weights=_weights(spec.weights),
        temperature=_positive("temperature", spec.temperature), epochs=_whole("epochs", spec.epochs, 1),
        lr=_positive("lr", spec.lr), batch_size=_whole("batch_size", spec.batch_size, 1),
        seed=_whole("seed", spec.seed, 0), limit=None if spec.limit is None else _whole("limit", spec.limit, 1),
        teacher_views=_whole("teacher_views", spec.teacher_views, 0), name=spec.name)
    train_config(checked).validate()
    return checked


def train_config(spec: JobSpec) -> TrainConfig:
    """The training settings of a job: the spec's values over ``TrainConfig``'s defaults (SGD with
    Nesterov momentum, cosine schedule, crop and flip augmentation, test evaluation every epoch)."""
    return TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, limit=spec.limit,
                       loss_weights=dict(spec.weights), temperature=spec.temperature,
                       teacher_views=spec.teacher_views)


def default_name(spec: JobSpec) -> str:
    """``camnet`` with ce, kd and cam -> ``camnet-ce-kd-cam``."""
    return f"{spec.student}-{method_name(spec.weights).replace('+', '-')}"
