"""``python -m kd_core``, called in-process: one-line errors with exit status 2, complete help, and
train -> distill -> evaluate on a tiny image folder."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal

import pytest
import torch

from helpers import write_image_folder
from kd_core.checkpoint import file_sha256, load_checkpoint, read_metadata, weights_sha256
from kd_core import cli
from kd_core.cli import LOSS_TERMS, build_parser, main
from kd_core.losses import LOSSES

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # defaults such as checkpoints/ and runs/ must not touch the repo
    return tmp_path


@pytest.fixture
def folder_data(workdir):
    write_image_folder(workdir / "data", CLASSES, {"train": 16, "test": 8}, size=32)
    return f"folder:{workdir / 'data'}"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def common(workdir, name):
    return ["--epochs", 1, "--batch-size", 16, "--limit", 40, "--output", workdir / "ck" / f"{name}.safetensors",
            "--run-dir", workdir / "runs" / name, "--cache-dir", workdir / "cache"]


# ---------------------------------------------------------------------------------------------
# errors


CACHE = ["--cache-dir", "{workdir}/cache"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet21", "--data", "{data}", *CACHE], "error: unknown model 'resnet21'; choose one of: "),
    (["train", "--model", "camnet", "--data", "folder:{workdir}/nowhere", *CACHE],
     "error: data set folder '.*nowhere' does not exist"),
    (["train", "--model", "camnet", "--data", "{data}", "--epochs", "-2", *CACHE], "error: epochs must be at least 1, got -2"),
    (["train", "--model", "camnet", "--data", "{data}", "--epochs", "0", *CACHE], "error: epochs must be at least 1, got 0"),
    (["train", "--data", "{data}"], "error: say which model to train: --model ARCH or --recipe NAME"),
    (["distill", "--student", "camnet", "--teacher", "t.safetensors", "--kd", "1", "--teacher-views", "-1"],
     "error: teacher views must not be negative, got -1"),
    (["distill", "--student", "camnet", "--teacher", "t.safetensors", "--kd", "1", "--temperature", "0"],
     "error: temperature T must be positive, got 0.0"),
    (["distill", "--student", "camnet", "--teacher", "t.safetensors", "--kd", "1", "-T", "-1"],
     "error: temperature T must be positive, got -1.0"),
    (["distill", "--student", "camnet", "--data", "{data}", "--kd", "1", *CACHE], "error: distill needs --teacher CHECKPOINT"),
    (["distill", "--student", "camnet", "--data", "{data}", "--kd", "-1", "--teacher", "t.safetensors"],
     "error: loss weights must not be negative"),
    (["distill", "--student", "camnet", "--data", "{data}", "--kd", "1", "--teacher", "{workdir}/missing.safetensors",
      *CACHE], "error: no checkpoint file at .*missing.safetensors"),
    (["evaluate", "{workdir}/missing.safetensors", *CACHE], "error: no checkpoint file at .*missing.safetensors"),
    (["list", "{workdir}/no-such-folder"], "error: no folder .*no-such-folder"),
])
def test_errors_are_one_line_with_status_2(capsys, workdir, folder_data, argv, message):
    code, out, err = run_cli(capsys, *[arg.format(data=folder_data, workdir=workdir) for arg in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(message, lines[0]), err
    assert "Traceback" not in err and not (workdir / "ck").exists()


# ---------------------------------------------------------------------------------------------
# help


TRAINING_OPTIONS = ["--recipe", "--data", "--output", "--name", "--run-dir", "--fresh", "--cache-dir", "--epochs",
                    "--batch-size", "--lr", "--weight-decay", "--label-smoothing", "--seed", "--limit", "--device",
                    "--no-amp", "--eval-every", "--set", "--crop-padding", "--no-flip", "--rotation", "--color-jitter",
                    "--cutout"]
HELP_OPTIONS = {
    "train": TRAINING_OPTIONS + ["--model"],
    "distill": TRAINING_OPTIONS + ["--student", "--teacher", "--temperature", "--teacher-views"]
               + [f"--{term}" for term in LOSS_TERMS],
    "evaluate": ["--data", "--teacher", "--speed", "--json", "--cache-dir"],
    "list": ["--json"],
    "study": ["--recipe", "--seeds", "--temperatures", "--feature-weight", "--teacher", "--data", "--output",
              "--epochs", "--limit", "--device", "--cache-dir"],
}


def test_every_loss_term_has_a_flag():
    assert sorted(LOSS_TERMS) == LOSSES.names()


def subcommand_options(command: str) -> list[str]:
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [option for action in subparsers.choices[command]._actions for option in action.option_strings]


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_help_mentions_every_option(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in set(HELP_OPTIONS[command]) | set(subcommand_options(command)):
        assert re.search(rf"(^|\s|,\s*){re.escape(option)}\b", text), f"{command} --help lacks {option}"


def test_models_lists_parameter_counts(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert re.search(r"^camnet\s+96,170 parameters$", out, re.M)
    assert re.search(r"^resnet20\s+269,722 parameters$", out, re.M)


# ---------------------------------------------------------------------------------------------
# end to end


def test_train_distill_evaluate(capsys, workdir, folder_data):
    code, out, _ = run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, *common(workdir, "teacher"))
    assert code == 0 and re.search(r"wrote .*teacher.safetensors: test top-1 \d+\.\d\d%", out)
    teacher_path = workdir / "ck" / "teacher.safetensors"

    code, out, _ = run_cli(capsys, "distill", "--student", "camnet", "--teacher", teacher_path, "--data", folder_data,
                           "--ce", 0.5, "--kd", 1, "--cam", 1, "--feature", 1, "-T", 2, *common(workdir, "student"))
    assert code == 0, out
    student_path = workdir / "ck" / "student.safetensors"
    meta = read_metadata(student_path)
    assert meta["arch"] == "camnet" and meta["role"] == "student" and meta["method"] == "ce+kd+feature+cam"
    assert meta["data"]["classes"] == CLASSES and meta["data"]["input_size"] == [3, 32, 32]
    assert meta["data"]["train_size"] == 40 and meta["data"]["test_size"] == 24
    assert meta["config"]["temperature"] == 2 and meta["config"]["loss_weights"] == {"ce": 0.5, "kd": 1, "cam": 1, "feature": 1}
    assert meta["name"] == "camnet" and meta["teacher"]["name"] == "lightnn"  # --name defaults to the arch
    assert meta["teacher"]["file"] == "teacher.safetensors" and meta["teacher"]["sha256"] == file_sha256(teacher_path)
    assert meta["teacher"]["weights_sha256"] == weights_sha256(load_checkpoint(teacher_path).model)
    assert meta["metrics"]["file_size"] == student_path.stat().st_size and len(meta["history"]) == 1
    assert (workdir / "runs" / "student" / "resume.safetensors").exists()

    code, out, _ = run_cli(capsys, "evaluate", student_path, "--cache-dir", workdir / "cache")
    assert code == 0
    printed = re.search(r"top-1 (\d+\.\d\d)%  top-5 (\d+\.\d\d)%  \(recorded: ([\d.]+)\)", out)
    assert printed and printed.group(1) == f"{float(printed.group(3)):.2f}" == f"{meta['metrics']['test_top1']:.2f}"
    assert f"vs teacher {teacher_path}: top-1 agreement" in out  # the recorded teacher lies beside the student
    assert "per class: cat " in out and "params 96,170" not in out  # 3 classes: not the 10-class size
    code, out, _ = run_cli(capsys, "evaluate", student_path, "--cache-dir", workdir / "cache", "--json")
    (report,) = json.loads(out)
    assert round(report["top1"], 2) == meta["metrics"]["test_top1"] and report["params"] == meta["metrics"]["params"]
    assert sum(map(sum, report["confusion"])) == 24

    code, out, _ = run_cli(capsys, "list", workdir / "ck")
    assert code == 0
    assert re.search(r"^student\s+camnet\s+student", out, re.M) and re.search(r"^teacher\s+lightnn\s+teacher", out, re.M)


def test_a_net_predicting_with_test_time_augmentation_also_reports_its_single_view_top1(capsys, workdir,
                                                                                       folder_data):
    """A net whose forward averages mirror and shifted views reports, beside that top-1, the top-1 of
    one pass per image (run's final evaluation, evaluate, --record, list); a net without TTA does not."""
    from kd_core import models
    from kd_core.checkpoint import save_checkpoint
    from kd_core.data import load_data
    from kd_core.evaluation import predict
    from kd_core.models.base import SingleView
    from kd_core.run import evaluate_final

    data = load_data(folder_data, cache_dir=workdir / "cache")
    torch.manual_seed(3)
    arch_args = {"num_classes": 3, "in_channels": 3, "widths": [8, 16, 16]}
    model = models.create("airnet", **arch_args, flip_tta=True, translate_tta=True).eval()
    one_pass = predict(SingleView(model), data.test.images, data.mean, data.std).argmax(1)
    expected = 100.0 * (one_pass == data.test.labels).float().mean().item()
    report = evaluate_final(model, data, torch.device("cpu"))
    assert report["top1_single_view"] == pytest.approx(expected)
    model.set_tta(False, False)
    assert "top1_single_view" not in evaluate_final(model, data, torch.device("cpu"))  # one pass is all it makes

    meta = {"arch": "airnet", "role": "student", "data": {"source": folder_data, "classes": CLASSES,
                                                          "input_size": [3, 32, 32], "mean": list(data.mean),
                                                          "std": list(data.std)}}
    save_checkpoint(workdir / "ck" / "tta.safetensors", model,
                    {**meta, "arch_args": {**arch_args, "flip_tta": True, "translate_tta": True}})
    save_checkpoint(workdir / "ck" / "plain.safetensors", model, {**meta, "arch_args": arch_args})
    code, out, _ = run_cli(capsys, "evaluate", workdir / "ck" / "tta.safetensors", workdir / "ck" / "plain.safetensors",
                           "--cache-dir", workdir / "cache", "--record")
    assert code == 0
    assert out.count("single view (no test-time augmentation)") == 1 and f"{expected:.2f}%" in out
    assert read_metadata(workdir / "ck" / "tta.safetensors")["metrics"]["test_top1_single_view"] == pytest.approx(expected)
    assert "test_top1_single_view" not in read_metadata(workdir / "ck" / "plain.safetensors")["metrics"]
    code, out, _ = run_cli(capsys, "list", workdir / "ck", "--markdown")
    assert code == 0 and out.count(f"({expected:.2f}% single view)") == 1


def test_ctrl_c_before_the_first_epoch_ends_says_nothing_was_kept(capsys, workdir, folder_data, monkeypatch):
    class CtrlCAsTheRunStarts(cli.StopOnSignal):
        def __call__(self, trainer):
            super().__call__(trainer)
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled by the installed handler

    monkeypatch.setattr(cli, "StopOnSignal", CtrlCAsTheRunStarts)
    code, out, err = run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, *common(workdir, "stopped"))
    assert code == 130 and "stopped before the first epoch finished" in out and "state kept" not in out
    assert "stopping after this step (signal 2; again to stop at once)" in err
    assert not (workdir / "ck" / "stopped.safetensors").exists()


