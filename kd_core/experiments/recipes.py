"""Named recipes: the exact settings that produce each shipped checkpoint, as plain Python values,
and :meth:`Recipe.run_spec`, the one way from a recipe to a run.

The CLI (``train/distill --recipe NAME``), the study runner and the dashboard's jobs all call
``run_spec``; settings given alongside a recipe override single fields of its ``TrainConfig``
(``--epochs 1 --limit 2000``, or any field with ``--set name=value``). How each recipe was found,
and what was tried and did not pay: ``docs/experiments.md``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..data import AugmentConfig
from ..registry import Registry
from ..run import RunSpec
from ..training import TrainConfig, complete_config
from ..training.config import changed_settings, with_overrides

CIFAR10_JPEG = "folder:../shared/data/cifar10-jpeg.tar.gz"
CHECKPOINTS = Path("checkpoints")
RUNS = Path("runs")
# The objective of a distillation given no weights and no recipe: the PyTorch KD tutorial's mix.
DISTILL_WEIGHTS = {"ce": 0.25, "kd": 0.75}


@dataclass(frozen=True)
class Recipe:
    name: str
    arch: str
    role: str                      # teacher | student
    config: TrainConfig
    description: str
    teacher: str | None = None     # recipe name of the teacher; its checkpoint is checkpoints/<name>.safetensors
    data: str = CIFAR10_JPEG
    arch_args: dict[str, Any] = field(default_factory=dict)
    published: str | None = None   # the source project's number for this row (original CIFAR-10)
    weights_dtype: str = "float32" # how the checkpoint stores parameters (float16 halves the file)
    named: bool = True             # False: an ad-hoc run (:meth:`custom`), recorded without a recipe name
    shipped: bool = True           # False: too large to commit; its file is git-ignored, its students record it

    @classmethod
    def custom(cls, arch: str, distill: bool, data: str = "cifar10") -> "Recipe":
        """The base of a run that names no recipe: ``TrainConfig``'s defaults, and for a
        distillation :data:`DISTILL_WEIGHTS`."""
        config = TrainConfig(loss_weights=dict(DISTILL_WEIGHTS)) if distill else TrainConfig()
        return cls(arch, arch, "student" if distill else "teacher", config, "", data=data, named=False)

    @property
    def command(self) -> str:
        verb = "distill" if self.teacher else "train"
        return f"python -m kd_core {verb} --recipe {self.name}"

    def run_spec(self, overrides: Mapping[str, Any] | None = None, *, arch: str | None = None,
                 teacher: Path | None = None, data: str | None = None, name: str | None = None,
                 output: Path | None = None, state_path: Path | None = None, cache_dir: Path | None = None,
                 weights_dtype: str | None = None, checkpoints_dir: Path = CHECKPOINTS,
                 runs_dir: Path = RUNS) -> RunSpec:
        """The run this recipe makes, with ``overrides`` (setting -> value, see
        :func:`kd_core.training.config.with_overrides`) applied to its configuration.

        ``arch`` other than the recipe's trains that architecture with the recipe's settings (and
        none of its architecture arguments). The teacher defaults to the recipe's checkpoint in
        ``checkpoints_dir`` when the objective has a term that reads one, else none.
        """
        own_arch = arch in (None, self.arch)
        arch = arch or self.arch
        config = with_overrides(self.config, overrides or {}).validate()
        if teacher is None and self.teacher and set(active_terms(config.loss_weights)) - {"ce"}:
            teacher = checkpoints_dir / f"{self.teacher}.safetensors"
        name = name or (self.name if own_arch else arch)
        return RunSpec(arch=arch, data=data or self.data, config=config,
                       output=output or checkpoints_dir / f"{name}.safetensors", teacher=teacher, name=name,
                       role=self.role if own_arch else ("student" if teacher else "teacher"),
                       recipe=self.name if self.named else None, arch_args=dict(self.arch_args) if own_arch else {},
                       state_path=state_path or runs_dir / name / "resume.safetensors", cache_dir=cache_dir,
                       weights_dtype=weights_dtype or (self.weights_dtype if own_arch else "float32"))


def active_terms(weights: Mapping[str, float]) -> list[str]:
    return [term for term, weight in weights.items() if weight > 0]


RECIPES: Registry[Recipe] = Registry("recipe")


def _add(recipe: Recipe) -> None:
    RECIPES.register(recipe.name)(lambda: recipe)


def get(name: str) -> Recipe:
    return RECIPES.create(name)


def absent_teacher(recipe: Recipe, where: str) -> str:
    """What to tell someone who starts ``recipe`` while its teacher is not in the checkpoints folder
    (``where``, as they know it)."""
    return (f"recipe {recipe.name} distils from {recipe.teacher}, which is not in {where}: "
            f"train it first ({get(recipe.teacher).command})")


def names() -> list[str]:
    return RECIPES.names()


_DATA_DERIVED = ("num_classes", "in_channels", "input_size")  # arch_args that come from the data set


def trained_architecture(meta: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The architecture a checkpoint was trained as, and its arguments other than the data-derived
    ones: its ``trained_as`` entry for a re-parameterized student, else its own."""
    trained = meta.get("trained_as") or meta
    return trained.get("arch"), {k: v for k, v in trained.get("arch_args", {}).items() if k not in _DATA_DERIVED}


