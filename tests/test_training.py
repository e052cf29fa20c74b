"""The training engine: it learns real CIFAR-10, reports through callbacks, resumes bit-exactly,
keeps an EMA, leaves the teacher untouched, and follows its learning-rate schedule."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kd_core import models
from kd_core.data import AugmentConfig
from kd_core.training import Callback, NonFiniteLoss, TrainConfig, Trainer, freeze
from kd_core.training.schedule import lr_factor


class Recorder(Callback):
    def __init__(self, stop_after_epoch: int | None = None):
        self.events: list[str] = []
        self.steps, self.epochs = [], []
        self.stop_after_epoch = stop_after_epoch

    def on_train_start(self, trainer):
        self.events.append("start")

    def on_step_end(self, trainer, info):
        self.events.append("step")
        self.steps.append((info, [group["lr"] for group in trainer.optimizer.param_groups]))

    def on_epoch_end(self, trainer, info):
        self.events.append("epoch")
        self.epochs.append(info)
        if info.epoch == self.stop_after_epoch:
            trainer.request_stop()

    def on_train_end(self, trainer):
        self.events.append("end")


def student(arch="lightnn", seed=0) -> models.Classifier:
    torch.manual_seed(seed)
    return models.create(arch, num_classes=2, **({"input_size": 16} if arch == "lightnn" else {}))


def config(**overrides) -> TrainConfig:
    values = dict(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, augment=AugmentConfig(crop_padding=2))
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------
# learning, on the real data


def test_one_epoch_on_real_cifar10_learns(real_cifar):
    torch.manual_seed(0)
    model = models.create("lightnn")
    settings = TrainConfig(epochs=1, batch_size=128, limit=5000, optimizer="adam", lr=0.002, schedule="onecycle")
    result = Trainer(model, real_cifar, settings).fit()
    assert result.test_top1 > 25.0  # chance is 10%
    assert result.history[0].test["test_top1"] == result.test_top1
    assert result.history[0].train["train_top1"] > 15.0


# ---------------------------------------------------------------------------------------------
# callbacks and the schedule inside the loop


def test_callbacks_see_every_step_and_epoch(tiny_bundle):
    recorder = Recorder()
    result = Trainer(student(), tiny_bundle, config(bias_lr_scale=4), callbacks=[recorder]).fit()
    steps_per_epoch = 64 // 16  # 64 >= 2 x 16, so the last partial batch would be dropped; there is none
    assert recorder.events == ["start"] + (["step"] * steps_per_epoch + ["epoch"]) * 3 + ["end"]
    infos = [info for info, _ in recorder.steps]
    assert [info.global_step for info in infos] == list(range(1, 13))
    assert [info.step for info in infos] == [0, 1, 2, 3] * 3 and {info.steps_per_epoch for info in infos} == {4}
    assert [info.epoch for info in recorder.epochs] == [0, 1, 2] and result.history == recorder.epochs
    assert all("test_top1" in info.test and "loss" in info.train for info in recorder.epochs)
    # the lr the step used: warm-up over the first epoch (4 steps), then half a cosine over 8
    expected = {1: 0.25, 2: 0.5, 4: 1.0, 5: 1.0, 9: 0.5, 12: 0.5 * (1 + math.cos(math.pi * 7 / 8))}
    for info, group_lrs in recorder.steps:
        if info.global_step in expected:
            assert info.lr == pytest.approx(0.05 * expected[info.global_step])
            assert sorted(group_lrs) == pytest.approx([info.lr, 4 * info.lr])  # weights; biases x bias_lr_scale
    assert result.history[-1].train["loss"] == pytest.approx(
        sum(info.losses["loss"] for info in infos[-4:]) / 4)


@pytest.mark.parametrize("eval_every, evaluated", [(0, [2]), (2, [1, 2]), (1, [0, 1, 2])])
def test_eval_every(tiny_bundle, eval_every, evaluated):
    result = Trainer(student(), tiny_bundle, config(eval_every=eval_every)).fit()
    assert [info.epoch for info in result.history if info.test] == evaluated


# ---------------------------------------------------------------------------------------------
# resume


def test_stop_and_resume_equals_an_uninterrupted_run(tiny_bundle, tmp_path):
    settings = config(ema_decay=0.5)
    straight = Trainer(student(), tiny_bundle, settings, state_path=tmp_path / "straight.safetensors").fit()

    stopper = Recorder(stop_after_epoch=0)
    first = Trainer(student(), tiny_bundle, settings, callbacks=[stopper], state_path=tmp_path / "run.safetensors")
    stopped = first.fit()
    assert stopped.stopped and stopped.epochs_done == 1
    assert first.global_step == 4  # a stop between epochs trains no step of the next one
    assert stopper.events.count("epoch") == 1

    second = Trainer(student(seed=99), tiny_bundle, settings, state_path=tmp_path / "run.safetensors")
    resumed = second.fit()
    assert not resumed.stopped and second.start_epoch == 1 and second.global_step == 12
    assert [info.epoch for info in resumed.history] == [0, 1, 2] and len(resumed.history) == len(straight.history)
    assert resumed.history[0].train == stopped.history[0].train
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert [info.train["loss"] for info in resumed.history] == [info.train["loss"] for info in straight.history]
    assert resumed.test_top1 == straight.test_top1


def test_resume_refuses_changed_settings(tiny_bundle, tmp_path):
    state = tmp_path / "run.safetensors"
    Trainer(student(), tiny_bundle, config(), callbacks=[Recorder(stop_after_epoch=0)], state_path=state).fit()
    with pytest.raises(ValueError, match=r"used other settings \(lr\)"):
        Trainer(student(), tiny_bundle, config(lr=0.01), state_path=state).fit()
    fresh = Trainer(student(), tiny_bundle, config(lr=0.01), state_path=state).fit(resume=False)
    assert len(fresh.history) == 3


def test_resume_reads_a_setting_newer_than_the_state_as_its_default(tiny_bundle, tmp_path):
    """A run saved by an older version lacks the settings added since; it trained with their
    defaults, so it resumes under them and not under another value."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = tmp_path / "run.safetensors"
    Trainer(student(), tiny_bundle, config(), callbacks=[Recorder(stop_after_epoch=0)], state_path=state).fit()
    with safe_open(str(state), "pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    info = json.loads(metadata["info"])
    del info["config"]["kd_standardize"], info["config"]["mirror_views"]
    save_file(tensors, str(state), metadata={**metadata, "info": json.dumps(info)})
    with pytest.raises(ValueError, match=r"used other settings \(kd_standardize\)"):
        Trainer(student(), tiny_bundle, config(kd_standardize=True), state_path=state).fit()
    resumed = Trainer(student(), tiny_bundle, config(), state_path=state)
    assert len(resumed.fit().history) == 3 and resumed.start_epoch == 1


def test_resume_refuses_a_retrained_teacher(tiny_bundle, tmp_path):
    """Same settings, other teacher weights (its checkpoint was retrained): not the same run."""
    state = tmp_path / "run.safetensors"
    settings = config(loss_weights={"ce": 0.5, "kd": 0.5})
    Trainer(student(), tiny_bundle, settings, teacher=student(seed=5), callbacks=[Recorder(stop_after_epoch=0)],
            state_path=state).fit()
    with pytest.raises(ValueError, match=r"used other settings \(teacher weights\)"):
        Trainer(student(), tiny_bundle, settings, teacher=student(seed=6), state_path=state).fit()
    resumed = Trainer(student(), tiny_bundle, settings, teacher=student(seed=5), state_path=state)
    assert len(resumed.fit().history) == 3 and resumed.start_epoch == 1


# ---------------------------------------------------------------------------------------------
# EMA, teacher


class ParameterLog(Callback):
    def __init__(self):
        self.snapshots = []

    def on_train_start(self, trainer):
        self.snapshots.append([p.detach().clone() for p in trainer.model.parameters()])

    def on_step_end(self, trainer, info):
        self.snapshots.append([p.detach().clone() for p in trainer.model.parameters()])


def test_ema_follows_its_formula(tiny_bundle):
    decay = 0.8
    log = ParameterLog()
    trainer = Trainer(student("resnet8"), tiny_bundle, config(ema_decay=decay, epochs=2), callbacks=[log])
    result = trainer.fit()
    assert result.model is trainer.ema and result.model is not trainer.model
    expected = log.snapshots[0]
    for weights in log.snapshots[1:]:
        expected = [average + (1 - decay) * (weight - average) for average, weight in zip(expected, weights)]
    for average, ema_parameter, live in zip(expected, result.model.parameters(), trainer.model.parameters()):
        assert torch.allclose(ema_parameter, average, atol=1e-6)
    assert any(not torch.allclose(e, p) for e, p in zip(result.model.parameters(), trainer.model.parameters()))
    for ema_buffer, buffer in zip(result.model.buffers(), trainer.model.buffers()):
        assert torch.equal(ema_buffer, buffer)  # BatchNorm statistics are copied, not averaged


class GradientNorms(Callback):
    """Each step's global gradient norm (still in place after the step) and the weights after step 1."""

    def __init__(self):
        self.norms, self.after_first = [], None

    def on_step_end(self, trainer, info):
        self.norms.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm().item())
        if self.after_first is None:
            self.after_first = [p.detach().clone() for p in trainer.model.parameters()]


