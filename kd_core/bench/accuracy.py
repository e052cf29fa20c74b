"""Time to accuracy: how long each way takes to distil a student to a given test accuracy.

Both ways train deepnn -> lightnn (or another recipe's pair) and score the test split after every
epoch, stopping at the first epoch that reaches the target; the wall time counts everything after
the data is on disk: the reference loop's per-sample decoding every epoch, the engine's teacher
bank built afresh (never read from the cache) and every evaluation. The engine runs the recipe with
its schedule spread over ``epochs`` (its batch, optimizer and objective; ``views`` teacher views in its
bank, default the recipe's); the reference loop the tutorial's way at the recipe's learning rate (SGD
with Nesterov momentum, no schedule, batch 128, :mod:`.reference`), for at most ``max_epochs``.
Where only the engine reaches the target, the reference's time is a lower bound on what it needs,
and so is the speedup.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_checkpoint
from ..data import load_data
from ..training import Callback, Trainer
from .reference import BATCH_SIZE, WORKERS, _loader, distillation_loss, image_folder


class _StopAt(Callback):
    """Stop after the first epoch whose test top-1 reaches ``target``; remember when."""

    def __init__(self, target: float, started: float):
        self.target, self.started, self.reached = target, started, None

    def on_epoch_end(self, trainer, info) -> None:
        top1 = info.test.get("test_top1")
        if top1 is not None and top1 >= self.target and self.reached is None:
            self.reached = {"epochs": info.epoch + 1, "top1": top1, "seconds": time.perf_counter() - self.started}
            trainer.request_stop()


def engine_time_to_accuracy(recipe, data_source: str, checkpoints: Path, target: float, epochs: int, views: int,
                            cache_dir: Path | None = None) -> dict:
    from .. import models

    data = load_data(data_source, cache_dir=cache_dir)
    teacher = load_checkpoint(checkpoints / f"{recipe.teacher}.safetensors")
    config = replace(recipe.config, epochs=epochs, eval_every=1, validation=0, teacher_views=views)
    torch.manual_seed(config.seed)
    student = models.create(recipe.arch, **models.arch_args_for(recipe.arch, len(data.classes), data.input_shape,
                                                                 **recipe.arch_args))
    started = time.perf_counter()
    stop = _StopAt(target, started)
    trainer = Trainer(student, data, config, teacher=teacher.model, callbacks=[stop])
    result = trainer.fit()  # the bank is built in memory: its cost is part of the time
    last = result.history[-1].test.get("test_top1") if result.history else None
    return stop.reached or {"epochs": None, "top1": last, "seconds": time.perf_counter() - started}


@torch.no_grad()
def _test_top1(model, root: Path, mean, std, batch_size: int, workers: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    test_root = root / "test" if (root / "test").is_dir() else root / "val"
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(test_root), transform=transform),
                                         batch_size=batch_size, num_workers=workers)
    model.eval()
    correct = seen = 0
    for inputs, labels in loader:
        correct += (model(inputs).argmax(1) == labels).sum().item()
        seen += len(labels)
    model.train()
    return 100.0 * correct / seen


def reference_time_to_accuracy(teacher, student, root: Path, mean, std, weights: dict[str, float],
                               temperature: float, lr: float, target: float, max_epochs: int,
                               batch_size: int = BATCH_SIZE, workers: int = WORKERS, seed: int = 0,
                               clip_grad_norm: float = 0.0, log: Callable[[str], None] = lambda line: None) -> dict:
    """The usual loop, an epoch at a time, scored on the test split after each, until ``target``;
    with the recipe's gradient clipping (``clip_grad_norm``, 0: none)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    loader = _loader(root, mean, std, batch_size, workers, seed)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    uses_cam = weights.get("cam", 0.0) > 0
    teacher.eval()
    student.train()
    top1 = None
    for epoch in range(max_epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            with torch.no_grad():
                teacher_features = teacher.forward_features(inputs)
                teacher_logits = teacher.forward_head(teacher_features)
            student_features = student.forward_features(inputs)
            student_logits = student.forward_head(student_features)
            loss = distillation_loss(student_logits, teacher_logits, labels, weights, temperature,
                                     student if uses_cam else None, student_features,
                                     teacher if uses_cam else None, teacher_features)
            loss.backward()
            if clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), clip_grad_norm)
            optimizer.step()
        top1 = _test_top1(student, root, mean, std, 256, workers)
        log(f"reference loop epoch {epoch + 1}: test top-1 {top1:.2f}%")
        if top1 >= target:
            return {"epochs": epoch + 1, "top1": top1, "seconds": time.perf_counter() - started}
    return {"epochs": None, "top1": top1, "seconds": time.perf_counter() - started}


