"""``python -m kd_core benchmark``: the engine against the usual loop and the machine's peak.

Every row is measured in the same run, on the same data (the recipes' CIFAR-10 copy) and machine:

- **training**: for each pair (``deepnn -> lightnn``, KD; ``airnet -> camnet_rep``, KD + CAM, the
  shipped recipes' students and objectives), the reference loop (:mod:`.reference`), the engine
  with the teacher run at every step, and the engine on a teacher bank; images per second, the
  ratio to the reference, and what an ``--epochs``-epoch run over the 50,000 training images costs
  each way, the bank's build (the recipe's number of views, or ``views``) included;
- **the machine's peak**: float32 and bfloat16 dense-kernel GFLOP/s on the threads in use, and
  the fraction of it each training and inference row reaches (:mod:`.peak` says how work is
  counted); each row against the peak of the precision it computes in (the engine trains under
  bfloat16 autocast where the CPU has it; the reference loop and evaluation run in float32);
- **teacher training**: the engine training airnet (its own recipe, cross-entropy) from scratch;
- **explain**: an Explain-tab call (airnet + camnet-kd-cam, Grad-CAM, a 1024 x 768 photo):
  median and 95th percentile;
- **checkpoints**: evaluation throughput (batch 1,000, as ``evaluate`` runs, test-time
  augmentation included where the checkpoint records it) and batch-1 latency of every shipped
  checkpoint.

``--quick`` (CI) times a few steps of each; the full run times enough for steady figures.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import models
from ..checkpoint import list_checkpoints, load_checkpoint
from ..data import DataBundle, Split, load_data
from ..evaluation import predict
from ..experiments import recipes
from ..files import atomic_path
from ..profile import count_macs, count_parameters, measure_latency
from ..runtime import autocast_dtype
from . import peak
from .probes import bench_explain, synthetic_photo, time_training
from .reference import image_folder, reference_distill

TRAIN_IMAGES = 50_000
PAIRS = ("lightnn-kd", "camnet-kd-cam")  # recipes: teacher, student architecture, objective, batch, views
EXPLAIN = ("airnet", "camnet-kd-cam")
TEACHER = "airnet"  # the teacher recipe whose training step is timed


@dataclass(frozen=True)
class Scale:
    steps: int             # timed training steps per row
    warmup: int            # untimed steps before them
    bank_views: int        # views of the timed bank build (the cost is costed at the recipe's views)
    eval_images: int       # images per checkpoint for evaluation throughput
    latency_repeats: int   # batch-1 forward passes per checkpoint
    explain_repeats: int
    matmul_size: int


QUICK = Scale(steps=2, warmup=1, bank_views=1, eval_images=256, latency_repeats=10, explain_repeats=8,
              matmul_size=1024)  # 1.5 min on a 2-core AMD EPYC, whose float32 airnet steps take 13 s each
FULL = Scale(steps=30, warmup=3, bank_views=2, eval_images=2_000, latency_repeats=50, explain_repeats=40,
             matmul_size=2048)


def _shape(checkpoint) -> tuple[int, int, int]:
    return tuple(checkpoint.meta["data"]["input_size"])


def _student(recipe, checkpoint) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create(recipe.arch, **models.arch_args_for(recipe.arch, len(checkpoint.classes), _shape(checkpoint),
                                                             **recipe.arch_args))


def training_rows(pair: str, data: DataBundle, root: Path, checkpoints: Path, scale: Scale, epochs: int,
                  peaks: dict[str, float], views: int | None = None) -> list[dict[str, Any]]:
    """The reference loop, the engine live and the engine on a bank (``views`` views, default the
    recipe's), for one recipe's pair."""
    recipe = recipes.get(pair)
    teacher = load_checkpoint(checkpoints / f"{recipe.teacher}.safetensors")
    config = recipe.config if views is None else replace(recipe.config, teacher_views=views)
    # training and banks run one pass of each model, never the test-time augmentation
    student_macs = count_macs(_student(recipe, teacher), _shape(teacher), tta=False)
    teacher_macs = count_macs(teacher.model, _shape(teacher), tta=False)
    engine_dtype = autocast_dtype(torch.device("cpu"), config.amp)
    engine_precision = "bfloat16" if engine_dtype == torch.bfloat16 else "float32"
    label = f"{recipe.teacher} -> {recipe.arch} ({' + '.join(config.loss_weights)})"

    reference = reference_distill(teacher.model, _student(recipe, teacher), root, teacher.mean, teacher.std,
                                  config.loss_weights, config.temperature, lr=config.lr, steps=scale.steps,
                                  warmup=scale.warmup, clip_grad_norm=config.clip_grad_norm)
    count = config.batch_size * (scale.steps + scale.warmup)
    subset = data.train.subset(count, seed=0)
    small = DataBundle(data.source, subset, Split(data.test.images[:config.batch_size], data.test.labels[:config.batch_size]),
                       data.classes, tuple(teacher.mean), tuple(teacher.std))
    common = dict(epochs=1, eval_every=0, limit=None, validation=0, device="cpu", ema_decay=0.0)
    live = time_training(teacher.model, _student(recipe, teacher), small,
                         replace(config, **common, teacher_views=0), scale.warmup)
    banked = time_training(teacher.model, _student(recipe, teacher), small,
                           replace(config, **common, teacher_views=scale.bank_views), scale.warmup)

    def row(way: str, images_per_second: float, macs: int, precision: str, run_minutes: float, **extra) -> dict:
        achieved = peak.achieved_gflops(macs, images_per_second)
        return {"pair": label, "recipe": pair, "way": way, "images_per_second": images_per_second,
                "speedup": images_per_second / reference["images_per_second"], "run_minutes": run_minutes,
                "gflops": achieved, "precision": precision, "peak_fraction": achieved / peaks[precision],
                "macs_per_image": macs, **extra}

    per_epoch = TRAIN_IMAGES / 60  # minutes per epoch = per_epoch / images per second
    reference_ips = reference["images_per_second"]
    live_ips = config.batch_size / live["step_seconds"]
    banked_ips = config.batch_size / banked["step_seconds"]
    build_seconds = banked["bank_seconds_per_image_view"]
    build_minutes = TRAIN_IMAGES * config.teacher_views * build_seconds / 60
    train_macs = peak.training_macs(student_macs, teacher_macs)
    rows = [
        row(f"reference loop (batch {reference['batch_size']}, {reference['workers']} workers)", reference_ips,
            train_macs, "float32", epochs * per_epoch / reference_ips),
        row(f"engine, live teacher (batch {config.batch_size})", live_ips, train_macs, engine_precision,
            epochs * per_epoch / live_ips),
        row(f"engine, {config.teacher_views}-view teacher bank (batch {config.batch_size})", banked_ips,
            peak.training_macs(student_macs), engine_precision, build_minutes + epochs * per_epoch / banked_ips,
            bank_build_minutes=build_minutes),
    ]
    bank_rate = 1 / build_seconds
    bank_gflops = peak.achieved_gflops(teacher_macs, bank_rate)
    rows.append({"pair": label, "recipe": pair, "way": f"teacher bank build ({recipe.teacher} forward, per image-view)",
                 "images_per_second": bank_rate, "speedup": None, "run_minutes": build_minutes, "gflops": bank_gflops,
                 "precision": engine_precision, "peak_fraction": bank_gflops / peaks[engine_precision],
                 "macs_per_image": teacher_macs})
    return rows


def teacher_training_row(name: str, data: DataBundle, scale: Scale, epochs: int, peaks: dict[str, float]) -> dict:
    """The engine training a teacher recipe (cross-entropy, its own batch and optimizer) from scratch."""
    recipe = recipes.get(name)
    config = recipe.config
    shape = data.input_shape

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return models.create(recipe.arch, **models.arch_args_for(recipe.arch, len(data.classes), shape,
                                                                 **recipe.arch_args))

    macs = peak.training_macs(count_macs(fresh(), shape, tta=False))
    count = config.batch_size * (scale.steps + scale.warmup)
    small = DataBundle(data.source, data.train.subset(count, seed=0),
                       Split(data.test.images[:config.batch_size], data.test.labels[:config.batch_size]),
                       data.classes, data.mean, data.std)
    timed = time_training(None, fresh(), small, replace(config, epochs=1, warmup_epochs=0, eval_every=0, limit=None,
                                                        validation=0, device="cpu", ema_decay=0.0), scale.warmup)
    precision = "bfloat16" if autocast_dtype(torch.device("cpu"), config.amp) == torch.bfloat16 else "float32"
    images_per_second = config.batch_size / timed["step_seconds"]
    achieved = peak.achieved_gflops(macs, images_per_second)
    return {"recipe": name, "arch": recipe.arch, "batch_size": config.batch_size, "images_per_second": images_per_second,
            "run_minutes": epochs * TRAIN_IMAGES / images_per_second / 60, "gflops": achieved, "precision": precision,
            "peak_fraction": achieved / peaks[precision], "macs_per_image": macs}


def checkpoint_rows(checkpoints: Path, scale: Scale, peaks: dict[str, float]) -> list[dict[str, Any]]:
    """Evaluation throughput and batch-1 latency of every checkpoint in the folder."""
    rows = []
    for entry in list_checkpoints(checkpoints):
        if "error" in entry:
            continue
        checkpoint = load_checkpoint(entry["path"])
        shape = _shape(checkpoint)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (scale.eval_images, *shape), generator=generator, dtype=torch.uint8)
        predict(checkpoint.model, images[:100], checkpoint.mean, checkpoint.std)  # warm-up
        started = time.perf_counter()
        predict(checkpoint.model, images, checkpoint.mean, checkpoint.std)
        images_per_second = scale.eval_images / (time.perf_counter() - started)
        macs = count_macs(checkpoint.model, shape)  # test-time augmentation's passes included
        achieved = peak.achieved_gflops(macs, images_per_second)
        rows.append({"name": entry["name"], "arch": checkpoint.meta.get("arch"), "input": "x".join(map(str, shape)),
                     "parameters": count_parameters(checkpoint.model), "macs_per_image": macs,
                     "images_per_second": images_per_second,
                     "batch1_ms": measure_latency(checkpoint.model, shape, 1, scale.latency_repeats),
                     "gflops": achieved, "peak_fraction": achieved / peaks["float32"]})
    return rows


def run(checkpoints: Path = recipes.CHECKPOINTS, source: str = recipes.CIFAR10_JPEG, quick: bool = False,
        epochs: int = 10, views: int | None = None, cache_dir: Path | None = None,
        progress=print) -> dict[str, Any]:
    """All rows, as one JSON-able dict. ``progress`` gets a line as each part starts."""
    if epochs < 1 or (views is not None and views < 1):
        raise ValueError(f"epochs and views must be at least 1, got {epochs} and {views}")
    scale = QUICK if quick else FULL
    started = time.perf_counter()
    for name in {recipes.get(pair).teacher for pair in PAIRS} | set(EXPLAIN):
        if not (checkpoints / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"the benchmark needs {checkpoints / (name + '.safetensors')} "
                                    f"(python -m kd_core {'train' if name in ('airnet', 'deepnn') else 'distill'} "
                                    f"--recipe {name})")
    progress(f"dense-kernel peak ({scale.matmul_size} x {scale.matmul_size} product and a 3x3 convolution, "
             f"{torch.get_num_threads()} threads)")
    peaks = peak.peaks(scale.matmul_size)
    progress(f"data: {source}")
    data = load_data(source, cache_dir)
    root = image_folder(source, cache_dir)
    training = []
    for pair in PAIRS:
        progress(f"training: {pair} (reference loop, engine live, engine on a bank)")
        training += training_rows(pair, data, root, checkpoints, scale, epochs, peaks, views)
    progress(f"training: the {TEACHER} teacher from scratch")
    teacher_row = teacher_training_row(TEACHER, data, scale, epochs, peaks)
    progress("explain latency")
    with tempfile.TemporaryDirectory() as scratch:
        photo = Path(scratch) / "photo.jpg"
        synthetic_photo().save(photo, quality=90)
        explain = bench_explain(checkpoints, *EXPLAIN, photo, repeats=scale.explain_repeats)
    progress("checkpoints: evaluation throughput and batch-1 latency")
    rows = checkpoint_rows(checkpoints, scale, peaks)
    return {"quick": quick, "epochs": epochs, "views": views, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": _cpu_name(), "peak_gflops": peaks, "matmul_size": scale.matmul_size, "training": training,
            "teacher_training": teacher_row,
            "explain": {"teacher": EXPLAIN[0], "student": EXPLAIN[1], "image": "1024x768 JPEG", **explain},
            "checkpoints": rows, "seconds": time.perf_counter() - started}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _number(value: float, digits: int = 0) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _gflops(value: float) -> str:
    return _number(value, 1 if value < 10 else 0)  # a CPU without native bfloat16 reaches a few


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run` report."""
    peaks = report["peak_gflops"]
    lines = [f"{report['cpu']}, {report['threads']} threads, torch {report['torch']}"
             f"{' (quick: few steps, rough figures)' if report['quick'] else ''}",
             f"dense-kernel peak: float32 {_gflops(peaks['float32'])} GFLOP/s, "
             f"bfloat16 {_gflops(peaks['bfloat16'])} GFLOP/s", "",
             f"| pair | way | images/s | vs reference | {report['epochs']}-epoch run (min) | GFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|"]
    for row in report["training"]:
        speedup = "" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        lines.append(f"| {row['pair']} | {row['way']} | {_number(row['images_per_second'])} | {speedup} | "
                     f"{_number(row['run_minutes'], 1)} | {_number(row['gflops'], 1)} | "
                     f"{100 * row['peak_fraction']:.1f}% {row['precision']} |")
    teacher = report.get("teacher_training")
    if teacher:
        lines += ["", f"training the {teacher['recipe']} teacher ({teacher['arch']}, cross-entropy, batch "
                  f"{teacher['batch_size']}): {_number(teacher['images_per_second'])} images/s, "
                  f"{report['epochs']} epochs {_number(teacher['run_minutes'], 1)} min, "
                  f"{_number(teacher['gflops'], 1)} GFLOP/s, {100 * teacher['peak_fraction']:.1f}% of the "
                  f"{teacher['precision']} peak"]
    explain = report["explain"]
    lines += ["", f"explain {explain['teacher']} + {explain['student']} ({explain['image']}): median "
              f"{_number(explain['median_ms'], 1)} ms, p95 {_number(explain['p95_ms'], 1)} ms", "",
              "| checkpoint | arch | parameters | MACs | eval images/s | batch-1 ms | of float32 peak |",
              "|---|---|---|---|---|---|---|"]
    for row in report["checkpoints"]:
        lines.append(f"| {row['name']} | {row['arch']} | {row['parameters']:,} | {row['macs_per_image'] / 1e6:,.1f} M | "
                     f"{_number(row['images_per_second'])} | {_number(row['batch1_ms'], 2)} | "
                     f"{100 * row['peak_fraction']:.1f}% |")
    lines += ["", f"measured in {report['seconds'] / 60:.1f} min"]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as scratch:
        Path(scratch).write_text(json.dumps(report, indent=2) + "\n")