def test_gradient_clipping_caps_each_steps_norm_and_keeps_its_direction(tiny_bundle):
    plain = dict(epochs=1, momentum=0.0, weight_decay=0.0, warmup_epochs=0)
    free, clipped = GradientNorms(), GradientNorms()
    start = [p.detach().clone() for p in student().parameters()]
    Trainer(student(), tiny_bundle, config(**plain), callbacks=[free]).fit()
    cap = 0.01 * min(free.norms)
    Trainer(student(), tiny_bundle, config(**plain, clip_grad_norm=cap), callbacks=[clipped]).fit()
    assert len(clipped.norms) == len(free.norms) > 1
    assert clipped.norms == pytest.approx([cap] * len(free.norms), rel=1e-4)  # every step was over the cap
    # step 1 (same weights, same batch): plain SGD moved the weights along the same gradient, scaled to the cap
    scale = cap / free.norms[0]
    for before, unclipped, capped in zip(start, free.after_first, clipped.after_first):
        assert torch.allclose(before - capped, (before - unclipped) * scale, atol=1e-7)


class TeacherWatch(Callback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, trainer, info):
        teacher = trainer.teacher
        self.seen.append((teacher.training, any(p.requires_grad for p in teacher.parameters()),
                          sorted(name for name in info.losses if "/" not in name)))


