"""Does a second process pay on a CPU? One distillation run as 1 process x N threads against N
processes x 1 thread under torchrun (Gloo), the same recipe, global batch, images and seed.

Each run is the ordinary CLI in a subprocess (``python -m kd_core distill``, or the same under
``python -m torch.distributed.run --standalone --nproc_per_node N``) with the live teacher, so
every step pays the teacher's forward pass; its training time (the epochs and the final test-split
evaluation, the bank-free part of a run) is read back from the checkpoint it writes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..checkpoint import read_metadata


def scaling_command(recipe: str, data: str, limit: int, epochs: int, output: Path, cache_dir: Path | None,
                    processes: int) -> list[str]:
    command = [sys.executable, "-m", "kd_core", "distill", "--recipe", recipe, "--data", data,
               "--limit", str(limit), "--epochs", str(epochs), "--teacher-views", "0", "--set", "eval_every=0",
               "--output", str(output), "--run-dir", str(output.with_suffix("")), "--fresh"]
    command += ["--cache-dir", str(cache_dir)] if cache_dir else []
    if processes > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                        "-m", "kd_core"]
    return command


def measure_scaling(recipe: str, data: str, limit: int = 10_000, epochs: int = 2, processes: int = 2,
                    cache_dir: Path | None = None, timeout: float = 1800) -> list[dict]:
    """Images per second of training for 1 process x ``processes`` threads and ``processes``
    processes x 1 thread (the ratio in ``speedup``)."""
    if processes < 2:
        raise ValueError(f"scaling compares one process with several; got {processes} processes")
    if limit < 1 or epochs < 1:
        raise ValueError("limit and epochs must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kd-scaling-") as folder:
        for count, threads in ((1, processes), (processes, 1)):
            output = Path(folder) / f"p{count}.safetensors"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run(scaling_command(recipe, data, limit, epochs, output, cache_dir, count), env=env,
                                  capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"the {count}-process run failed:\n{done.stderr[-2000:]}")
            seconds = read_metadata(output)["train_seconds"]
            rows.append({"way": f"{count} process{'es' if count > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
                         "processes": count, "threads": threads, "train_seconds": seconds,
                         "images_per_second": limit * epochs / seconds})
    rows[1]["speedup"] = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    return rows


def format_scaling(rows: list[dict], recipe: str, limit: int, epochs: int) -> str:
    lines = [f"{recipe}, live teacher, {limit:,} images x {epochs} epochs (test evaluation included)", "",
             "| way | training s | images/s | vs 1 process |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['way']} | {row['train_seconds']:.1f} | {row['images_per_second']:,.0f} | "
                     f"{row.get('speedup', 1.0):.2f}x |")
    return "\n".join(lines)
