"""Latency benchmarks for the dashboard.

    python -m kd_core.bench explain --checkpoints DIR --teacher NAME --student NAME \\
        [--method gradcam] [--repeats 30] [--threads 1] [--image PATH]

times whole :func:`kd_core.explain.explain` calls as the app makes them: from an image file
(decoded every call) to probabilities, maps and overlays. The image is ``--image`` (e.g. one of
``assets/examples/``), else a synthetic 1024 x 768 JPEG: the largest picture the Explain tab
draws on (uploads are capped at 1024 pixels a side), so the worst case for decoding and overlays.

``--threads`` limits torch and NumPy's BLAS (EigenCAM's SVD) alike. On a CPU shared with a
training job use one: two threads then fight the trainer for the cores and a call can take five to
ten times longer.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits  # installed with grad-cam (through scikit-learn)

from .explain import ModelCache, cam_methods, explain


def bench_explain(checkpoint_dir: str | Path, teacher: str, student: str, image: str | Path,
                  method: str = "gradcam", repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Wall times in milliseconds of ``explain(image, [teacher, student], method)``: median, p90
    and min over ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cache = ModelCache(checkpoint_dir)
    checkpoints = [cache.get(teacher), cache.get(student)]
    timings = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        explain(image, checkpoints, method=method)
        if index >= warmup:
            timings.append(1000 * (time.perf_counter() - started))
    return {"median_ms": float(np.median(timings)), "p90_ms": float(np.percentile(timings, 90)),
            "min_ms": float(min(timings))}


def synthetic_photo(width: int = 1024, height: int = 768) -> Image.Image:
    """A smooth colour gradient with a bright disc: photo-sized, deterministic, compressible."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((rows - 0.4 * height) ** 2 + (columns - 0.6 * width) ** 2) < (0.15 * height) ** 2
    pixels = np.stack([columns / width, rows / height, 0.5 + 0.5 * disc], axis=-1)  # (H, W, 3)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_core.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("explain", help="latency of one Explain-tab call (teacher + student)")
    bench.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder")
    bench.add_argument("--teacher", required=True, help="teacher checkpoint name (file stem)")
    bench.add_argument("--student", required=True, help="student checkpoint name (file stem)")
    bench.add_argument("--method", default="gradcam", choices=cam_methods())
    bench.add_argument("--repeats", type=int, default=30, help="timed calls (default 30)")
    bench.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    bench.add_argument("--image", type=Path, help="image file (default: a synthetic 1024 x 768 photo)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads), tempfile.TemporaryDirectory() as scratch:
        image, label = args.image, str(args.image)
        if image is None:
            image, label = Path(scratch) / "synthetic.jpg", "synthetic"
            synthetic_photo().save(image, quality=90)
        try:
            result = bench_explain(args.checkpoints, args.teacher, args.student, image,
                                   args.method, args.repeats)
        except ValueError as error:  # CheckpointError, ImageError, bad arguments
            print(f"error: {error}", file=sys.stderr)
            return 2
        with Image.open(image) as opened:
            size = f"{opened.width}x{opened.height}"
    print(f"explain {args.teacher} + {args.student}, {args.method}, {size} image "
          f"({label}), {args.repeats} repeats, "
          f"{args.threads} thread(s): median {result['median_ms']:.1f} ms, "
          f"p90 {result['p90_ms']:.1f} ms, min {result['min_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
