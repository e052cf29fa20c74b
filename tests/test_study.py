"""``python -m kd_core study``: the variants each study trains, the summary table's arithmetic, and
an ablation + seeds study end to end on a tiny image folder (resumable, refusing mixed settings)."""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import write_image_folder
from kd_core.experiments import recipes
from kd_core import cli
from kd_core.cli import StopOnSignal, main
from kd_core.experiments.study import (StudyStopped, ablation_variants, matching_checkpoint, run_study, summarize,
                                      temperature_variants, variants_for)
from kd_core.checkpoint import read_metadata
from kd_core.training import Callback

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")


def test_ablation_variants_keep_the_recipes_weights():
    config = recipes.get("camnet-kd-cam").config  # ce 0.25, kd 0.75, cam 1
    variants = ablation_variants(config, feature_weight=2.0)
    assert [v.label for v in variants] == ["CE only", "KD", "CAM", "KD + CAM", "KD + feature"]
    assert [v.config.loss_weights for v in variants] == [
        {"ce": 1.0}, {"ce": 0.25, "kd": 0.75}, {"ce": 1.0, "cam": 1.0},
        {"ce": 0.25, "kd": 0.75, "cam": 1.0}, {"ce": 0.25, "kd": 0.75, "feature": 2.0}]
    assert all(v.config.epochs == config.epochs and v.config.seed == config.seed for v in variants)
    assert all(v.config.teacher_views == config.teacher_views == 8 for v in variants)
    assert [v.slug for v in variants] == ["ceonly", "kd", "cam", "kd-cam", "kd-feature"]


def test_ablation_of_a_ce_recipe_uses_hintons_half_mix():
    variants = ablation_variants(recipes.get("camnet-ce").config)
    assert variants[1].config.loss_weights == {"ce": 0.5, "kd": 0.5}
    assert variants[2].config.loss_weights == {"ce": 1.0, "cam": 1.0}


def test_temperature_variants():
    config = recipes.get("lightnn-kd").config
    variants = temperature_variants(config, [1, 2.5, 8])
    assert [v.label for v in variants] == ["T=1", "T=2.5", "T=8"]
    assert [v.config.temperature for v in variants] == [1.0, 2.5, 8.0]
    assert all(v.config.loss_weights == config.loss_weights for v in variants)
    with pytest.raises(ValueError, match="needs a recipe whose objective has a KD term"):
        temperature_variants(recipes.get("camnet-ce").config, [1])
    with pytest.raises(ValueError, match="unknown study 'grid'"):
        variants_for("grid", config)


def test_summary_mean_and_sample_std():
    rows = [{"variant": "KD", "seed": s, "loss_weights": {"ce": 0.25, "kd": 0.75}, "temperature": 4.0,
             "top1": a, "split": "test", "train_seconds": 120.0, "cam_correlation": c}
            for s, a, c in [(0, 70.0, 0.5), (1, 72.0, 0.6), (2, 74.0, 0.7)]]
    rows.append({"variant": "CE only", "seed": 0, "loss_weights": {"ce": 1.0}, "temperature": 4.0,
                 "test_top1": 65.5, "train_seconds": 60.0})  # a row written before splits and CAMs were recorded
    table = summarize(rows, "title").splitlines()
    assert table[0] == "**title**"
    assert table[2].startswith("| variant | objective | T | seeds | test top-1 (%) |")
    assert table[4] == "| KD | 0.25·ce + 0.75·kd | 4 | 0, 1, 2 | **72.00** ± 2.00 | 70.00, 72.00, 74.00 | 2.0 | 0.600 |"
    assert table[5] == "| CE only | 1·ce | - | 0 | **65.50** | 65.50 | 1.0 | - |"
    rows = [{**rows[0], "variant": "KD (z)", "config": {"kd_standardize": True}}]
    assert summarize(rows, "title").splitlines()[4].startswith("| KD (z) | 0.25·ce + 0.75·kd (z-scored) | 4 | 0 |")
    tta = [{**row, "variant": "TTA", "top1_single_view": single} for row, single in zip(rows * 2, (69.0, 70.0))]
    assert "| **70.00** ± 0.00 (single view 69.50 ± 0.71) | 70.00, 70.00 |" in summarize(tta, "title")
    unrecorded = {key: value for key, value in tta[1].items() if key != "top1_single_view"}
    assert "single view" not in summarize([tta[0], unrecorded], "title")  # only when every run recorded it


