"""Typed training configuration. Recipes are plain ``TrainConfig`` values; the resolved config is
saved in every checkpoint's metadata."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data import AugmentConfig

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
    ema_every: int = 1              # update the EMA every this many steps
    amp: bool = True                # bf16 autocast on CPUs that support it, fp16 on CUDA
    channels_last: bool = True
    seed: int = 0
    limit: int | None = None        # train on a random subset of this many images
    eval_every: int = 1             # evaluate on the test split every this many epochs (0: only at the end)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the objective: weights per loss term (see kd_core.losses) and their options
    loss_weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    temperature: float = 4.0
    kd_standardize: bool = False    # KD between z-scored logits (logit standardization, Sun et al. 2024)
    cam_target: str = "teacher"     # teacher | label
    cam_distance: str = "l1"        # l1 | mse
    feature_spatial: str = "pool"   # pool | resize
    # 0: run the teacher at every step; N: run it once on N augmented views of every training image
    # and train on those views (see kd_core.training.teacher_bank)
    teacher_views: int = 0
    mirror_views: bool = False      # also train on each banked view's mirror image, with that view's targets
    distinct_views: bool = False    # a bank's views of one image take distinct crop windows (teacher_bank.distinct_draws)

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
            (self.ema_every >= 1, f"EMA interval must be at least 1, got {self.ema_every}"),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
            (self.eval_every >= 0, f"eval interval must not be negative, got {self.eval_every}"),
            (self.teacher_views >= 0, f"teacher views must not be negative, got {self.teacher_views}"),
            (not self.mirror_views or self.teacher_views > 0, "mirrored views need a teacher bank (teacher views > 0)"),
            (not self.distinct_views or self.teacher_views > 0, "distinct views need a teacher bank (teacher views > 0)"),
            (self.temperature > 0, f"temperature T must be positive, got {self.temperature}"),
            (self.cam_target in ("teacher", "label"), f"CAM target must be teacher or label, got {self.cam_target!r}"),
            (self.cam_distance in ("l1", "mse"), f"CAM distance must be l1 or mse, got {self.cam_distance!r}"),
            (self.feature_spatial in ("pool", "resize"), f"feature spatial must be pool or resize, got {self.feature_spatial!r}"),
            (all(w >= 0 for w in self.loss_weights.values()), f"loss weights must not be negative, got {self.loss_weights}"),
            (any(w > 0 for w in self.loss_weights.values()), "at least one loss weight must be positive"),
            (self.augment.crop_padding >= 0 and self.augment.rotation >= 0 and self.augment.color_jitter >= 0
             and self.augment.cutout >= 0, "augmentation strengths must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def loss_options(self) -> dict[str, dict[str, Any]]:
        return {"ce": {"label_smoothing": self.label_smoothing}, "kd": {"temperature": self.temperature, "standardize": self.kd_standardize},
                "cam": {"target": self.cam_target, "distance": self.cam_distance},
                "feature": {"spatial": self.feature_spatial}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        if isinstance(values.get("augment"), dict):
            values["augment"] = AugmentConfig(**values["augment"])
        return cls(**values)


def complete_config(saved: dict[str, Any]) -> dict[str, Any]:
    """Training settings saved as JSON (a checkpoint's or a resumable run's), with every setting
    newer than the save read as its default: what that run trained with."""
    return {**json.loads(json.dumps(TrainConfig().to_dict())), **saved}
