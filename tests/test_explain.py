"""The Explain tab's backend: CAM methods, explain(), agreement measures, the model cache, bench."""
from __future__ import annotations

import math
import os
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import kd_core.explain.cache as explain_module
from kd_core import bench, models
from kd_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kd_core.explain import (MissingCheckpointError, ModelCache, ModelExplanation, cam_correlation, cam_methods,
                             compare, compute_cam, explain, overlay_heatmap, top_region_iou)
from kd_core.explain.images import ImageError, load_image, to_model_input
from kd_core.models.base import GapLinearClassifier, GapLinearHead

CLASSES = ["cat", "dog", "bird"]
ZOO = {  # name: (arch, extra arch args, input channels, input side)
    "camnet": ("camnet", {}, 3, 32),
    "lightnn": ("lightnn", {"input_size": 16}, 3, 16),
    "mlp": ("mlp", {"input_size": 16, "hidden": [32]}, 3, 16),
    "camnet_gray": ("camnet", {}, 1, 32),
}


def save_tiny(directory, name, seed=0, classes=CLASSES):
    arch, extra, channels, side = ZOO[name]
    torch.manual_seed(seed)
    arch_args = {"num_classes": len(classes), "in_channels": channels, **extra}
    meta = {"arch": arch, "arch_args": arch_args,
            "data": {"source": "synthetic", "classes": classes, "input_size": [channels, side, side],
                     "mean": [0.5] * channels, "std": [0.25] * channels}}
    return save_checkpoint(directory / f"{name}.safetensors", models.create(arch, **arch_args), meta)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints")
    for name in ZOO:
        save_tiny(directory, name)
    return ModelCache(directory)


@pytest.fixture
def photo():
    """90 x 140 RGB with a bright disc on a darker gradient."""
    rows, columns = np.mgrid[0:90, 0:140]
    pixels = np.stack([columns / 140, rows / 90, np.full((90, 140), 0.3)], axis=-1)
    pixels[(rows - 30) ** 2 + (columns - 100) ** 2 < 15 ** 2] = 1.0
    return np.round(pixels * 255).astype(np.uint8)


def hooks_left(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._backward_hooks) for module in model.modules())


# --- CAM methods ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", cam_methods())
@pytest.mark.parametrize("name", ["camnet", "lightnn"])
def test_every_method_gives_a_unit_range_map(zoo, photo, name, method):
    checkpoint = zoo.get(name)
    side = ZOO[name][3]
    logits, cam = compute_cam(checkpoint.model, to_model_input(load_image(photo), checkpoint.meta), method)
    assert logits.shape == (len(CLASSES),)
    assert cam.shape == (side, side) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert hooks_left(checkpoint.model) == 0


