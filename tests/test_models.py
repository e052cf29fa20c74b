"""The model zoo: exact sizes, and the forward_features / forward_head / CAM-layer contract for
every registered model."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from kd_core import models
from kd_core.models.base import GapLinearClassifier
from kd_core.registry import Registry

# parameters for 3x32x32 input and 10 classes
PARAMETERS = {
    "camnet": 96_170,
    "deepnn": 1_186_986,
    "lightnn": 267_738,
    "tiny_titans_cnn": 2_193_226,
    "resnet8": 75_290,
    "resnet14": 172_506,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet18": 11_173_962,
    "resnet50": 23_520_842,
    "mobilenet_v2": 2_236_682,
    "airnet": 1_972_792,
    "mlp": 3_676_682,
    # trains in this form, ships as camnet: 3x3 + BN and 1x1 + BN branches per conv
    "camnet_rep": 96_170 + 3 * 128 + 128 * 64 + 64 * 32 + 4 * (128 + 64 + 32) - (128 + 64 + 32),
}
# He et al. 2016, Table 6 (CIFAR-10), in millions
PAPER_MILLIONS = {"resnet20": 0.27, "resnet32": 0.46, "resnet56": 0.85}


@pytest.fixture(scope="module", params=models.list_models())
def model(request) -> models.Classifier:
    torch.manual_seed(0)
    return models.create(request.param).eval()


def test_every_model_has_a_known_size():
    assert sorted(PARAMETERS) == models.list_models()


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_count(name):
    assert models.count_parameters(models.create(name)) == PARAMETERS[name]


def test_small_model_counts_by_hand():
    conv = lambda cin, cout: cin * cout * 9 + cout  # noqa: E731  3x3 conv with bias
    linear = lambda cin, cout: cin * cout + cout  # noqa: E731
    assert PARAMETERS["camnet"] == conv(3, 128) + conv(128, 64) + conv(64, 32) + linear(32, 10)
    assert PARAMETERS["lightnn"] == conv(3, 16) + conv(16, 16) + linear(16 * 8 * 8, 256) + linear(256, 10)
    assert PARAMETERS["deepnn"] == (conv(3, 128) + conv(128, 64) + conv(64, 64) + conv(64, 32)
                                    + linear(32 * 8 * 8, 512) + linear(512, 10))
    assert PARAMETERS["tiny_titans_cnn"] == (conv(3, 32) + conv(32, 64) + conv(64, 128)
                                             + linear(128 * 8 * 8, 256) + linear(256, 10))


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_cifar_resnets_match_the_paper(name):
    assert round(PARAMETERS[name] / 1e6, 2) == PAPER_MILLIONS[name]


def test_forward_is_head_of_features(model):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
    assert features.ndim == 4 and features.shape[0] == 2
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, model.forward_head(features), atol=1e-5)


def test_cam_module_produces_the_feature_map(model):
    images = torch.randn(1, 3, 32, 32)
    if model.cam_layer is None:
        assert type(model).__name__ == "MLP"
        with pytest.raises(ValueError, match="no spatial feature map"):
            model.cam_module()
        return
    captured = []
    handle = model.cam_module().register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            features = model.forward_features(images)
    finally:
        handle.remove()
    assert len(captured) == 1 and torch.equal(captured[0], features)


def test_linear_cam_weight_matches_head(model):
    weight = model.linear_cam_weight()
    if not isinstance(model, GapLinearClassifier):
        assert weight is None
        return
    with torch.no_grad():
        channels = model.forward_features(torch.zeros(1, 3, 32, 32)).shape[1]
    assert weight.shape == (10, channels)
    assert weight is model.head.fc.weight


@pytest.mark.parametrize("name", ["camnet", "lightnn", "deepnn", "resnet8", "airnet", "mlp", "mobilenet_v2"])
def test_other_classes_and_channels(name):
    model = models.create(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("name", ["deepnn", "lightnn", "tiny_titans_cnn"])
def test_pooling_before_relu_is_the_source_nets_function_and_gradient(name):
    """The source nets apply ReLU, then max pooling; the zoo pools first (a quarter of the ReLU's work)."""
    torch.manual_seed(0)
    ours = models.create(name).train()
    layers = list(ours.features)
    source = list(layers)
    for i, layer in enumerate(layers[:-1]):  # swap every (MaxPool2d, ReLU) pair back to (ReLU, MaxPool2d)
        if isinstance(layer, torch.nn.MaxPool2d) and isinstance(layers[i + 1], torch.nn.ReLU):
            source[i], source[i + 1] = layers[i + 1], layer
    assert source != layers
    images = torch.randn(8, 3, 32, 32)
    outputs = []
    for order in (layers, source):
        ours.zero_grad()
        torch.manual_seed(1)  # the same dropout draw
        features = torch.nn.Sequential(*order)(images)
        ours.forward_head(features).square().sum().backward()
        outputs.append((features.detach(), [p.grad.clone() for p in ours.parameters()]))
    (ours_features, ours_grads), (source_features, source_grads) = outputs
    assert torch.equal(ours_features, source_features)
    for mine, theirs in zip(ours_grads, source_grads):
        assert torch.allclose(mine, theirs, atol=1e-6)
    assert [name for name, _ in ours.named_parameters()][:2] == ["features.0.weight", "features.0.bias"]


def test_unknown_model_lists_the_choices():
    with pytest.raises(KeyError, match="unknown model 'resnet21'; choose one of: .*resnet20"):
        models.create("resnet21")


def test_registry_refuses_duplicates():
    registry: Registry[int] = Registry("widget")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(lambda: 2)
    assert registry.create("a") == 1 and registry.names() == ["a"] and "a" in registry


def test_resnet_depth_must_be_6n_plus_2():
    from kd_core.models.resnet_cifar import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


TTA_MODELS = [("airnet", {"widths": (8, 16, 16)}), ("camnet", {}),
              ("camnet_rep", {}), ("tiny_titans_cnn", {})]


@pytest.mark.parametrize("arch,kw", TTA_MODELS)
def test_flip_tta_averages_the_mirror_image_in_eval_mode_only(arch, kw):
    torch.manual_seed(0)
    model = models.create(arch, flip_tta=True, **kw).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        single = model.forward_head(model.forward_features(x))
        mirrored = model.forward_head(model.forward_features(x.flip(-1)))
        torch.testing.assert_close(model(x), (single + mirrored) / 2)
        assert not torch.allclose(single, mirrored)  # the average differs from either view
        model.train()
        torch.manual_seed(1)  # the same dropout masks for both (tiny_titans_cnn has dropout)
        trained = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(trained, model.forward_head(model.forward_features(x)))
    assert models.count_parameters(model) == models.count_parameters(models.create(arch, **kw))


@pytest.mark.parametrize("arch,kw", TTA_MODELS)
def test_translate_tta_adds_airbench_level_two(arch, kw):
    """Half the mirror pair, plus a quarter each for the pairs shifted one pixel up-left and
    down-right with reflect padding: six single-view passes."""
    torch.manual_seed(0)
    model = models.create(arch, flip_tta=True, translate_tta=True, **kw).eval()
    x = torch.randn(2, 3, 32, 32)

    def pair(images):
        single = model.forward_head(model.forward_features(images))
        return (single + model.forward_head(model.forward_features(images.flip(-1)))) / 2

    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 0:32, 0:32], padded[..., 2:34, 2:34]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :31, :31])  # content moved one pixel down-right
    with torch.no_grad():
        expected = pair(x) / 2 + (pair(up_left) + pair(down_right)) / 4
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(model(x), pair(x))
        model.train()
        torch.manual_seed(1)  # the same dropout masks for both (tiny_titans_cnn has dropout)
        trained = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(trained, model.forward_head(model.forward_features(x)))
    with pytest.raises(ValueError, match="flip_tta"):
        models.create(arch, translate_tta=True, **kw)


