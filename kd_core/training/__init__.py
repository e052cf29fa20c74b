"""The training engine, its configuration, schedules, callbacks and resumable state."""
from .callbacks import Callback, EpochInfo, StepInfo, TqdmProgress
from .config import TrainConfig, complete_config
from .engine import NonFiniteLoss, Trainer, TrainResult, freeze

__all__ = ["Callback", "EpochInfo", "StepInfo", "TqdmProgress", "TrainConfig", "complete_config", "NonFiniteLoss",
           "Trainer", "TrainResult", "autocast_dtype", "freeze", "resolve_device"]
