"""Typed training configuration. Recipes are plain ``TrainConfig`` values; the resolved config is
saved in every checkpoint's metadata."""
from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from ..data import AugmentConfig
from ..data.mixing import MIX_KINDS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    bias_lr_scale: float = 1.0      # biases and norm parameters: lr x this, weight decay / this
    schedule: str = "cosine"        # cosine | onecycle (linear up, linear down) | constant
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    ema_decay: float = 0.0          # 0: off; else evaluate and save an EMA of the weights
    clip_grad_norm: float = 0.0     # 0: off; else scale each step's gradients to at most this global L2 norm
    amp: bool = True                # bf16 autocast on CPUs that support it, fp16 on CUDA
    channels_last: bool = True
    seed: int = 0
    limit: int | None = None        # train on a random subset of this many images
    eval_every: int = 1             # evaluate every this many epochs (0: only at the end)
    validation: int = 0             # hold this many training images out (stratified, fixed) and evaluate on
                                    # them instead of the test split: for choosing methods and settings
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the objective: weights per loss term (see kd_core.losses) and their options
    loss_weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    temperature: float = 4.0
    kd_standardize: bool = False    # KD between z-scored logits (logit standardization, Sun et al. 2024)
    dkd_alpha: float = 1.0          # decoupled KD: weight of the target-class term (Zhao et al. 2022)
    dkd_beta: float = 8.0           # decoupled KD: weight of the non-target-class term
    cam_target: str = "teacher"     # teacher | label
    cam_distance: str = "l1"        # l1 | mse
    feature_spatial: str = "pool"   # pool | resize
    # 0: run the teacher at every step; N: run it once on N augmented views of every training image
    # and train on those views (see kd_core.training.teacher_bank)
    teacher_views: int = 0
    mirror_views: bool = False      # also train on each banked view's mirror image, with that view's targets
                                    # (nothing without a bank: fresh draws already flip)

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first impossible value."""
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must not be negative, got {self.weight_decay}"),
            (self.bias_lr_scale > 0, f"bias lr scale must be positive, got {self.bias_lr_scale}"),
            (0 <= self.warmup_epochs <= self.epochs, f"warm-up must be within 0..epochs, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.ema_decay < 1, f"EMA decay must be in [0, 1), got {self.ema_decay}"),
            (self.clip_grad_norm >= 0, f"gradient clipping norm must not be negative, got {self.clip_grad_norm}"),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
            (self.eval_every >= 0, f"eval interval must not be negative, got {self.eval_every}"),
            (self.validation >= 0, f"validation must not be negative, got {self.validation}"),
            (self.teacher_views >= 0, f"teacher views must not be negative, got {self.teacher_views}"),
            (self.temperature > 0, f"temperature T must be positive, got {self.temperature}"),
            (self.cam_target in ("teacher", "label"), f"CAM target must be teacher or label, got {self.cam_target!r}"),
            (self.cam_distance in ("l1", "mse"), f"CAM distance must be l1 or mse, got {self.cam_distance!r}"),
            (self.feature_spatial in ("pool", "resize"), f"feature spatial must be pool or resize, got {self.feature_spatial!r}"),
            (all(w >= 0 for w in self.loss_weights.values()), f"loss weights must not be negative, got {self.loss_weights}"),
            (any(w > 0 for w in self.loss_weights.values()), "at least one loss weight must be positive"),
            (self.augment.mix in MIX_KINDS, f"mixing must be one of {MIX_KINDS}, got {self.augment.mix!r}"),
            (self.augment.mix_alpha > 0, f"mixing alpha must be positive, got {self.augment.mix_alpha}"),
            (self.augment.crop_padding >= 0 and self.augment.rotation >= 0 and self.augment.color_jitter >= 0
             and self.augment.cutout >= 0, "augmentation strengths must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def loss_options(self) -> dict[str, dict[str, Any]]:
        return {"ce": {"label_smoothing": self.label_smoothing}, "kd": {"temperature": self.temperature, "standardize": self.kd_standardize},
                "dkd": {"temperature": self.temperature, "alpha": self.dkd_alpha, "beta": self.dkd_beta},
                "cam": {"target": self.cam_target, "distance": self.cam_distance},
                "feature": {"spatial": self.feature_spatial}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> dict[str, Any]:
        """The settings as they are saved (JSON values: tuples become lists)."""
        return json.loads(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        if isinstance(values.get("augment"), dict):
            values["augment"] = AugmentConfig(**{key: value for key, value in values["augment"].items()
                                                 if key in AugmentConfig.__dataclass_fields__})
        return cls(**values)


def complete_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Training settings saved as JSON (a checkpoint's or a resumable run's), with every setting
    newer than the save read as its default: what that run trained with. Settings since removed
    (they held their no-op defaults in every saved run: docs/experiments.md) are dropped."""
    defaults = TrainConfig().to_json()
    completed = {**defaults, **{name: value for name, value in saved.items() if name in defaults}}
    augment = completed["augment"] if isinstance(completed["augment"], Mapping) else {}
    completed["augment"] = {**defaults["augment"],
                            **{name: value for name, value in augment.items() if name in defaults["augment"]}}
    return completed