def test_airnet_residual_adds_airbench96s_third_conv_with_a_skip():
    plain = models.create("airnet", widths=(8, 16, 16))
    model = models.create("airnet", widths=(8, 16, 16), residual=True).eval()
    extra = sum(9 * width * width + 2 * width for width in (8, 16, 16))  # conv + fixed-scale BN per group
    assert models.count_parameters(model) == models.count_parameters(plain) + extra == 16_264
    assert models.count_parameters(models.create("airnet", widths=(128, 384, 384), residual=True)) == 7_409_976
    group = model.features[2]
    x = torch.randn(2, 24, 31, 31)
    with torch.no_grad():
        shortcut = group[3](group[2](group[1](group[0](x))))
        branch = group[9](group[8](group[7](group[6](group[5](group[4](shortcut))))))
        torch.testing.assert_close(group(x), shortcut + branch)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert list(plain.state_dict()) == [name for name in model.state_dict()
                                        if not name.split(".")[2] in {"7", "8"}]  # plain keys unchanged


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    model.eval()


def test_camnet_rep_folds_exactly_into_camnet():
    """The training form and the plain camnet it folds into compute the same function (eval mode),
    features and logits alike, and the folded net has camnet's exact size."""
    torch.manual_seed(0)
    trained = models.create("camnet_rep")
    _randomize_batchnorm(trained)
    arch, args, plain = trained.reparameterize()
    assert (arch, args) == ("camnet", {"num_classes": 10, "in_channels": 3})
    assert type(plain) is type(models.create("camnet")) and not plain.training
    assert models.count_parameters(plain) == PARAMETERS["camnet"]
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), trained.forward_features(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(plain(x), trained(x), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(plain.linear_cam_weight(), trained.linear_cam_weight())


def test_camnet_rep_passes_its_test_time_augmentation_to_the_plain_net():
    torch.manual_seed(0)
    trained = models.create("camnet_rep", flip_tta=True, translate_tta=True)
    _randomize_batchnorm(trained)
    arch, args, plain = trained.reparameterize()
    assert args == {"num_classes": 10, "in_channels": 3, "flip_tta": True, "translate_tta": True}
    assert plain.flip_tta and plain.translate_tta
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained(x), atol=2e-5, rtol=1e-5)
        assert not torch.allclose(plain(x), plain.single_pass(x), atol=1e-4)


def test_rep_conv_centre_tap_lines_up_with_the_3x3_kernel():
    """Padding 0 and 1, stride 1 and 2: the folded 3x3 conv equals the two branches."""
    from kd_core.models.reparam import RepConv3x3

    for stride in (1, 2):
        for padding in (0, 1):
            block = RepConv3x3(4, 5, stride=stride, padding=padding)
            _randomize_block = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            with torch.no_grad():
                for bn in _randomize_block:
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_()
            block.eval()
            x = torch.randn(2, 4, 11, 11)
            weight, bias = block.fold()
            folded = torch.nn.functional.conv2d(x, weight, bias, stride=stride, padding=padding)
            torch.testing.assert_close(folded, block(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padding 0 or 1"):
        RepConv3x3(4, 5, padding=2)


def test_camnet_rep_trains_channels_last_on_one_thread_without_corrupting_memory():
    """torch 2.14's strided 1x1 convolution on 3 channels, channels-last, one thread, corrupts the
    heap on AVX2 CPUs (glibc aborts within a few steps); RepConv3x3 never asks for it. In a
    subprocess, so that a crash fails this test rather than ending pytest."""
    script = """
import torch
from kd_core import models
torch.set_num_threads(1)
model = models.create("camnet_rep", num_classes=3).to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _ in range(30):
    x = torch.randn(24, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (24,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    garbage = [torch.empty(1000 * k) for k in range(1, 50)]
print("trained")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "trained\n", done.stderr[-2000:]


def test_models_with_the_crashing_kernel_keep_the_default_memory_layout():
    """Where a model (a timm or imported one) has that strided 1x1 convolution on 3 channels, the
    trainer and the app's model cache leave it in the default layout; the zoo's models go channels-last."""
    from torch import nn

    from kd_core.data import DataBundle, Split
    from kd_core.runtime import channels_last_safe
    from kd_core.training import TrainConfig, Trainer

    risky = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2), nn.ReLU())
    assert not channels_last_safe(risky) and not channels_last_safe(models.create("camnet"), risky)
    assert channels_last_safe(nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(3, 8, 1), None)
    assert channels_last_safe(models.create("camnet_rep")) and channels_last_safe(models.create("airnet"))

    split = Split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    data = DataBundle("synthetic", split, split, ["a", "b"], (0.5,) * 3, (0.25,) * 3)
    config = TrainConfig(epochs=1, batch_size=2, device="cpu")
    assert Trainer(models.create("camnet", num_classes=2), data, config).channels_last
    unsafe = models.create("camnet", num_classes=2)
    unsafe.extra = nn.Conv2d(3, 4, 1, stride=2)  # anywhere in the model
    trainer = Trainer(unsafe, data, config)
    assert not trainer.channels_last and trainer.memory_format == torch.contiguous_format


@pytest.mark.parametrize("translate", [False, True])
def test_batched_test_time_augmentation_equals_the_view_by_view_mean(translate):
    from kd_core.models.base import batched_tta, mirror_mean, shifted_mirror_mean

    torch.manual_seed(0)
    model = models.create("airnet", widths=(8, 16, 16), flip_tta=True, translate_tta=translate).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = (shifted_mirror_mean if translate else mirror_mean)(model.single_pass, x)
        torch.testing.assert_close(batched_tta(model.single_pass, x, translate), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)  # a small batch takes the batched path
        big = torch.randn(40, 3, 32, 32)                                        # a large one the view-by-view path
        torch.testing.assert_close(model(big), (shifted_mirror_mean if translate else mirror_mean)(model.single_pass, big))


@pytest.mark.parametrize("translate", [False, True])
def test_predict_views_gives_the_tta_logits_and_the_single_view_ones_from_the_same_passes(translate):
    from kd_core.evaluation import predict, predict_views
    from kd_core.models.base import SingleView

    torch.manual_seed(0)
    model = models.create("airnet", widths=(8, 16, 16), flip_tta=True, translate_tta=translate).train()
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    logits, single = predict_views(model, images, mean, std, batch_size=32)  # chunks of 32, 32 and 6 images
    torch.testing.assert_close(logits, predict(model, images, mean, std), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, predict(SingleView(model), images, mean, std), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, single) and model.training  # the views differ; the mode is restored
    plain = models.create("airnet", widths=(8, 16, 16)).eval()
    logits, single = predict_views(plain, images, mean, std)
    assert single is None and torch.equal(logits, predict(plain, images, mean, std))


def test_a_stride_2_stem_quarters_resnet18s_work_and_keeps_its_weights():
    from kd_core.profile import count_macs

    full, strided = models.create("resnet18"), models.create("resnet18", stem_stride=2)
    assert models.count_parameters(strided) == PARAMETERS["resnet18"]
    assert strided.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 2, 2)
    assert full.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    # every conv sees a quarter of the positions; only the classifier's 5,120 MACs stay
    assert count_macs(full, (3, 32, 32)) - 4 * count_macs(strided, (3, 32, 32)) == -3 * 512 * 10
    for bad in ({"stem_stride": 3}, {"stem_stride": 2, "small_input": False}):
        with pytest.raises(ValueError, match="stem_stride"):
            models.create("resnet18", **bad)


def test_pretrained_torchvision_weights_reach_the_body_and_the_head_is_new(monkeypatch):
    """Online, ``pretrained=True`` asks torchvision for the ImageNet weights (stood in for here by a
    fixed set): every layer but the replaced stem and classifier keeps them."""
    import torchvision

    asked = []
    build = torchvision.models.resnet18
    torch.manual_seed(1)
    imagenet = build(weights=None).state_dict()

    def fake_resnet18(weights=None):
        asked.append(weights)
        net = build(weights=None)
        if weights is not None:
            net.load_state_dict(imagenet)
        return net

    monkeypatch.setattr(torchvision.models, "resnet18", fake_resnet18)
    model = models.create("resnet18", pretrained=True, stem_stride=2)
    assert asked == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert torch.equal(model.features[4][0].conv1.weight, imagenet["layer1.0.conv1.weight"])
    assert torch.equal(model.features[7][1].bn2.running_var, imagenet["layer4.1.bn2.running_var"])
    assert model.features[0].weight.shape == (64, 3, 3, 3) and model.head.fc.out_features == 10

    def offline(weights=None):
        raise OSError("no route to host")

    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(RuntimeError, match="could not load ImageNet weights .* pretrained=False"):
        models.create("resnet18", pretrained=True)
