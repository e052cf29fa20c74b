"""The small models of the source projects: CAM-Net, the PyTorch KD tutorial's DeepNN and
LightNN, an MLP student, and the "tiny titans" CNN.

Where a source net applies ReLU and then 2x2 max pooling, these pool first: ReLU is monotonic, so
``relu(maxpool(x)) == maxpool(relu(x))`` and so are the gradients, but the ReLU and its backward
pass touch a quarter of the values. Neither layer has parameters, so the weights' names are the
source nets' own."""
from __future__ import annotations

from torch import nn

from .base import Classifier, GapLinearClassifier, GapLinearHead
from .registry import register


def _same_maxpool_2x2() -> nn.Sequential:
    """Keras' MaxPool2D(2, strides=1, padding='same'): pad right/bottom by one, keep H x W."""
    return nn.Sequential(nn.ReplicationPad2d((0, 1, 0, 1)), nn.MaxPool2d(2, stride=1))


class CamNet(GapLinearClassifier):
    """CAM-KD's 96,170-parameter student; global-average-pool head, so its CAM is exact.
    ``flip_tta``/``translate_tta``: test-time augmentation of its predictions (:meth:`Classifier.set_tta`)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, flip_tta: bool = False,
                 translate_tta: bool = False):
        super().__init__()
        self.set_tta(flip_tta, translate_tta)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 128, 3, stride=2, padding=1),  # (B, 128, H/2, W/2)
            nn.LeakyReLU(0.2),
            _same_maxpool_2x2(),
            nn.Conv2d(128, 64, 3, stride=2),  # (B, 64, 7, 7) for 32x32 input
            nn.LeakyReLU(0.2),
            _same_maxpool_2x2(),
            nn.Conv2d(64, 32, 3, stride=2),  # (B, 32, 3, 3)
        )
        self.head = GapLinearHead(32, num_classes)


class DeepNN(Classifier):
    """The PyTorch KD tutorial's teacher (1,186,986 parameters for 32x32 RGB input)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.MaxPool2d(2), nn.ReLU(),  # (B, 32, H/4, W/4)
        )
        side = input_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 512), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )


class LightNN(Classifier):
    """The PyTorch KD tutorial's student (267,738 parameters for 32x32 RGB input)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),  # (B, 16, H/4, W/4)
        )
        side = input_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 256), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(256, num_classes),
        )


class MLP(Classifier):
    """A feed-forward student. Its "feature map" is the last hidden layer as ``(B, C, 1, 1)``,
    so hint and cosine losses apply to it; it has no spatial map and hence no CAM."""

    cam_layer = None

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 hidden: tuple[int, ...] = (1024, 512), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * input_size * input_size
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Unflatten(1, (width, 1, 1)))  # (B, hidden, 1, 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, num_classes))


class TinyTitansCNN(Classifier):
    """The ResNet-18 -> small-CNN project's student (2,193,226 parameters for 32x32 RGB).
    ``flip_tta``/``translate_tta``: test-time augmentation of its predictions (:meth:`Classifier.set_tta`)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, flip_tta: bool = False,
                 translate_tta: bool = False):
        super().__init__()
        self.set_tta(flip_tta, translate_tta)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),  # (B, 128, H/4, W/4)
        )
        side = input_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * side * side, 256), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )


register("camnet")(CamNet)
register("deepnn")(DeepNN)
register("lightnn")(LightNN)
register("mlp")(MLP)
register("tiny_titans_cnn")(TinyTitansCNN)
