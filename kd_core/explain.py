"""The dashboard's Explain tab: what each model predicts for one image, where it looks (a class
activation map drawn over the image), and how far each student agrees with its teacher.

Heatmaps come from the grad-cam package (jacobgil/pytorch-grad-cam) through :data:`CAM_METHODS`.
That package hooks the target layer, calls ``model.eval()`` and ``model.zero_grad()`` and returns
NumPy, so it only runs on private copies of checkpoints (:class:`ModelCache`: frozen, eval mode),
never on a model a training job is updating. The differentiable CAMs that train students are in
:mod:`kd_core.cam`.

Speed: teacher + student + Grad-CAM on a 1024-pixel upload takes 20-45 ms on one CPU thread
(``python -m kd_core.bench explain ...``). Give the app one thread for torch and for NumPy's BLAS
(``torch.set_num_threads(1)`` and ``threadpoolctl.threadpool_limits(1)``) on a CPU shared with
training: two threads fighting a trainer make each call five to ten times slower.
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from .checkpoint import SUFFIX, CheckpointError, LoadedCheckpoint, load_checkpoint
from .evaluation import agreement
from .images import DISPLAY_MAX_SIDE, load_image, to_model_input
from .models.base import SingleView
from .registry import Registry

CAM_METHODS: Registry[BaseCAM] = Registry("CAM method")
CAM_METHODS.register("gradcam")(GradCAM)
CAM_METHODS.register("gradcam++")(GradCAMPlusPlus)
CAM_METHODS.register("hirescam")(HiResCAM)
CAM_METHODS.register("layercam")(LayerCAM)
CAM_METHODS.register("eigencam")(EigenCAM)

SCORECAM_BATCH_SIZE = 32
TOP_REGION_FRACTION = 0.2


@CAM_METHODS.register("scorecam")
def _score_cam(model: nn.Module, target_layers: list[nn.Module]) -> ScoreCAM:
    """Score-CAM runs the model once more per channel of the target layer (airnet: 256 channels,
    8 batches of 32), so it is one to two orders of magnitude slower than Grad-CAM. The package
    draws a tqdm bar on stderr for it; set TQDM_DISABLE=1 before start-up to silence it."""
    cam = ScoreCAM(model, target_layers)
    cam.batch_size = SCORECAM_BATCH_SIZE
    return cam


def cam_methods() -> list[str]:
    return CAM_METHODS.names()


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
    """Explain ``image`` (anything :func:`kd_core.images.load_image` reads) with every checkpoint;
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
    for checkpoint in checkpoints:
        teacher_prediction = results[0].predicted if results else None
        class_index = _target_index(target, checkpoint.classes, teacher_prediction)
        results.append(_explain_one(checkpoint, picture, pixels, method, class_index, top_k, opacity))
    agreements = [compare(results[0], student) for student in results[1:]]
    return Explanation(pixels, method, results, agreements, time.perf_counter() - started)


