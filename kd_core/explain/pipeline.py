"""Explain one image with a teacher and its students: what each predicts, where it looks (a CAM
drawn over the image), and how far each student agrees with the teacher.

Speed: airnet + camnet-kd-cam + Grad-CAM on a 1024 x 768 upload takes about 85 ms on one CPU
thread, most of it airnet's six test-time-augmentation views (``python -m kd_core benchmark explain``). Give the app one thread for torch and for NumPy's BLAS
(``torch.set_num_threads(1)`` and ``threadpoolctl.threadpool_limits(1)``) on a CPU shared with
training: two threads fighting a trainer make each call five to ten times slower.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint import LoadedCheckpoint
from ..evaluation import agreement
from .images import DISPLAY_MAX_SIDE, load_image, to_model_input
from .methods import CAM_METHODS, cam_methods, compute_cam, input_saliency, overlay_heatmap, predict_with_gradcam
from .similarity import cam_correlation, same_size, top_region_iou


@dataclass
class ModelExplanation:
    name: str
    arch: str
    logits: np.ndarray  # (K,) float32
    probabilities: np.ndarray  # (K,) float64, sums to 1
    top_k: list[tuple[str, float]]  # (class, probability), most probable first
    predicted: int
    predicted_class: str
    target: int | None  # the class the map explains; None when there is no map
    cam: np.ndarray | None  # (H, W) float32 in [0, 1], the model's input resolution
    overlay: np.ndarray | None  # (h, w, 3) uint8, the heatmap over the displayed image
    note: str = ""
    target_class: str | None = None  # the name of ``target``
    map_kind: str | None = None  # "cam", or "saliency" (input gradients) for a model with no spatial map


@dataclass
class Agreement:
    """How one student compares with the teacher on this image."""

    student: str
    same_top1: bool
    kl_teacher_student: float  # KL(teacher || student) of the softmax outputs, in nats
    cam_correlation: float | None  # Pearson r of the maps; None without two maps, nan if one is flat
    cam_top_region_iou: float | None  # IoU of the hottest TOP_REGION_FRACTION of each map


@dataclass
class Explanation:
    image: np.ndarray  # (h, w, 3) uint8, the upload as displayed (longest side capped)
    method: str
    models: list[ModelExplanation]  # the teacher first
    agreements: list[Agreement]  # one per student, in order
    seconds: float

    @property
    def teacher(self) -> ModelExplanation:
        return self.models[0]


def explain(image: Any, checkpoints: Sequence[LoadedCheckpoint], method: str = "gradcam",
            target: str | int = "predicted", top_k: int = 5, opacity: float = 0.5,
            max_side: int = DISPLAY_MAX_SIDE) -> Explanation:
    """Explain ``image`` (anything :func:`kd_core.explain.images.load_image` reads) with every checkpoint;
    the first is the teacher, the others are compared with it.

    ``target``: ``"predicted"`` (each model's own top-1), ``"teacher"`` (the teacher's top-1 for
    every model, so the maps answer the same question), a class index or a class name.
    ``opacity`` is the heatmap's weight in the overlay, 0 (image only) to 1 (heatmap only).
    Raises ``ImageError`` for a bad upload and ``ValueError`` for bad arguments.
    """
    started = time.perf_counter()
    _check_arguments(checkpoints, method, top_k, opacity)
    picture = load_image(image, max_side)
    pixels = np.asarray(picture)  # (h, w, 3) uint8
    results: list[ModelExplanation] = []
    shrunk: dict[tuple[int, int], Image.Image] = {}  # the upload at each RGB model's input size, made once
    for checkpoint in checkpoints:
        teacher_prediction = results[0].predicted if results else None
        class_index = _target_index(target, checkpoint.classes, teacher_prediction)
        channels, height, width = checkpoint.meta["data"]["input_size"]
        if channels == 3 and (width, height) not in shrunk:
            shrunk[width, height] = picture.resize((width, height), Image.Resampling.BILINEAR)  # as to_model_input
        source = shrunk[width, height] if channels == 3 else picture
        results.append(_explain_one(checkpoint, source, pixels, method, class_index, top_k, opacity))
    agreements = [compare(results[0], student) for student in results[1:]]
    return Explanation(pixels, method, results, agreements, time.perf_counter() - started)


def compare(teacher: ModelExplanation, student: ModelExplanation) -> Agreement:
    correlation = iou = None
    if teacher.map_kind == student.map_kind == "cam":  # a saliency map is not a CAM: not compared
        teacher_map, student_map = same_size(teacher.cam, student.cam)
        correlation = cam_correlation(teacher_map, student_map)
        iou = top_region_iou(teacher_map, student_map)
    divergence = agreement(torch.from_numpy(student.logits)[None], torch.from_numpy(teacher.logits)[None])
    return Agreement(student.name, teacher.predicted == student.predicted,
                     divergence["kl_teacher_student"], correlation, iou)


def _check_arguments(checkpoints: Sequence[LoadedCheckpoint], method: str, top_k: int,
                     opacity: float) -> None:
    if not checkpoints:
        raise ValueError("pick at least one checkpoint to explain with (the first is the teacher)")
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(cam_methods())}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"heatmap opacity must be between 0 and 1, got {opacity}")
    teacher = checkpoints[0]
    for checkpoint in checkpoints:
        if checkpoint.model.training:
            raise ValueError(f"{checkpoint.name} is in training mode; explain only models loaded for "
                             "it (ModelCache.get or load_checkpoint), never one that is being trained")
        if checkpoint.classes != teacher.classes:
            raise ValueError(f"{checkpoint.name} and the teacher {teacher.name} were trained on "
                             "different classes, so they cannot be compared; pick checkpoints of one data set")


def _target_index(target: str | int, classes: list[str], teacher_prediction: int | None) -> int | None:
    if isinstance(target, str):
        if target == "predicted":
            return None
        if target == "teacher":
            return teacher_prediction
        if target in classes:
            return classes.index(target)
        raise ValueError(f"unknown target {target!r}: give 'predicted', 'teacher', a class index "
                         f"or one of the classes {', '.join(classes)}")
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and 0 <= target < len(classes):
        return int(target)
    raise ValueError(f"target class {target!r} is out of range: these models have {len(classes)} "
                     f"classes (0 to {len(classes) - 1})")


def _explain_one(checkpoint: LoadedCheckpoint, picture: Image.Image, pixels: np.ndarray, method: str,
                 target: int | None, top_k: int, opacity: float) -> ModelExplanation:
    model = checkpoint.model
    input_tensor = to_model_input(picture, checkpoint.meta)  # (1, C, H, W); ``picture`` may be that size already
    note = ""
    if model.cam_layer is None:
        with torch.no_grad():
            logits = model(input_tensor)[0]  # the model's own prediction, test-time augmentation included
        cam = input_saliency(model, input_tensor, int(logits.argmax()) if target is None else target)
        note = (f"input-gradient saliency, not a CAM: {checkpoint.meta['arch']} has no spatial feature map "
                "(|d score / d pixel|, largest over channels)")
    elif method == "gradcam":  # the prediction and the map from one pass over the views
        logits, cam = predict_with_gradcam(model, input_tensor, target)
    else:
        with torch.no_grad():
            logits = model(input_tensor)[0]
        _, cam = compute_cam(model, input_tensor, method, int(logits.argmax()) if target is None else target)
    overlay = overlay_heatmap(pixels, cam, opacity)
    if model.cam_layer is not None and cam.max() == 0:
        note = "the map is empty: nothing at the target layer raises this class's score"
    probabilities = torch.softmax(logits.double(), dim=0).numpy()
    predicted = int(probabilities.argmax())
    explained = None if cam is None else predicted if target is None else target
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    classes = checkpoint.classes
    return ModelExplanation(
        name=checkpoint.name, arch=checkpoint.meta["arch"], logits=logits.numpy(), probabilities=probabilities,
        top_k=[(classes[index], float(probabilities[index])) for index in order],
        predicted=predicted, predicted_class=classes[predicted], target=explained,
        cam=cam, overlay=overlay, note=note, target_class=None if explained is None else classes[explained],
        map_kind=None if cam is None else "saliency" if model.cam_layer is None else "cam")
