"""The Models tab's figures and tables: a table of every checkpoint, accuracy/cost
charts, per-class accuracy, the confusion matrix and the images a student gets wrong where its
teacher is right. Figures are plotly; numbers come from checkpoint metadata."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from safetensors import safe_open

from ..checkpoint import CheckpointError, LoadedCheckpoint, file_sha256, list_checkpoints
from ..evaluation import student_mistakes as find_student_mistakes
from ..export import format_table

TABLE_COLUMNS = ["name", "arch", "role", "params", "MACs (M)", "size (MB)", "test top-1 (%)",
                 "single view (%)", "CAM corr. with teacher", "method", "teacher", "train (min)", "CPU latency b1 (ms)"]


def checkpoint_rows(directory: str | Path) -> list[dict[str, Any]]:
    """Usable checkpoints only, as flat dicts (broken files are reported by ``list_checkpoints``)."""
    rows = []
    for entry in list_checkpoints(directory):
        if "error" in entry:
            continue
        meta = entry["meta"]
        metrics = meta.get("metrics", {})
        rows.append({
            "name": entry["name"], "arch": meta["arch"], "role": meta.get("role", ""),
            "params": metrics.get("params"), "MACs (M)": round(metrics.get("macs", 0) / 1e6, 1),
            "size (MB)": round(entry["file_size"] / 1e6, 2), "test top-1 (%)": metrics.get("test_top1"),
            "single view (%)": metrics.get("test_top1_single_view"),  # a net predicting with TTA: one pass
            "CAM corr. with teacher": metrics.get("cam_correlation_mean"),
            "method": meta.get("method", ""), "teacher": (meta.get("teacher") or {}).get("name", ""),
            "train (min)": round(meta.get("train_seconds", 0) / 60, 1),
            "CPU latency b1 (ms)": round(metrics["latency_ms_batch1"], 2) if "latency_ms_batch1" in metrics else None,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[row[column] for column in TABLE_COLUMNS] for row in rows]


def accuracy_chart(rows: list[dict[str, Any]], x: str = "params") -> go.Figure:
    """Test top-1 against parameters (log scale) or against CPU batch-1 latency."""
    key = {"params": "params", "latency": "CPU latency b1 (ms)"}[x]
    points = [row for row in rows if row.get(key) is not None and row.get("test top-1 (%)") is not None]
    figure = go.Figure()
    for role, symbol in (("teacher", "diamond"), ("student", "circle")):
        chosen = [row for row in points if row["role"] == role]
        figure.add_trace(go.Scatter(
            x=[row[key] for row in chosen], y=[row["test top-1 (%)"] for row in chosen], mode="markers+text",
            text=[row["name"] for row in chosen], textposition="top center", name=role,
            marker={"size": 12, "symbol": symbol}))
    figure.update_layout(xaxis_title="parameters" if x == "params" else "CPU latency, batch 1 (ms)",
                         yaxis_title="test top-1 (%)", xaxis_type="log", height=380,
                         margin={"l": 40, "r": 20, "t": 30, "b": 40})
    if not points:
        figure.add_annotation(text="no measurements yet (python -m kd_core evaluate --speed --record)",
                              showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return figure


def per_class_chart(meta: dict[str, Any]) -> go.Figure:
    classes = meta["data"]["classes"]
    per_class = meta.get("metrics", {}).get("per_class")
    figure = go.Figure()
    if per_class:
        figure.add_trace(go.Bar(x=classes, y=per_class, text=[f"{value:.1f}" for value in per_class]))
    else:
        figure.add_annotation(text="no per-class accuracy recorded", showarrow=False, x=0.5, y=0.5,
                              xref="paper", yref="paper")
    figure.update_layout(yaxis_title="test accuracy (%)", yaxis_range=[0, 100], height=320,
                         margin={"l": 40, "r": 20, "t": 30, "b": 40})
    return figure


def confusion_chart(meta: dict[str, Any]) -> go.Figure:
    classes = meta["data"]["classes"]
    confusion = meta.get("metrics", {}).get("confusion")
    figure = go.Figure()
    if confusion:
        counts = np.asarray(confusion)
        figure.add_trace(go.Heatmap(z=counts, x=classes, y=classes, colorscale="Blues", text=counts,
                                    texttemplate="%{text}", hovertemplate="true %{y}<br>predicted %{x}: %{z}"))
        figure.update_yaxes(autorange="reversed")
    figure.update_layout(xaxis_title="predicted", yaxis_title="true", height=420,
                         margin={"l": 40, "r": 20, "t": 30, "b": 40})
    return figure


@dataclass(frozen=True)
class Sample:
    """A fixed sample of test images the Models tab draws a student's mistakes from."""
    images: torch.Tensor   # (N, C, H, W) uint8
    labels: torch.Tensor   # (N,)
    classes: list[str]
    sha256: str            # of the file: which sample recorded predictions were made on