def test_reparameterized_student_ships_as_the_plain_net(capsys, workdir, folder_data):
    """camnet_rep trains with BN and extra branches and is written as plain camnet weights whose
    recorded accuracy the evaluate command reproduces; the training form is recorded too."""
    code, _, _ = run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, *common(workdir, "teacher"))
    assert code == 0
    code, out, _ = run_cli(capsys, "distill", "--student", "camnet_rep", "--teacher", workdir / "ck" / "teacher.safetensors",
                           "--data", folder_data, "--kd", 1, "--cam", 1, *common(workdir, "rep"))
    assert code == 0, out
    path = workdir / "ck" / "rep.safetensors"
    checkpoint = load_checkpoint(path)
    assert checkpoint.meta["arch"] == "camnet" and checkpoint.meta["arch_args"] == {"num_classes": 3, "in_channels": 3}
    assert checkpoint.meta["trained_as"]["arch"] == "camnet_rep" and checkpoint.meta["trained_as"]["params"] > 96_170
    assert type(checkpoint.model).__name__ == "CamNet"
    assert checkpoint.meta["metrics"]["params"] == 3 * 128 * 9 + 128 + 128 * 64 * 9 + 64 + 64 * 32 * 9 + 32 + 32 * 3 + 3
    code, out, _ = run_cli(capsys, "evaluate", path, "--cache-dir", workdir / "cache", "--json")
    (report,) = json.loads(out)
    assert round(report["top1"], 2) == checkpoint.meta["metrics"]["test_top1"]


