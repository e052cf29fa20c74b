"""``benchmark cost TEACHER STUDENT...``: what a student saves against its teacher at inference.

One row per checkpoint (parameters, multiply-accumulates, file size, float32 CPU latency at batch 1
and 256, peak inference memory at batch 256, recorded test top-1), then each student's ratios to
the teacher (the Tiny-Titans source project's "x faster, x less memory"). Every model is timed as
one pass, its test-time augmentation off, so that the rows compare networks, not prediction
policies; the top-1 column is the recorded one (with the model's test-time augmentation, if any).
The file column is the checkpoint as shipped, so it counts the storage precision too (float16 or
float32 weights, :mod:`kd_core.checkpoint`).
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomically
from ..profile import count_macs, count_parameters, measure_latency, measure_peak_memory

COLUMNS = ("params", "macs", "file_bytes", "latency_ms_batch1", "latency_ms_batch256", "peak_memory_bytes_batch256")


def _single_pass(path: Path):
    """A checkpoint's network in float32 evaluation mode, its test-time augmentation off."""
    from ..checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    model = checkpoint.model.float().eval()
    model.set_tta(False, False)
    return checkpoint, model, tuple(checkpoint.meta["data"]["input_size"])


def _peak_memory(path: str, threads: int) -> int | None:
    torch.set_num_threads(threads)
    _, model, shape = _single_pass(Path(path))
    return measure_peak_memory(model, shape, 256)


def peak_memory_in_fresh_process(path: Path, threads: int) -> int | None:
    """Peak inference memory at batch 256, measured in a process of its own: in a process that has
    run other models, memory the allocator kept from them hides part of the peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_memory, (str(path), threads))


def cost_row(path: Path, repeats: int = 30) -> dict[str, Any]:
    """The cost of one checkpoint's network, one pass, float32, on the CPU."""
    memory = peak_memory_in_fresh_process(path, torch.get_num_threads())
    checkpoint, model, shape = _single_pass(path)
    return {
        "name": path.stem, "arch": checkpoint.meta.get("arch"),
        "test_top1": checkpoint.meta.get("metrics", {}).get("test_top1"),
        "params": count_parameters(model), "macs": count_macs(model, shape, tta=False),
        "file_bytes": path.stat().st_size,
        "latency_ms_batch1": measure_latency(model, shape, 1, repeats=repeats),
        "latency_ms_batch256": measure_latency(model, shape, 256, repeats=max(3, repeats // 6), warmup=1),
        "peak_memory_bytes_batch256": memory,
    }


def ratios(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, float | None]:
    """Each cost of the teacher divided by the student's: how many times smaller or faster the
    student is (None where a figure is missing or zero)."""
    out: dict[str, float | None] = {}
    for key in COLUMNS:
        a, b = teacher.get(key), student.get(key)
        out[key] = a / b if a and b else None
    return out


def check_pairs(teacher: Path, students: list[Path]) -> None:
    """Refuse, before anything is timed, a missing file or a student of another data set (other
    classes or input size) than the teacher's."""
    from ..checkpoint import read_metadata

    def data_of(path: Path) -> tuple:
        data = read_metadata(path).get("data") or {}
        return tuple(data.get("classes") or ()), tuple(data.get("input_size") or ())

    wanted = data_of(teacher)
    for path in students:
        if data_of(path) != wanted:
            raise ValueError(f"{path.name} was trained on other data (classes or input size) than {teacher.name}; "
                             "its costs do not compare")


def measure_cost(teacher: Path, students: list[Path], repeats: int = 30) -> dict[str, Any]:
    check_pairs(teacher, students)
    rows = [cost_row(path, repeats) for path in [teacher, *students]]
    return {"threads": torch.get_num_threads(), "rows": rows,
            "ratios": [{"student": row["name"], **ratios(rows[0], row)} for row in rows[1:]]}


def _size(value: float | None, unit: float, digits: int) -> str:
    return "n/a" if value is None else f"{value / unit:,.{digits}f}"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def format_cost(report: dict[str, Any]) -> str:
    lines = [f"Inference cost, one pass, float32, CPU with {report['threads']} threads "
             "(ratios: teacher / student, so above 1x the student is smaller or faster)", "",
             "| model | test top-1 | parameters | MACs | file | batch 1 | batch 256 | peak memory, batch 256 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        top1 = "n/a" if row["test_top1"] is None else f"{row['test_top1']:.2f}%"
        lines.append(f"| {row['name']} | {top1} | {row['params']:,} | {_size(row['macs'], 1e6, 1)} M "
                     f"| {_size(row['file_bytes'], 1e6, 1)} MB | {row['latency_ms_batch1']:.2f} ms "
                     f"| {row['latency_ms_batch256']:.1f} ms | {_size(row['peak_memory_bytes_batch256'], 1e6, 0)} MB |")
    teacher = report["rows"][0]["name"]
    for ratio in report["ratios"]:
        lines.append(f"| {teacher} / {ratio['student']} | | {_times(ratio['params'])} | {_times(ratio['macs'])} "
                     f"| {_times(ratio['file_bytes'])} | {_times(ratio['latency_ms_batch1'])} "
                     f"| {_times(ratio['latency_ms_batch256'])} | {_times(ratio['peak_memory_bytes_batch256'])} |")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    write_atomically(path, (json.dumps(report, indent=2) + "\n").encode())
