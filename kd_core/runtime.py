"""Where and how a process computes: the device, mixed precision, seeds, and the allocator setting
of training processes.

Allocator: glibc serves every block larger than its mmap threshold (at most 32 MB) with a fresh
``mmap`` and unmaps it when freed. A CPU training step allocates and frees the same large
activations every step, so each step faults hundreds of megabytes of new zeroed pages in from the
kernel. With mmap and trimming off (:func:`reuse_freed_memory`), freed blocks stay in the heap and
are reused: a cross-entropy step of the camnet-kd-cam recipe's student (batch 256, 2 threads) took
157 ms against 342 ms (docs/experiments.md, "Speed: memory allocation"; ``python -m kd_core.bench distill
... --system-malloc`` measures glibc's default). The cost: the process keeps its peak memory until
it exits, which a training process reaches every step anyway. Training entry points (the CLI's
train, distill and study, the job worker, the distill benchmark) call it once at start;
``KD_CORE_MALLOC=system`` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import os
import platform
import random

import torch

M_TRIM_THRESHOLD = -1       # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = 2**31 - 1      # an int: hand memory back only above 2 GB of free heap top


def _glibc_mallopt():
    """glibc's ``mallopt``, or None (not glibc, or ``KD_CORE_MALLOC=system``: leave malloc alone)."""
    if os.environ.get("KD_CORE_MALLOC", "").lower() == "system":
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and keep freed ones; whether it did
    (False off glibc, or when ``KD_CORE_MALLOC=system``). Process-wide; call it before training."""
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def limit_malloc_arenas(count: int = 1) -> bool:
    """Let glibc's malloc keep at most ``count`` arenas (its default is eight per core): each
    thread that allocates otherwise gets an arena of its own whose freed memory no other thread
    reuses, so a server answering on many threads grows by an arena's worth per thread. Whether it
    did (see :func:`reuse_freed_memory`); call it before starting threads."""
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, count))


def channels_last_safe(*modules: torch.nn.Module | None) -> bool:
    """Whether ``modules`` may run in channels-last memory: not where one has a strided 1x1
    convolution on 3 input channels, whose CPU kernel in torch 2.14 corrupts the heap on AVX2 CPUs
    at one thread with channels-last input (the zoo avoids it: ``models/reparam.py``; a timm or
    imported model may not). Such models run in the default layout instead."""
    return not any(isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride != (1, 1)
                   and layer.in_channels == 3
                   for module in modules if module is not None for layer in module.modules())


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available")
    return device


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """fp16 on CUDA; bf16 on CPUs with native bf16 (AVX-512 BF16 / AMX), where it is ~2x faster."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