class BrightnessNet(GapLinearClassifier):
    """Feature map ``relu(mean(RGB) - 0.3)``: only bright pixels fire; class 0 is their mean."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.head = GapLinearHead(2, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 3)
            self.features[0].bias.fill_(-0.3)
            self.head.fc.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
            self.head.fc.bias.zero_()


# EigenCAM is left out: its first principal component has an arbitrary sign.
@pytest.mark.parametrize("method", sorted(set(cam_methods()) - {"eigencam"}))
def test_the_map_peaks_on_the_bright_region(method):
    image = torch.full((1, 3, 16, 16), 0.1)
    image[:, :, 3:7, 9:13] = 1.0
    square = np.zeros((16, 16), dtype=bool)
    square[3:7, 9:13] = True
    model = BrightnessNet().requires_grad_(False).eval()
    _, cam = compute_cam(model, image, method, target=0)
    assert square[np.unravel_index(cam.argmax(), cam.shape)]
    assert cam[square].min() > 0.9 and cam[~square].max() < 0.05


# --- explain -------------------------------------------------------------------------------------

def test_explain_teacher_and_students(zoo, photo):
    checkpoints = [zoo.get(name) for name in ("camnet", "lightnn", "mlp", "camnet_gray")]
    result = explain(photo, checkpoints, top_k=2)
    assert result.image.shape == (90, 140, 3) and result.method == "gradcam"
    assert [entry.name for entry in result.models] == ["camnet", "lightnn", "mlp", "camnet_gray"]
    for entry, checkpoint in zip(result.models, checkpoints):
        with torch.no_grad():
            logits = checkpoint.model(to_model_input(load_image(photo), checkpoint.meta))[0]
        expected = torch.softmax(logits.double(), 0).numpy()
        assert np.allclose(entry.probabilities, expected, atol=1e-6)
        assert abs(entry.probabilities.sum() - 1) < 1e-5
        assert entry.predicted == int(expected.argmax()) and entry.predicted_class == CLASSES[entry.predicted]
        probabilities = [probability for _, probability in entry.top_k]
        assert len(entry.top_k) == 2 and probabilities == sorted(probabilities, reverse=True)
        assert entry.top_k[0] == (entry.predicted_class, pytest.approx(expected.max()))
    teacher, lightnn, mlp, gray = result.models
    for entry, side in ((teacher, 32), (lightnn, 16), (gray, 32)):
        assert entry.cam.shape == (side, side) and 0 <= entry.cam.min() and entry.cam.max() <= 1
        assert entry.overlay.shape == (90, 140, 3) and entry.overlay.dtype == np.uint8
        assert entry.target == entry.predicted
    assert mlp.map_kind == "saliency" and mlp.cam.shape == (16, 16) and mlp.overlay.shape == (90, 140, 3)
    assert mlp.target == mlp.predicted and "input-gradient saliency, not a CAM" in mlp.note
    assert [entry.map_kind for entry in (teacher, lightnn, gray)] == ["cam"] * 3
    assert [agreement.student for agreement in result.agreements] == ["lightnn", "mlp", "camnet_gray"]
    lightnn_agreement, mlp_agreement, _ = result.agreements
    p, q = teacher.probabilities, lightnn.probabilities
    assert lightnn_agreement.kl_teacher_student == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-4)
    assert lightnn_agreement.same_top1 == (teacher.predicted == lightnn.predicted)
    assert mlp_agreement.cam_correlation is None and mlp_agreement.cam_top_region_iou is None
    assert all(hooks_left(checkpoint.model) == 0 for checkpoint in checkpoints)


def test_overlay_is_drawn_at_the_capped_display_resolution(zoo):
    big = np.zeros((1536, 2048, 3), dtype=np.uint8)
    result = explain(big, [zoo.get("camnet")])
    assert result.image.shape == (384, 512, 3) and result.teacher.overlay.shape == (384, 512, 3)


def test_a_model_agrees_with_itself(zoo, photo):
    camnet = zoo.get("camnet")
    result = explain(photo, [camnet, camnet], method="eigencam")
    (agreement,) = result.agreements
    assert agreement.same_top1 and agreement.kl_teacher_student == 0.0
    assert agreement.cam_correlation == pytest.approx(1.0) and agreement.cam_top_region_iou == 1.0


@pytest.mark.parametrize("target, expected", [(2, 2), ("bird", 2), ("dog", 1)])
def test_a_chosen_target_is_explained_by_every_model(zoo, photo, target, expected):
    result = explain(photo, [zoo.get("camnet"), zoo.get("lightnn")], target=target)
    assert [entry.target for entry in result.models] == [expected, expected]


def test_target_teacher_explains_the_teachers_class(zoo, photo):
    result = explain(photo, [zoo.get("camnet"), zoo.get("lightnn")], target="teacher")
    assert [entry.target for entry in result.models] == [result.teacher.predicted] * 2


@pytest.mark.parametrize("arguments, message", [
    ({"target": 3}, "out of range"), ({"target": True}, "out of range"), ({"target": "fish"}, "unknown target"),
    ({"method": "magic"}, "gradcam"), ({"top_k": 0}, "top_k"), ({"opacity": 1.5}, "opacity"),
])
def test_bad_arguments_are_clear_errors(zoo, photo, arguments, message):
    with pytest.raises(ValueError, match=message):
        explain(photo, [zoo.get("camnet")], **arguments)


def test_no_checkpoints_or_no_image_are_clear_errors(zoo):
    with pytest.raises(ValueError, match="at least one checkpoint"):
        explain(np.zeros((8, 8, 3), np.uint8), [])
    with pytest.raises(ImageError, match="no image"):
        explain(None, [zoo.get("camnet")])


def test_models_of_other_classes_or_in_training_are_refused(tmp_path, zoo, photo):
    save_tiny(tmp_path, "lightnn", classes=["zero", "one", "two"])
    other = ModelCache(tmp_path).get("lightnn")
    with pytest.raises(ValueError, match="different classes"):
        explain(photo, [zoo.get("camnet"), other])
    other.model.train()
    with pytest.raises(ValueError, match="training mode"):
        explain(photo, [other])


def test_opacity_blends_image_and_heatmap(photo):
    cam = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (8, 1))
    assert np.array_equal(overlay_heatmap(photo, cam, opacity=0.0), photo)
    heat = overlay_heatmap(photo, cam, opacity=1.0)
    assert heat.shape == photo.shape
    assert tuple(heat[45, 0]) == (0, 0, 128) and tuple(heat[45, -1]) == (128, 0, 0)  # jet: blue .. red


def test_concurrent_explains_match_sequential_ones(zoo, photo):
    checkpoints = [zoo.get("camnet"), zoo.get("lightnn")]
    expected = explain(photo, checkpoints)
    results = []

    def worker():
        results.append(explain(photo, checkpoints))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for result in results:
        for got, want in zip(result.models, expected.models):
            assert np.array_equal(got.cam, want.cam) and np.array_equal(got.probabilities, want.probabilities)


@pytest.mark.parametrize("name", ["camnet", "lightnn", "camnet_gray", "airnet", "airnet_channels_last"])
@pytest.mark.parametrize("target", [None, 1])
def test_gradcam_without_hooks_gives_the_packages_map(zoo, name, target):
    """compute_cam's "gradcam" takes the gradient at the feature map, with no hook and no backward
    pass through the trunk; the grad-cam package's GradCAM hooks the CAM layer and backpropagates
    to the input. Same map and logits, also for airnet (its head pools by max and mean) and a model
    in channels-last memory, as the app's cache keeps them."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from kd_core.models.base import SingleView

    if name.startswith("airnet"):
        torch.manual_seed(1)
        model = models.create("airnet", num_classes=3, widths=[8, 16, 16]).eval()
        if name == "airnet_channels_last":
            model = model.to(memory_format=torch.channels_last)
        channels, side = 3, 32
    else:
        model = zoo.get(name).model
        _, _, channels, side = ZOO[name]
    torch.manual_seed(3)
    x = torch.randn(1, channels, side, side)
    logits, ours = compute_cam(model, x, "gradcam", target)
    single = SingleView(model)
    cam = GradCAM(single, [single.cam_module()])
    try:
        theirs = cam(x.clone().requires_grad_(True), None if target is None else [ClassifierOutputTarget(target)])[0]
    finally:
        cam.activations_and_grads.release()
    assert ours.shape == (side, side) and hooks_left(model) == 0
    assert ours.max() == pytest.approx(1, abs=1e-6) or (target is not None and ours.max() == 0)  # 0: nothing raises it
    np.testing.assert_allclose(ours, np.clip(theirs, 0, 1), atol=1e-5)
    torch.testing.assert_close(logits, model.single_pass(x)[0].detach())


