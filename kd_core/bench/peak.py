"""What the machine can do, and how much of it a row of the benchmark uses.

The peak is a square matrix multiply, the best case for a CPU's vector units: ``2 n^3`` floating
point operations per ``n x n`` product, best of a few repeats, on the threads torch is using.

Work is counted in multiply-accumulates (MACs) of one forward pass, as torch's own
``FlopCounterMode`` counts them (convolutions, linear layers and matrix multiplies; element-wise
operations, normalization and pooling are not counted, so every fraction here is a lower bound).
One MAC is two floating point operations. A training step counts three forward passes of the
student (the backward pass costs about two: gradients for inputs and for weights) plus one forward
of the teacher where the teacher runs live; a teacher bank's build counts one forward of the
teacher per image-view.
"""
from __future__ import annotations

import time

import torch

TRAINING_PASSES = 3  # forward + backward (inputs and weights) of the trained model, in forward passes


@torch.no_grad()
def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` ``size x size`` matrix products in ``dtype``."""
    if size < 1 or repeats < 1:
        raise ValueError("size and repeats must be at least 1")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up: kernels chosen, pages touched
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def peaks(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Matrix-multiply GFLOP/s in float32 and bfloat16 on the current torch threads."""
    return {"float32": matmul_gflops(torch.float32, size, repeats),
            "bfloat16": matmul_gflops(torch.bfloat16, size, repeats)}


def training_macs(student_macs: int, teacher_macs: int = 0) -> int:
    """MACs of one training step per image: the student trained, the teacher (if live) run forward."""
    return TRAINING_PASSES * student_macs + teacher_macs


def achieved_gflops(macs_per_image: int, images_per_second: float) -> float:
    return 2 * macs_per_image * images_per_second / 1e9