def test_a_checkpoint_saved_before_a_setting_existed_matches_that_settings_default():
    """Settings added to TrainConfig later (cam_distance, augment.mix, say) are missing from older checkpoints
    and results rows: those ran with the default, so a run of the recipe still matches them."""
    recipe = recipes.get("airnet-micro-kd")
    config = json.loads(json.dumps(recipe.config.to_dict()))
    older = {key: value for key, value in config.items() if key != "cam_distance"}
    older["augment"] = {key: value for key, value in config["augment"].items() if key not in ("mix", "mix_alpha")}
    meta = {"arch": recipe.arch, "arch_args": {"num_classes": 10, **json.loads(json.dumps(recipe.arch_args))},
            "data": {"source": recipe.data}, "config": older,
            "teacher": {"file": "airnet.safetensors", "weights_sha256": "w"}}
    teacher = Path("checkpoints/airnet.safetensors")
    assert matching_checkpoint([(Path("old"), meta)], recipe, config, recipe.data, teacher, "w") == (Path("old"), meta)
    assert matching_checkpoint([(Path("old"), meta)], recipe, {**config, "cam_distance": "mse"}, recipe.data,
                               teacher, "w") is None
    assert matching_checkpoint([(Path("old"), meta)], recipe, config, recipe.data, teacher, "other weights") is None
    mixed = {**config, "augment": {**config["augment"], "mix": "mixup"}}  # an augmentation setting, as above
    assert matching_checkpoint([(Path("old"), meta)], recipe, mixed, recipe.data, teacher, "w") is None
    # where a run computes is not a setting of what it computes: a CUDA study reuses a run made with "auto"
    assert matching_checkpoint([(Path("old"), meta)], recipe, {**config, "device": "cuda"}, recipe.data,
                               teacher, "w") == (Path("old"), meta)


def test_a_study_folder_resumes_on_another_device(tmp_path):
    """A finished row recorded with device auto is the same run for a study given --device cpu."""
    recipe = recipes.get("lightnn-ce")
    row = {"variant": "recipe", "seed": 0, "loss_weights": {"ce": 1.0}, "temperature": 4.0, "top1": 70.0,
           "split": "test", "train_seconds": 60.0, "checkpoint": "x.safetensors",
           "config": recipe.config.to_json(), "teacher_sha256": None, "cam_correlation": None}
    (tmp_path / "results.json").write_text(json.dumps([row]))
    summary = run_study("seeds", recipe, replace(recipe.config, device="cpu"), tmp_path, [0], None, recipe.data,
                        log=lambda line: None)
    assert "| recipe | 1·ce | - | 0 | **70.00** |" in summary