def test_float16_weights_are_what_is_evaluated_and_stored(capsys, workdir, folder_data):
    code, _, _ = run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, *common(workdir, "full"))
    assert code == 0
    code, out, _ = run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, "--weights-dtype", "float16",
                           *common(workdir, "half"))
    assert code == 0, out
    full, half = workdir / "ck" / "full.safetensors", workdir / "ck" / "half.safetensors"
    meta = read_metadata(half)
    assert meta["weights_dtype"] == "float16" and read_metadata(full)["weights_dtype"] == "float32"
    assert 0.49 < half.stat().st_size / full.stat().st_size < 0.51
    model = load_checkpoint(half).model
    assert all(torch.equal(p, p.half().float()) for p in model.parameters())  # float16 values in float32
    code, out, _ = run_cli(capsys, "evaluate", half, "--cache-dir", workdir / "cache", "--json")
    (report,) = json.loads(out)
    assert round(report["top1"], 2) == meta["metrics"]["test_top1"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, "--weights-dtype", "int8")
    assert exit_info.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_list_markdown_table(capsys, workdir, folder_data):
    code, _, _ = run_cli(capsys, "train", "--recipe", "camnet-ce", "--data", folder_data, *common(workdir, "camnet-ce"))
    assert code == 0
    (workdir / "ck" / "broken.safetensors").write_bytes(b"not a checkpoint")
    code, out, _ = run_cli(capsys, "list", workdir / "ck", "--markdown")
    meta = read_metadata(workdir / "ck" / "camnet-ce.safetensors")
    lines = out.splitlines()
    assert lines[0].startswith("| checkpoint | role | params |") and lines[1] == "|---" * 12 + "|"
    assert lines[0].endswith("| command | source project (original CIFAR-10) |")
    assert lines[2].startswith("| broken | unusable: ") and lines[2].count("|") == 13
    assert lines[3] == (f"| camnet-ce | student | {meta['metrics']['params']:,} | {meta['metrics']['macs'] / 1e6:.1f} M | "
                        f"{meta['metrics']['file_size'] / 1e6:.2f} MB | {meta['metrics']['test_top1']:.2f}% | ce | - | "
                        f"{meta['train_seconds'] / 60:.1f} min, 1 epochs | - | "
                        "`python -m kd_core train --recipe camnet-ce --epochs 1 --batch-size 16 --limit 40` | - |")