def test_cams_under_a_callers_no_grad_and_a_private_copy_that_shares_frozen_weights(zoo, monkeypatch):
    """compute_cam works inside torch.no_grad() (it needs a gradient, and takes one); the grad-cam
    package's methods hook a copy of the modules that shares the cached model's frozen tensors."""
    import copy

    model = copy.deepcopy(zoo.get("camnet").model).requires_grad_(False).eval()
    x = torch.randn(1, 3, 32, 32)
    _, expected = compute_cam(model, x, "gradcam")
    with torch.no_grad():
        _, inside = compute_cam(model, x, "gradcam")
    np.testing.assert_array_equal(inside, expected)
    copies = []
    real_deepcopy = copy.deepcopy

    def watch(value, memo=None):
        copies.append(real_deepcopy(value, memo))
        return copies[-1]

    import types

    import kd_core.explain.methods as methods
    monkeypatch.setattr(methods, "copy", types.SimpleNamespace(deepcopy=watch))
    compute_cam(model, x, "layercam")
    [private] = copies
    assert private is not model and hooks_left(private) == 0 and hooks_left(model) == 0
    assert all(mine is theirs for mine, theirs in zip(private.parameters(), model.parameters()))
    assert all(mine is theirs for mine, theirs in zip(private.buffers(), model.buffers()))