def test_teacher_stays_frozen_while_the_student_learns(tiny_bundle):
    torch.manual_seed(5)
    teacher = models.create("resnet8", num_classes=2).train()  # as a caller might hand it over
    before = copy.deepcopy(teacher.state_dict())
    model = student("camnet")
    initial_student = copy.deepcopy(model.state_dict())
    weights = {"ce": 1.0, "kd": 1.0, "feature": 1.0, "cam": 1.0, "at": 1.0, "cosine": 1.0}
    watch = TeacherWatch()
    trainer = Trainer(model, tiny_bundle, config(loss_weights=weights, epochs=2), teacher=teacher, callbacks=[watch])
    adapter_before = trainer.objective.terms["feature"].adapter[0].weight.detach().clone()
    trainer.fit()
    assert watch.seen and all(seen == (False, False, sorted([*weights, "loss"])) for seen in watch.seen)
    assert not teacher.training
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # weights and BatchNorm statistics
    assert not torch.equal(trainer.objective.terms["feature"].adapter[0].weight, adapter_before)
    assert not torch.equal(model.state_dict()["features.0.weight"], initial_student["features.0.weight"])


def test_freeze():
    teacher = freeze(models.create("camnet").train())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_non_finite_loss_stops_training(tiny_bundle):
    settings = config(lr=1e30, warmup_epochs=0, schedule="constant", amp=False)
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        Trainer(student(), tiny_bundle, settings).fit()


# ---------------------------------------------------------------------------------------------
# schedules and settings


@pytest.mark.parametrize("schedule, step, total, warmup, expected", [
    ("cosine", 0, 10, 2, 0.5),                                   # warm-up: (step + 1) / warmup
    ("cosine", 1, 10, 2, 1.0),
    ("cosine", 2, 10, 2, 1.0),                                   # cosine starts at the top
    ("cosine", 4, 10, 2, 0.5 * (1 + math.cos(math.pi / 4))),     # progress 2/8
    ("cosine", 6, 10, 2, 0.5),                                   # progress 4/8
    ("cosine", 5, 10, 0, 0.5),
    ("onecycle", 0, 10, 4, 0.25),
    ("onecycle", 4, 10, 4, 1.0),
    ("onecycle", 7, 10, 4, 0.5),                                 # 1 - 3/6
    ("onecycle", 9, 10, 0, 0.1),
    ("constant", 0, 10, 4, 0.25),
    ("constant", 3, 10, 4, 1.0),
    ("constant", 9, 10, 4, 1.0),
])
def test_lr_factor_by_hand(schedule, step, total, warmup, expected):
    assert lr_factor(schedule, step, total, warmup) == pytest.approx(expected)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor("step", 5, 10, 0)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be at least 1"),
    ("epochs", -3, "epochs must be at least 1"),
    ("lr", 0.0, "learning rate must be positive"),
    ("temperature", 0.0, "temperature T must be positive"),
    ("temperature", -1.0, "temperature T must be positive"),
    ("schedule", "step", "schedule must be one of"),
    ("warmup_epochs", 5.0, "warm-up must be within 0..epochs"),
    ("ema_decay", 1.0, "EMA decay must be in"),
    ("clip_grad_norm", -1.0, "gradient clipping norm must not be negative"),
    ("loss_weights", {"ce": 1.0, "kd": -1.0}, "loss weights must not be negative"),
    ("loss_weights", {"ce": 0.0}, "at least one loss weight must be positive"),
    ("augment", AugmentConfig(cutout=-1), "augmentation strengths must not be negative"),
])
def test_config_rejects_impossible_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        config(**{field: value}).validate()


def test_config_round_trips_through_a_dict():
    original = config(loss_weights={"ce": 0.5, "kd": 0.5}, augment=AugmentConfig(cutout=8, flip=False))
    assert TrainConfig.from_dict({**original.to_dict(), "unknown_future_key": 1}) == original
    saved = original.to_dict()  # settings since removed, at the top level and among the augmentation's
    assert TrainConfig.from_dict({**saved, "augment": {**saved["augment"], "removed_setting": 0}}) == original