def test_a_listed_run_scored_on_held_out_images_says_so():
    from kd_core.cli import _top1_text

    assert _top1_text({"test_top1": 78.494}) == "78.49%"
    assert _top1_text({"validation_top1": 78.8, "validation_top5": 98.7}) == "78.80% val"
    assert _top1_text({"params": 10}) == "-"


def test_distill_from_teacher_views_is_reproducible_and_shares_its_bank(capsys, workdir, folder_data):
    code, _, _ = run_cli(capsys, "train", "--model", "lightnn", "--data", folder_data, *common(workdir, "teacher"))
    teacher_path = workdir / "ck" / "teacher.safetensors"
    weights = []
    for name in ("first", "second"):
        code, out, _ = run_cli(capsys, "distill", "--student", "camnet", "--teacher", teacher_path, "--data", folder_data,
                               "--ce", 0.5, "--kd", 0.5, "--cam", 1, "--teacher-views", 3, *common(workdir, name))
        assert code == 0, out
        meta = read_metadata(workdir / "ck" / f"{name}.safetensors")
        assert meta["config"]["teacher_views"] == 3
        weights.append(weights_sha256(load_checkpoint(workdir / "ck" / f"{name}.safetensors").model))
    assert weights[0] == weights[1]  # same seed, same bank: the same student, bit for bit
    assert len(list((workdir / "cache" / "teacher-banks").glob("*.safetensors"))) == 1
    built, reused = (read_metadata(workdir / "ck" / f"{name}.safetensors") for name in ("first", "second"))
    # the second run reused the bank, and still reports what building it cost
    assert built["teacher_bank_seconds"] > 0 and reused["teacher_bank_seconds"] == built["teacher_bank_seconds"]
    assert "teacher_bank_reused" not in built and reused["teacher_bank_reused"] is True
    code, out, _ = run_cli(capsys, "list", workdir / "ck", "--markdown")
    first_row = next(line for line in out.splitlines() if line.startswith("| first |"))
    second_row = next(line for line in out.splitlines() if line.startswith("| second |"))
    assert f"{built['teacher_bank_seconds'] / 60:.1f} min teacher bank (3 views)" in first_row
    assert f"{built['teacher_bank_seconds'] / 60:.1f} min teacher bank (3 views, built by an earlier run)" in second_row


