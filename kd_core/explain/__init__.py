"""Explaining models for people: safe image decoding, CAM methods, the explain pipeline, CAM
similarity, and the app's model cache."""
from ..checkpoint import MissingCheckpointError
from .cache import ModelCache
from .images import ImageError, load_image, to_model_input
from .methods import CAM_METHODS, cam_methods, compute_cam, input_saliency, overlay_heatmap
from .pipeline import Agreement, Explanation, ModelExplanation, compare, explain
from .similarity import TOP_REGION_FRACTION, cam_correlation, top_region_iou

__all__ = ["Agreement", "CAM_METHODS", "Explanation", "ImageError", "MissingCheckpointError", "ModelCache",
           "ModelExplanation", "TOP_REGION_FRACTION", "cam_correlation", "cam_methods", "compare", "compute_cam",
           "explain", "input_saliency", "load_image", "overlay_heatmap", "to_model_input", "top_region_iou"]
