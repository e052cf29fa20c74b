"""What a distillation job asks for, and the checks it passes before it is queued.

A job names its teacher by checkpoint name only (``airnet``, never a path): the file is looked up
in the checkpoints folder and refused when the name would lead outside it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import models
from ..experiments import recipes
from ..checkpoint import NAME, SUFFIX, CheckpointError, checkpoint_file, load_checkpoint, read_metadata
from ..data import DataError, load_data
from ..data.sources import parse_source, source_name
from ..losses import LOSSES, feature_shape
from ..training.teacher_bank import bank_bytes
from ..run import RunSpec, method_name
from ..training import TrainConfig
from ..training.config import with_overrides


@dataclass
class JobSpec:
    """A job: a recipe (or none) and the settings that override it. Settings left ``None`` are the
    recipe's; with no recipe, ``TrainConfig``'s defaults and
    :data:`kd_core.experiments.recipes.DISTILL_WEIGHTS` (:func:`base_recipe`)."""

    teacher: str | None = None     # checkpoint name in the checkpoints folder; default: the recipe's teacher
    student: str | None = None     # model-zoo architecture; default: the recipe's
    data: str | None = None        # cifar10 | mnist | folder:PATH, one of the offered sources
    recipe: str | None = None      # a distillation recipe to start from
    weights: dict[str, float] | None = None
    temperature: float | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    limit: int | None = None       # train on a random subset of this many images (None: all)
    teacher_views: int | None = None  # 0: teacher at every step; N: a teacher bank of N views per image
    name: str | None = None        # checkpoint name; default <student>-<terms>, made unique

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "JobSpec":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown job settings: {', '.join(unknown)}")
        values = {key: (None if value == "" else value) for key, value in values.items()}
        required = ("data",) if values.get("recipe") else ("teacher", "student", "data")
        missing = sorted(name for name in required if values.get(name) is None)
        if missing:
            raise ValueError(f"{', '.join(missing)}: required")
        return cls(**values)


# the job settings a form offers, and the TrainConfig setting each one overrides
SETTINGS = {"weights": "loss_weights", "temperature": "temperature", "epochs": "epochs", "lr": "lr",
            "batch_size": "batch_size", "seed": "seed", "limit": "limit", "teacher_views": "teacher_views"}
# What one job may ask of a shared machine (the recipes stay well inside: 130 epochs, 16 views).
MAX_EPOCHS = 300
MAX_TEACHER_VIEWS = 32
MAX_BATCH_SIZE = 4096
MAX_LR = 10.0
MAX_TEMPERATURE = 100.0
MAX_LIMIT = 10_000_000
MAX_BANK_BYTES = 4 * 2**30  # a job's teacher bank, in memory and in the cache folder


def distillation_recipes() -> list[str]:
    return [name for name in recipes.names() if recipes.get(name).teacher]


def base_recipe(spec: JobSpec) -> recipes.Recipe:
    """The recipe a job starts from: the named one, or the base of a run that names none."""
    if spec.recipe is None:
        return recipes.Recipe.custom(spec.student or "camnet", distill=True)
    if not isinstance(spec.recipe, str) or spec.recipe not in distillation_recipes():
        raise ValueError(f"recipe: {spec.recipe!r} is not a distillation recipe; choose one of "
                         f"{', '.join(distillation_recipes())}")
    return recipes.get(spec.recipe)


def overrides(spec: JobSpec) -> dict[str, Any]:
    return {setting: getattr(spec, key) for key, setting in SETTINGS.items() if getattr(spec, key) is not None}


def train_config(spec: JobSpec) -> TrainConfig:
    """The training settings of a job: its recipe's, with the job's own values over them."""
    return with_overrides(base_recipe(spec).config, overrides(spec))


def form_values(recipe: str | None) -> dict[str, Any]:
    """What a job form shows for ``recipe`` (None: no recipe): every offered setting, from the very
    configuration the CLI's ``distill --recipe`` trains with."""
    spec = JobSpec(recipe=recipe)
    base, config = base_recipe(spec), train_config(spec)
    values = {key: getattr(config, setting) for key, setting in SETTINGS.items()}
    return {**values, "weights": dict(config.loss_weights), "teacher": base.teacher, "student": base.arch,
            "data": base.data}


def run_spec(spec: JobSpec, name: str, checkpoints_dir: Path, state_path: Path) -> RunSpec:
    """What :func:`kd_core.run.run` trains for a (validated) job: its recipe's ``run_spec``."""
    teacher = teacher_path(spec.teacher, checkpoints_dir)
    return base_recipe(spec).run_spec(overrides(spec), arch=spec.student, teacher=teacher, data=spec.data, name=name,
                                      output=checkpoints_dir / f"{name}{SUFFIX}", state_path=state_path)


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