# -- overriding single settings ----------------------------------------------------------------------
# Every field, and every augmentation field as ``augment.<name>``, can be set by name: the CLI's
# ``--set name=value``, a recipe's overrides, a dashboard job. Values are checked against the
# dataclass's own annotations, so a new field needs no flag, parser or form of its own.

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def setting_types() -> dict[str, Any]:
    """``{"epochs": int, ..., "augment.cutout": int, ...}``: every setting and its annotated type."""
    hints = typing.get_type_hints(TrainConfig)
    settings = {name: kind for name, kind in hints.items() if name != "augment"}
    settings.update({f"augment.{name}": kind for name, kind in typing.get_type_hints(AugmentConfig).items()})
    return settings


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """``value`` (a Python value, or text from a command line) as a value of ``kind``."""
    if isinstance(kind, types.UnionType):  # ``int | None``
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(option for option in typing.get_args(kind) if option is not type(None))
    text = value.strip() if isinstance(value, str) else None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
        elif kind is int:
            number = float(text) if text is not None else value
            if not isinstance(number, bool) and isinstance(number, (int, float)) and float(number).is_integer():
                return int(number)
        elif kind is float:
            number = float(text) if text is not None else value
            if not isinstance(number, bool) and isinstance(number, (int, float)):
                return float(number)
        elif kind is str:
            if isinstance(value, str):
                return value
        elif typing.get_origin(kind) is dict:
            mapping = json.loads(text) if text is not None else value
            if isinstance(mapping, dict):
                return {str(key): _coerce(f"{name}.{key}", float, weight) for key, weight in mapping.items()}
    except (ValueError, json.JSONDecodeError):
        pass
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        kind, 'a JSON object such as {"ce": 1.0}')
    raise ValueError(f"setting {name}: expected {expected}, got {value!r}")


def parse_setting(assignment: str) -> tuple[str, Any]:
    """``"lr=0.02"`` -> ``("lr", 0.02)``, checked against the dataclass (``ValueError`` otherwise)."""
    name, equals, text = assignment.partition("=")
    name = name.strip().replace("-", "_")
    if not equals:
        raise ValueError(f"--set takes NAME=VALUE, got {assignment!r}")
    kinds = setting_types()
    if name not in kinds:
        raise ValueError(f"unknown setting {name!r}; settings: {', '.join(sorted(kinds))}")
    return name, _coerce(name, kinds[name], text)


def with_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """``config`` with the settings named in ``overrides`` (flat names, ``augment.<name>``, or an
    ``augment`` mapping) replaced, each checked against its annotated type."""
    kinds = setting_types()
    flat: dict[str, Any] = {}
    for name, value in overrides.items():
        if name == "augment" and isinstance(value, (Mapping, AugmentConfig)):
            items = asdict(value) if isinstance(value, AugmentConfig) else value
            flat.update({f"augment.{key}": item for key, item in items.items()})
        else:
            flat[name] = value
    unknown = sorted(set(flat) - set(kinds))
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}")
    checked = {name: _coerce(name, kinds[name], value) for name, value in flat.items()}
    augment = replace(config.augment, **{name[len("augment."):]: value for name, value in checked.items()
                                         if name.startswith("augment.")})
    return replace(config, augment=augment, **{name: value for name, value in checked.items()
                                               if not name.startswith("augment.")})


def flat_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved configuration (JSON values, settings newer than the save at their defaults) as flat
    ``name -> value`` pairs, augmentation as ``augment.<name>``."""
    complete = complete_config(dict(saved))
    flat = {name: value for name, value in complete.items() if name != "augment"}
    augment = {**json.loads(json.dumps(asdict(AugmentConfig()))), **complete.get("augment", {})}
    augment = {name: value for name, value in augment.items() if name in AugmentConfig.__dataclass_fields__}
    flat.update({f"augment.{name}": value for name, value in augment.items()})
    return flat


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in which ``saved`` differs from ``current`` (both as saved, i.e. JSON values),
    with ``saved``'s values; where a run computes is not a setting of what it computes (``device``)."""
    before, now = flat_settings(saved), flat_settings(current)
    return {name: value for name, value in before.items() if name != "device" and now.get(name) != value}
