from __future__ import annotations

from ..registry import Registry
from .base import Classifier

MODELS: Registry[Classifier] = Registry("model")
register = MODELS.register
