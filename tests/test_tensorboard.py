"""TensorBoard curves through a callback of the one training loop: the event files hold exactly the
values the loop reported, for the CLI, studies and dashboard jobs."""
from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import write_dataset
from kd_core import models
from kd_core.cli import main
from kd_core.data import AugmentConfig
from kd_core.jobs import JobStore
from kd_core.jobs.worker import JobReporter, job_callbacks
from kd_core.training import Callback, TrainConfig, Trainer
from kd_core.training.tensorboard import TensorBoardLogger


class Steps(Callback):
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step_end(self, trainer, info):
        self.steps.append(info)

    def on_epoch_end(self, trainer, info):
        self.epochs.append(info)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_event_file_holds_every_reported_loss_lr_and_metric(tiny_bundle, tmp_path):
    torch.manual_seed(0)
    teacher = models.create("lightnn", num_classes=2, input_size=16)
    student = models.create("camnet", num_classes=2)
    watched = Steps()
    settings = TrainConfig(epochs=2, batch_size=16, lr=0.05, warmup_epochs=1, augment=AugmentConfig(crop_padding=2),
                           loss_weights={"ce": 0.5, "kd": 0.5})
    Trainer(student, tiny_bundle, settings, teacher=teacher,
            callbacks=[watched, TensorBoardLogger(tmp_path / "tb")]).fit()
    logged = scalars(tmp_path / "tb")
    for term in ("loss", "ce", "kd"):
        expected = [(info.global_step, info.losses[term]) for info in watched.steps]
        assert [step for step, _ in logged[f"step/{term}"]] == [step for step, _ in expected]
        assert [value for _, value in logged[f"step/{term}"]] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert [value for _, value in logged["step/lr"]] == pytest.approx([info.lr for info in watched.steps])
    assert [step for step, _ in logged["epoch/test_top1"]] == [4, 8]  # 4 steps an epoch
    assert [value for _, value in logged["epoch/test_top1"]] == pytest.approx(
        [info.test["test_top1"] for info in watched.epochs])
    assert [value for _, value in logged["epoch/train_top1"]] == pytest.approx(
        [info.train["train_top1"] for info in watched.epochs])
    assert [value for _, value in logged["epoch/train_kd"]] == pytest.approx(
        [info.train["kd"] for info in watched.epochs])


def test_the_cli_and_studies_log_each_run_and_jobs_log_when_the_operator_says(tmp_path, keep_signal_handlers,
                                                                                monkeypatch):
    write_dataset(tmp_path / "data", {"train": 2, "test": 1})
    data = ["--data", f"folder:{tmp_path / 'data'}", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--model", "lightnn", "--epochs", "1", "--batch-size", "10", "--validation", "10",
                 "--output", str(tmp_path / "m.safetensors"), "--run-dir", str(tmp_path / "run"),
                 "--log-dir", str(tmp_path / "tb"), *data]) == 0
    logged = scalars(tmp_path / "tb")
    assert len(logged["step/loss"]) == 1 and "epoch/validation_top1" in logged  # named for the split scored
    assert main(["study", "seeds", "--recipe", "lightnn-ce", "--seeds", "0", "1", "--epochs", "1", "--limit", "20",
                 "--output", str(tmp_path / "study"), "--log-dir", str(tmp_path / "study-tb"), *data]) == 0
    assert sorted(path.name for path in (tmp_path / "study-tb").iterdir()) == \
        ["lightnn-ce-recipe-s0", "lightnn-ce-recipe-s1"]
    assert "epoch/test_top1" in scalars(tmp_path / "study-tb" / "lightnn-ce-recipe-s1")

    store = JobStore(tmp_path / "jobs.sqlite3")
    monkeypatch.delenv("KD_TENSORBOARD_DIR", raising=False)
    assert [type(callback) for callback in job_callbacks(store, 3, "x")] == [JobReporter]
    monkeypatch.setenv("KD_TENSORBOARD_DIR", str(tmp_path / "jobs-tb"))
    reporter, logger = job_callbacks(store, 3, "my-student")
    assert isinstance(logger, TensorBoardLogger) and logger.log_dir == tmp_path / "jobs-tb" / "job-3-my-student"
