"""Progress leaves the training loop through callbacks; the CLI, the job runner and the tests all
watch the same loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Trainer


@dataclass
class StepInfo:
    epoch: int            # 0-based epoch in progress
    step: int             # 0-based step within the epoch
    steps_per_epoch: int
    global_step: int
    lr: float
    losses: dict[str, float]


@dataclass
class EpochInfo:
    epoch: int            # 0-based epoch just finished
    epochs: int
    train: dict[str, float]          # mean losses and train accuracy over the epoch
    test: dict[str, float] = field(default_factory=dict)  # test_top1, test_loss when evaluated (on the
                                                          # validation split when the run holds one out)
    seconds: float = 0.0


class Callback:
    def on_bank_progress(self, trainer: "Trainer", done: int, total: int) -> None: ...  # teacher bank batches
    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", info: StepInfo) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", info: EpochInfo) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


class TqdmProgress(Callback):
    """One progress bar per epoch on stderr, with the running loss and lr; a summary line per epoch
    on ``stream`` (standard output unless given)."""

    def __init__(self, stream=None) -> None:
        self.bar = None
        self.stream = stream

    def on_bank_progress(self, trainer: "Trainer", done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"teacher on {trainer.config.teacher_views} views", leave=False,
                            dynamic_ncols=True)
        self.bar.update(1)
        if done == total:
            self.bar.close()
            self.bar = None

    def on_step_end(self, trainer: "Trainer", info: StepInfo) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=info.steps_per_epoch, desc=f"epoch {info.epoch + 1}/{trainer.config.epochs}",
                            leave=False, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{info.losses['loss']:.3f}", lr=f"{info.lr:.3g}")

    def on_epoch_end(self, trainer: "Trainer", info: EpochInfo) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        split = trainer.data.evaluated_on  # test, or a validation split held out of train/
        test = f" {split}_top1 {info.test['test_top1']:.2f}%" if "test_top1" in info.test else ""
        print(f"epoch {info.epoch + 1}/{info.epochs}: loss {info.train['loss']:.4f} "
              f"train_top1 {info.train['train_top1']:.2f}%{test} ({info.seconds:.0f} s)", file=self.stream, flush=True)

    def on_train_end(self, trainer: "Trainer") -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