def test_training_time_names_a_mirrored_bank():
    from kd_core.cli import _training_time

    meta = {"train_seconds": 600, "teacher_bank_seconds": 120, "teacher_bank_reused": True,
            "config": {"epochs": 5, "teacher_views": 16, "mirror_views": True}}
    assert _training_time(meta) == "10.0 min, 5 epochs + 2.0 min teacher bank (16 views + mirrors, built by an earlier run)"


def test_training_commands_keep_freed_memory_and_others_do_not(capsys, workdir, monkeypatch):
    """train, distill and study tune malloc (kd_core.runtime) before anything else; a listing does not."""
    calls = []
    monkeypatch.setattr("kd_core.cli.reuse_freed_memory", lambda: calls.append(True) or True)
    assert main(["recipes"]) == 0 and main(["models"]) == 0
    assert calls == []
    for command in ("train", "distill", "study"):
        argv = [command, "ablation", "--recipe", "no-such-recipe"] if command == "study" else \
            [command, "--recipe", "no-such-recipe"]
        assert main(argv) == 2
    assert len(calls) == 3
    assert capsys.readouterr().err.count("no-such-recipe") == 3


@pytest.mark.parametrize("switch, value", [("mirror_views", True), ("kd_standardize", True), ("cam_distance", "mse")])
def test_settings_without_a_flag_are_set_by_name(switch, value):
    from kd_core.cli import reproduce_command, resolve_run
    from kd_core.experiments import recipes

    text = str(value).lower() if isinstance(value, bool) else value
    spec = resolve_run(build_parser().parse_args(["distill", "--recipe", "airnet-micro-kd", "--set",
                                                  f"{switch}={text}"]), distill=True)
    assert getattr(spec.config, switch) == value
    meta = {"recipe": "airnet-micro-kd", "config": spec.config.to_json(),
            "arch_args": {"num_classes": 10, "in_channels": 3, **json.loads(json.dumps(recipes.get("airnet-micro-kd").arch_args))}}
    expected = "" if getattr(recipes.get("airnet-micro-kd").config, switch) == value else f" --set {switch}={text}"
    assert reproduce_command(meta) == "python -m kd_core distill --recipe airnet-micro-kd" + expected


def test_distilling_for_a_validation_score_refuses_a_teacher_that_saw_the_held_out_images(capsys):
    from kd_core.run import HeldOutLeak, check_held_out

    source = "folder:data"
    saw_all = {"data": {"source": source}, "config": {"validation": 0}}
    with pytest.raises(HeldOutLeak, match="teacher t was trained on all of its training images, so it may have "
                                          "trained on the 5,000 images this run holds out"):
        check_held_out(saw_all, "t", source, 5000)
    with pytest.raises(HeldOutLeak, match="was trained with --validation 1000, another split than this run's"):
        check_held_out({"data": {"source": source}, "config": {"validation": 1000}}, "t", source, 5000)
    with pytest.raises(HeldOutLeak, match="records no held-out split"):  # imported: what it saw is unknown
        check_held_out({"data": {"source": source}, "config": {}, "method": "imported"}, "t", source, 5000)
    with pytest.raises(HeldOutLeak, match="was trained on all"):  # the same folder, spelled otherwise
        check_held_out({"data": {"source": "folder:./data/"}, "config": {}}, "t", source, 5000)
    check_held_out({"data": {"source": source}, "config": {"validation": 5000}}, "t", source, 5000)  # same split
    check_held_out(saw_all, "t", source, 0)  # scored on the test split: nothing held out
    assert capsys.readouterr().err == ""
    check_held_out({"data": {"source": "cifar10"}}, "imported", source, 5000)  # other data: cannot tell, says so
    assert "teacher imported was trained on cifar10, not folder:data" in capsys.readouterr().err


def test_a_recipe_whose_teacher_is_not_in_the_folder_says_how_to_train_it(capsys, tmp_path, monkeypatch):
    """resnet50 is too large to ship: distilling its student first asks for it, and `recipes` says so."""
    monkeypatch.setattr("kd_core.cli.CHECKPOINT_DIR", tmp_path)
    assert main(["distill", "--recipe", "mobilenet-v2-kd"]) == 2
    assert "distils from resnet50, which is not in" in capsys.readouterr().err
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "python -m kd_core train --recipe resnet50   # not shipped (too large): this trains it" in out
    assert "python -m kd_core distill --recipe mobilenet-v2-kd   # after python -m kd_core train --recipe resnet50" in out
    assert "python -m kd_core distill --recipe lightnn-kd\n" in out  # a shipped teacher: no note