def bank_size(spec: JobSpec, checkpoints_dir: Path, cache_dir: Path | None = None) -> int:
    """Bytes the teacher bank of a checked ``spec`` will hold (0 when it runs the teacher at every
    step): its views of every training image (the ``limit`` subset), from the teacher's checkpoint."""
    config = train_config(spec)
    active = [name for name, weight in config.loss_weights.items() if weight > 0]
    if not config.teacher_views or not any(LOSSES.get(name).needs_teacher for name in active):
        return 0
    teacher = load_checkpoint(teacher_path(spec.teacher, checkpoints_dir))
    recorded = teacher.meta["data"]
    images = recorded.get("train_size") if recorded.get("source") == spec.data else None
    if images is None:
        images = len(load_data(spec.data, cache_dir=cache_dir).train)
    if config.limit:
        images = min(images, config.limit)
    shape = feature_shape(teacher.model, tuple(recorded["input_size"]))
    reads_features = any(LOSSES.get(name).needs_teacher and LOSSES.get(name).needs_teacher_features for name in active)
    return bank_bytes(config.teacher_views, images, len(teacher.classes),
                      shape[1:] if teacher.model.cam_layer is not None else None, shape if reads_features else None,
                      config.augment)


def check_bank(spec: JobSpec, checkpoints_dir: Path, cache_dir: Path | None = None) -> str:
    """What a checked job's teacher bank will hold, said in the job's message ("" without one);
    ``ValueError`` beyond :data:`MAX_BANK_BYTES`."""
    size, views = bank_size(spec, checkpoints_dir, cache_dir), train_config(spec).teacher_views
    if size > MAX_BANK_BYTES:
        raise ValueError(f"teacher_views: a bank of {views} views would hold {size / 2**30:.1f} GB, more than this "
                         f"server's {MAX_BANK_BYTES / 2**30:.0f} GB; use fewer views, a subset (limit), or 0 views "
                         "(the teacher at every step)")
    return f"its teacher bank will hold {size / 2**20:,.2f} MB ({views} views)" if size else ""


def teacher_path(name: Any, checkpoints_dir: Path) -> Path:
    """The checkpoint file called ``name`` inside ``checkpoints_dir``; ``ValueError`` for anything else."""
    try:
        path = checkpoint_file(name, checkpoints_dir)
        read_metadata(path)
    except CheckpointError as error:
        raise ValueError(f"teacher: {error}") from None
    return path


def _check_data(source: Any, offered: Sequence[str] | None) -> str:
    if not isinstance(source, str):
        raise ValueError(f"data must be a source name, got {source!r}")
    if offered is not None and source not in offered:
        raise ValueError(f"data: {source!r} is not one of the offered data sets ({', '.join(offered)})")
    try:
        _, path = parse_source(source)
    except DataError as error:
        raise ValueError(f"data: {error}") from None
    if path is not None and not path.exists():
        raise ValueError(f"data: the data set {source_name(source)!r} is not on this server (its folder is gone)")
    return source


def _at_most(name: str, value: Any, maximum: float) -> Any:
    if value is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g} on this server, got {value!r}")
    return value


def validate_spec(spec: JobSpec, checkpoints_dir: Path, data_sources: Sequence[str] | None = None) -> JobSpec:
    """The spec with its recipe's values filled in and numbers normalized, or ``ValueError`` whose
    message starts with the field."""
    base = base_recipe(spec)
    student = spec.student if spec.student is not None else base.arch
    teacher = spec.teacher if spec.teacher is not None else base.teacher
    if not isinstance(student, str) or student not in models.MODELS:
        raise ValueError(f"student: unknown architecture {student!r}; choose one of "
                         f"{', '.join(models.list_models())}")
    if spec.name is not None and not (isinstance(spec.name, str) and NAME.fullmatch(spec.name)):
        raise ValueError(f"name: {spec.name!r} is not a checkpoint name (letters, digits, '.', '_', '-')")
    teacher_path(teacher, checkpoints_dir)

    def given(key, check):
        return None if getattr(spec, key) is None else check(getattr(spec, key))

    checked = JobSpec(
        teacher=teacher.removesuffix(SUFFIX), student=student, data=_check_data(spec.data, data_sources),
        recipe=spec.recipe, weights=given("weights", _weights),
        temperature=_at_most("temperature", given("temperature", lambda v: _positive("temperature", v)), MAX_TEMPERATURE),
        epochs=_at_most("epochs", given("epochs", lambda v: _whole("epochs", v, 1)), MAX_EPOCHS),
        lr=_at_most("lr", given("lr", lambda v: _positive("lr", v)), MAX_LR),
        batch_size=_at_most("batch_size", given("batch_size", lambda v: _whole("batch_size", v, 1)), MAX_BATCH_SIZE),
        seed=given("seed", lambda v: _whole("seed", v, 0)),
        limit=_at_most("limit", given("limit", lambda v: _whole("limit", v, 1)), MAX_LIMIT),
        teacher_views=_at_most("teacher_views", given("teacher_views", lambda v: _whole("teacher_views", v, 0)),
                               MAX_TEACHER_VIEWS),
        name=spec.name)
    config = train_config(checked).validate()
    for key, setting in SETTINGS.items():  # the stored job says everything it trains with
        if getattr(checked, key) is None and key != "limit":
            setattr(checked, key, getattr(config, setting))
    checked.weights = {term: weight for term, weight in checked.weights.items() if weight > 0}
    return checked


def default_name(spec: JobSpec) -> str:
    """``camnet`` with ce, kd and cam -> ``camnet-ce-kd-cam``."""
    return f"{spec.student}-{method_name(spec.weights).replace('+', '-')}"