def test_a_run_stored_at_another_weights_dtype_is_neither_resumed_nor_reused(tmp_path):
    """digits-mlp-ce now stores float16 weights; a study row or checkpoint from when it stored float32
    was scored on other weights, so a study of the recipe refuses the old folder and reuses no such
    checkpoint. A row written before rows recorded the dtype is judged by its checkpoint in the folder,
    if there; with neither, it is taken as it stands."""
    from kd_core import models
    from kd_core.checkpoint import save_checkpoint

    recipe = recipes.get("digits-mlp-ce")
    assert recipe.weights_dtype == "float16"
    row = {"variant": "recipe", "seed": 0, "loss_weights": {"ce": 1.0}, "temperature": 4.0, "top1": 99.16,
           "split": "test", "train_seconds": 6.0, "checkpoint": "x.safetensors",
           "config": recipe.config.to_json(), "teacher_sha256": None, "cam_correlation": None}

    def study(rows):
        (tmp_path / "results.json").write_text(json.dumps(rows))
        return run_study("seeds", recipe, recipe.config, tmp_path, [0], None, recipe.data, log=lambda line: None)

    refused = ("holds a recipe run .seed 0. scored with float32 weights, and the recipe now stores float16; "
               "give the study another --output folder")
    with pytest.raises(ValueError, match=refused):
        study([{**row, "weights_dtype": "float32"}])
    assert "| recipe | 1·ce | - | 0 | **99.16** |" in study([{**row, "weights_dtype": "float16"}])
    assert "| recipe | 1·ce | - | 0 | **99.16** |" in study([row])  # no dtype, no checkpoint: unknown
    mlp = models.create("mlp", num_classes=10, in_channels=1, input_size=8)
    meta = {"arch": recipe.arch, "arch_args": {"num_classes": 10, "in_channels": 1, "input_size": 8},
            "data": {"source": recipe.data, "input_size": [1, 8, 8]}, "config": recipe.config.to_dict(),
            "teacher": None}
    save_checkpoint(tmp_path / "x.safetensors", mlp, dict(meta))  # float32, as the recipe stored it before
    with pytest.raises(ValueError, match=refused):
        study([row])

    config = json.loads(json.dumps(recipe.config.to_dict()))
    meta = {**meta, "config": config}
    assert matching_checkpoint([(Path("old"), meta)], recipe, config, recipe.data, None) is None
    stored = {**meta, "weights_dtype": "float16"}
    assert matching_checkpoint([(Path("new"), stored)], recipe, config, recipe.data, None) == (Path("new"), stored)


def test_a_run_of_another_architecture_or_test_time_augmentation_is_not_resumed(tmp_path):
    """tiny-titans-ce now predicts with level-2 TTA; a study row from when it did not scored other
    predictions, so a study of the recipe refuses the old folder, whether the row records the
    architecture or (written before rows recorded it) its checkpoint in the folder says it."""
    from kd_core import models
    from kd_core.checkpoint import save_checkpoint

    recipe = recipes.get("tiny-titans-ce")
    assert recipe.arch_args == {"flip_tta": True, "translate_tta": True}
    row = {"variant": "recipe", "seed": 0, "loss_weights": {"ce": 1.0}, "temperature": 4.0, "top1": 86.31,
           "split": "test", "train_seconds": 6.0, "checkpoint": "x.safetensors", "weights_dtype": "float16",
           "config": recipe.config.to_json(), "teacher_sha256": None, "cam_correlation": None}

    def study(rows):
        (tmp_path / "results.json").write_text(json.dumps(rows))
        return run_study("seeds", recipe, recipe.config, tmp_path, [0], None, recipe.data, log=lambda line: None)

    refused = (r"holds a recipe run .seed 0. of tiny_titans_cnn\(\), and the recipe now builds "
               r"tiny_titans_cnn\(flip_tta=True, translate_tta=True\); give the study another --output folder")
    with pytest.raises(ValueError, match=refused):
        study([{**row, "architecture": {"arch": "tiny_titans_cnn", "arch_args": {}}}])
    built = {"arch": "tiny_titans_cnn", "arch_args": {"flip_tta": True, "translate_tta": True}}
    assert "| recipe | 1·ce | - | 0 | **86.31** |" in study([{**row, "architecture": built}])
    assert "| recipe | 1·ce | - | 0 | **86.31** |" in study([row])  # neither row nor checkpoint says
    net = models.create("tiny_titans_cnn", num_classes=10)
    meta = {"arch": recipe.arch, "arch_args": {"num_classes": 10, "in_channels": 3, "input_size": 32},
            "data": {"source": recipe.data}, "config": recipe.config.to_dict(), "teacher": None,
            "weights_dtype": "float16"}
    save_checkpoint(tmp_path / "x.safetensors", net, meta)  # as the recipe trained it before: one view
    with pytest.raises(ValueError, match=refused):
        study([row])