def time_to_accuracy(pair: str, data_source: str, checkpoints: Path, target: float, epochs: int = 10,
                     max_epochs: int | None = None, views: int | None = None, cache_dir: Path | None = None,
                     log: Callable[[str], None] = lambda line: None) -> dict:
    """Both ways for recipe ``pair``: epochs, test top-1 and wall seconds to reach ``target`` (epochs
    None where a way did not reach it: the engine in its ``epochs``-epoch run, the reference loop in
    ``max_epochs``, default ``epochs``)."""
    from .. import models
    from ..experiments import recipes

    if not 0 < target <= 100:
        raise ValueError(f"the target accuracy is a percentage in (0, 100], got {target}")
    max_epochs = epochs if max_epochs is None else max_epochs
    if epochs < 1 or max_epochs < 1 or (views is not None and views < 1):
        raise ValueError(f"epochs, max epochs and views must be at least 1, got {epochs}, {max_epochs}, {views}")
    recipe = recipes.get(pair)
    if not recipe.teacher:
        raise ValueError(f"recipe {pair} does not distil; time to accuracy compares distillation loops")
    teacher = load_checkpoint(checkpoints / f"{recipe.teacher}.safetensors")
    root = image_folder(data_source, cache_dir)
    torch.manual_seed(0)
    student = models.create(recipe.arch, **models.arch_args_for(recipe.arch, len(teacher.classes),
                                                                 tuple(teacher.meta["data"]["input_size"]),
                                                                 **recipe.arch_args))
    config = recipe.config
    log(f"reference loop to {target:g}% (at most {max_epochs} epochs)")
    reference = reference_time_to_accuracy(teacher.model, student, root, teacher.mean, teacher.std,
                                           config.loss_weights, config.temperature, config.lr, target, max_epochs,
                                           clip_grad_norm=config.clip_grad_norm, log=log)
    views = config.teacher_views if views is None else views
    log(f"engine to {target:g}% (recipe {pair} over {epochs} epochs, a {views}-view teacher bank built afresh)")
    engine = engine_time_to_accuracy(recipe, data_source, checkpoints, target, epochs, views, cache_dir)
    reached = engine["epochs"] is not None
    speedup = reference["seconds"] / engine["seconds"] if reached else None
    return {"pair": pair, "target": target, "epochs": epochs, "max_epochs": max_epochs, "views": views,
            "reference": reference, "engine": engine, "speedup": speedup,
            "speedup_is_lower_bound": reached and reference["epochs"] is None}


def format_time_to_accuracy(result: dict) -> str:
    lines = [f"time to {result['target']:g}% test top-1, recipe {result['pair']}", "",
             "| way | epochs | test top-1 | wall minutes |", "|---|---|---|---|"]
    ways = (("reference", "reference loop", result["max_epochs"]),
            ("engine", f"engine, {result['epochs']}-epoch schedule ({result['views']}-view bank built afresh)",
             result["epochs"]))
    for way, label, most in ways:
        row = result[way]
        epochs = row["epochs"] if row["epochs"] else f"not reached in {most}"
        top1 = f"{row['top1']:.2f}%" if row["top1"] is not None else "-"
        lines.append(f"| {label} | {epochs} | {top1} | {row['seconds'] / 60:.1f} |")
    if result["speedup"] and result["speedup_is_lower_bound"]:
        lines.append(f"\nthe engine reaches it at least {result['speedup']:.1f}x sooner (the reference loop had "
                     f"not reached it when it stopped)")
    elif result["speedup"]:
        lines.append(f"\nthe engine reaches it {result['speedup']:.1f}x sooner")
    return "\n".join(lines)
