"""ONNX export (kd_core.export): logits as in torch at any batch size, metadata, int8 fidelity,
refusals, atomic writes, the printed and recorded table, and the Models tab's note on it."""
from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from torch import nn

from helpers import synthetic_bundle
from kd_core import __version__, export, files, models
from kd_core.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint, weights_sha256
from kd_core.dashboard import models_tab
from kd_core.data import load_data, normalize
from kd_core.evaluation import predict

pytest.importorskip("onnxruntime", reason="ONNX export needs `pip install -r requirements-extras.txt`")


def data_meta(bundle, source: str) -> dict:
    return {"source": source, "classes": bundle.classes, "input_size": list(bundle.input_shape),
            "mean": list(bundle.mean), "std": list(bundle.std)}


def tiny_airnet(tmp_path, tta: bool) -> LoadedCheckpoint:
    """A random tiny airnet on 16x16 synthetic images; with ``tta`` airbench's six-view TTA."""
    torch.manual_seed(0)
    arch_args = {"num_classes": 2, "widths": [8, 8, 8], "flip_tta": tta, "translate_tta": tta}
    model = models.create("airnet", **arch_args).eval()
    meta = {"arch": "airnet", "arch_args": arch_args, "data": data_meta(synthetic_bundle(), "synthetic")}
    return load_checkpoint(save_checkpoint(tmp_path / f"airnet-tta{int(tta)}.safetensors", model, meta))


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """lightnn after 40 Adam steps on scikit-learn's digits (about 90% test top-1): a real source,
    and logits with the small margins that quantization can flip."""
    digits = load_data("digits")
    torch.manual_seed(0)
    arch_args = {"num_classes": 10, "in_channels": 1, "input_size": 8}
    model = models.create("lightnn", **arch_args)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        index = torch.randint(0, len(digits.train), (64,), generator=generator)
        logits = model(normalize(digits.train.images[index], digits.mean, digits.std))
        loss = nn.functional.cross_entropy(logits, digits.train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("digits") / "digits-lightnn.safetensors"
    save_checkpoint(path, model.eval(), {"arch": "lightnn", "arch_args": arch_args, "data": data_meta(digits, "digits")})
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("tta", [False, True], ids=["one-pass", "six-view-tta"])
def test_onnx_logits_match_pytorch_at_every_batch_size_and_metadata_describes_the_model(tmp_path, tta):
    checkpoint = tiny_airnet(tmp_path, tta)
    path = export.export_onnx(checkpoint, tmp_path / "model.onnx")
    images = synthetic_bundle(test_size=12).test.images
    session = export.session(path)
    # 1 and 5 take torch's batched TTA path, 12 (72 views > BATCHED_TTA_MAX) its per-view path
    for batch in (1, 5, 12):
        expected = predict(checkpoint.model, images[:batch], checkpoint.mean, checkpoint.std)
        torch.testing.assert_close(export.run_onnx(session, images[:batch]), expected, atol=1e-4, rtol=1e-4)
    assert session.get_inputs()[0].name == "pixels" and session.get_inputs()[0].shape[1:] == [3, 16, 16]
    props = export.metadata(path)
    assert json.loads(props["classes"]) == ["dark", "bright"]
    assert json.loads(props["mean"]) == checkpoint.mean and json.loads(props["std"]) == checkpoint.std
    assert json.loads(props["input_size"]) == [3, 16, 16]
    assert props["checkpoint"] == f"airnet-tta{int(tta)}" and props["kd_core_version"] == __version__
    assert "stack_trace" not in path.read_bytes().decode("latin-1")  # the exporter's notes are dropped


def test_int8_model_follows_the_float_model(tmp_path, digits_checkpoint):
    checkpoint = load_checkpoint(digits_checkpoint)
    digits = load_data("digits")
    float_path = export.export_onnx(checkpoint, tmp_path / "digits.onnx")
    int8_path = export.quantize_int8(float_path, tmp_path / "digits.int8.onnx", digits.train.subset(128).images)
    reference = predict(checkpoint.model, digits.test.images, checkpoint.mean, checkpoint.std)
    exact = export.measure(float_path, digits.test.images, digits.test.labels, reference)
    quantized = export.measure(int8_path, digits.test.images, digits.test.labels, reference)
    assert 80 < exact["top1"] < 98  # trained, with low-margin images left
    assert exact["agreement"] == 100 and exact["max_abs_logit_diff"] < 1e-4
    assert quantized["agreement"] >= 97 and abs(quantized["top1"] - exact["top1"]) <= 1.5  # 359 test images
    assert quantized["max_abs_logit_diff"] > 1e-3  # it is quantized, not a copy
    assert quantized["file_size"] < 0.5 * exact["file_size"]
    assert json.loads(export.metadata(int8_path)["quantization"])["calibration_images"] == 128
    assert json.loads(export.metadata(int8_path)["classes"]) == digits.classes


def test_main_prints_the_table_and_records_it_without_touching_the_tensors(tmp_path, digits_checkpoint, capsys):
    checkpoint_path = tmp_path / digits_checkpoint.name
    checkpoint_path.write_bytes(digits_checkpoint.read_bytes())
    before = weights_sha256(load_checkpoint(checkpoint_path).model)
    assert export.main(parse(str(checkpoint_path), "--int8", "--calibration", "64", "--limit", "100", "--record")) == 0
    printed = capsys.readouterr().out
    assert "100 test images" in printed
    for name in ("pytorch float32", "onnx float32", "onnx int8"):
        assert name in printed
    assert (tmp_path / "digits-lightnn.onnx").is_file() and (tmp_path / "digits-lightnn.int8.onnx").is_file()
    recorded = load_checkpoint(checkpoint_path)
    assert weights_sha256(recorded.model) == before
    rows = {row["name"]: row for row in recorded.meta["export"]["rows"]}
    assert rows["onnx float32"]["agreement"] == 100 and rows["pytorch float32"]["max_abs_logit_diff"] == 0
    assert rows["onnx int8"]["file_size"] == (tmp_path / "digits-lightnn.int8.onnx").stat().st_size
    assert all(row["latency_ms_batch1"] > 0 and row["latency_ms_batch256"] > 0 for row in rows.values())
    assert recorded.meta["export"]["settings"] == {"format": "onnx", "int8": True, "calibration": 64, "data": "digits",
                                                   "test_images": 100, "limit": 100, "threads": torch.get_num_threads()}
    assert recorded.meta["export"]["onnxruntime"] == export._onnx_modules()[1].__version__


def test_options_and_default_paths(tmp_path):
    args = parse("checkpoints/student.safetensors")
    assert (args.format, args.int8, args.calibration, args.limit, args.output, args.record) == \
        ("onnx", False, 512, None, None, False)
    assert export.output_paths(tmp_path / "student.safetensors", None) == \
        (tmp_path / "student.onnx", tmp_path / "student.int8.onnx")
    assert export.output_paths(tmp_path / "student.safetensors", tmp_path / "out" / "s.onnx") == \
        (tmp_path / "out" / "s.onnx", tmp_path / "out" / "s.int8.onnx")


def test_refuses_a_file_that_is_not_a_checkpoint_and_an_unknown_format(tmp_path, digits_checkpoint):
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.safetensors is not a readable safetensors file"):
        export.main(parse(str(not_a_checkpoint)))
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'; this kd_core exports: onnx"):
        export.main(parse(str(digits_checkpoint), "--format", "tflite"))
    with pytest.raises(export.ExportError, match="--calibration must be at least 1, got 0"):
        export.main(parse(str(digits_checkpoint), "--int8", "--calibration", "0"))
    assert not list(tmp_path.glob("*.onnx"))


def test_a_missing_onnx_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(export.ExportError, match=r"pip install -r requirements-extras.txt"):
        export.export_onnx(tiny_airnet(tmp_path, False), tmp_path / "model.onnx")


class _CumulativeMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x.flatten(1), dim=1).values[:, :2]  # (B, 2); aten.cummax has no ONNX function


