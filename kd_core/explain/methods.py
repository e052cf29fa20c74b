"""CAM methods for people: the grad-cam package's heatmaps over a checkpoint's CAM layer.

A method is a registry entry (:data:`CAM_METHODS`); :func:`compute_cam` runs one on a model and
:func:`overlay_heatmap` draws its map over the uploaded picture. Grad-CAM, the default, is computed
here without hooks (the package's numbers, see :func:`_gradcam`), so any number of threads explain
with one model at once. The package's other methods hook the target layer, call ``model.eval()``
and ``model.zero_grad()`` and return NumPy: each call runs them on a private copy of the model. The
app's models are frozen copies of checkpoints (:class:`kd_core.explain.cache.ModelCache`), never a
model being trained. The differentiable CAMs that train students are in :mod:`kd_core.cam`.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import cv2
import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ..models.base import Classifier, SingleView, tta_views, view_mean
from ..registry import Registry

CAM_METHODS: Registry[BaseCAM] = Registry("CAM method")
CAM_METHODS.register("gradcam")(GradCAM)
CAM_METHODS.register("gradcam++")(GradCAMPlusPlus)
CAM_METHODS.register("hirescam")(HiResCAM)
CAM_METHODS.register("layercam")(LayerCAM)
CAM_METHODS.register("eigencam")(EigenCAM)

SCORECAM_BATCH_SIZE = 32


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


def compute_cam(model: nn.Module, input_tensor: torch.Tensor, method: str = "gradcam",
                target: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Logits ``(K,)`` and the map ``(H, W)`` (float32 in [0, 1], the input's resolution) of
    ``input_tensor`` ``(1, C, H, W)`` for class ``target`` (None: the predicted class), both from one
    pass (``forward_head(forward_features(x))``, no test-time augmentation)."""
    if method == "gradcam":
        return _gradcam(model, input_tensor, [1.0], target)
    targets = None if target is None else [ClassifierOutputTarget(target)]
    # The package hooks the target layer (recording every pass through it, any thread's) and calls
    # eval() and zero_grad(): it gets a private copy of the modules, so the caller's model is never
    # touched and other threads keep using it. Frozen tensors (the cache's models) are shared, not
    # copied: nothing writes to them, and a ResNet-50's weights are 100 MB a call.
    frozen = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers()) if not tensor.requires_grad}
    private = copy.deepcopy(model, frozen)
    with _cam(method, SingleView(private)) as cam:
        if cam.uses_gradients:
            # The gradient flows from the input, so the target layer gets one even though the
            # cached copies' weights are frozen (and no weight gradients are computed).
            maps = cam(input_tensor.detach().clone().requires_grad_(True), targets)
        else:
            with torch.no_grad():
                maps = cam(input_tensor, targets)
        logits = cam.outputs.detach()[0]
    return logits, np.clip(maps[0], 0.0, 1.0).astype(np.float32)


def predict_with_gradcam(model: Classifier, input_tensor: torch.Tensor,
                         target: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """What ``model(input_tensor)`` predicts ``(K,)`` (test-time augmentation included) and the
    Grad-CAM of the image itself (as :func:`compute_cam` gives it) for ``target`` (None: that
    prediction's class), from one pass over every view: the map reuses the first view's features."""
    if model.flip_tta:
        return _gradcam(model, *tta_views(input_tensor, model.translate_tta), target)
    return _gradcam(model, input_tensor, [1.0], target)


def _gradcam(model: nn.Module, views: torch.Tensor, weights: list[float],
             target: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """Logits averaged over ``views`` (one image's views, itself first) and the image's Grad-CAM:
    the grad-cam package's GradCAM, computed without hooks. The gradient of the class score is
    taken at the feature map (``forward_features``, the CAM layer's output by the zoo's contract)
    rather than carried back to the input, so the trunk runs forward once and never backward, and
    several threads may explain with one model at once. The map is scaled as the package scales
    it (:func:`scale_cam_image`, per layer and then over layers), so both give the same numbers."""
    model.cam_module()  # a model with no spatial feature map has no CAM: say so
    if model.training:
        raise ValueError("explain a model in eval mode: in training mode its batch-norm statistics would change")
    with torch.no_grad():
        features = model.forward_features(views)                                 # (V, C, h, w)
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():  # also under a caller's no_grad()
        per_view = model.forward_head(features)                                  # (V, K)
        logits = view_mean(per_view.detach(), weights)[0]
        chosen = int(logits.argmax()) if target is None else target
        (gradient,) = torch.autograd.grad(per_view[0, chosen], features)
    channel_weights = gradient[:1].mean(dim=(2, 3), keepdim=True)                # (1, C, 1, 1)
    cam = torch.relu((channel_weights * features[:1].detach()).sum(dim=1)).numpy()  # (1, h, w)
    size = (views.shape[-1], views.shape[-2])                                    # (width, height)
    maps = scale_cam_image(np.maximum(scale_cam_image(cam, size), 0))
    return logits, np.clip(maps[0], 0.0, 1.0).astype(np.float32)


def input_saliency(model: nn.Module, input_tensor: torch.Tensor, target: int) -> np.ndarray:
    """Simonyan et al. 2014's saliency for models with no spatial feature map (an MLP): the absolute
    gradient of class ``target``'s score with respect to each input pixel, largest over channels,
    scaled to [0, 1]: ``(H, W)`` float32 at the input's resolution."""
    pixels = input_tensor.detach().clone().requires_grad_(True)             # (1, C, H, W)
    with torch.enable_grad():
        score = model.single_pass(pixels)[0, target]
        (gradient,) = torch.autograd.grad(score, pixels)
    saliency = gradient[0].abs().amax(0)                                     # (H, W)
    top = saliency.max()
    return (saliency / top if top > 0 else saliency).numpy().astype(np.float32)


def overlay_heatmap(image: np.ndarray, cam: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """The map ``(H, W)`` in [0, 1] upsampled (bilinear) to ``image`` ``(h, w, 3)`` uint8, coloured
    with the jet colour map and blended: ``opacity * heat + (1 - opacity) * image``."""
    height, width = image.shape[:2]
    heat = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colours, opacity, np.ascontiguousarray(image), 1.0 - opacity, 0.0)


@contextlib.contextmanager
def _cam(method: str, model: nn.Module) -> Iterator[BaseCAM]:
    cam = CAM_METHODS.create(method, model=model, target_layers=[model.cam_module()])
    try:
        yield cam
    finally:
        # What ``with cam:`` does, minus BaseCAM.__exit__ swallowing IndexError (it prints it and
        # returns True), which would turn a bug into a missing result.
        cam.activations_and_grads.release()