def test_hooked_and_hook_free_methods_share_a_model_across_threads(zoo, photo):
    """Grad-CAM (no hooks) runs beside other threads' passes; a method of the grad-cam package
    hooks a private copy of the model: every thread gets the map it gets alone."""
    checkpoints = [zoo.get("camnet"), zoo.get("lightnn")]
    expected = {method: explain(photo, checkpoints, method=method) for method in ("gradcam", "layercam")}
    results, errors = [], []

    def worker(method):
        try:
            for _ in range(3):
                results.append((method, explain(photo, checkpoints, method=method)))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(method,)) for method in ("gradcam", "layercam") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 18
    for method, result in results:
        for got, want in zip(result.models, expected[method].models):
            assert np.array_equal(got.cam, want.cam) and np.array_equal(got.probabilities, want.probabilities)
    assert all(hooks_left(checkpoint.model) == 0 for checkpoint in checkpoints)


def test_a_trainable_model_is_explained_and_left_without_gradients(tmp_path, photo):
    loaded = load_checkpoint(save_tiny(tmp_path, "camnet"))
    assert all(parameter.requires_grad for parameter in loaded.model.parameters())
    result = explain(photo, [loaded])
    assert result.teacher.cam.shape == (32, 32)
    assert all(parameter.grad is None for parameter in loaded.model.parameters())


# --- agreement measures --------------------------------------------------------------------------

def outcome(name: str, probabilities: list[float], cam: np.ndarray | None = None) -> ModelExplanation:
    logits = np.log(np.array(probabilities, dtype=np.float32))
    predicted = int(np.argmax(probabilities))
    return ModelExplanation(name=name, arch="camnet", logits=logits, probabilities=np.array(probabilities),
                            top_k=[], predicted=predicted, predicted_class=str(predicted),
                            target=None if cam is None else predicted, cam=cam, overlay=None,
                            map_kind=None if cam is None else "cam")


