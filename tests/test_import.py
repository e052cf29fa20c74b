"""``python -m kd_core import``: weights trained elsewhere become a checkpoint that works as a teacher."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from helpers import write_dataset
from kd_core import models
from kd_core.checkpoint import load_checkpoint, read_metadata
from kd_core.cli import main
from kd_core.data import load_data
from kd_core.evaluation import predict
from kd_core.importer import WeightsError, fit_names, import_weights, read_state_dict
from kd_core.run import RunSpec, run
from kd_core.training import TrainConfig


@pytest.fixture
def source(tmp_path) -> str:
    write_dataset(tmp_path / "data", {"train": 3, "test": 2})
    return f"folder:{tmp_path / 'data'}"


def trained_elsewhere(arch: str = "camnet", **kwargs) -> torch.nn.Module:
    torch.manual_seed(3)
    return models.create(arch, **models.arch_args_for(arch, 10, (3, 32, 32), **kwargs)).eval()


def test_a_pth_with_a_module_prefix_imports_and_predicts_as_the_original(tmp_path, source):
    original = trained_elsewhere()
    weights = tmp_path / "ddp.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, weights)
    imported = import_weights("camnet", weights, source, tmp_path / "mine.safetensors", cache_dir=tmp_path / "cache")
    assert imported.meta["imported_from"]["renamed"] == "removed 'module.'"
    checkpoint = load_checkpoint(imported.path)
    data = load_data(source, cache_dir=tmp_path / "cache")
    expected = predict(original, data.test.images, data.mean, data.std)
    assert torch.equal(predict(checkpoint.model, data.test.images, checkpoint.mean, checkpoint.std), expected)
    top1 = 100 * (expected.argmax(1) == data.test.labels).float().mean().item()
    assert checkpoint.meta["metrics"]["test_top1"] == round(top1, 2)
    assert checkpoint.meta["role"] == "teacher" and checkpoint.meta["method"] == "imported"
    # a teacher like any other: distil it into a student
    student = tmp_path / "student.safetensors"
    run(RunSpec(arch="lightnn", data=source, output=student, teacher=imported.path, cache_dir=tmp_path / "cache",
                config=TrainConfig(epochs=1, batch_size=10, loss_weights={"ce": 0.5, "kd": 0.5})))
    assert read_metadata(student)["teacher"]["name"] == "mine"


def test_timm_weights_by_their_own_names_and_safetensors_from_the_cli(tmp_path, source, capsys):
    trained = trained_elsewhere("timm:test_resnet")
    weights = tmp_path / "hub.safetensors"
    save_file({k.removeprefix("model."): v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    output = tmp_path / "r.safetensors"
    assert main(["import", "--arch", "timm:test_resnet", "--weights", str(weights), "--data", source, "--name",
                 "hub-resnet", "--output", str(output), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "(names fitted: added 'model.')" in capsys.readouterr().out
    checkpoint = load_checkpoint(output)
    assert checkpoint.name == "hub-resnet" and checkpoint.mean == [0.5] * 3 and checkpoint.std == [0.25] * 3
    assert checkpoint.meta["versions"]["timm"]
    for name, tensor in trained.state_dict().items():
        assert torch.equal(checkpoint.model.state_dict()[name], tensor)


def test_wrong_shapes_missing_tensors_and_files_that_are_not_state_dicts_are_refused(tmp_path, source, capsys):
    state = trained_elsewhere().state_dict()
    wrong = dict(state, **{"head.fc.weight": torch.zeros(5, 3)})
    torch.save(wrong, tmp_path / "wrong.pt")
    missing = {k: v for k, v in state.items() if k != "head.fc.bias"}
    torch.save(missing, tmp_path / "missing.pt")

    class Payload:
        def __reduce__(self):  # what a malicious pickle does: run code on load
            return (print, ("unpickled!",))
    with open(tmp_path / "code.pth", "wb") as handle:
        pickle.dump(Payload(), handle, protocol=2)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no-weights.pth")
    (tmp_path / "text.safetensors").write_text("not tensors")

    def refusal(name: str) -> str:
        with pytest.raises(WeightsError) as error:
            import_weights("camnet", tmp_path / name, source, tmp_path / "out.safetensors", cache_dir=tmp_path / "c")
        return str(error.value)

    assert "wrong shape (1): head.fc.weight (5, 3) (needs (10, " in refusal("wrong.pt")
    assert "missing (1): head.fc.bias" in refusal("missing.pt")
    assert "loads without unpickling code" in refusal("code.pth")
    assert "unpickled!" not in capsys.readouterr().out
    assert "a dict without a state dict in it (keys: epoch, optimizer)" in refusal("no-weights.pth")
    assert "not a readable safetensors file" in refusal("text.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["import", "--arch", "camnet", "--weights", str(tmp_path / "wrong.pt"), "--data", source,
                 "--name", "x", "--output", str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: the weights do not fit camnet: wrong shape")


def test_names_are_fitted_only_as_far_as_they_match():
    expected = ["model.conv.weight", "model.fc.weight"]
    tensor = torch.zeros(1)
    assert fit_names({"module._orig_mod.conv.weight": tensor, "module._orig_mod.fc.weight": tensor}, expected)[1] == \
        "removed 'module._orig_mod.', added 'model.'"
    assert fit_names({"model.conv.weight": tensor, "model.fc.weight": tensor}, expected)[1] == ""
    names, how = fit_names({"conv.weight": tensor, "other.weight": tensor}, ["conv.weight", "fc.weight"])
    assert how == "" and set(names) == {"conv.weight", "other.weight"}  # left for check_fit to name


def test_read_state_dict_unwraps_the_usual_training_checkpoints(tmp_path):
    tensors = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    for key in ("model", "model_state_dict"):
        torch.save({key: tensors, "epoch": 1}, tmp_path / f"{key}.pt")
        assert set(read_state_dict(tmp_path / f"{key}.pt")) == set(tensors)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match="must be .safetensors, .pt or .pth"):
        read_state_dict(tmp_path / "w.npz")