def test_ablation_and_seed_studies_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data", ["cat", "dog", "frog"], {"train": 12, "test": 6}, size=32)
    data = f"folder:{tmp_path / 'data'}"
    cache = ["--cache-dir", tmp_path / "cache"]
    assert main(["train", "--model", "lightnn", "--data", data, "--epochs", "1", "--limit", "24",
                 "--output", str(tmp_path / "teacher.safetensors"), *map(str, cache)]) == 0
    capsys.readouterr()

    study = ["study", "ablation", "--recipe", "camnet-kd-cam", "--teacher", tmp_path / "teacher.safetensors",
             "--data", data, "--epochs", "1", "--limit", "24", "--output", tmp_path / "ablation", *cache]
    assert main([str(arg) for arg in study]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "ablation" / "results.json").read_text())
    assert [row["variant"] for row in rows] == ["CE only", "KD", "CAM", "KD + CAM", "KD + feature"]
    assert all(0 <= row["top1"] <= 100 and row["epochs"] == 1 and row["limit"] == 24 for row in rows)
    assert all(row["architecture"] == {"arch": "camnet_rep", "arch_args": {"flip_tta": True, "translate_tta": True}}
               for row in rows)  # what each checkpoint was trained as
    assert sorted(p.name for p in (tmp_path / "ablation").glob("*.safetensors")) == sorted(
        f"camnet-kd-cam-{slug}-s0.safetensors" for slug in ["ceonly", "kd", "cam", "kd-cam", "kd-feature"])
    assert out.startswith("**ablation study of recipe camnet-kd-cam (camnet_rep, 1 epochs, teacher teacher)")
    for row in rows:
        assert f"| {row['variant']} |" in out and f"**{row['top1']:.2f}**" in out
    assert (tmp_path / "ablation" / "results.md").read_text() == out

    # Run again: every run is already recorded, so nothing trains and the table is the same.
    mtime = (tmp_path / "ablation" / "results.json").stat().st_mtime_ns
    assert main([str(arg) for arg in study]) == 0
    assert capsys.readouterr().out == out
    assert (tmp_path / "ablation" / "results.json").stat().st_mtime_ns == mtime

    # Rows written before a setting existed (kd_standardize here) ran with its default: still recorded.
    older = [{**row, "config": {k: v for k, v in row["config"].items() if k != "kd_standardize"}} for row in rows]
    (tmp_path / "ablation" / "results.json").write_text(json.dumps(older))
    mtime = (tmp_path / "ablation" / "results.json").stat().st_mtime_ns
    assert main([str(arg) for arg in study]) == 0
    assert capsys.readouterr().out == out
    assert (tmp_path / "ablation" / "results.json").stat().st_mtime_ns == mtime

    # The same folder with other settings is refused rather than mixed into one table.
    changed = [str(arg) for arg in study]
    changed[changed.index("--epochs") + 1] = "2"
    assert main(changed) == 2
    assert "holds a CE only run (seed 0) with other settings" in capsys.readouterr().err

    seeds = ["study", "seeds", "--recipe", "camnet-ce", "--data", data, "--epochs", "1", "--limit", "24",
             "--seeds", "0", "1", "--output", tmp_path / "seeds", *cache]
    assert main([str(arg) for arg in seeds]) == 0
    out = capsys.readouterr().out
    accuracies = [row["top1"] for row in json.loads((tmp_path / "seeds" / "results.json").read_text())]
    assert len(accuracies) == 2
    assert re.search(r"\| recipe \| 1·ce \| - \| 0, 1 \| \*\*\d+\.\d\d\*\* ± \d+\.\d\d \|", out)

    # A new ablation folder that may reuse the first one's checkpoints: the KD and KD + CAM runs
    # match them exactly, so only they are taken over; everything else trains as usual.
    first = tmp_path / "ablation"
    reuse = ["--reuse", first / "camnet-kd-cam-kd-s0.safetensors", first / "camnet-kd-cam-kd-cam-s0.safetensors",
             tmp_path / "seeds" / "camnet-ce-recipe-s1.safetensors"]  # other recipe and seed: no match
    again = [str(arg) for arg in study[:study.index("--output")] + ["--output", tmp_path / "reused", *cache, *reuse]]
    assert main(again) == 0
    capsys.readouterr()
    reused = {row["variant"]: row for row in json.loads((tmp_path / "reused" / "results.json").read_text())}
    original = {row["variant"]: row for row in rows}
    assert reused["KD"]["checkpoint"] == "camnet-kd-cam-kd-s0.safetensors"
    assert reused["KD + CAM"]["checkpoint"] == "camnet-kd-cam-kd-cam-s0.safetensors"
    assert reused["KD"]["top1"] == original["KD"]["top1"]
    assert reused["KD"]["cam_correlation"] == pytest.approx(original["KD"]["cam_correlation"], abs=1e-6)  # measured
    assert sorted(p.name for p in (tmp_path / "reused").glob("*.safetensors")) == sorted(
        f"camnet-kd-cam-{slug}-s0.safetensors" for slug in ["ceonly", "cam", "kd-feature"])
    assert main([*again[:-1], str(tmp_path / "absent.safetensors")]) == 2
    assert "no checkpoint file at" in capsys.readouterr().err

    # The teacher is retrained into the same file: its old distilled rows and checkpoints are not
    # this teacher's, so the old folder is refused and a new one reuses nothing distilled.
    assert all(len(row["teacher_sha256"]) == 64 for row in rows if row["variant"] != "CE only")
    assert rows[0]["teacher_sha256"] is None
    assert main(["train", "--model", "lightnn", "--data", data, "--epochs", "1", "--limit", "24", "--seed", "1", "--fresh",
                 "--output", str(tmp_path / "teacher.safetensors"), *map(str, cache)]) == 0
    capsys.readouterr()
    assert main([str(arg) for arg in study]) == 2
    assert "holds a KD run (seed 0) distilled from other weights of teacher.safetensors" in capsys.readouterr().err
    retrained = [*again[:again.index("--output")], "--output", str(tmp_path / "retrained"), *map(str, cache),
                 "--reuse", str(first / "camnet-kd-cam-kd-s0.safetensors"), "--epochs", "1"]
    assert main(retrained) == 0
    assert "has these settings" not in capsys.readouterr().out
    assert len(list((tmp_path / "retrained").glob("*.safetensors"))) == 5