def saved_config(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training settings as JSON values, a setting newer than the checkpoint read as
    the default it was trained with."""
    return complete_config(meta.get("config", {}))


def differences(meta: dict[str, Any]) -> tuple[Recipe, dict[str, Any], bool] | None:
    """How a checkpoint's run differs from the recipe that made it: the recipe, the settings that
    differ (with the checkpoint's values) and whether the architecture arguments do; None when no
    (known) recipe made it."""
    name = meta.get("recipe")
    if not name or name not in RECIPES:
        return None
    recipe = get(name)
    arch_args_differ = trained_architecture(meta)[1] != json.loads(json.dumps(recipe.arch_args))
    return recipe, changed_settings(saved_config(meta), recipe.config.to_json()), arch_args_differ


# airbench's optimizer (mean-loss units, batch 512): SGD-Nesterov, per-step decay lr x wd = 0.001,
# 64x lr for biases and norms, label smoothing 0.2, a triangular schedule peaking at 23%.
AIRNET = TrainConfig(epochs=24, batch_size=512, lr=0.65, momentum=0.85, nesterov=True, weight_decay=0.00154,
                     bias_lr_scale=64, schedule="onecycle", warmup_epochs=0.23 * 24, label_smoothing=0.2,
                     augment=AugmentConfig(crop_padding=3, flip=True), loss_weights={"ce": 1.0})

# The teacher: airbench95's widths with airbench96's residual third conv, level-2 TTA; scored once at
# the end (six views cost most of a minute); float16 weights keep the file at 14.8 MB.
# docs/experiments.md, "airnet, the teacher".
_add(Recipe("airnet", "airnet", "teacher", replace(AIRNET, eval_every=0),
            "fast CIFAR teacher after airbench95/96: 7.4 M parameters, mirror-and-shift test-time augmentation",
            arch_args={"widths": (128, 384, 384), "residual": True, "flip_tta": True, "translate_tta": True},
            published="best source teacher: ResNet-18 88.28%", weights_dtype="float16"))

# The tutorial's teacher and students with a modern recipe (augmentation, SGD, cosine schedule).
_SMALL = TrainConfig(epochs=40, batch_size=256, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                     warmup_epochs=1, augment=AugmentConfig(crop_padding=4, flip=True))

_add(Recipe("deepnn", "deepnn", "teacher", replace(_SMALL, epochs=30),
            "the PyTorch KD tutorial's teacher, trained with augmentation and a cosine schedule",
            published="tutorial: 74.43%"))
# The T^2-scaled KD gradient from deepnn's large logits makes the batch-norm-free LightNN unstable at
# lr 0.05 (and one seed in three at 0.03); gradients clipped to norm 5 (about the median step's) keep
# lr 0.03 stable. 16 banked views and their mirror images: 32 distinct images each.
# 77.90% against 77.74% for lr 0.02 and 8 views; docs/experiments.md, "Does distillation pay?".
_LIGHTNN_KD = replace(_SMALL, lr=0.03, clip_grad_norm=5.0, loss_weights={"ce": 0.25, "kd": 0.75}, temperature=4,
                      teacher_views=16, mirror_views=True)
# Each headline student's cross-entropy twin (what `study gain` trains against it) is a recipe of its
# own: the KD recipe with the teacher's terms removed (its teacher settings then do nothing), at the
# learning rate cross-entropy alone wants. The shipped -ce checkpoints are the gain studies' seed 0.
_add(Recipe("lightnn-ce", "lightnn", "student", replace(_LIGHTNN_KD, lr=0.05, loss_weights={"ce": 1.0}),
            "the tutorial's student, cross-entropy only: lightnn-kd without its teacher, at lr 0.05",
            published="tutorial: 69.51%"))
_add(Recipe("lightnn-kd", "lightnn", "student", _LIGHTNN_KD,
            "the tutorial's student distilled from deepnn (Hinton KD)", teacher="deepnn",
            published="tutorial: 71.89%"))
# CAM-Net underfits: lighter regularization (+-2 px crops, weight decay 1e-4), 20 epochs; students
# learn from an 8-view teacher bank, since airnet's forward pass costs many camnet steps.
_CAMNET = replace(_SMALL, epochs=20, weight_decay=1e-4, augment=AugmentConfig(crop_padding=2, flip=True),
                  teacher_views=8)
_add(Recipe("camnet-ce", "camnet", "student", _CAMNET, "CAM-KD's student, cross-entropy only"))
_add(Recipe("camnet-kd", "camnet", "student", replace(_CAMNET, loss_weights={"ce": 0.25, "kd": 0.75}),
            "CAM-KD's student with Hinton KD from airnet", teacher="airnet"))
# Trained re-parameterized (camnet_rep, folded into plain camnet before saving: 66.1% vs 59.4% in
# 4 epochs), T=1 (airnet's label-smoothed logits are nearly uniform at T=4), level-2 TTA, 52 epochs.
# docs/experiments.md, "camnet".
_add(Recipe("camnet-kd-cam", "camnet_rep", "student",
            replace(_CAMNET, epochs=52, temperature=1, eval_every=0,
                    loss_weights={"ce": 0.25, "kd": 0.75, "cam": 1.0}),
            "CAM-KD's student (trained re-parameterized, shipped plain) with Hinton KD and CAM alignment from airnet",
            teacher="airnet", arch_args={"flip_tta": True, "translate_tta": True}, published="CAM-KD: 68.3%"))

# The best student of at most 100,000 parameters: airnet at 24/40/64 channels, airbench's optimizer,
# a 16-view bank with mirrored views, KD on z-scored logits (Sun et al. 2024) at T=2 with CE 0.1 and
# KD 3, 130 epochs (the 90-minute budget). docs/experiments.md, "airnet-micro-kd".
_MICRO_EPOCHS = 130
_MICRO_KD = replace(AIRNET, epochs=_MICRO_EPOCHS, warmup_epochs=round(0.23 * _MICRO_EPOCHS, 1),
                    loss_weights={"ce": 0.1, "kd": 3.0}, temperature=2, kd_standardize=True, teacher_views=16,
                    mirror_views=True, eval_every=0, augment=AugmentConfig(crop_padding=2, flip=True))
_MICRO_ARGS = {"widths": (24, 40, 64), "flip_tta": True, "translate_tta": True}
_add(Recipe("airnet-micro-ce", "airnet", "student", replace(_MICRO_KD, loss_weights={"ce": 1.0}),
            "airnet at 24/40/64 channels (94,776 parameters), cross-entropy only: airnet-micro-kd without its teacher",
            arch_args=_MICRO_ARGS))
_add(Recipe("airnet-micro-kd", "airnet", "student", _MICRO_KD,
            "airnet at 24/40/64 channels (94,776 parameters), KD on standardized logits from airnet",
            teacher="airnet", arch_args=_MICRO_ARGS,
            published="best source student: small CNN (2.2 M params) 84.58%; MobileNetV2 75.78%"))

# The Tiny-Titans source project: a ResNet-18 teacher and its small CNN student. The 3x3 stem at
# stride 2 (0.14 GMACs an image; the stride-1 CIFAR stem costs 0.56, 102 images/s against 337 in
# training on the 2-core CPU) buys 34 epochs in the 90-minute budget (26 gave 89.06% with mirror
# TTA, 89.54% with level 2); no label smoothing, which would flatten the soft targets the student
# learns from; scored once at the end. float16 weights: 22 MB. docs/experiments.md, "Tiny-Titans".
_add(Recipe("resnet18", "resnet18", "teacher", replace(_SMALL, epochs=34, lr=0.1, eval_every=0),
            "torchvision's ResNet-18 from scratch with a 3x3 stride-2 stem, mirror-and-shift test-time augmentation",
            arch_args={"stem_stride": 2, "flip_tta": True, "translate_tta": True},
            published="Tiny-Titans: ResNet-18 88.28%", weights_dtype="float16"))
# The student, BN-free like lightnn, so lightnn-kd's optimizer (lr 0.03, gradients clipped to norm 5;
# its twin at lr 0.05): Hinton KD at T=4 and a FitNets hint from ResNet-18's last feature map (its
# 8x8 map pooled to the teacher's 2x2, through a 1x1-conv adapter), from an 8-view bank with mirrors;
# level-2 TTA like its teacher.
_TITANS_KD = replace(_LIGHTNN_KD, teacher_views=8, loss_weights={"ce": 0.25, "kd": 0.75, "feature": 1.0})
_TITANS_ARGS = {"flip_tta": True, "translate_tta": True}
_add(Recipe("tiny-titans-ce", "tiny_titans_cnn", "student", replace(_TITANS_KD, lr=0.05, loss_weights={"ce": 1.0}),
            "the Tiny-Titans small CNN, cross-entropy only: tiny-titans-kd without its teacher, at lr 0.05",
            arch_args=_TITANS_ARGS, weights_dtype="float16"))
_add(Recipe("tiny-titans-kd", "tiny_titans_cnn", "student", _TITANS_KD,
            "the Tiny-Titans small CNN distilled from resnet18: logit matching (KD) and feature matching (hint)",
            teacher="resnet18", arch_args=_TITANS_ARGS, published="Tiny-Titans: small CNN 84.58%",
            weights_dtype="float16"))

# The ResNet-50 -> MobileNetV2 source project. ResNet-50 with the 3x3 stride-2 stem (0.32 GMACs; 124
# training images/s on the 2-core CPU, 29 with the stride-1 stem) for 10 epochs, level-2 TTA; at
# float16 it is 47 MB, too large to ship: its recipe reproduces it and its student records it.
_add(Recipe("resnet50", "resnet50", "teacher", replace(_SMALL, epochs=10, lr=0.1, eval_every=0),
            "torchvision's ResNet-50 from scratch with a 3x3 stride-2 stem, mirror-and-shift test-time augmentation",
            arch_args={"stem_stride": 2, "flip_tta": True, "translate_tta": True},
            published="ResNet-50 -> MobileNetV2 project: teacher 74.19%", weights_dtype="float16", shipped=False))
# MobileNetV2 (small-input stem: 264 training images/s, 3.2 min an epoch; a stride-2 stem 480 but a
# 1x1 last map), the source's augmentation (crop, flip, rotation, colour jitter) and Hinton KD at T=4
# from an 8-view bank of resnet50 with mirrors (its build about 13 min): 20 epochs fit the budget.
_MOBILENET_KD = replace(_SMALL, epochs=20, loss_weights={"ce": 0.25, "kd": 0.75}, temperature=4, teacher_views=8,
                        mirror_views=True,
                        augment=AugmentConfig(crop_padding=4, flip=True, rotation=10, color_jitter=0.2))
_add(Recipe("mobilenet-v2-ce", "mobilenet_v2", "student", replace(_MOBILENET_KD, loss_weights={"ce": 1.0}),
            "MobileNetV2, cross-entropy only: mobilenet-v2-kd without its teacher",
            published="ResNet-50 -> MobileNetV2 project: MobileNetV2 alone 71.19%", weights_dtype="float16"))
_add(Recipe("mobilenet-v2-kd", "mobilenet_v2", "student", _MOBILENET_KD,
            "MobileNetV2 distilled from resnet50 (Hinton KD at T=4) with crop, flip, rotation and colour jitter",
            teacher="resnet50", published="ResNet-50 -> MobileNetV2 project: distilled 75.78%",
            weights_dtype="float16"))

# Handwritten digits offline (scikit-learn's 1,797 8x8 digits, the CNN -> MLP source project's task
# on MNIST): the tutorial's CNN as teacher and a two-layer MLP student; +-1 px crops, no flips. The
# MLPs store float16 weights (1.2 MB each, not 2.4), which keeps checkpoints/ inside its budget.
_DIGITS = TrainConfig(epochs=40, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                      warmup_epochs=1, augment=AugmentConfig(crop_padding=1, flip=False))
_add(Recipe("digits-cnn", "deepnn", "teacher", _DIGITS, "the tutorial's CNN on handwritten digits",
            data="digits", published="CNN -> MLP project (MNIST): teacher 98.59%"))
_add(Recipe("digits-mlp-ce", "mlp", "student", _DIGITS, "an MLP on handwritten digits, cross-entropy only",
            data="digits", weights_dtype="float16"))
_add(Recipe("digits-mlp-kd", "mlp", "student", replace(_DIGITS, loss_weights={"ce": 0.25, "kd": 0.75}),
            "an MLP distilled from digits-cnn (Hinton KD)", teacher="digits-cnn", data="digits",
            published="CNN -> MLP project (MNIST): MLP student 97.31%", weights_dtype="float16"))