def test_an_operator_onnx_cannot_express_is_named_and_no_file_is_left(tmp_path):
    meta = {"arch": "cummax-net", "data": {**data_meta(synthetic_bundle(), "synthetic")}}
    checkpoint = LoadedCheckpoint(_CumulativeMax().eval(), meta, tmp_path / "cummax-net.safetensors")
    with pytest.raises(export.ExportError, match=r"cummax-net \(cummax-net\): not expressible in ONNX opset 20: "
                                                 r"No ONNX function found for .*aten\.cummax"):
        export.export_onnx(checkpoint, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    checkpoint = tiny_airnet(tmp_path, False)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous export")

    def full_disk(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export.export_onnx(checkpoint, target)
    assert target.read_bytes() == b"the previous export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["airnet-tta0.safetensors", "model.onnx"]


def test_models_tab_says_how_to_get_back_a_teacher_that_is_not_in_the_folder(tmp_path, monkeypatch):
    """The mistakes gallery of a student whose teacher is absent (ResNet-50 is not shipped) is empty,
    and its note names the teacher, its recorded accuracy and the recipe that trains it again."""
    student = tiny_airnet(tmp_path, False)
    student.meta["teacher"] = {"name": "resnet50", "file": "resnet50.safetensors", "test_top1": 84.08}

    def find_checkpoint(name):
        raise CheckpointError(f"checkpoint {name!r} is not in the checkpoints folder")

    monkeypatch.setattr(models_tab, "sample_for", lambda checkpoint, cifar_sample: "a sample of its data set")
    gallery, note = models_tab.mistakes_gallery(student, find_checkpoint, "sample.safetensors")
    assert gallery == [] and note == ("Teacher resnet50 is not in the checkpoints folder (it scored 84.08% test top-1 "
                                      "when this model learnt from it); `python -m kd_core train --recipe resnet50` "
                                      "trains it again.")
    student.meta["teacher"] = {"name": "someone-elses", "file": "someone-elses.safetensors"}
    assert models_tab.mistakes_gallery(student, find_checkpoint, "sample.safetensors")[1] == (
        "Teacher someone-elses is not in the checkpoints folder.")


def test_models_tab_note_shows_the_recorded_export(tmp_path):
    checkpoint = tiny_airnet(tmp_path, False)
    *_, note = models_tab.details(checkpoint, None, None)
    assert note == "No teacher recorded for this model."
    row = {"format": "onnx", "file_size": 35356, "top1": 87.19, "agreement": 99.44, "max_abs_logit_diff": 0.61,
           "latency_ms_batch1": 0.018, "latency_ms_batch256": 0.66}
    checkpoint.meta["export"] = {"rows": [{**row, "name": "onnx float32", "file_size": 90403},
                                          {**row, "name": "onnx int8"}],
                                 "settings": {"threads": 2, "test_images": 10000}, "onnxruntime": "1.32.0"}
    *_, note = models_tab.details(checkpoint, None, None)
    assert note.startswith("No teacher recorded for this model.\n\nExported (ONNX Runtime 1.32.0, 2 threads, "
                           "10,000 test images):\n\n```\n")
    lines = note.split("```")[1].strip("\n").splitlines()
    assert "file size (KB)" in lines[0] and "batch-256 (ms)" in lines[0]
    assert lines[1].split() == ["onnx", "float32", "onnx", "90.4", "87.19", "99.44", "0.61", "0.02", "0.7"]
    assert lines[2].split()[:4] == ["onnx", "int8", "onnx", "35.4"]