def test_a_stopped_study_leaves_the_table_of_its_finished_runs(tmp_path):
    write_image_folder(tmp_path / "data", ["cat", "dog"], {"train": 8, "test": 4}, size=32)
    recipe = recipes.get("camnet-ce")
    config = replace(recipe.config, epochs=1, limit=16).validate()

    class StopAtStart(Callback):
        def on_train_start(self, trainer):
            trainer.request_stop()

    runs = []

    def stop_the_second_run(name):
        runs.append(1)
        return [StopAtStart()] if len(runs) == 2 else []

    study = dict(kind="seeds", recipe=recipe, config=config, folder=tmp_path / "seeds", seeds=(0, 1), teacher=None,
                 data=f"folder:{tmp_path / 'data'}", cache_dir=tmp_path / "cache", log=lambda line: None)
    with pytest.raises(StudyStopped, match="^stopped camnet-ce-recipe-s1 before it finished an epoch$"):
        run_study(**study, callbacks=stop_the_second_run)
    partial = (tmp_path / "seeds" / "results.md").read_text()
    assert partial.startswith("**seeds study of recipe camnet-ce (camnet, 1 epochs), data folder:")
    assert "; not yet run: recipe (seed 1)**" in partial
    seed0 = json.loads((tmp_path / "seeds" / "results.json").read_text())[0]["top1"]
    assert f"| recipe | 1·ce | - | 0 | **{seed0:.2f}** | {seed0:.2f} |" in partial

    summary = run_study(**study)  # resumed: trains seed 1 only; the title loses its note
    assert (tmp_path / "seeds" / "results.md").read_text() == summary + "\n"
    assert "not yet run" not in summary and "| recipe | 1·ce | - | 0, 1 |" in summary
    assert not list((tmp_path / "seeds").glob("*.tmp"))


