"""Training curves as TensorBoard event files, through a callback of the one training loop.

``tensorboard --logdir DIR`` then shows, per run: every loss term and the learning rate per step
(``step/*``), and per epoch the mean training loss and accuracy and the evaluation accuracy and
loss (``epoch/*``; ``validation_*`` when the run holds a validation split out, else ``test_*``).
The step axis is the optimizer step, so a resumed run continues its curves.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .callbacks import Callback, EpochInfo, StepInfo

if TYPE_CHECKING:
    from .engine import Trainer


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise RuntimeError("TensorBoard logging needs the tensorboard package: "
                           "pip install -r requirements-extras.txt") from None


class TensorBoardLogger(Callback):
    """Writes to ``log_dir`` (created when training starts), every ``every``-th step's losses."""

    def __init__(self, log_dir: str | Path, every: int = 1) -> None:
        _require_tensorboard()  # a missing package fails before any data is loaded
        self.log_dir, self.every = Path(log_dir), max(1, int(every))
        self.writer = None

    def on_train_start(self, trainer: "Trainer") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_step_end(self, trainer: "Trainer", info: StepInfo) -> None:
        if self.writer is None or info.global_step % self.every:
            return
        for term, value in info.losses.items():
            self.writer.add_scalar(f"step/{term}", value, info.global_step)
        self.writer.add_scalar("step/lr", info.lr, info.global_step)

    def on_epoch_end(self, trainer: "Trainer", info: EpochInfo) -> None:
        if self.writer is None:
            return
        step, split = trainer.global_step, trainer.data.evaluated_on
        for key, value in info.train.items():
            self.writer.add_scalar(f"epoch/train_{key.removeprefix('train_')}", value, step)
        for key, value in info.test.items():  # test_top1, test_loss: named for the split evaluated
            self.writer.add_scalar(f"epoch/{split}_{key.removeprefix('test_')}", value, step)
        self.writer.add_scalar("epoch/epoch", info.epoch + 1, step)
        self.writer.flush()

    def on_train_end(self, trainer: "Trainer") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
