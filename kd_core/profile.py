"""Cost of a model: parameters, multiply-accumulates, file size, CPU latency, peak memory."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def count_macs(model: torch.nn.Module, input_shape: tuple[int, int, int], tta: bool = True) -> int:
    """Multiply-accumulates of one forward pass on one ``(C, H, W)`` input (FLOPs / 2), counted by
    torch's own FlopCounterMode (convolutions, linear layers, matmuls).

    ``tta``: count the eval-mode prediction with the model's test-time augmentation (its mirror and
    shifted passes); False counts the single pass that training and teacher banks run."""
    was_training = model.training
    saved_tta = (getattr(model, "flip_tta", False), getattr(model, "translate_tta", False))
    model.eval()
    if not tta and any(saved_tta):
        model.set_tta(False, False)
    parameter = next(model.parameters())
    probe = torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(probe)
    finally:
        if not tta and any(saved_tta):
            model.set_tta(*saved_tta)
        model.train(was_training)
    return counter.get_total_flops() // 2


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak resident memory) when 5 is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def measure_latency(model: torch.nn.Module, input_shape: tuple[int, int, int], batch_size: int = 1,
                    repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time in milliseconds of one float32 forward pass of ``batch_size`` inputs."""
    import time

    model.eval()
    parameter = next(model.parameters())
    batch = torch.randn(batch_size, *input_shape, device=parameter.device)
    timings = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        model(batch)
        if parameter.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            timings.append(time.perf_counter() - started)
    return 1000 * sorted(timings)[len(timings) // 2]


@torch.no_grad()
def measure_peak_memory(model: torch.nn.Module, input_shape: tuple[int, int, int], batch_size: int = 256) -> int | None:
    """Extra bytes held at the peak of one forward pass of ``batch_size`` inputs (activations and
    workspace; the weights are already resident). CUDA: the allocator's peak; CPU: the process's
    peak resident set (VmHWM) after resetting it. None where the OS does not tell."""
    model.eval()
    parameter = next(model.parameters())
    batch = torch.randn(batch_size, *input_shape, device=parameter.device)
    if parameter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(batch)
        return torch.cuda.max_memory_allocated() - before
    if not _reset_peak_rss():
        return None
    before = _status_kib("VmRSS")
    model(batch)
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024
