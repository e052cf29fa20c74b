"""What the machine can do, and how much of it a row of the benchmark uses.

The peak is the faster of two dense kernels, the best cases for a CPU's vector units, each the best
of a few repeats on the threads torch is using: a square matrix multiply (``2 n^3`` floating point
operations per ``n x n`` product, through torch's BLAS) and a 3x3 convolution in channels-last
memory (through oneDNN, as the models' own layers run). Both are needed: MKL, torch's BLAS, takes a
slow path on AMD CPUs (2 cores of an AMD EPYC: 96 GFLOP/s for the product, while airnet's
convolutions ran at 159), and either library may lack a fast kernel for a precision.

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
    return 2 * size ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def _best_seconds(kernel, repeats: int) -> float:
    """The best of ``repeats`` timed calls after an untimed warm-up (kernels chosen, pages touched);
    for a kernel whose warm-up took over a second (a precision the CPU emulates), that call's time."""
    started = time.perf_counter()
    kernel()
    best = time.perf_counter() - started
    if best > 1.0:
        return best
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        kernel()
        best = min(best, time.perf_counter() - started)
    return best


@torch.no_grad()
def conv_gflops(dtype: torch.dtype = torch.float32, channels: int = 256, side: int = 16, batch: int = 32,
                repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` 3x3 convolutions (``channels`` in and out, ``side x side``,
    padding 1, channels-last) of a ``batch`` in ``dtype``."""
    if min(channels, side, batch, repeats) < 1:
        raise ValueError("channels, side, batch and repeats must be at least 1")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=generator).to(dtype)
    weight = torch.randn(channels, channels, 3, 3, generator=generator).to(dtype)
    x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    seconds = _best_seconds(lambda: torch.nn.functional.conv2d(x, weight, padding=1), repeats)
    return 2 * batch * side * side * channels * channels * 9 / seconds / 1e9


def peaks(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Dense-kernel GFLOP/s in float32 and bfloat16 on the current torch threads: the faster of an
    ``size x size`` matrix product and a 3x3 convolution of about the same work."""
    channels = max(8, size // 8)  # 2048 -> 256 channels: 32 x 16 x 16 x 256 x 256 x 9 MACs, 1.1x the product's
    return {name: max(matmul_gflops(dtype, size, repeats), conv_gflops(dtype, channels, repeats=repeats))
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def training_macs(student_macs: int, teacher_macs: int = 0) -> int:
    """MACs of one training step per image: the student trained, the teacher (if live) run forward."""
    return TRAINING_PASSES * student_macs + teacher_macs


def achieved_gflops(macs_per_image: int, images_per_second: float) -> float:
    return 2 * macs_per_image * images_per_second / 1e9
