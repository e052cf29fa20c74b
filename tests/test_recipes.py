"""The one way from a recipe to a run: every entry point resolves a recipe to the same run, and that
run is the one the recipe resolved to before the code was reorganized (``tests/data``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_core.cli import build_parser, reproduce_command, resolve_run
from kd_core.experiments import recipes
from kd_core.training import TrainConfig
from kd_core.training.config import changed_settings, parse_setting, with_overrides

STORED = json.loads((Path(__file__).parent / "data" / "recipe_run_specs.json").read_text())
REMOVED_SETTINGS = {"distinct_views": False, "ema_every": 1}  # taken out of TrainConfig; they held these no-op values
# added since, at the value every recipe keeps that does not record it (lightnn-kd: clip_grad_norm 5)
ADDED_SETTINGS = {"validation": 0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "clip_grad_norm": 0.0}
ADDED_AUGMENT_SETTINGS = {"mix": "none", "mix_alpha": 1.0}


def as_stored(spec) -> dict:
    return json.loads(json.dumps({
        "arch": spec.arch, "data": spec.data, "config": spec.config.to_dict(), "output": str(spec.output),
        "teacher": str(spec.teacher) if spec.teacher else None, "name": spec.name, "role": spec.role,
        "recipe": spec.recipe, "arch_args": spec.arch_args, "state_path": str(spec.state_path),
        "weights_dtype": spec.weights_dtype}))


@pytest.mark.parametrize("name", sorted(STORED))
def test_every_recipe_resolves_to_the_run_it_resolved_to_before(name):
    """(Recipes added since the reorganization have no stored copy.)"""
    assert set(STORED) <= set(recipes.names())
    verb = "distill" if recipes.get(name).teacher else "train"
    resolved = as_stored(resolve_run(build_parser().parse_args([verb, "--recipe", name]), verb == "distill"))
    stored = STORED[name]
    for setting, value in REMOVED_SETTINGS.items():
        assert stored["config"].pop(setting) == value
    for setting, value in ADDED_SETTINGS.items():
        if setting not in stored["config"]:
            assert resolved["config"].pop(setting) == value
    for setting, value in ADDED_AUGMENT_SETTINGS.items():
        assert resolved["config"]["augment"].pop(setting) == value
    assert resolved.keys() == stored.keys()
    for key in stored:
        if key == "config":
            assert resolved["config"].keys() == stored["config"].keys()
            for setting in stored["config"]:
                assert resolved["config"][setting] == stored["config"][setting], (name, setting)
        else:
            assert resolved[key] == stored[key], (name, key)


def test_cli_flags_and_set_reach_the_config():
    args = build_parser().parse_args(["distill", "--recipe", "camnet-kd-cam", "--epochs", "3", "--kd", "0.5",
                                      "--set", "cam_distance=mse", "--set", "augment.cutout=8",
                                      "--set", "mirror_views=true", "--no-flip"])
    spec = resolve_run(args, distill=True)
    recipe = recipes.get("camnet-kd-cam")
    assert changed_settings(spec.config.to_json(), recipe.config.to_json()) == {
        "epochs": 3, "loss_weights": {"ce": 0.25, "kd": 0.5, "cam": 1.0}, "mirror_views": True,
        "cam_distance": "mse", "augment.flip": False, "augment.cutout": 8}
    assert spec.teacher == Path("checkpoints/airnet.safetensors") and spec.recipe == "camnet-kd-cam"


def test_a_run_without_a_recipe_distils_with_the_default_weights():
    spec = resolve_run(build_parser().parse_args(["distill", "--student", "camnet", "--teacher", "t.safetensors"]),
                       distill=True)
    assert spec.config.loss_weights == recipes.DISTILL_WEIGHTS and spec.recipe is None and spec.role == "student"
    assert spec.config == with_overrides(TrainConfig(), {"loss_weights": recipes.DISTILL_WEIGHTS})


def test_another_architecture_keeps_the_recipes_settings_but_not_its_architecture_arguments():
    spec = recipes.get("airnet-micro-kd").run_spec(arch="camnet")
    assert (spec.arch, spec.arch_args, spec.name, spec.role, spec.weights_dtype) == ("camnet", {}, "camnet",
                                                                                     "student", "float32")
    assert spec.config == recipes.get("airnet-micro-kd").config


def test_a_cross_entropy_only_override_needs_no_teacher():
    spec = recipes.get("camnet-kd").run_spec({"loss_weights": {"ce": 1.0}})
    assert spec.teacher is None


@pytest.mark.parametrize("assignment, message", [
    ("epochs=2.5", "setting epochs: expected a whole number"), ("nope=1", "unknown setting 'nope'"),
    ("mirror_views=maybe", "setting mirror_views: expected true or false"), ("lr", "--set takes NAME=VALUE"),
    ("loss_weights=[1]", "setting loss_weights: expected a JSON object"),
])
def test_set_refuses_what_the_dataclass_does_not_allow(assignment, message):
    with pytest.raises(ValueError, match=message):
        parse_setting(assignment)


def test_reproduce_command_sets_every_difference():
    recipe = recipes.get("camnet-kd-cam")
    config = with_overrides(recipe.config, {"epochs": 7, "lr": 0.125, "augment.cutout": 8,
                                            "loss_weights": {"ce": 1.0}}).to_json()
    meta = {"recipe": recipe.name, "config": config,
            "arch_args": {"num_classes": 10, "in_channels": 3, "flip_tta": True, "translate_tta": True}}
    command = reproduce_command(meta)
    assert command == ("python -m kd_core distill --recipe camnet-kd-cam --epochs 7 --lr 0.125 "
                       "--set 'loss_weights={\"ce\": 1.0}' --cutout 8")
    args = build_parser().parse_args(__import__("shlex").split(command)[3:])
    assert resolve_run(args, distill=True).config.to_json() == config  # the command does reproduce it
    assert reproduce_command({**meta, "config": recipe.config.to_json()}) == recipe.command
    del meta["config"]["kd_standardize"]  # saved before the setting existed: it ran with the default
    assert "kd_standardize" not in reproduce_command(meta)
    meta["config"]["mirror_views"] = True
    assert " --set mirror_views=true" in reproduce_command(meta)
    assert reproduce_command({**meta, "arch_args": {}}).endswith(" (and other architecture arguments)")
    assert reproduce_command({"recipe": None}) is None and reproduce_command({"recipe": "gone"}) is None


@pytest.mark.parametrize("name", [name for name in recipes.names() if recipes.get(name).teacher])
def test_a_distill_tab_job_with_a_recipe_trains_what_distill_recipe_trains(name, tmp_path, monkeypatch):
    """The Distill form filled in for recipe R (its Recipe dropdown's handler) and launched trains
    the configuration of ``python -m kd_core distill --recipe R``. A teacher too large to ship
    (resnet50) is stood in for by a copy of a shipped CIFAR-10 teacher under its name."""
    import shutil

    import app
    from kd_core.jobs.spec import JobSpec, run_spec, validate_spec

    checkpoints = Path(__file__).resolve().parents[1] / "checkpoints"
    teacher_name = recipes.get(name).teacher
    if not (checkpoints / f"{teacher_name}.safetensors").exists():
        assert not recipes.get(teacher_name).shipped, f"{teacher_name} should be shipped"
        stand_in = tmp_path / "checkpoints"
        stand_in.mkdir()
        shutil.copy(checkpoints / "deepnn.safetensors", stand_in / f"{teacher_name}.safetensors")
        checkpoints = stand_in
        monkeypatch.setattr(app, "CHECKPOINTS", stand_in)
        monkeypatch.setattr("kd_core.cli.CHECKPOINT_DIR", stand_in)
    teacher, student, data, *numbers = (update["value"] if isinstance(update, dict) else update
                                        for update in app.recipe_form(name))
    assert data in app.DATA_SOURCES and (data == "digits") == (recipes.get(name).data == "digits")
    request = app.job_request(teacher, student, data, *numbers, "", name)
    job = run_spec(validate_spec(JobSpec.from_dict(request), checkpoints), "job", checkpoints, tmp_path / "state")
    cli = resolve_run(build_parser().parse_args(["distill", "--recipe", name]), distill=True)
    assert job.config == cli.config
    assert (job.arch, job.arch_args, job.role, job.recipe, job.weights_dtype, job.teacher.name) == \
        (cli.arch, cli.arch_args, cli.role, cli.recipe, cli.weights_dtype, cli.teacher.name)


def test_a_recipe_whose_teacher_is_not_shipped_says_how_to_train_it(tmp_path, monkeypatch):
    import gradio as gr

    import app

    monkeypatch.setattr(app, "CHECKPOINTS", tmp_path)  # a folder without lightnn-kd's deepnn
    with pytest.raises(gr.Error, match=r"distils from deepnn, which is not in the checkpoints folder: .*"
                                       r"python -m kd_core train --recipe deepnn"):
        app.recipe_form("lightnn-kd")


def test_every_shipped_checkpoint_is_its_recipe_unchanged():
    """What ships was trained by exactly its recipe, settings since removed included (they held
    their no-op values), so its command is the recipe's own."""
    from kd_core.checkpoint import read_metadata

    shipped = sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*.safetensors"))
    assert shipped
    for path in shipped:
        meta = read_metadata(path)
        assert reproduce_command(meta) == recipes.get(meta["recipe"]).command, path.name
        for setting, value in REMOVED_SETTINGS.items():
            assert meta["config"].get(setting, value) == value


def test_the_distill_tab_offers_only_recipes_whose_teacher_is_in_the_folder(tmp_path, monkeypatch):
    """A recipe whose teacher is absent (resnet50, too large to ship) is not offered, so a pick
    cannot leave the form on a recipe it could not fill in; it appears once the teacher is there."""
    import shutil

    import app

    monkeypatch.setattr(app, "CHECKPOINTS", tmp_path)
    assert app.offered_recipes() == [app.NO_RECIPE]
    assert app.recipe_choices("lightnn-kd")["value"] == app.NO_RECIPE
    shutil.copy(Path(__file__).resolve().parents[1] / "checkpoints" / "deepnn.safetensors", tmp_path)
    offered = app.offered_recipes()
    assert offered == [app.NO_RECIPE, "lightnn-kd"]
    update = app.recipe_choices("lightnn-kd")
    assert update["choices"] == offered and update["value"] == "lightnn-kd"
