"""One run over several processes, as ``torchrun`` starts them: the process group, which process
this is, and the few collectives the training loop needs.

:func:`init_from_env` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: Gloo for CPU tensors and, on a machine
with a GPU for this process, NCCL for CUDA tensors on ``cuda:LOCAL_RANK`` (one ``cpu:gloo,cuda:nccl``
group, so a run on either device works). Without ``WORLD_SIZE``, or with 1, it creates nothing and
every function here answers for a single process: rank 0 of 1, collectives hand their input back.
A single-process run is therefore exactly what it was before.

How training uses it (kd_core.training.engine):

- Batches. ``batch_size`` is the global batch. Every process draws the same epoch order and the
  same augmentation parameters for the whole global batch and keeps its own contiguous
  ``batch_size / world_size`` rows (:func:`kd_core.data.loader.shard`), so N processes see the very
  images and views one process would, split N ways. A batch size that does not split evenly is
  refused; a last, partial batch is cut to a multiple of ``world_size``.
- Gradients: averaged by :func:`average_gradients` after the backward pass, in flat buckets, instead
  of wrapping the student in DistributedDataParallel. DDP reduces only the parameters of the module
  it wraps, from hooks armed by that module's own forward; here the loss terms call the student's
  ``forward_features``/``forward_head`` directly, the CAM term reads the head's weights a second
  time, and the objective's adapters (the FitNets hint) are trainable parameters outside the
  student. Averaging the gradient of every parameter the optimizer holds covers all of it, and
  ``trainer.model`` stays the plain classifier whose state is saved, the same for any number of
  processes. The price: communication does not overlap the backward pass as DDP's does. Every
  process builds the same graph, so the same parameters have gradients and the buckets match.
- Batch norm: plain, per-process statistics in the forward pass (over ``batch_size / world_size``
  images); the running statistics are averaged over processes at each epoch's end, before
  evaluation and the save (as timm's ``distribute_bn``). A model with neither batch norm nor
  dropout (camnet, say) trains as it would in one process, to float rounding.
- Teacher bank: rank 0 builds it and alone writes the cache file; the others wait, then read that
  file (or, with a cache folder they do not share, build the same bank again without writing it).
- Randomness: augmentation is drawn for the global batch (above); dropout draws from torch's global
  generator, which each process forks by its rank when training starts, so masks differ between
  processes (a model with dropout is therefore not step-for-step the single-process run).
- Metrics: sums of losses, correct predictions and counts are added over processes; evaluation is
  split over processes and added the same way, so every epoch's numbers are global (a step's
  running loss in the progress bar is rank 0's share).
- Files: rank 0 alone writes checkpoints, resumable state, logs and progress bars. The state holds
  the unwrapped modules and the shared generators, so it resumes on any number of processes; every
  process reads it, so the run folder must be on a file system they all share.
- Failure: every collective waits at most the process group's timeout (``KD_DIST_TIMEOUT_S``,
  default 1800 s; it must exceed rank 0's longest solo work: the teacher bank's build, or in a study
  the CAM agreement it measures over the test split after each run). When a process dies or hangs,
  the others raise :class:`DistributedError` instead of waiting forever (on NCCL, torch's watchdog
  may end the process first, with its own message).
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 1800.0
BUCKET_BYTES = 25 * 2**20  # gradients per all-reduce, as DDP's default bucket


class DistributedError(RuntimeError):
    """A collective failed: another process of the run died, or stopped answering in time."""


def timeout_seconds() -> float:
    text = os.environ.get("KD_DIST_TIMEOUT_S", "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"KD_DIST_TIMEOUT_S must be a number of seconds, got {text!r}") from None
    if seconds <= 0:
        raise ValueError(f"KD_DIST_TIMEOUT_S must be positive, got {text!r}")
    return seconds


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; whether there is one (False
    for a single process: nothing is created). Calling it again is harmless."""
    if active():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    backend = "gloo"
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:  # a GPU for every process here
        torch.cuda.set_device(local_rank)  # this process's GPU: "cuda" now means cuda:LOCAL_RANK
        backend = "cpu:gloo,cuda:nccl"
    seconds = timeout_seconds()
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))  # env://: RANK, WORLD_SIZE, MASTER_*
    except (RuntimeError, ValueError) as error:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(f"process {os.environ.get('RANK', '?')} of {world} could not join the run at "
                               f"{where} within {seconds:.0f} s (KD_DIST_TIMEOUT_S): {_first_line(error)}") from error
    return True


