"""Self-describing safetensors checkpoints: a bit-exact round trip, atomic writes, and a
CheckpointError naming the problem for every way a file can be unusable."""
from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kd_core import checkpoint as checkpoint_module
from kd_core import models
from kd_core.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, read_metadata, save_checkpoint

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def meta_for(arch: str, **extra) -> dict:
    return {"name": f"my-{arch}", "arch": arch, "arch_args": {"num_classes": 10, "in_channels": 3},
            "data": {"source": "folder:x", "classes": CLASSES, "input_size": [3, 32, 32],
                     "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
            "metrics": {"test_top1": 12.34}, "config": {"epochs": 3, "lr": 0.05}, **extra}


def trained_looking(arch: str) -> models.Classifier:
    """Random weights plus moved BatchNorm statistics (and counters), so every buffer matters."""
    torch.manual_seed(0)
    model = models.create(arch).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = trained_looking("camnet")
    path = save_checkpoint(tmp_path / "camnet.safetensors", model, meta_for("camnet"))
    return path, model


def header_length(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def rewrite(source, target, change_tensors=None, change_header=None):
    """Copy a safetensors file, editing its tensors and/or its header metadata on the way."""
    with safe_open(str(source), "pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if change_tensors:
        change_tensors(tensors)
    if change_header:
        change_header(header)
    save_file(tensors, str(target), metadata=header)
    return target


def edit_meta(change):
    def change_header(header):
        meta = json.loads(header["kd_core"])
        change(meta)
        header["kd_core"] = json.dumps(meta)
    return change_header


# ---------------------------------------------------------------------------------------------
# the good path


@pytest.mark.parametrize("arch", ["camnet", "resnet8", "lightnn", "airnet", "mlp"])
def test_round_trip_is_bit_exact(tmp_path, arch):
    model = trained_looking(arch)
    meta = meta_for(arch)
    path = save_checkpoint(tmp_path / f"{arch}.safetensors", model, meta)
    loaded = load_checkpoint(path)

    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert restored[name].dtype == original[name].dtype, name
        assert torch.equal(restored[name], original[name]), name
    assert not loaded.model.training

    for key, value in meta.items():
        assert loaded.meta[key] == (value if key != "metrics" else {**value, "file_size": path.stat().st_size})
    assert loaded.meta["format"] == "kd_core/1" and "created" in loaded.meta
    assert (loaded.name, loaded.classes, loaded.mean, loaded.std) == (
        f"my-{arch}", CLASSES, meta["data"]["mean"], meta["data"]["std"])

    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded.model(images))


def test_float16_weights_halve_the_file_and_load_back_as_the_rounded_model(tmp_path):
    from kd_core.checkpoint import round_weights, weights_sha256

    model = trained_looking("airnet")
    full = save_checkpoint(tmp_path / "full.safetensors", model, meta_for("airnet"))
    rounded = round_weights(trained_looking("airnet"), "float16")
    half = save_checkpoint(tmp_path / "half.safetensors", rounded, meta_for("airnet", weights_dtype="float16"))

    with safe_open(str(half), "pt") as handle:
        dtypes = {name: handle.get_tensor(name).dtype for name in handle.keys()}
    parameters = {name for name, _ in model.named_parameters()}
    assert {dtypes[name] for name in parameters} == {torch.float16}
    assert {dtypes[name] for name in dtypes if name not in parameters} == {torch.float32, torch.int64}  # BN stats, counters
    assert 0.49 < half.stat().st_size / full.stat().st_size < 0.51

    loaded = load_checkpoint(half)
    assert loaded.meta["weights_dtype"] == "float16" and read_metadata(full)["weights_dtype"] == "float32"
    for name, tensor in rounded.state_dict().items():  # float32 in memory, equal to the rounded model
        assert loaded.model.state_dict()[name].dtype == tensor.dtype and torch.equal(loaded.model.state_dict()[name], tensor)
    assert weights_sha256(loaded.model) == weights_sha256(rounded)
    weight = model.features[2][0].weight
    assert 0 < (weight - rounded.features[2][0].weight).abs().max() <= weight.abs().max() * 2 ** -11


def test_weights_dtype_is_checked(tmp_path):
    from kd_core.checkpoint import round_weights

    with pytest.raises(ValueError, match="weights dtype must be one of float32, float16, got 'int8'"):
        save_checkpoint(tmp_path / "x.safetensors", models.create("camnet"), meta_for("camnet", weights_dtype="int8"))
    model = models.create("camnet")
    with torch.no_grad():
        model.head.fc.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="head.fc.weight reaches 1e\\+06, beyond float16's range"):
        round_weights(model, "float16")
    assert not list(tmp_path.iterdir())


def test_file_size_in_metadata_is_the_real_size(saved):
    path, _ = saved
    assert read_metadata(path)["metrics"]["file_size"] == path.stat().st_size == len(path.read_bytes())


def test_save_leaves_no_temporary_file(saved):
    path, _ = saved
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]