def compute_cam(model: nn.Module, input_tensor: torch.Tensor, method: str = "gradcam",
                target: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Logits ``(K,)`` and the map ``(H, W)`` (float32 in [0, 1], the input's resolution) of
    ``input_tensor`` ``(1, C, H, W)`` for class ``target`` (None: the predicted class), both from one
    pass (``forward_head(forward_features(x))``, no test-time augmentation)."""
    targets = None if target is None else [ClassifierOutputTarget(target)]
    with _model_lock(model), _cam(method, SingleView(model)) as cam:
        if cam.uses_gradients:
            # The gradient flows from the input, so the target layer gets one even though the
            # cached copies' weights are frozen (and no weight gradients are computed).
            maps = cam(input_tensor.detach().clone().requires_grad_(True), targets)
        else:
            with torch.no_grad():
                maps = cam(input_tensor, targets)
        logits = cam.outputs.detach()[0]
    if any(parameter.grad is not None for parameter in model.parameters()):
        model.zero_grad(set_to_none=True)  # a model with trainable weights got weight gradients
    return logits, np.clip(maps[0], 0.0, 1.0).astype(np.float32)


def overlay_heatmap(image: np.ndarray, cam: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """The map ``(H, W)`` in [0, 1] upsampled (bilinear) to ``image`` ``(h, w, 3)`` uint8, coloured
    with the jet colour map and blended: ``opacity * heat + (1 - opacity) * image``."""
    height, width = image.shape[:2]
    heat = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colours, opacity, np.ascontiguousarray(image), 1.0 - opacity, 0.0)


def compare(teacher: ModelExplanation, student: ModelExplanation) -> Agreement:
    correlation = iou = None
    if teacher.cam is not None and student.cam is not None:
        teacher_map, student_map = _same_size(teacher.cam, student.cam)
        correlation = cam_correlation(teacher_map, student_map)
        iou = top_region_iou(teacher_map, student_map)
    divergence = agreement(torch.from_numpy(student.logits)[None], torch.from_numpy(teacher.logits)[None])
    return Agreement(student.name, teacher.predicted == student.predicted,
                     divergence["kl_teacher_student"], correlation, iou)


def cam_correlation(map_a: np.ndarray, map_b: np.ndarray) -> float:
    """Pearson correlation of two maps of one shape; nan when either map is flat."""
    a = map_a.astype(np.float64).ravel() - map_a.mean()
    b = map_b.astype(np.float64).ravel() - map_b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


def top_region_iou(map_a: np.ndarray, map_b: np.ndarray, fraction: float = TOP_REGION_FRACTION) -> float:
    """Intersection over union of the ``fraction`` hottest pixels of each map (same shape)."""
    count = max(1, int(round(fraction * map_a.size)))
    region_a = np.zeros(map_a.size, dtype=bool)
    region_b = np.zeros(map_b.size, dtype=bool)
    region_a[np.argsort(-map_a.ravel(), kind="stable")[:count]] = True
    region_b[np.argsort(-map_b.ravel(), kind="stable")[:count]] = True
    return float((region_a & region_b).sum() / (region_a | region_b).sum())


class MissingCheckpointError(CheckpointError):
    """The named checkpoint is not (or no longer) in the checkpoint folder."""


class ModelCache:
    """The checkpoints of one folder, loaded on first use as private copies for explaining
    (weights frozen, eval mode) and reloaded when their file changes (path, inode, mtime, size).

    ``get(name)`` takes a file stem as listed by ``list_checkpoints``; names with folders, ``..``
    or links leading out of the folder are refused. At most ``max_models`` stay loaded (least
    recently used dropped first). Thread-safe; two threads asking for one model load it once.
    """

    def __init__(self, checkpoint_dir: str | Path, max_models: int = 8):
        self.directory = Path(checkpoint_dir)
        self.max_models = max_models
        self._entries: OrderedDict[str, tuple[tuple, LoadedCheckpoint]] = OrderedDict()
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, name: str) -> LoadedCheckpoint:
        stem, path, resolved = self._locate(name)
        with self._guard:
            loading = self._loading.setdefault(stem, threading.Lock())
        with loading:
            version = self._version(stem, resolved)
            with self._guard:
                cached = self._entries.get(stem)
                if cached is not None and cached[0] == version:
                    self._entries.move_to_end(stem)
                    return cached[1]
            checkpoint = self._load(stem, path, resolved)
            with self._guard:
                self._entries[stem] = (version, checkpoint)
                self._entries.move_to_end(stem)
                while len(self._entries) > self.max_models:
                    self._entries.popitem(last=False)
            return checkpoint

    def _locate(self, name: str) -> tuple[str, Path, Path]:
        if not isinstance(name, str):
            raise CheckpointError(f"a checkpoint name must be text, not {type(name).__name__}")
        stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
        if stem in ("", ".", "..") or any(character in stem for character in "/\\\0"):
            raise CheckpointError(f"{name!r} is not a checkpoint name: give a file name from "
                                  f"{self.directory} without folders, as listed")
        directory = self.directory.resolve()
        if not directory.is_dir():
            raise CheckpointError(f"the checkpoint folder {self.directory} does not exist")
        path = directory / f"{stem}{SUFFIX}"
        resolved = path.resolve()
        if not resolved.is_relative_to(directory):
            raise CheckpointError(f"checkpoint {stem!r} links to a file outside {self.directory}; refused")
        if not resolved.is_file():
            self._forget(stem)
            raise self._missing(stem)
        return stem, path, resolved

    def _version(self, stem: str, resolved: Path) -> tuple:
        try:
            status = resolved.stat()
        except FileNotFoundError:
            self._forget(stem)
            raise self._missing(stem) from None
        return str(resolved), status.st_ino, status.st_mtime_ns, status.st_size

    def _load(self, stem: str, path: Path, resolved: Path) -> LoadedCheckpoint:
        try:
            loaded = load_checkpoint(resolved)
        except FileNotFoundError:  # deleted between the check and the read
            self._forget(stem)
            raise self._missing(stem) from None
        loaded.model.requires_grad_(False).eval()
        return LoadedCheckpoint(loaded.model, loaded.meta, path)

    def _forget(self, stem: str) -> None:
        with self._guard:
            self._entries.pop(stem, None)

    def _missing(self, stem: str) -> MissingCheckpointError:
        available = sorted(path.stem for path in self.directory.glob(f"*{SUFFIX}"))
        return MissingCheckpointError(
            f"checkpoint {stem!r} is not in {self.directory} (deleted or renamed?); refresh the list. "
            f"Available: {', '.join(available) if available else 'none'}")


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
    input_tensor = to_model_input(picture, checkpoint.meta)  # (1, C, H, W)
    cam = overlay = None
    note = ""
    with _model_lock(model), torch.no_grad():
        logits = model(input_tensor)[0]  # the model's own prediction, test-time augmentation included
    if model.cam_layer is None:
        note = f"no CAM for this architecture: {checkpoint.meta['arch']} has no spatial feature map"
    else:
        _, cam = compute_cam(model, input_tensor, method, int(logits.argmax()) if target is None else target)
        overlay = overlay_heatmap(pixels, cam, opacity)
        if cam.max() == 0:
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
        cam=cam, overlay=overlay, note=note)


def _same_size(map_a: np.ndarray, map_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height = max(map_a.shape[0], map_b.shape[0])
    width = max(map_a.shape[1], map_b.shape[1])

    def resized(cam: np.ndarray) -> np.ndarray:
        if cam.shape == (height, width):
            return cam
        return cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)

    return resized(map_a), resized(map_b)


@contextlib.contextmanager
def _cam(method: str, model: nn.Module) -> Iterator[BaseCAM]:
    cam = CAM_METHODS.create(method, model=model, target_layers=[model.cam_module()])
    try:
        yield cam
    finally:
        # What ``with cam:`` does, minus BaseCAM.__exit__ swallowing IndexError (it prints it and
        # returns True), which would turn a bug into a missing result.
        cam.activations_and_grads.release()


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.Lock:
    """One lock per model: hooks of two CAM objects on one model would see each other's passes."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())
