"""How alike two class activation maps are: Pearson correlation, and the IoU of their hottest regions."""
from __future__ import annotations

import cv2
import numpy as np

from ..evaluation import TOP_REGION_FRACTION  # one definition for the Explain tab and evaluate


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


def same_size(map_a: np.ndarray, map_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps at the larger of their heights and widths (bilinear), so they can be compared."""
    height = max(map_a.shape[0], map_b.shape[0])
    width = max(map_a.shape[1], map_b.shape[1])

    def resized(cam: np.ndarray) -> np.ndarray:
        if cam.shape == (height, width):
            return cam
        return cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)

    return resized(map_a), resized(map_b)
