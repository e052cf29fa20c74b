"""Class activation maps in torch: Zhou's CAM identity for GAP + linear heads, Grad-CAM against
its formula, and both against a known bright region of an image."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_core import models
from kd_core.cam import class_activation_map, normalize_maps, resize_maps
from kd_core.models.base import Classifier, GapLinearClassifier, GapLinearHead

GAP_MODELS = [name for name in models.list_models() if models.create(name).linear_cam_weight() is not None]


def test_gap_models_are_the_expected_ones():
    assert set(GAP_MODELS) == {"camnet", "camnet_rep", "mobilenet_v2", "resnet8", "resnet14", "resnet18", "resnet20",
                               "resnet32", "resnet50", "resnet56"}


@pytest.mark.parametrize("name", GAP_MODELS)
def test_cam_averages_to_the_logits(name):
    """For GAP then linear, ``logit_k = mean_hw(cam_k) + b_k`` (Zhou et al. 2016)."""
    torch.manual_seed(0)
    model = models.create(name).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 32, 32))
        logits = model.forward_head(features)
        bias = model.head.fc.bias
        for k in range(10):
            maps = class_activation_map(model, features, torch.full((2,), k))  # (B, H, W)
            assert maps.shape == (2, *features.shape[-2:])
            assert torch.allclose(maps.mean(dim=(1, 2)) + bias[k], logits[:, k], atol=1e-4)


class FlatLinear(Classifier):
    """Features = input; head = flatten + linear, so dy_k/dA = W_k and alpha_c = mean_hw W_k[c]."""

    def __init__(self, channels=3, side=4, num_classes=5):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, num_classes))


@pytest.mark.parametrize("with_logits", [True, False])
def test_grad_cam_matches_its_formula(with_logits):
    torch.manual_seed(0)
    model = FlatLinear()
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    classes = torch.tensor([1, 4])
    logits = model.forward_head(features) if with_logits else None
    maps = class_activation_map(model, features, classes, logits)
    weight = model.head[1].weight.detach().view(5, 3, 4, 4)
    for sample, k in enumerate(classes.tolist()):
        alpha = weight[k].mean(dim=(1, 2))  # (C,)
        expected = torch.relu((alpha[:, None, None] * features[sample].detach()).sum(0))
        assert torch.allclose(maps[sample], expected, atol=1e-6)
    maps.sum().backward()
    # a student's map (logits given) keeps the graph through alpha = dy/dA to the head's weight
    head_grad = model.head[1].weight.grad
    assert (head_grad is not None and head_grad.abs().sum() > 0) == with_logits


def test_grad_cam_without_a_graph_reruns_the_head():
    torch.manual_seed(0)
    model = models.create("lightnn").eval()
    classes = torch.tensor([0, 5, 9])
    with torch.no_grad():  # as a frozen teacher or a heatmap would ask
        features = model.forward_features(torch.randn(3, 3, 32, 32))
        detached = class_activation_map(model, features, classes)
    live_features = features.clone().requires_grad_(True)
    live = class_activation_map(model, live_features, classes, model.forward_head(live_features))
    assert torch.allclose(detached, live.detach(), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_models_without_a_map_have_no_cam():
    model = models.create("mlp")
    with pytest.raises(ValueError, match="MLP has no spatial feature map"):
        class_activation_map(model, torch.zeros(1, 512, 1, 1), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------
# a known image region


SQUARE = (slice(16, 24), slice(4, 12))  # rows 16..23, columns 4..11 of a 32 x 32 image


def brightness_features() -> nn.Sequential:
    """(B, 3, 32, 32) -> (B, 1, 8, 8): mean brightness of each 4 x 4 block."""
    gray = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        gray.weight.fill_(1 / 3)
    return nn.Sequential(gray, nn.AvgPool2d(4))


class BrightGap(GapLinearClassifier):
    """Class 0 = "bright", class 1 = "dark"; GAP + linear, so the original CAM applies."""

    def __init__(self):
        super().__init__()
        self.features = brightness_features()
        self.head = GapLinearHead(1, 2)
        with torch.no_grad():
            self.head.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.fc.bias.zero_()


class MaxPoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, features):
        return self.fc(features.amax(dim=(2, 3)))


class BrightMax(Classifier):
    """The same features with a global-max-pool head (as airnet's): Grad-CAM applies."""

    def __init__(self):
        super().__init__()
        self.features = brightness_features()
        self.head = MaxPoolHead()


def image_with_square(seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    image = 0.2 * torch.rand(1, 3, 32, 32, generator=generator)
    image[:, :, SQUARE[0], SQUARE[1]] = 0.9
    return image


def in_square(flat_index: int) -> bool:
    row, col = divmod(flat_index, 32)
    return SQUARE[0].start <= row < SQUARE[0].stop and SQUARE[1].start <= col < SQUARE[1].stop


@pytest.mark.parametrize("model_class", [BrightGap, BrightMax])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cam_peaks_in_the_bright_square(model_class, seed):
    model = model_class().eval()
    image = image_with_square(seed).requires_grad_(True)
    features = model.forward_features(image)
    maps = class_activation_map(model, features, torch.tensor([0]), model.forward_head(features))
    assert maps.shape == (1, 8, 8)  # one cell per 4 x 4 block: the square covers blocks (4..5, 1..2)
    hottest = set(maps[0].flatten().topk(4).indices.tolist())
    assert hottest == {4 * 8 + 1, 4 * 8 + 2, 5 * 8 + 1, 5 * 8 + 2}
    heatmap = normalize_maps(resize_maps(maps, (32, 32)))[0]  # (32, 32) in [0, 1]
    assert in_square(heatmap.argmax().item())
    assert heatmap.max().item() == pytest.approx(1, abs=1e-3) and heatmap.min().item() == 0


def test_cam_of_the_dark_class_avoids_the_square():
    model = BrightGap().eval()
    with torch.no_grad():
        maps = class_activation_map(model, model.forward_features(image_with_square()), torch.tensor([1]))
    blocks = normalize_maps(maps)[0]  # (8, 8): the square is the coldest part
    assert blocks[4:6, 1:3].max() < 0.01 and blocks.max() == pytest.approx(1, abs=1e-5)
    assert not in_square(normalize_maps(resize_maps(maps, (32, 32)))[0].argmax().item())


def test_normalize_maps():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]])
    normalized = normalize_maps(maps)
    assert torch.allclose(normalized[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=1e-6)
    assert torch.equal(normalized[1], torch.zeros(2, 2))  # a flat map carries no location


def test_resize_maps():
    maps = torch.arange(4.0).view(1, 2, 2)
    assert resize_maps(maps, (2, 2)) is maps
    stretched = resize_maps(torch.full((1, 1, 1), 3.0), (4, 5))
    assert stretched.shape == (1, 4, 5) and torch.allclose(stretched, torch.full((1, 4, 5), 3.0))


@pytest.mark.parametrize("name", ["camnet", "lightnn"])
def test_maps_are_float32_under_autocast(name):
    """bf16 maps, once min-max normalized, turned rounding into exploding CAM-loss gradients.
    (The reference is taken under no_grad, as a dashboard or a frozen teacher would.)"""
    torch.manual_seed(0)
    model = models.create(name).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = class_activation_map(model, model.forward_features(images), torch.tensor([3, 7]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(images)
        maps = class_activation_map(model, features, torch.tensor([3, 7]), model.forward_head(features))
    assert features.dtype == torch.bfloat16 and maps.dtype == torch.float32
    assert (normalize_maps(maps) - normalize_maps(reference)).abs().mean() < 0.05  # bf16 features, same map