@functools.lru_cache(maxsize=4)
def _read_sample(path: str, mtime_ns: int, size: int) -> Sample:
    with safe_open(path, "pt") as handle:
        classes = json.loads(handle.metadata()["classes"])
        images, labels = handle.get_tensor("images"), handle.get_tensor("labels")
    return Sample(images, labels, classes, file_sha256(path))


def load_sample(path: str | Path) -> Sample:
    """The shipped test-image sample, read once per version of the file."""
    status = Path(path).stat()
    return _read_sample(str(path), status.st_mtime_ns, status.st_size)


def student_mistakes(student: LoadedCheckpoint, teacher: LoadedCheckpoint, sample: Sample,
                     limit: int = 24) -> tuple[list[tuple[np.ndarray, str]], int]:
    """A gallery of the sample images the teacher classifies correctly and the student does not:
    the first ``limit``, enlarged, with captions, and how many there are in all."""
    if student.classes != sample.classes or teacher.classes != sample.classes:
        return [], 0
    chosen, student_predictions = find_student_mistakes(student, teacher, sample.images, sample.labels, sample.sha256)
    gallery = []
    for index in chosen[:limit].tolist():
        picture = sample.images[index].permute(1, 2, 0).numpy()  # (H, W, C)
        picture = np.repeat(picture, 4, axis=0).repeat(4, axis=1)  # 32x32 is too small to see
        if picture.shape[2] == 1:
            picture = np.repeat(picture, 3, axis=2)
        caption = f"true {sample.classes[sample.labels[index]]}; student says {sample.classes[student_predictions[index]]}"
        gallery.append((picture, caption))
    return gallery, len(chosen)


@functools.cache
def _digits_sample() -> Sample:
    from ..data import load_data

    digits = load_data("digits")
    return Sample(digits.test.images, digits.test.labels, digits.classes, "digits-test-split")


def sample_for(checkpoint: LoadedCheckpoint, cifar_sample: str | Path) -> Sample | None:
    """The images a model's mistakes are drawn from: the shipped CIFAR-10 sample for a CIFAR-10
    model, the test split itself for scikit-learn's digits (bundled, 359 images); None otherwise."""
    if checkpoint.meta["data"].get("source") == "digits":
        return _digits_sample()
    sample = load_sample(cifar_sample)
    return sample if sample.classes == checkpoint.classes else None


def mistakes_gallery(student: LoadedCheckpoint, find_checkpoint, cifar_sample: str | Path) -> tuple[list, str]:
    """A gallery of sample images a model's teacher gets right and it gets wrong, with a note.
    ``find_checkpoint`` loads a checkpoint by name (the app's model cache)."""
    recorded = student.meta.get("teacher")
    if not recorded:
        return [], "No teacher recorded for this model."
    sample = sample_for(student, cifar_sample)
    if sample is None:
        return [], "No sample images of this model's data set are shipped."
    try:
        teacher = find_checkpoint(recorded["name"])
    except CheckpointError:
        return [], absent_teacher_note(recorded)
    gallery, count = student_mistakes(student, teacher, sample)
    return gallery, (f"{count} of {len(sample.labels):,} sample test images that {recorded['name']} "
                     f"classifies correctly and {student.name} does not (first {len(gallery)} shown).")


def absent_teacher_note(recorded: dict[str, Any]) -> str:
    """Why a student's mistakes gallery is empty when its recorded teacher is not in the folder, and
    how to get the teacher back where a recipe reproduces it (e.g. ResNet-50, too large to ship)."""
    from ..experiments import recipes

    note = f"Teacher {recorded['name']} is not in the checkpoints folder"
    if recorded.get("test_top1"):
        note += f" (it scored {recorded['test_top1']:.2f}% test top-1 when this model learnt from it)"
    if recorded["name"] in recipes.names():
        note += f"; `{recipes.get(recorded['name']).command}` trains it again"
    return note + "."


def export_note(meta: dict[str, Any]) -> str:
    """The ONNX export recorded in a checkpoint (``export --record``) as a Markdown code block; "" if none."""
    recorded = meta.get("export")
    if not recorded:
        return ""
    settings = recorded["settings"]
    return (f"Exported (ONNX Runtime {recorded['onnxruntime']}, {settings['threads']} thread{'s' if settings['threads'] != 1 else ''}, "
            f"{settings['test_images']:,} test images):\n\n```\n{format_table(recorded['rows'])}\n```")


def details(student: LoadedCheckpoint, find_checkpoint, cifar_sample: str | Path):
    """What the Models tab shows for one model: per-class accuracy, confusion matrix, the gallery of
    :func:`mistakes_gallery`, and a note on it and on the model's recorded ONNX export."""
    gallery, note = mistakes_gallery(student, find_checkpoint, cifar_sample)
    exported = export_note(student.meta)
    return (per_class_chart(student.meta), confusion_chart(student.meta), gallery,
            f"{note}\n\n{exported}" if exported else note)
