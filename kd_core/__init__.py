"""kd_core: knowledge distillation (soft targets, feature hints, CAM alignment) for image classifiers."""
__version__ = "0.1.0"
