"""In-memory data: sources decoded once to uint8 tensors, and batch loaders that augment on device."""
from .augment import AugmentConfig, augment_batch
from .loader import BatchLoader, normalize
from .sources import DataBundle, DataError, Split, channel_stats, load_data

__all__ = ["AugmentConfig", "augment_batch", "BatchLoader", "normalize", "DataBundle", "DataError",
           "Split", "channel_stats", "load_data"]
