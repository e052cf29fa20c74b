"""The one training loop: teachers, baseline students and distillation differ only in the
objective (see :mod:`kd_core.losses`) and in whether a frozen teacher runs beside the student.
Under torchrun the same loop runs in every process, each on its share of every global batch
(:mod:`kd_core.distributed` says how gradients, batch norm, metrics and files are shared)."""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .. import distributed
from ..checkpoint import weights_sha256
from ..data import BatchLoader, DataBundle
from ..data.loader import shard
from ..data.mixing import MixedLabels
from ..evaluation import predict
from ..losses import ModelOutput, StepOutputs, build_objective
from ..models import Classifier
from ..runtime import autocast_dtype, channels_last_safe, resolve_device, seed_everything
from .callbacks import Callback, EpochInfo, StepInfo
from .config import TrainConfig, changed_settings
from .schedule import lr_factor
from .state import load_state, read_state_info, save_state
from .targets import BankedTeacher, LiveTeacher, teacher_targets
from .teacher_bank import TeacherTargets


def freeze(teacher: Classifier) -> Classifier:
    """A teacher is frozen: eval mode (BN statistics fixed, no dropout) and no gradients."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@dataclass
class TrainResult:
    model: Classifier                     # the EMA weights when EMA is on
    history: list[EpochInfo]
    test_top1: float | None
    train_seconds: float
    stopped: bool = False
    epochs_done: int = 0
    bank_seconds: float = 0.0             # building the teacher bank, in this run or, when reused, the run that
                                          # cached it (0: no bank, or a cached one without that record)
    bank_reused: bool = False             # the bank came from the cache
    evaluated_on: str = "test"            # what test_top1 was measured on: test, or a validation split


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """One training loop for teachers, baselines and students.

    :meth:`fit` runs :meth:`train_one_epoch` and :meth:`evaluate` per epoch (as torchvision's
    references do), saves resumable state after each, and reports through callbacks. The
    teacher's outputs come from ``targets`` (:mod:`.targets`: the live teacher or a teacher bank),
    by default chosen from the configuration by :func:`~.targets.teacher_targets`.
    """

    def __init__(self, model: Classifier, data: DataBundle, config: TrainConfig,
                 teacher: Classifier | None = None, callbacks: Iterable[Callback] = (),
                 state_path: str | Path | None = None, bank_dir: str | Path | None = None,
                 targets: LiveTeacher | None = None):
        """``bank_dir``: where teacher banks are kept for reuse (``config.teacher_views > 0``);
        None keeps them in memory only."""
        self.config = config.validate()
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.device = distributed.process_device(resolve_device(config.device))
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        self.channels_last = config.channels_last and channels_last_safe(model, teacher)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        seed_everything(config.seed)
        self.data = data
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.teacher = freeze(teacher.to(self.device, memory_format=self.memory_format)) if teacher else None
        self.objective = build_objective(config.loss_weights, self.model, self.teacher, data.input_shape,
                                         config.loss_options()).to(self.device)
        self.train_split = data.train.subset(config.limit, seed=config.seed)
        drop_last = len(self.train_split) >= 2 * config.batch_size
        self.train_loader = BatchLoader(self.train_split, config.batch_size, data.mean, data.std, shuffle=True,
                                        augment=config.augment, drop_last=drop_last, device=self.device,
                                        seed=config.seed, channels_last=self.channels_last,
                                        rank=self.rank, world_size=self.world_size)
        self.targets = targets if targets is not None else teacher_targets(
            self.teacher, config, self.objective.needs_teacher, bank_dir)
        if isinstance(self.targets, BankedTeacher):
            self.targets.check(self)
        # the teacher's weights, so a resumed run refuses a retrained teacher
        self.teacher_sha256 = self.targets.sha256 if self.targets else (weights_sha256(self.teacher)
                                                                         if self.teacher is not None else None)
        self.optimizer = self._build_optimizer()
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if config.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.callbacks = list(callbacks)
        self.state_path = Path(state_path) if state_path else None
        self.start_epoch, self.train_seconds, self.history = 0, 0.0, []
        self.global_step = 0
        self.stop_requested = False
        self._prepared = False

    # -- set-up -----------------------------------------------------------------------------------

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Weights decay; biases and norm parameters get ``lr * bias_lr_scale`` and a weight decay
        divided by the same scale, so their per-step decay matches the weights'."""
        config = self.config
        parameters = [p for p in list(self.model.parameters()) + list(self.objective.parameters()) if p.requires_grad]
        weights = [p for p in parameters if p.ndim > 1]
        biases = [p for p in parameters if p.ndim <= 1]
        groups = [{"params": weights, "lr_scale": 1.0, "weight_decay": config.weight_decay},
                  {"params": biases, "lr_scale": config.bias_lr_scale,
                   "weight_decay": config.weight_decay / config.bias_lr_scale}]
        groups = [group for group in groups if group["params"]]
        if config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                   nesterov=config.nesterov and config.momentum > 0)
        optimizer_class = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        return optimizer_class(groups, lr=config.lr)

    def _maybe_init_from_data(self) -> None:
        init = getattr(self.model, "init_from_data", None)
        if init is not None:
            sample = self.train_split.images[:5000]
            from ..data import normalize
            init(normalize(sample, self.data.mean, self.data.std).to(self.device))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- resume -----------------------------------------------------------------------------------

    def _modules(self) -> dict[str, torch.nn.Module]:
        modules = {"model": self.model, "objective": self.objective}
        if self.ema is not None:
            modules["ema"] = self.ema
        return modules

    def _save_state(self, epoch: int) -> None:
        rng = {"torch": torch.get_rng_state(), "loader": self.train_loader.generator.get_state()}
        info = {"epoch": epoch, "train_seconds": self.train_seconds, "global_step": self.global_step,
                "history": [vars(item) for item in self.history], "config": self.config.to_dict(),
                "teacher_sha256": self.teacher_sha256}
        save_state(self.state_path, self._modules(), self.optimizer, rng, info)

    def resume(self) -> bool:
        """Continue from the state file when there is one; returns whether it did."""
        found = self.state_path is not None and self.state_path.exists()
        seen_by = distributed.sum_numbers([found])[0]  # the processes that see the state file
        if not seen_by:
            return False
        if seen_by < self.world_size:
            raise ValueError(f"only some processes of this run see its state {self.state_path}; "
                             "put the run folder on a file system every machine shares")
        saved = read_state_info(self.state_path)
        changed = sorted(changed_settings(saved["config"], self.config.to_json()))  # newer settings: defaults
        if saved.get("teacher_sha256", self.teacher_sha256) != self.teacher_sha256:
            changed.append("teacher weights")  # e.g. the teacher checkpoint was retrained since
        if changed:
            raise ValueError(f"the saved run in {self.state_path.parent} used other settings ({', '.join(changed)}); "
                             "start fresh (--fresh) or use another run folder")
        rng, info = load_state(self.state_path, self._modules(), self.optimizer, self.device)
        torch.set_rng_state(rng["torch"])
        self.train_loader.generator.set_state(rng["loader"])
        self.start_epoch = info["epoch"] + 1
        self.train_seconds = info["train_seconds"]
        self.global_step = info["global_step"]
        self.history = [EpochInfo(**item) for item in info["history"]]
        return True

    # -- the loop ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current step, then return; the last finished epoch stays resumable."""
        self.stop_requested = True

    def stop_agreed(self) -> bool:
        """Whether some process was asked to stop: they all stop after the same step."""
        return distributed.any_true(self.stop_requested)

    def emit(self, event: str, *args) -> None:
        if not distributed.is_main():  # progress, logs and job records come from one process
            return
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def _set_lr(self) -> float:
        steps_per_epoch = len(self.train_loader)
        factor = lr_factor(self.config.schedule, self.global_step, self.config.epochs * steps_per_epoch,
                           round(self.config.warmup_epochs * steps_per_epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor * group["lr_scale"]
        return self.config.lr * factor

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor | MixedLabels,
                    banked: TeacherTargets | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        with self.autocast():
            features = self.model.forward_features(images)         # (B, C, H, W)
            logits = self.model.forward_head(features)             # (B, K)
            teacher_output = self.targets.outputs(images, banked) if self.targets else None
            mixed = labels if isinstance(labels, MixedLabels) else None
            losses = self.objective(StepOutputs(ModelOutput(features, logits, self.model), teacher_output,
                                                mixed.dominant if mixed else labels, mixed))
        if not distributed.all_true(torch.isfinite(losses["loss"])):  # every process raises at the same step
            raise NonFiniteLoss(f"the loss became {losses['loss'].item()} at step {self.global_step}; "
                                "lower the learning rate or the loss weights")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        distributed.average_gradients(parameters)
        if self.config.clip_grad_norm > 0:  # on the averaged, unscaled gradients: the same in every process
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.config.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses, logits

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        for ema_parameter, parameter in zip(self.ema.parameters(), self.model.parameters()):
            ema_parameter.lerp_(parameter, 1 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def evaluation_model(self) -> Classifier:
        return self.ema if self.ema is not None else self.model

    def evaluate(self) -> dict[str, float]:
        """Test top-1 and loss of the model being trained (its EMA when on), under autocast; in a
        distributed run each process scores its share of the test split and the sums are added."""
        share = shard(len(self.data.test), self.rank, self.world_size, even=False)
        logits = predict(self.evaluation_model(), self.data.test.images[share], self.data.mean, self.data.std,
                         device=self.device, amp_dtype=self.amp_dtype)
        labels = self.data.test.labels[share]
        if self.world_size == 1:
            return {"test_top1": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
                    "test_loss": torch.nn.functional.cross_entropy(logits, labels).item()}
        correct, loss, count = distributed.sum_numbers([
            (logits.argmax(1) == labels).sum().item(),
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item(), len(labels)])
        return {"test_top1": 100.0 * correct / count, "test_loss": loss / count}

    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        """One pass over the training split; its mean losses and training top-1, or None when a stop
        was asked for during it (the epoch then does not count)."""
        self.model.train()
        self.objective.train()
        steps_per_epoch = len(self.train_loader)
        sums: dict[str, float] = {}
        correct = seen = 0
        for step, (images, labels, *banked) in enumerate(self.train_loader):
            lr = self._set_lr()
            losses, logits = self._train_step(images, labels, *banked)
            if isinstance(labels, MixedLabels):
                labels = labels.dominant  # training accuracy of mixed images: the larger share's label
            self.global_step += 1
            if self.ema is not None:
                self._update_ema()
            values = {name: value.item() for name, value in losses.items()}
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            self.emit("on_step_end", StepInfo(epoch, step, steps_per_epoch, self.global_step, lr, values))
            if self.stop_agreed():
                return None
        *totals, correct, seen = distributed.sum_numbers([*sums.values(), correct, seen])  # over processes
        metrics = {name: total / seen for name, total in zip(sums, totals)}
        metrics["train_top1"] = 100.0 * correct / seen
        return metrics

    def prepare(self) -> bool:
        """Ready the teacher's outputs (a bank is built or loaded here), once; False when a stop
        asked for meanwhile abandoned it."""
        if not self._prepared and self.targets is not None:
            self._prepared = self.targets.prepare(self)
            return self._prepared
        return True

    def fit(self, resume: bool = True) -> TrainResult:
        self.prepare()
        if not (resume and self.resume()):
            self._maybe_init_from_data()
            if self.ema is not None:
                self.ema.load_state_dict(self.model.state_dict())
        distributed.broadcast_modules(self._modules().values())  # every process starts from rank 0's weights
        if self.world_size > 1:  # dropout masks of each process's own, drawn from the (shared, saved) state
            torch.manual_seed(int(torch.randint(2**62, ())) + self.rank)
        self.emit("on_train_start")
        stopped = False  # agreed by every process, so all return the same result (not each its own flag)
        for epoch in range(self.start_epoch, self.config.epochs):
            if self.stop_agreed():  # asked between epochs (e.g. in on_epoch_end): train no more steps
                stopped = True
                break
            started = time.perf_counter()
            train_metrics = self.train_one_epoch(epoch)
            if train_metrics is None:
                stopped = True
                break
            last = epoch == self.config.epochs - 1
            evaluate_now = last or (self.config.eval_every and (epoch + 1) % self.config.eval_every == 0)
            distributed.average_buffers(self._modules().values())  # batch-norm statistics, the same everywhere
            test_metrics = self.evaluate() if evaluate_now else {}
            self.train_seconds += time.perf_counter() - started
            info = EpochInfo(epoch, self.config.epochs, train_metrics, test_metrics, time.perf_counter() - started)
            self.history.append(info)
            if self.state_path is not None and distributed.is_main():
                self._save_state(epoch)
            self.emit("on_epoch_end", info)
        self.emit("on_train_end")
        last_test = self.history[-1].test.get("test_top1") if self.history else None
        bank_seconds, bank_reused = (self.targets.bank_seconds, self.targets.bank_reused) if self.targets else (0.0, False)
        return TrainResult(self.evaluation_model(), self.history, last_test, self.train_seconds,
                           stopped=stopped, epochs_done=len(self.history), bank_seconds=bank_seconds,
                           bank_reused=bank_reused, evaluated_on=self.data.evaluated_on)
