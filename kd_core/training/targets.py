"""Where a distillation step gets its teacher's outputs: the live teacher, run on every batch, or a
teacher bank, read for exactly the view each image shows. :func:`teacher_targets` chooses one from
the configuration; the :class:`~kd_core.training.engine.Trainer` only asks it for a batch's outputs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..checkpoint import weights_sha256
from ..losses import ModelOutput
from ..models import Classifier
from .config import TrainConfig
from .teacher_bank import BankLoader, TeacherTargets, bank_key, build_bank, check_feature_size, \
    load_or_build_bank

if TYPE_CHECKING:
    from .engine import Trainer


class LiveTeacher:
    """The frozen teacher, run on every training batch (any augmentation works)."""

    def __init__(self, teacher: Classifier):
        self.teacher = teacher
        self.sha256 = weights_sha256(teacher)
        self.bank_seconds, self.bank_reused = 0.0, False

    def prepare(self, trainer: "Trainer") -> bool:
        """Nothing to build; the training loop runs on the trainer's own loader."""
        return True

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, banked: TeacherTargets | None = None) -> ModelOutput:
        features = self.teacher.forward_features(images)                 # (B, C, H, W)
        return ModelOutput(features, self.teacher.forward_head(features), self.teacher)


class BankedTeacher(LiveTeacher):
    """The teacher's outputs on ``config.teacher_views`` views of every training image, computed
    once (or read from the cache folder) and served with each batch (:mod:`.teacher_bank`)."""

    def __init__(self, teacher: Classifier, bank_dir):
        super().__init__(teacher)
        self.bank_dir = bank_dir

    def check(self, trainer: "Trainer") -> None:
        """Refuse, before anything is built, what a bank cannot reproduce or hold."""
        if trainer.objective.needs_teacher_features:
            check_feature_size(self.teacher, trainer.train_split, trainer.config.teacher_views)

    def prepare(self, trainer: "Trainer") -> bool:
        """Build (or load) the bank and switch the trainer to its views; False when a stop asked for
        during the build abandoned it. In a distributed run rank 0 builds the bank and writes the cache
        file, then the others read it (or build the same bank without writing it: a cache folder they
        do not share)."""
        config = trainer.config
        # maps are kept whenever the teacher has them, so runs with and without the CAM term share a bank
        cam_target = config.cam_target if self.teacher.cam_layer is not None else None
        # feature maps only for terms that read them: they make a bank many times larger
        features = bool(trainer.objective.needs_teacher_features)
        key = bank_key(self.sha256, trainer.train_split, config.augment, config.teacher_views, cam_target,
                       config.seed, features)

        def build():
            return build_bank(self.teacher, trainer.train_split, trainer.data.mean, trainer.data.std, config.augment,
                              config.teacher_views, cam_target, seed=config.seed, features=features,
                              device=trainer.device, channels_last=trainer.channels_last, autocast=trainer.autocast,
                              progress=lambda done, total: trainer.emit("on_bank_progress", done, total),
                              should_stop=lambda: trainer.stop_requested)

        padding, cutout, bank = config.augment.crop_padding, config.augment.cutout, None
        if distributed.is_main():
            bank = load_or_build_bank(self.bank_dir, key, build, padding, cutout=cutout)
        if distributed.broadcast_object(bank is not None) and not distributed.is_main():
            bank = load_or_build_bank(self.bank_dir, key, build, padding, save=False, cutout=cutout)
        if not distributed.all_true(bank is not None):  # a stop during a build: every process abandons it
            return False
        self.bank_seconds, self.bank_reused = bank.build_seconds or 0.0, bank.reused
        trainer.train_loader = BankLoader(trainer.train_split, bank, config.batch_size, trainer.data.mean,
                                          trainer.data.std, drop_last=trainer.train_loader.drop_last,
                                          device=trainer.device, seed=config.seed,
                                          channels_last=trainer.channels_last, mirror=config.mirror_views,
                                          rank=trainer.rank, world_size=trainer.world_size)
        return True

    def outputs(self, images: torch.Tensor, banked: TeacherTargets | None = None) -> ModelOutput:
        return ModelOutput(banked.features, banked.logits, self.teacher, banked.cams)


def teacher_targets(teacher: Classifier | None, config: TrainConfig, needs_teacher: bool,
                    bank_dir=None) -> LiveTeacher | None:
    """The source of teacher outputs a run with ``config`` uses: none when no term reads a teacher,
    a bank for ``config.teacher_views > 0``, else the live teacher."""
    if teacher is None or not needs_teacher:
        return None
    return BankedTeacher(teacher, bank_dir) if config.teacher_views > 0 else LiveTeacher(teacher)