def test_ctrl_c_stops_a_study_after_the_step_and_the_same_command_resumes_it(capsys, tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data", ["cat", "dog"], {"train": 8, "test": 4}, size=32)
    argv = ["study", "seeds", "--recipe", "camnet-ce", "--seeds", "0", "--epochs", "2", "--limit", "16",
            "--set", "batch_size=8", "--data", f"folder:{tmp_path / 'data'}", "--cache-dir", str(tmp_path / "cache"),
            "--output", str(tmp_path / "study")]
    run_dir = tmp_path / "study" / "camnet-ce-recipe-s0"
    trained = []  # (epoch, step) of every step taken, over both commands

    class Record(Callback):
        def __init__(self, ctrl_c):
            self.ctrl_c = ctrl_c

        def on_step_end(self, trainer, info):
            trained.append((info.epoch, info.step))
            if self.ctrl_c and info.epoch == 1:  # a real SIGINT in the second epoch's first step
                os.kill(os.getpid(), signal.SIGINT)

    original_handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "_callbacks", lambda log_dir, stream=None: [Record(ctrl_c=True)])
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopping after this step (signal 2; again to stop at once)" in err and "Traceback" not in err
    assert (f"stopped camnet-ce-recipe-s0 after 1 epoch(s), its state kept in {run_dir}; rerun the same command "
            "to resume") in err
    assert trained == [(0, 0), (0, 1), (1, 0)]  # the step under way finished, no other
    assert (run_dir / "resume.safetensors").exists() and not (tmp_path / "study" / "results.json").exists()
    assert signal.getsignal(signal.SIGINT) is original_handler  # the command put its handlers back

    monkeypatch.setattr(cli, "_callbacks", lambda log_dir, stream=None: [Record(ctrl_c=False)])
    assert main(argv) == 0
    assert trained[3:] == [(1, 0), (1, 1)]  # resumed: the second epoch again, from its start
    assert "| recipe | 1·ce | - | 0 |" in capsys.readouterr().out
    assert len(read_metadata(tmp_path / "study" / "camnet-ce-recipe-s0.safetensors")["history"]) == 2


def test_a_signal_stops_the_running_trainer_and_every_later_run_and_a_second_one_stops_at_once(monkeypatch):
    installed = {}

    def install(signum, handler):
        previous, installed[signum] = installed.get(signum, "before"), handler
        return previous

    monkeypatch.setattr(signal, "signal", install)

    class Trainer:
        stop_requested = False

        def request_stop(self):
            self.stop_requested = True

    with StopOnSignal() as hook:
        assert set(installed) == {signal.SIGINT, signal.SIGTERM}
        running = Trainer()
        hook(running)
        assert not running.stop_requested
        installed[signal.SIGTERM](signal.SIGTERM, None)
        assert running.stop_requested
        later = Trainer()
        hook(later)  # e.g. the study's next run, started while the first was measured
        assert later.stop_requested
        with pytest.raises(KeyboardInterrupt):
            installed[signal.SIGINT](signal.SIGINT, None)
    assert installed == {signal.SIGINT: "before", signal.SIGTERM: "before"}  # put back


