"""timm architectures in the zoo (``timm:<name>``): the contract, CAMs, distillation both ways,
checkpoints that rebuild them, and the dashboard's explanations. timm's ``test_*`` models are a few
hundred thousand parameters; nothing here downloads anything."""
from __future__ import annotations

import pytest
import torch

from helpers import CAT, write_dataset
from kd_core import models
from kd_core.cam import class_activation_map
from kd_core.checkpoint import load_checkpoint, read_metadata
from kd_core.cli import main
from kd_core.explain.pipeline import explain
from kd_core.models import timm_models
from kd_core.run import RunSpec, run
from kd_core.training import TrainConfig


def build(name: str, **kwargs) -> models.Classifier:
    torch.manual_seed(0)
    return models.create(name, **models.arch_args_for(name, 10, (3, 32, 32), **kwargs)).eval()


def test_a_timm_model_keeps_the_zoo_contract_and_its_cam_is_exact():
    model = build("timm:resnet18", output_stride=8)  # dilated: a 4x4 map from a 32x32 image
    images = torch.randn(3, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (3, 512, 4, 4)
    logits = model(images)
    assert torch.allclose(logits, model.forward_head(features))
    assert model.cam_module() is model.features  # the hook point outputs exactly the feature map
    # pool-then-linear head: the CAM averaged over the map, plus the bias, is the logit
    classes = logits.argmax(1)
    maps = class_activation_map(model, features, classes, create_graph=False)
    bias = model.model.get_classifier().bias[classes]
    assert torch.allclose(maps.mean(dim=(1, 2)) + bias, logits.gather(1, classes[:, None])[:, 0], atol=1e-4)
    assert all(name.startswith("model.") for name in model.state_dict())


def test_heads_that_are_not_pool_then_linear_and_token_models_are_told_apart():
    mobilenet = build("timm:mobilenetv3_small_050")  # a 1x1 convolution after the pooling
    assert mobilenet.cam_layer == "features" and mobilenet.linear_cam_weight() is None
    features = mobilenet.forward_features(torch.randn(2, 3, 32, 32)).requires_grad_(True)
    maps = class_activation_map(mobilenet, features, torch.tensor([1, 2]), mobilenet.forward_head(features))
    assert maps.shape == (2, 1, 1)  # through Grad-CAM
    vit = build("timm:test_vit3", img_size=32)
    assert vit.cam_layer is None  # tokens, not a spatial map
    with pytest.raises(ValueError, match="no spatial feature map"):
        vit.cam_module()


def test_channels_last_feature_maps_are_read_channels_first():
    """Swin's timm features are (B, H, W, C): the wrapper hands them on as (B, C, H, W), so that CAMs
    weigh channels, and gives its head what it expects; Grad-CAM agrees with the grad-cam package."""
    import numpy as np
    from pytorch_grad_cam import GradCAM

    from kd_core.explain.methods import compute_cam
    from kd_core.models.base import SingleView

    swin = build("timm:swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                 num_heads=(1, 2))
    assert swin._nhwc and swin.cam_layer == "features"
    images = torch.randn(2, 3, 32, 32)
    features = swin.forward_features(images)
    assert features.shape == (2, swin.model.num_features, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(swin(images), swin.model(images))  # the same network, only read differently
    _, ours = compute_cam(swin, images[:1], "gradcam")
    single = SingleView(swin)
    cam = GradCAM(single, [single.cam_module()])
    try:
        theirs = cam(images[:1].clone().requires_grad_(True), None)[0]
    finally:
        cam.activations_and_grads.release()
    np.testing.assert_allclose(ours, np.clip(theirs, 0, 1), atol=1e-5)


def test_unknown_names_wrong_sizes_and_offline_weights_get_clear_errors(monkeypatch):
    with pytest.raises(KeyError) as unknown_timm:
        models.create("timm:resnet_nope")
    assert unknown_timm.value.args[0].startswith("unknown timm architecture 'resnet_nope'")
    assert "timm.list_models('*resnet*')" in unknown_timm.value.args[0]
    with pytest.raises(KeyError) as unknown:
        models.create("resnet_nope")
    assert unknown.value.args[0].endswith("or timm:<name> for any timm architecture")
    with pytest.raises(ValueError, match="does not take 32x32 inputs.*img_size=32"):
        build("timm:test_vit3")  # built for 160x160 unless told

    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1.*kd_core import"):
        models.create("timm:test_resnet", pretrained=True)


def test_distil_a_timm_teacher_into_camnet_and_camnet_into_a_timm_student(tmp_path):
    write_dataset(tmp_path / "data", {"train": 4, "test": 2})
    source, cache = f"folder:{tmp_path / 'data'}", tmp_path / "cache"
    config = TrainConfig(epochs=1, batch_size=20, lr=0.05)
    teacher = tmp_path / "timm-teacher.safetensors"
    run(RunSpec(arch="timm:test_resnet", data=source, config=config, output=teacher, role="teacher", cache_dir=cache))
    distilled = TrainConfig(epochs=1, batch_size=20, lr=0.05, loss_weights={"ce": 0.5, "kd": 0.5, "cam": 1.0})
    student = tmp_path / "camnet.safetensors"
    run(RunSpec(arch="camnet", data=source, config=distilled, output=student, teacher=teacher, cache_dir=cache))
    timm_student = tmp_path / "timm-student.safetensors"
    run(RunSpec(arch="timm:test_efficientnet", data=source, config=distilled, output=timm_student, teacher=student,
                cache_dir=cache))

    meta = read_metadata(teacher)
    assert meta["arch"] == "timm:test_resnet" and meta["versions"]["timm"] == timm_models.version()
    assert read_metadata(timm_student)["teacher"]["name"] == "camnet"
    checkpoints = [load_checkpoint(path) for path in (teacher, student, timm_student)]
    result = explain(CAT, checkpoints, method="gradcam")
    assert [item.arch for item in result.models] == ["timm:test_resnet", "camnet", "timm:test_efficientnet"]
    for item in result.models:
        assert item.map_kind == "cam" and item.cam is not None and item.overlay is not None
        assert abs(item.probabilities.sum() - 1) < 1e-5


def test_the_cli_trains_a_timm_model_with_architecture_arguments(tmp_path, keep_signal_handlers, capsys):
    write_dataset(tmp_path / "data", {"train": 2, "test": 1})
    output = tmp_path / "r18.safetensors"
    status = main(["train", "--model", "timm:resnet18", "--arch-arg", "output_stride=8", "--arch-arg", "drop_rate=0.1",
                   "--data", f"folder:{tmp_path / 'data'}", "--epochs", "1", "--batch-size", "20", "--output",
                   str(output), "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert status == 0
    arch_args = read_metadata(output)["arch_args"]
    assert arch_args["output_stride"] == 8 and arch_args["drop_rate"] == 0.1
    assert load_checkpoint(output).model.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4
    assert main(["train", "--model", "timm:nope_net", "--data", "cifar10"]) == 2
    assert "unknown timm architecture 'nope_net'" in capsys.readouterr().err
    assert main(["train", "--model", "camnet", "--arch-arg", "oops"]) == 2
    assert "--arch-arg takes NAME=VALUE" in capsys.readouterr().err