def test_failed_save_keeps_the_previous_file(saved, monkeypatch):
    path, _ = saved
    before = path.read_bytes()

    def fail(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "fsync", fail)  # dies after writing, before the rename
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, trained_looking("camnet").train(), meta_for("camnet", name="other"))
    assert path.read_bytes() == before
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]
    assert load_checkpoint(path).name == "my-camnet"


def test_save_needs_the_describing_keys(tmp_path):
    meta = meta_for("camnet")
    del meta["data"]
    with pytest.raises(ValueError, match="needs 'data'"):
        save_checkpoint(tmp_path / "x.safetensors", models.create("camnet"), meta)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# every unusable file says why


def written(target, data: bytes):
    target.write_bytes(data)
    return target


def truncated_in_data(path, target):
    data = path.read_bytes()
    start = 8 + header_length(path)
    return written(target, data[: start + (len(data) - start) // 2])


def truncated_in_header(path, target):
    return written(target, path.read_bytes()[: 8 + header_length(path) // 2])


def plain_safetensors(good, target):
    save_file({"weight": torch.zeros(3)}, str(target))
    return target


BROKEN_FILES = {
    "missing file": (lambda good, target: target, "no checkpoint file at"),
    "truncated in the data": (truncated_in_data, "not a readable safetensors file"),
    "truncated in the header": (truncated_in_header, "not a readable safetensors file"),
    "cut to five bytes": (lambda good, target: written(target, good.read_bytes()[:5]), "not a readable safetensors file"),
    "empty file": (lambda good, target: written(target, b""), "not a readable safetensors file"),
    "random bytes": (lambda good, target: written(target, random.Random(0).randbytes(4096)),
                     "not a readable safetensors file"),
    "text file": (lambda good, target: written(target, b"epoch 1: loss 2.3\n" * 50), "not a readable safetensors file"),
    "plain safetensors": (plain_safetensors, "safetensors file without kd_core metadata"),
    "corrupt metadata JSON": (lambda good, target: rewrite(good, target, change_header=lambda h: h.update(kd_core="{arch")),
                              "corrupt metadata"),
    "metadata without arch": (lambda good, target: rewrite(good, target, change_header=edit_meta(lambda m: m.pop("arch"))),
                              "metadata lacks 'arch'"),
    "unknown architecture": (lambda good, target: rewrite(good, target, change_header=edit_meta(
        lambda m: m.update(arch="resnet1000"))), "an architecture this kd_core does not have: unknown model 'resnet1000'"),
    "arguments the model does not take": (lambda good, target: rewrite(good, target, change_header=edit_meta(
        lambda m: m["arch_args"].update(depth=3))), "cannot build camnet from arch_args"),
    "missing tensor": (lambda good, target: rewrite(good, target, change_tensors=lambda t: t.pop("head.fc.bias")),
                       "does not fit camnet: missing tensors head.fc.bias"),
    "unexpected tensor": (lambda good, target: rewrite(good, target, change_tensors=lambda t: t.update(
        {"extra.weight": torch.zeros(2)})), "does not fit camnet: unexpected tensors extra.weight"),
    "mis-shaped tensor": (lambda good, target: rewrite(good, target, change_tensors=lambda t: t.update(
        {"head.fc.weight": torch.zeros(10, 16)})), r"tensor head.fc.weight has shape \(10, 16\), camnet needs \(10, 32\)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_broken_files_raise_a_named_error(saved, tmp_path, case):
    good, _ = saved
    make, message = BROKEN_FILES[case]
    path = make(good, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path)
    assert "broken.safetensors" in str(caught.value)


def test_list_checkpoints_marks_broken_files(saved):
    good, _ = saved
    folder = good.parent
    truncated_in_data(good, folder / "half.safetensors")
    (folder / "notes.txt").write_text("not a checkpoint, not listed")
    plain_safetensors(good, folder / "plain.safetensors")
    rows = {row["name"]: row for row in list_checkpoints(folder)}
    assert list(rows) == ["camnet", "half", "plain"]
    assert "error" not in rows["camnet"] and rows["camnet"]["meta"]["arch"] == "camnet"
    assert rows["camnet"]["file_size"] == good.stat().st_size
    assert "not a readable safetensors file" in rows["half"]["error"] and "meta" not in rows["half"]
    assert "without kd_core metadata" in rows["plain"]["error"]


def test_weights_sha256_follows_the_weights_not_the_metadata(tmp_path):
    from kd_core.checkpoint import file_sha256, update_metadata, weights_sha256

    model = trained_looking("camnet")
    path = save_checkpoint(tmp_path / "a.safetensors", model, meta_for("camnet"))
    before_file, before_weights = file_sha256(path), weights_sha256(load_checkpoint(path).model)
    assert before_weights == weights_sha256(model) and len(before_weights) == 64
    update_metadata(path, {"metrics": {"latency_ms_batch1": 1.0}})
    assert file_sha256(path) != before_file
    assert weights_sha256(load_checkpoint(path).model) == before_weights
    with torch.no_grad():
        model.head.fc.bias[0] += 1e-6
    assert weights_sha256(model) != before_weights