def test_kl_divergence_values():
    same = compare(outcome("t", [0.2, 0.8]), outcome("s", [0.2, 0.8]))
    assert same.kl_teacher_student == 0.0 and same.same_top1
    differs = compare(outcome("t", [0.5, 0.5]), outcome("s", [0.9, 0.1]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert differs.kl_teacher_student == pytest.approx(expected, rel=1e-5)
    assert differs.cam_correlation is None and differs.cam_top_region_iou is None


def test_maps_of_different_sizes_are_compared_at_one_size():
    small = np.zeros((4, 4), dtype=np.float32)
    small[:2, :2] = 1.0
    large = cv2.resize(small, (8, 8), interpolation=cv2.INTER_LINEAR)
    result = compare(outcome("t", [0.5, 0.5], small), outcome("s", [0.5, 0.5], large))
    assert result.cam_correlation == pytest.approx(1.0) and result.cam_top_region_iou == 1.0


def test_cam_similarity_values():
    cam = np.random.default_rng(0).random((6, 6)).astype(np.float32)
    assert cam_correlation(cam, cam) == pytest.approx(1.0)
    assert cam_correlation(cam, 1 - cam) == pytest.approx(-1.0)
    assert math.isnan(cam_correlation(cam, np.zeros_like(cam)))
    left, right = np.zeros((5, 10)), np.zeros((5, 10))
    left[:, :2], right[:, -2:] = 1.0, 1.0  # each hot fifth on opposite sides
    assert top_region_iou(cam, cam) == 1.0 and top_region_iou(left, right) == 0.0


# --- model cache ---------------------------------------------------------------------------------

def test_cache_returns_frozen_private_copies_and_reuses_them(zoo):
    first = zoo.get("camnet")
    assert zoo.get("camnet") is first and zoo.get("camnet.safetensors") is first
    assert not first.model.training
    assert not any(parameter.requires_grad for parameter in first.model.parameters())


@pytest.mark.parametrize("name", ["../camnet", "/etc/passwd", "sub/camnet", "..", "", "a\\b", "x\0y"])
def test_names_with_folders_are_refused(zoo, name):
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        zoo.get(name)


def test_links_out_of_the_folder_are_refused(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    save_tiny(outside, "camnet")
    (inside / "sneaky.safetensors").symlink_to(outside / "camnet.safetensors")
    save_tiny(inside, "lightnn")
    (inside / "alias.safetensors").symlink_to(inside / "lightnn.safetensors")
    cache = ModelCache(inside)
    with pytest.raises(CheckpointError, match="outside"):
        cache.get("sneaky")
    assert cache.get("alias").meta["arch"] == "lightnn"


def test_a_deleted_checkpoint_is_a_clear_error(tmp_path):
    path = save_tiny(tmp_path, "camnet")
    save_tiny(tmp_path, "lightnn")
    cache = ModelCache(tmp_path)
    cache.get("camnet")
    path.unlink()
    with pytest.raises(MissingCheckpointError, match="'camnet' is not in .*deleted or renamed.*Available: lightnn"):
        cache.get("camnet")
    with pytest.raises(MissingCheckpointError):
        cache.get("never_there")
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelCache(tmp_path / "nowhere").get("camnet")


def test_a_changed_file_is_reloaded(tmp_path):
    save_tiny(tmp_path, "camnet", seed=0)
    cache = ModelCache(tmp_path)
    before = cache.get("camnet")
    save_tiny(tmp_path, "camnet", seed=1)  # an atomic replace, as a finished training run does
    after = cache.get("camnet")
    assert after is not before
    assert not torch.equal(after.model.head.fc.weight, before.model.head.fc.weight)


def test_a_broken_file_names_the_problem(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        ModelCache(tmp_path).get("broken")


def test_least_recently_used_models_are_dropped(tmp_path):
    save_tiny(tmp_path, "camnet")
    save_tiny(tmp_path, "lightnn")
    cache = ModelCache(tmp_path, max_models=1)
    first = cache.get("camnet")
    cache.get("lightnn")
    assert cache.get("camnet") is not first


def test_concurrent_gets_load_once(tmp_path, monkeypatch):
    save_tiny(tmp_path, "camnet")
    loads = []
    real_load = explain_module.load_checkpoint

    def slow_load(path):
        loads.append(path)
        time.sleep(0.05)
        return real_load(path)

    monkeypatch.setattr(explain_module, "load_checkpoint", slow_load)
    cache = ModelCache(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("camnet"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(results) == 4 and all(result is results[0] for result in results)


# --- benchmark -----------------------------------------------------------------------------------

def test_bench_command_reports_median_and_p95(tmp_path, capsys):
    save_tiny(tmp_path, "camnet")
    save_tiny(tmp_path, "lightnn")
    common = ["explain", "--checkpoints", str(tmp_path), "--teacher", "camnet",
              "--threads", str(torch.get_num_threads())]  # main() sets it; keep the session's
    assert bench.main(common + ["--student", "lightnn", "--repeats", "2"]) == 0
    output = capsys.readouterr().out
    assert "synthetic" in output and "median" in output and "p95" in output
    assert bench.main(common + ["--student", "nope"]) == 2
    assert "error: checkpoint 'nope'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["camnet.safetensors", "lightnn.safetensors"]



def test_flip_tta_model_predicts_with_both_views_and_maps_one(tmp_path, photo):
    """airnet with flip TTA: the shown prediction is the two-view average (what the model predicts),
    the CAM is the single-view map for that class, never a mix of the two passes' hooks."""
    torch.manual_seed(0)
    arch_args = {"num_classes": 3, "in_channels": 3, "widths": [8, 16, 16]}
    meta = {"arch": "airnet", "data": {"source": "synthetic", "classes": CLASSES, "input_size": [3, 32, 32],
                                       "mean": [0.5] * 3, "std": [0.25] * 3}}
    model = models.create("airnet", **arch_args)
    save_checkpoint(tmp_path / "tta.safetensors", model, {**meta, "arch_args": {**arch_args, "flip_tta": True}})
    save_checkpoint(tmp_path / "plain.safetensors", model, {**meta, "arch_args": arch_args})
    cache = ModelCache(tmp_path)
    tta, plain = cache.get("tta"), cache.get("plain")
    x = to_model_input(load_image(photo), tta.meta)
    with torch.no_grad():
        two_views = tta.model(x)[0]
    result = explain(photo, [tta, plain], top_k=3)
    with_tta, without = result.models
    assert np.allclose(with_tta.logits, two_views.numpy(), atol=1e-6)
    assert not np.allclose(with_tta.logits, without.logits, atol=1e-4)
    _, expected_cam = compute_cam(plain.model, x, "gradcam", with_tta.predicted)
    assert with_tta.target == with_tta.predicted
    np.testing.assert_allclose(with_tta.cam, expected_cam, atol=1e-5)  # features of a batch of views
    assert hooks_left(tta.model) == 0


def test_sample_predictions_are_read_from_the_metadata_or_computed_once(tmp_path, monkeypatch):
    import kd_core.evaluation as evaluation
    from kd_core.evaluation import sample_predictions

    save_tiny(tmp_path, "camnet")
    checkpoint = load_checkpoint(tmp_path / "camnet.safetensors")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    calls = []
    real = evaluation.predict
    monkeypatch.setattr(evaluation, "predict", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    computed = sample_predictions(checkpoint, images, "abc")
    assert torch.equal(sample_predictions(checkpoint, images, "abc"), computed) and len(calls) == 1
    assert torch.equal(computed, real(checkpoint.model, images, checkpoint.mean, checkpoint.std).argmax(1))
    checkpoint.meta["sample_predictions"] = {"sample_sha256": "def", "predictions": [9, 8, 7, 6, 5, 4]}
    assert sample_predictions(checkpoint, images, "def").tolist() == [9, 8, 7, 6, 5, 4] and len(calls) == 1


def test_input_saliency_lights_exactly_the_pixels_a_model_reads():
    from kd_core.explain import input_saliency

    model = models.create("mlp", num_classes=2, in_channels=1, input_size=4, hidden=(3,)).eval()
    with torch.no_grad():
        first = model.features[1]                       # Linear(16, 3) after Flatten
        first.weight.zero_()
        first.weight[:, 2 * 4 + 1] = torch.tensor([1.0, -2.0, 0.5])  # only pixel (row 2, column 1)
        first.bias.fill_(1.0)                            # every ReLU open, so the gradient flows
    saliency = input_saliency(model, torch.randn(1, 1, 4, 4), target=1)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[2, 1] = 1.0
    np.testing.assert_array_equal(saliency, expected)


def test_test_set_cam_agreement_of_a_model_with_itself_is_one_and_a_shuffled_student_less():
    from kd_core.evaluation import cam_agreement, teacher_class_maps

    torch.manual_seed(0)
    teacher = models.create("camnet").eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    stats = ([0.5] * 3, [0.25] * 3)
    same = cam_agreement(teacher, teacher, images, stats, stats, batch_size=5)
    assert same == {"cam_correlation_mean": 1.0, "cam_correlation_median": 1.0, "cam_top_region_iou_mean": 1.0,
                    "cam_images": 12}
    other = models.create("camnet").eval()  # other random weights look elsewhere
    apart = cam_agreement(other, teacher, images, stats, stats, batch_size=5)
    assert apart["cam_correlation_mean"] < 0.99
    precomputed = teacher_class_maps(teacher, images, stats)
    assert cam_agreement(other, teacher, images, stats, stats, batch_size=5, teacher_maps=precomputed) == apart
    assert cam_agreement(models.create("mlp"), teacher, images, stats, stats) is None


def test_topk_chart_draws_the_probabilities_best_on_top(zoo, photo):
    from kd_core.dashboard.explain_tab import topk_chart

    model = explain(photo, [zoo.get("camnet")], top_k=3).teacher
    figure = topk_chart(model).to_dict()
    (bars,) = figure["data"]
    assert bars["type"] == "bar" and bars["orientation"] == "h"
    assert list(bars["y"]) == [name for name, _ in model.top_k][::-1]
    assert list(bars["x"]) == pytest.approx([100 * p for _, p in model.top_k][::-1])
    assert figure["layout"]["title"]["text"] == f"camnet: {model.predicted_class}"
    assert figure["layout"]["xaxis"]["range"] == [0, 100]


def test_a_model_in_training_mode_is_refused_rather_than_changed(zoo):
    model = models.create("camnet", num_classes=3).train()
    with pytest.raises(ValueError, match="eval mode"):
        compute_cam(model, torch.randn(1, 3, 32, 32), "gradcam")