def shutdown() -> None:
    """Leave the process group, when there is one."""
    if active():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files and reports progress."""
    return rank() == 0


def process_device(device: torch.device) -> torch.device:
    """``device`` for this process: in a distributed run on CUDA, the GPU of its local rank."""
    if device.type == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


# -- collectives ------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _collective(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RuntimeError as error:  # torch's DistBackendError, DistNetworkError, Gloo's and NCCL's timeouts
        raise DistributedError(
            f"{what} failed in process {rank()} of {world_size()}: another process of this run died or stopped "
            f"answering (each waits at most {timeout_seconds():.0f} s, KD_DIST_TIMEOUT_S); the last finished "
            f"epoch stays resumable ({_first_line(error)})") from error


def barrier() -> None:
    if active():
        _collective("a barrier", dist.barrier)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling a cache, say); the others run it once rank 0 is done."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over processes, in place; returned for convenience."""
    if active():
        _collective("an all-reduce", lambda: dist.all_reduce(tensor))
    return tensor


def sum_numbers(values: Sequence[float]) -> list:
    """Numbers summed over processes (float64, exact for counts); in one process, ``values`` as given."""
    if not active():
        return list(values)
    return all_reduce_sum(torch.tensor([float(value) for value in values], dtype=torch.float64)).tolist()


def all_true(flag) -> bool:
    """Whether ``flag`` (a bool or a one-element tensor) holds in every process."""
    return sum_numbers([bool(flag)])[0] == world_size()


def any_true(flag) -> bool:
    """Whether ``flag`` holds in some process."""
    return sum_numbers([bool(flag)])[0] > 0


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` (any picklable object), in every process."""
    if not active():
        return value
    holder = [value]
    _collective("a broadcast", lambda: dist.broadcast_object_list(holder, src=source))
    return holder[0]


def _buckets(tensors: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, at most ``BUCKET_BYTES`` a group."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and ((tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)
                       or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def _flat(what: str, tensors: Iterable[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """Run ``collective`` in place on each bucket of ``tensors`` packed flat, and copy the results back
    (any memory format)."""
    for bucket in _buckets(tensors):
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
        _collective(what, lambda: collective(flat))
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace every gradient by its mean over processes: each process's loss is the mean over its
    equal share of the global batch, so this is the global batch's gradient."""
    if not active():
        return
    world = world_size()
    _flat("the gradient all-reduce", [p.grad for p in parameters if p.grad is not None],
          lambda flat: dist.all_reduce(flat.div_(world)))


def average_buffers(modules: Iterable[nn.Module]) -> None:
    """Average the floating-point buffers (batch-norm running statistics) over processes."""
    if not active():
        return
    world = world_size()
    buffers = [buffer for module in modules for buffer in module.buffers() if buffer.is_floating_point()]
    _flat("the batch-norm statistics all-reduce", buffers, lambda flat: dist.all_reduce(flat.div_(world)))


def broadcast_modules(modules: Iterable[nn.Module], source: int = 0) -> None:
    """Give every process rank ``source``'s parameters and buffers (as DDP does when it starts)."""
    if not active():
        return
    tensors = [tensor for module in modules for tensor in module.state_dict().values()]
    _flat("the weights broadcast", tensors, lambda flat: dist.broadcast(flat, source))