def test_study_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "ablation", "--recipe", "camnet-kd-cam", "--teacher", "missing.safetensors"]) == 2
    assert "needs a teacher checkpoint; missing.safetensors does not exist" in capsys.readouterr().err
    assert main(["study", "temperature", "--recipe", "lightnn-kd", "--temperatures", "2", "0"]) == 2
    assert "temperatures must be > 0" in capsys.readouterr().err
    assert main(["study", "temperature", "--recipe", "camnet-ce"]) == 2
    assert "needs a recipe whose objective has a KD term" in capsys.readouterr().err
    assert main(["study", "seeds", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_gain_study_scores_the_recipe_and_its_ce_twin_on_a_validation_split(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data", ["cat", "dog", "frog"], {"train": 16, "test": 6}, size=32)
    data = f"folder:{tmp_path / 'data'}"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    teacher = ["train", "--model", "lightnn", "--data", data, "--epochs", "1", "--limit", "24", *cache]
    assert main([*teacher, "--output", str(tmp_path / "seen-all.safetensors")]) == 0
    # the teacher must not have trained on the held-out images: this one did, so nothing runs
    study = ["study", "gain", "--recipe", "lightnn-kd", "--teacher", str(tmp_path / "seen-all.safetensors"),
             "--data", data, "--epochs", "1", "--validation", "9", "--seeds", "0", "1",
             "--output", str(tmp_path / "gain"), *cache]
    capsys.readouterr()
    assert main(study) == 2
    assert ("teacher seen-all was trained on all of its training images, so it may have trained on the 9 images "
            "this run holds out") in capsys.readouterr().err
    assert not (tmp_path / "gain").exists()  # refused before anything was made
    assert main([*teacher, "--validation", "9", "--fresh", "--output", str(tmp_path / "teacher.safetensors")]) == 0
    capsys.readouterr()
    study[study.index("--teacher") + 1] = str(tmp_path / "teacher.safetensors")
    assert main(study) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "gain" / "results.json").read_text())
    assert [(row["variant"], row["seed"]) for row in rows] == [("CE twin", 0), ("KD", 0), ("CE twin", 1), ("KD", 1)]
    assert all(row["split"] == "validation" and row["config"]["validation"] == 9 for row in rows)
    assert all(-1 <= row["cam_correlation"] <= 1 for row in rows)  # both variants measured against the teacher
    assert rows[0]["loss_weights"] == {"ce": 1.0} and rows[1]["loss_weights"] == {"ce": 0.25, "kd": 0.75}
    for row in rows:  # each checkpoint was scored on the 9 held-out training images, and says so
        meta = read_metadata(tmp_path / "gain" / row["checkpoint"])
        assert meta["metrics"]["evaluated_on"] == "validation" and "test_top1" not in meta["metrics"]
        assert meta["metrics"]["validation_top1"] == row["top1"]
        assert meta["data"]["train_size"] == 48 - 9 and meta["data"]["validation_size"] == 9
    ce = {row["seed"]: row["top1"] for row in rows if row["variant"] == "CE twin"}
    kd = {row["seed"]: row["top1"] for row in rows if row["variant"] == "KD"}
    differences = [kd[seed] - ce[seed] for seed in (0, 1)]
    mean = sum(differences) / 2
    half = 12.706 * statistics.stdev(differences) / 2 ** 0.5  # Student's t, 1 degree of freedom
    gain_line = next(line for line in out.splitlines() if line.startswith("| 0, 1 |"))
    assert f"**{mean:+.2f}**" in gain_line and f"[{mean - half:+.2f}, {mean + half:+.2f}]" in gain_line
    assert gain_line.endswith("| validation |")
    assert "scored on 9 training images held out" in out.splitlines()[0]


def test_a_gain_studys_twin_can_take_the_best_cross_entropy_settings(capsys):
    config = recipes.get("lightnn-kd").config
    twin, kd = variants_for("gain", config, twin_overrides={"lr": 0.05, "teacher_views": 0, "mirror_views": False})
    assert (twin.label, twin.config.lr, twin.config.teacher_views, twin.config.loss_weights) == \
        ("CE twin", 0.05, 0, {"ce": 1.0})
    assert kd.config == config  # the distilled run is the recipe itself
    with pytest.raises(ValueError, match="learning rate must be positive"):
        variants_for("gain", config, twin_overrides={"lr": -1.0})
    assert main(["study", "seeds", "--recipe", "lightnn-kd", "--twin-set", "lr=0.05"]) == 2
    assert "--twin-set sets the cross-entropy twin of a gain study" in capsys.readouterr().err
