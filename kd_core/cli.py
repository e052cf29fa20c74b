"""``python -m kd_core``: train, distill, evaluate, study, import, export, benchmark, list, recipes, models.

Every failure the user can cause (an unknown model, a missing data set, an impossible value, a
broken checkpoint) ends in one line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import weakref
from pathlib import Path

from . import distributed, models
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .data import DataError, load_data
from .experiments import recipes
from .losses import LOSSES
from .runtime import reuse_freed_memory
from .training import TqdmProgress
from .training.config import parse_setting, with_overrides

LOSS_TERMS = tuple(LOSSES.names())
CHECKPOINT_DIR = recipes.CHECKPOINTS
# The everyday settings that have a flag of their own (flag destination -> setting); every other
# setting is reached with --set NAME=VALUE.
NAMED_SETTINGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
                  "label_smoothing": "label_smoothing", "seed": "seed", "limit": "limit", "device": "device",
                  "eval_every": "eval_every", "crop_padding": "augment.crop_padding", "rotation": "augment.rotation",
                  "color_jitter": "augment.color_jitter", "cutout": "augment.cutout", "mix": "augment.mix",
                  "mix_alpha": "augment.mix_alpha", "temperature": "temperature",
                  "teacher_views": "teacher_views", "validation": "validation"}


class UsageError(Exception):
    pass


def _add_training_options(parser: argparse.ArgumentParser, distill: bool) -> None:
    what = parser.add_argument_group("what to train")
    what.add_argument("--recipe", help="a named recipe (see `python -m kd_core recipes`); other options override its fields")
    what.add_argument("--student" if distill else "--model", dest="arch", metavar="ARCH",
                      help=f"architecture from the model zoo: {', '.join(models.list_models())}; or timm:NAME "
                           "for any timm architecture (e.g. timm:resnet18)")
    what.add_argument("--arch-arg", action="append", default=[], metavar="NAME=VALUE", dest="arch_args",
                      help="an argument of the architecture (JSON values: --arch-arg output_stride=8 "
                           "--arch-arg 'widths=[24,40,64]'); repeatable")
    if distill:
        what.add_argument("--teacher", type=Path, help="teacher checkpoint (.safetensors); with --recipe, "
                          "defaults to checkpoints/<teacher recipe>.safetensors")
    what.add_argument("--data", help="cifar10 | mnist | folder:PATH (a train/ + test/ image-folder tree or a "
                      ".tar.gz of one); default: the recipe's, else cifar10")
    what.add_argument("--output", "-o", type=Path, help="checkpoint to write (default checkpoints/<name>.safetensors)")
    what.add_argument("--log-dir", type=Path, help="also write TensorBoard curves here (tensorboard --logdir DIR)")
    what.add_argument("--name", help="model name recorded in the checkpoint (default: recipe or arch)")
    what.add_argument("--run-dir", type=Path, help="folder for the resumable state (default runs/<name>); "
                      "an interrupted run resumes from its last finished epoch")
    what.add_argument("--fresh", action="store_true", help="ignore and replace any resumable state in --run-dir")
    what.add_argument("--weights-dtype", choices=("float32", "float16"),
                      help="how the checkpoint stores parameters (default: the recipe's, else float32); float16 "
                      "halves the file, and the recorded metrics are measured on the rounded weights")
    what.add_argument("--cache-dir", type=Path, help="where decoded data sets are cached (default ~/.cache/kd_core "
                      "or $KD_CACHE_DIR)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help="passes over the training set (>= 1)")
    opt.add_argument("--batch-size", type=int, help="images per step")
    opt.add_argument("--lr", type=float, help="peak learning rate")
    opt.add_argument("--weight-decay", type=float, help="L2 weight decay")
    opt.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing in [0, 1)")
    opt.add_argument("--seed", type=int, help="random seed (model init, data order, augmentation)")
    opt.add_argument("--limit", type=int, help="train on a random subset of N training images")
    opt.add_argument("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    opt.add_argument("--no-amp", action="store_true", help="train in float32 (default: bf16 on capable CPUs, fp16 on CUDA)")
    opt.add_argument("--eval-every", type=int, help="evaluation every N epochs (0: only at the end)")
    opt.add_argument("--validation", type=int, metavar="N",
                     help="hold N training images out (stratified, the same for every run) and evaluate on them "
                          "instead of the test split: for choosing methods and settings (0: the test split)")

    opt.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                     help="set any training setting by name, checked against kd_core.training.TrainConfig (e.g. "
                          "--set schedule=onecycle --set augment.cutout=8 --set mirror_views=true); repeatable")

    aug = parser.add_argument_group("augmentation (on whole batches)")
    aug.add_argument("--crop-padding", type=int, help="random crop after reflect padding by N pixels (0: off)")
    aug.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    aug.add_argument("--rotation", type=float, help="random rotation up to N degrees")
    aug.add_argument("--color-jitter", type=float, help="brightness/contrast/saturation jitter strength")
    aug.add_argument("--cutout", type=int, help="zero a random N x N square")
    aug.add_argument("--mix", choices=("none", "mixup", "cutmix"),
                     help="blend each image with a random partner first (with a teacher bank: the exact mixed "
                          "view the teacher scored); cross-entropy weighs both labels")
    aug.add_argument("--mix-alpha", type=float, help="mixing shares drawn from Beta(a, a) (default 1)")

    if distill:
        loss = parser.add_argument_group(
            "distillation objective: loss = sum of weight x term (Hinton's alpha mix is --ce 1-a --kd a)")
        loss.add_argument("--ce", type=float, help="weight of cross-entropy with the labels; without a recipe and without any weight given, "
                          "distill uses --ce 0.25 --kd 0.75")
        loss.add_argument("--kd", type=float, help="weight of Hinton KD, KL(softmax(t/T) || softmax(s/T)) * T^2")
        loss.add_argument("--dkd", type=float, help="weight of decoupled KD (Zhao et al. 2022): target-class and "
                          "non-target-class terms weighted apart (--set dkd_alpha=1 --set dkd_beta=8)")
        loss.add_argument("--feature", type=float, help="weight of the FitNets hint (MSE through a 1x1 adapter)")
        loss.add_argument("--cam", type=float, help="weight of CAM alignment (CAM-KD)")
        loss.add_argument("--cosine", type=float, help="weight of the tutorial's cosine hidden-representation loss")
        loss.add_argument("--at", type=float, help="weight of attention transfer")
        loss.add_argument("--temperature", "-T", type=float, help="KD temperature T > 0")
        loss.add_argument("--teacher-views", type=int, metavar="N",
                          help="0: run the teacher at every step; N: run it once on N random augmented views of "
                               "every training image, keep its outputs in the cache folder and train on those views "
                               "(much faster with a large teacher)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kd_core", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a teacher or a baseline student (cross-entropy)",
                                description="Train a model on labels alone (a teacher, or a student baseline).")
    _add_training_options(train, distill=False)
    distill = commands.add_parser("distill", help="distil a teacher checkpoint into a student",
                                  description="Distil a teacher into a student with any weighted mix of losses.")
    _add_training_options(distill, distill=True)

    evaluate = commands.add_parser("evaluate", help="measure checkpoints on a data set's test split",
                                   description="Top-1/top-5, per-class accuracy, confusion matrix, cost, and "
                                               "agreement with a teacher.")
    evaluate.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files")
    evaluate.add_argument("--data", help="data source (default: the one recorded in each checkpoint)")
    evaluate.add_argument("--teacher", type=Path, help="teacher checkpoint for agreement (default: the recorded one, "
                          "when it lies beside the student)")
    evaluate.add_argument("--speed", action="store_true", help="also measure CPU latency (batch 1 and 256) and peak memory")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of text")
    evaluate.add_argument("--record", action="store_true",
                          help="write the measurements (per-class accuracy, confusion, top-5, and with --speed "
                               "latency and memory) into each checkpoint's metadata")
    evaluate.add_argument("--sample", type=Path, metavar="FILE",
                          help="with --record: also record each checkpoint's predictions on this image sample "
                               "(the dashboard's assets/cifar10-test-sample.safetensors), so the Models tab "
                               "shows its mistakes without running it")
    evaluate.add_argument("--cache-dir", type=Path)

    listing = commands.add_parser("list", help="describe the checkpoints in a folder")
    listing.add_argument("directory", nargs="?", type=Path, default=CHECKPOINT_DIR)
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--markdown", action="store_true",
                         help="print the README's results table (cost, accuracy, method, command) for the folder")

    study = commands.add_parser(
        "study", help="train one recipe several ways (ablation, temperature sweep, seeds) and tabulate",
        description="Run a study of a recipe and print a Markdown table of test top-1 (mean ± std over seeds). "
                    "Finished runs are kept in the output folder, so an interrupted study resumes.")
    study.add_argument("kind", choices=("ablation", "temperature", "seeds", "gain"),
                       help="ablation: CE / KD / CAM / KD+CAM / KD+feature; temperature: the recipe at each "
                            "--temperatures; seeds: the recipe as it is; gain: the recipe against its "
                            "cross-entropy twin, with the difference's 95%% confidence interval")
    study.add_argument("--recipe", required=True, help="the recipe to vary (see `python -m kd_core recipes`)")
    study.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every variant runs once per seed")
    study.add_argument("--temperatures", type=float, nargs="+", default=[1, 2, 3, 4, 6, 8],
                       help="KD temperatures for the temperature study")
    study.add_argument("--feature-weight", type=float, default=1.0, help="weight of the FitNets hint in the ablation")
    study.add_argument("--teacher", type=Path, help="teacher checkpoint (default: the recipe's, in checkpoints/)")
    study.add_argument("--data", help="data source (default: the recipe's)")
    study.add_argument("--output", "-o", type=Path,
                       help="study folder for checkpoints and results (default runs/study/<recipe>-<kind>)")
    study.add_argument("--epochs", type=int, help="override the recipe's epochs")
    study.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="CHECKPOINT",
                       help="finished checkpoints (e.g. the shipped ones) to record instead of retraining a run "
                            "whose architecture, data, teacher and settings they match exactly")
    study.add_argument("--limit", type=int, help="train on a random subset of N training images")
    study.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                       help="change any setting of the recipe before its variants are made (see train --help)")
    study.add_argument("--twin-set", action="append", default=[], metavar="NAME=VALUE", dest="twin_settings",
                       help="gain study: a setting of the cross-entropy twin only (its best cross-entropy "
                            "settings, e.g. --twin-set lr=0.05); repeatable")
    study.add_argument("--validation", type=int, metavar="N",
                       help="score every run on N training images held out (stratified, fixed) instead of the "
                            "test split: for choosing a method")
    study.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    study.add_argument("--cache-dir", type=Path)
    study.add_argument("--log-dir", type=Path, help="also write each run's TensorBoard curves to DIR/<run name>")

    bring = commands.add_parser(
        "import", help="bring weights trained elsewhere in as a checkpoint (a teacher, usually)",
        description="Read a state dict (.safetensors, or .pt/.pth through torch.load(weights_only=True): tensors "
                    "only, never arbitrary unpickling), fit it to an architecture (wrapper prefixes such as "
                    "module. and model. are removed), check every tensor's name and shape, evaluate the model on "
                    "the data set's test split and write a self-describing checkpoint.")
    bring.add_argument("--arch", required=True, help="zoo architecture, or timm:NAME")
    bring.add_argument("--arch-arg", action="append", default=[], metavar="NAME=VALUE", dest="arch_args",
                       help="an argument of the architecture (JSON values); repeatable")
    bring.add_argument("--weights", required=True, type=Path, help=".safetensors, .pt or .pth state dict")
    bring.add_argument("--data", required=True, help="the data set it was trained on (cifar10 | folder:PATH | ...)")
    bring.add_argument("--name", required=True, help="checkpoint name (written to checkpoints/NAME.safetensors)")
    bring.add_argument("--output", "-o", type=Path, help="checkpoint to write instead")
    bring.add_argument("--role", choices=("teacher", "student"), default="teacher")
    bring.add_argument("--mean", type=float, nargs="+", help="normalization mean per channel (default: the data set's)")
    bring.add_argument("--std", type=float, nargs="+", help="normalization std per channel (default: the data set's)")
    bring.add_argument("--classes", help="comma-separated class names for the outputs, in order (default: the data set's)")
    bring.add_argument("--cache-dir", type=Path)

    from .export import add_arguments as add_export_arguments

    add_export_arguments(commands.add_parser(
        "export", help="export a checkpoint to ONNX (optionally int8) and measure it in ONNX Runtime",
        description="Write an ONNX model, check it against PyTorch on the test split, optionally quantize it to "
                    "int8, and print a table of size, accuracy, agreement and latency."))

    from .bench import add_arguments as add_benchmark_arguments

    add_benchmark_arguments(commands.add_parser(
        "benchmark", help="time the engine against the usual training loop and the machine's peak",
        description="Measure, in one run: the reference training loop against the engine (live teacher and teacher "
                    "bank), the machine's dense-kernel peak and each row's share of it, explain latency, and every "
                    "shipped checkpoint's evaluation throughput and batch-1 latency. A probe subcommand runs one "
                    "measurement alone."))
    commands.add_parser("recipes", help="list the named recipes and the command that runs each")
    commands.add_parser("models", help="list the model zoo with parameter counts for 3x32x32 input")
    return parser


# ---------------------------------------------------------------------------------------------
# train / distill


def _overrides(args: argparse.Namespace, recipe: recipes.Recipe, distill: bool) -> dict:
    """The settings the command line changes in ``recipe``: named flags, then every ``--set``."""
    overrides = {setting: getattr(args, flag) for flag, setting in NAMED_SETTINGS.items()
                 if getattr(args, flag, None) is not None}
    if args.no_amp:
        overrides["amp"] = False
    if args.no_flip:
        overrides["augment.flip"] = False
    if distill:
        given = {term: getattr(args, term) for term in LOSS_TERMS if getattr(args, term) is not None}
        if given:  # a recipe's other terms stay; with no recipe, only the terms given
            overrides["loss_weights"] = {**(recipe.config.loss_weights if recipe.named else {}), **given}
    for assignment in args.settings:
        name, value = parse_setting(assignment)
        overrides[name] = value
    return overrides


def resolve_run(args: argparse.Namespace, distill: bool):
    """What ``train``/``distill`` would run for these arguments (a :class:`kd_core.run.RunSpec`)."""
    if args.recipe is None and args.arch is None:
        raise UsageError(f"say which model to train: --{'student' if distill else 'model'} ARCH or --recipe NAME")
    recipe = recipes.get(args.recipe) if args.recipe else recipes.Recipe.custom(args.arch, distill)
    if args.arch is not None:
        models.factory(args.arch)  # unknown names fail here, before any data is loaded
    if not distill and recipe.teacher:
        raise UsageError(f"recipe {recipe.name} distils from {recipe.teacher}: use `distill --recipe {recipe.name}`")
    teacher = getattr(args, "teacher", None)
    if distill and teacher is None and recipe.teacher:  # distill always has a teacher, even for a CE-only objective
        teacher = CHECKPOINT_DIR / f"{recipe.teacher}.safetensors"
        if not teacher.exists():  # a teacher too large to ship (Recipe.shipped), or deleted
            raise UsageError(f"{recipes.absent_teacher(recipe, str(CHECKPOINT_DIR))} or name another with --teacher")
    spec = recipe.run_spec(_overrides(args, recipe, distill), arch=args.arch, teacher=teacher,
                           data=args.data, name=args.name, output=args.output,
                           state_path=args.run_dir / "resume.safetensors" if args.run_dir else None,
                           cache_dir=args.cache_dir, weights_dtype=args.weights_dtype)
    if distill and spec.teacher is None:
        raise UsageError("distill needs --teacher CHECKPOINT")
    spec.arch_args.update(parse_arch_args(args.arch_args))
    return spec


def parse_arch_args(assignments: list[str]) -> dict:
    """``["output_stride=8", "name=x"]`` -> ``{"output_stride": 8, "name": "x"}`` (JSON values, else text)."""
    parsed = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"--arch-arg takes NAME=VALUE, got {assignment!r}")
        try:
            parsed[name] = json.loads(text)
        except json.JSONDecodeError:
            parsed[name] = text
    return parsed


def _callbacks(log_dir: Path | None, stream=None) -> list:
    callbacks = [TqdmProgress(stream=stream)]
    if log_dir is not None:
        from .training.tensorboard import TensorBoardLogger

        callbacks.append(TensorBoardLogger(log_dir))
    return callbacks


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM for a command that trains, as a context manager whose instance is
    ``run``'s ``stop_hook``: a signal asks the running trainer to stop after its current step,
    keeping its per-epoch state for a rerun to resume; a run that starts after it (a study's next run)
    stops before its first step; a second signal stops at once. The handlers hold no trainer past
    its run (a weak reference) and are put back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._trainer = lambda: None
        self._saved = {}

    def __enter__(self) -> "StopOnSignal":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def __call__(self, trainer) -> None:
        self._trainer = weakref.ref(trainer)
        if self.requested:
            trainer.request_stop()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nstopping after this step (signal {signum}; again to stop at once); rerun the same command to resume",
              file=sys.stderr)
        trainer = self._trainer()
        if trainer is not None:
            trainer.request_stop()


def _train(args: argparse.Namespace, distill: bool) -> int:
    from .run import run

    spec = resolve_run(args, distill)
    run_dir = spec.state_path.parent
    main_process = distributed.is_main()  # under torchrun, one process prints and logs for the run
    if args.fresh and run_dir.exists() and main_process:
        shutil.rmtree(run_dir)
    distributed.barrier()  # no process looks for resumable state before --fresh removed it

    with StopOnSignal() as stop_hook:
        result, path = run(spec, callbacks=_callbacks(args.log_dir) if main_process else [], stop_hook=stop_hook)
    if path is None:
        if main_process:
            print(f"stopped after {result.epochs_done} epoch(s); state kept in {run_dir}" if result.epochs_done
                  else "stopped before the first epoch finished")
        return 130
    if main_process:
        print(f"wrote {path}: {result.evaluated_on} top-1 {result.test_top1:.2f}% in {result.train_seconds / 60:.1f} min "
              "of training")
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate / list


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import (agreement, cam_agreement, classification_report, predict, predict_views,
                             teacher_class_maps)
    from .profile import count_macs, count_parameters, measure_latency, measure_peak_memory

    reports, teachers = [], {}
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        source = args.data or checkpoint.meta["data"]["source"]
        data = load_data(source, cache_dir=args.cache_dir)
        if data.classes != checkpoint.classes:
            raise UsageError(f"{path.name} was trained on other classes than {source} has")
        logits, single = predict_views(checkpoint.model, data.test.images, checkpoint.mean, checkpoint.std)
        report = {"checkpoint": str(path), "data": source, **classification_report(logits, data.test.labels),
                  "recorded_top1": checkpoint.meta.get("metrics", {}).get("test_top1"),
                  **({"top1_single_view": classification_report(single, data.test.labels)["top1"]}
                     if single is not None else {}),
                  "params": count_parameters(checkpoint.model),
                  "macs": count_macs(checkpoint.model, tuple(checkpoint.meta["data"]["input_size"])),
                  "file_size": path.stat().st_size, "classes": checkpoint.classes}
        teacher_path = args.teacher
        recorded = checkpoint.meta.get("teacher")
        if teacher_path is None and recorded and (path.parent / recorded["file"]).exists():
            teacher_path = path.parent / recorded["file"]
        if teacher_path is not None:
            key = (Path(teacher_path).resolve(), source)
            if key not in teachers:  # one teacher pass (logits and CAMs) for all its students
                teacher = load_checkpoint(teacher_path)
                teachers[key] = (teacher, predict(teacher.model, data.test.images, teacher.mean, teacher.std),
                                 teacher_class_maps(teacher.model, data.test.images, (teacher.mean, teacher.std)))
            teacher, teacher_logits, teacher_maps = teachers[key]
            report["teacher"] = str(teacher_path)
            report.update(agreement(logits, teacher_logits))
            report.update(cam_agreement(checkpoint.model, teacher.model, data.test.images,
                                        (checkpoint.mean, checkpoint.std), (teacher.mean, teacher.std),
                                        teacher_maps=teacher_maps) or {})
        if args.sample is not None:
            from .dashboard.models_tab import load_sample
            from .evaluation import sample_predictions
            sample = load_sample(args.sample)
            if sample.classes == checkpoint.classes:
                predicted = sample_predictions(checkpoint, sample.images, sample.sha256)
                report["sample_predictions"] = {"sample_sha256": sample.sha256, "predictions": predicted.tolist()}
        if args.speed:
            shape = tuple(checkpoint.meta["data"]["input_size"])
            report["latency_ms_batch1"] = measure_latency(checkpoint.model, shape, 1)
            report["latency_ms_batch256"] = measure_latency(checkpoint.model, shape, 256, repeats=5, warmup=1)
            report["peak_memory_bytes_batch256"] = measure_peak_memory(checkpoint.model, shape, 256)
        reports.append(report)
        if args.record:
            _record(path, report)
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    for report in reports:
        print(f"{report['checkpoint']} on {report['data']} (test split)")
        print(f"  top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  (recorded: {report['recorded_top1']})"
              + (f"; single view (no test-time augmentation) {report['top1_single_view']:.2f}%"
                 if "top1_single_view" in report else ""))
        print(f"  params {report['params']:,}  MACs {report['macs']:,}  file {report['file_size'] / 1e6:.2f} MB")
        if "top1_agreement" in report:
            print(f"  vs teacher {report['teacher']}: top-1 agreement {report['top1_agreement']:.2f}%, "
                  f"KL(teacher||student) {report['kl_teacher_student']:.4f}")
        if "cam_correlation_mean" in report:
            print(f"  CAMs vs teacher (teacher's class, {report['cam_images']:,} images): correlation mean "
                  f"{report['cam_correlation_mean']:.3f}, median {report['cam_correlation_median']:.3f}; "
                  f"top-20% IoU mean {report['cam_top_region_iou_mean']:.3f}")
        if "latency_ms_batch1" in report:
            memory = report["peak_memory_bytes_batch256"]
            print(f"  CPU latency: batch 1 {report['latency_ms_batch1']:.2f} ms, batch 256 "
                  f"{report['latency_ms_batch256']:.1f} ms; peak memory (batch 256) "
                  f"{'n/a' if memory is None else f'{memory / 1e6:.1f} MB'}")
        width = max(len(name) for name in report["classes"])
        print("  per class: " + ", ".join(f"{name} {accuracy:.1f}%" for name, accuracy in
                                          zip(report["classes"], report["per_class"])))
        print("  confusion (rows: true, columns: predicted):")
        for name, row in zip(report["classes"], report["confusion"]):
            print(f"    {name:>{width}} " + " ".join(f"{count:5d}" for count in row))
    return 0


def _record(path: Path, report: dict) -> None:
    from .checkpoint import update_metadata

    recorded = report["recorded_top1"]
    if recorded is not None and abs(recorded - report["top1"]) > 0.1:
        raise UsageError(f"{path.name}: measured top-1 {report['top1']:.2f}% differs from the recorded {recorded}%; "
                         "not recording (evaluated on another data set?)")
    keys = ("top5", "top1_single_view", "per_class", "confusion", "latency_ms_batch1", "latency_ms_batch256",
            "peak_memory_bytes_batch256", "top1_agreement", "kl_teacher_student", "cam_correlation_mean",
            "cam_correlation_median", "cam_top_region_iou_mean")
    metrics = {(f"test_{key}" if key in ("top5", "top1_single_view") else key): report[key]
               for key in keys if key in report}
    if "teacher" in report:  # what the agreement figures compare with
        metrics["agreement_teacher"] = Path(report["teacher"]).stem
    if "latency_ms_batch1" in metrics:
        import torch
        metrics["latency_device"] = f"cpu, {torch.get_num_threads()} threads"
    update_metadata(path, {"metrics": metrics, **({"sample_predictions": report["sample_predictions"]}
                                                   if "sample_predictions" in report else {})})
    print(f"recorded measurements in {path}")


def _list(args: argparse.Namespace) -> int:
    if not args.directory.is_dir():
        raise UsageError(f"no folder {args.directory}")
    rows = list_checkpoints(args.directory)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.markdown:
        print(_markdown_table(rows))
        return 0
    if not rows:
        print(f"no checkpoints in {args.directory}")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<20} UNUSABLE: {row['error']}")
            continue
        meta = row["meta"]
        metrics = meta.get("metrics", {})
        teacher = (meta.get("teacher") or {}).get("name", "-")
        minutes = meta.get("train_seconds", 0) / 60
        print(f"{row['name']:<20} {meta['arch']:<16} {meta.get('role', '?'):<8} {metrics.get('params', 0):>10,} params "
              f"{_top1_text(metrics):>10}  {meta.get('method', '?'):<14} teacher {teacher:<12} "
              f"{minutes:5.1f} min  {row['file_size'] / 1e6:6.2f} MB")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .experiments.study import StudyStopped, run_study

    main_process = distributed.is_main()  # under torchrun, one process prints and logs for the study
    recipe = recipes.get(args.recipe)
    overrides = {key: getattr(args, key) for key in ("epochs", "limit", "device", "validation")
                 if getattr(args, key) is not None}
    overrides.update(parse_setting(assignment) for assignment in args.settings)
    config = with_overrides(recipe.config, overrides).validate()
    twin_overrides = dict(parse_setting(assignment) for assignment in args.twin_settings)
    if twin_overrides and args.kind != "gain":
        raise UsageError("--twin-set sets the cross-entropy twin of a gain study; this is a "
                         f"{args.kind} study")
    if args.kind == "temperature" and any(t <= 0 for t in args.temperatures):
        raise UsageError("temperatures must be > 0")
    teacher = args.teacher or (CHECKPOINT_DIR / f"{recipe.teacher}.safetensors" if recipe.teacher else None)
    folder = args.output or Path("runs") / "study" / f"{recipe.name}-{args.kind}"
    try:
        with StopOnSignal() as stop_hook:
            summary = run_study(args.kind, recipe, config, folder, args.seeds, teacher, args.data or recipe.data,
                                cache_dir=args.cache_dir, temperatures=args.temperatures,
                                feature_weight=args.feature_weight,
                                callbacks=lambda name: _callbacks(args.log_dir and args.log_dir / name, sys.stderr)
                                if main_process else [],
                                log=lambda line: print(line, file=sys.stderr) if main_process else None,
                                reuse=args.reuse, twin_overrides=twin_overrides, stop_hook=stop_hook)
    except StudyStopped as stopped:
        if main_process:
            print(f"{stopped}; rerun the same command to resume", file=sys.stderr)
        return 130
    if main_process:
        print(summary)
    return 0


def reproduce_command(meta: dict) -> str | None:
    """The command that retrains a checkpoint from its metadata: its recipe's command plus a flag for
    every setting that differs from the recipe (a named flag where there is one, else ``--set``);
    None when no recipe made it."""
    found = recipes.differences(meta)
    if found is None:
        return None
    recipe, changed, arch_args_differ = found
    flags = {setting: flag for flag, setting in NAMED_SETTINGS.items()}
    if not recipe.teacher:  # train has no distillation flags
        flags = {setting: flag for setting, flag in flags.items() if setting not in ("temperature", "teacher_views")}
    parts = [recipe.command]
    for setting, value in changed.items():
        if setting in flags and value is not None:
            parts.append(f"--{flags[setting].replace('_', '-')} {value:g}" if isinstance(value, float) else
                         f"--{flags[setting].replace('_', '-')} {value}")
        elif (setting, value) in (("amp", False), ("augment.flip", False)):
            parts.append("--no-amp" if setting == "amp" else "--no-flip")
        else:
            text = value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else json.dumps(value)
            parts.append(f"--set {shlex.quote(f'{setting}={text}')}")
    return " ".join(parts) + (" (and other architecture arguments)" if arch_args_differ else "")


def _top1_text(metrics: dict) -> str:
    """``78.49%`` on the test split; ``78.80% val`` for a run scored only on held-out training images."""
    if "test_top1" in metrics:
        return f"{metrics['test_top1']:.2f}%"
    if "validation_top1" in metrics:
        return f"{metrics['validation_top1']:.2f}% val"
    return "-"


def _single_view_text(metrics: dict) -> str:
    """`` (86.9% single view)`` for a net whose top-1 is test-time augmented, else nothing."""
    single = metrics.get("test_top1_single_view")
    return "" if single is None else f" ({single:.2f}% single view)"


def _markdown_table(rows: list[dict]) -> str:
    lines = ["| checkpoint | role | params | MACs | file | test top-1 | method | teacher | training | "
             "CPU batch-1 latency | command | source project (original CIFAR-10) |", "|---" * 12 + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | unusable: {row['error']} |" + " |" * 10)
            continue
        meta, metrics = row["meta"], row["meta"].get("metrics", {})
        latency = metrics.get("latency_ms_batch1")
        command = reproduce_command(meta)
        name = meta.get("recipe")
        published = recipes.get(name).published if name in recipes.RECIPES else None
        lines.append(
            f"| {row['name']} | {meta.get('role', '?')} | {metrics.get('params', 0):,} | {metrics.get('macs', 0) / 1e6:.1f} M "
            f"| {row['file_size'] / 1e6:.2f} MB | {_top1_text(metrics)}"
            f"{_single_view_text(metrics)} | {meta.get('method', '?')} "
            f"| {(meta.get('teacher') or {}).get('name', '-')} "
            f"| {_training_time(meta)} "
            f"| {'-' if latency is None else f'{latency:.2f} ms'} | {f'`{command}`' if command else '-'} "
            f"| {published or '-'} |")
    return "\n".join(lines)


def _training_time(meta: dict) -> str:
    """``8.5 min, 20 epochs`` (+ the teacher bank's build, by this run or by the earlier one whose
    cached bank it reused)."""
    text = f"{meta.get('train_seconds', 0) / 60:.1f} min, {meta.get('config', {}).get('epochs', '?')} epochs"
    if meta.get("teacher_bank_seconds"):
        config = meta["config"]
        views = (f"{config['teacher_views']} views"
                 + (" + mirrors" if config.get("mirror_views") else ""))
        reused = ", built by an earlier run" if meta.get("teacher_bank_reused") else ""
        text += f" + {meta['teacher_bank_seconds'] / 60:.1f} min teacher bank ({views}{reused})"
    return text


def _import(args: argparse.Namespace) -> int:
    from .importer import import_weights

    output = args.output or CHECKPOINT_DIR / f"{args.name}.safetensors"
    classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
    imported = import_weights(args.arch, args.weights, args.data, output, name=args.name,
                              arch_args=parse_arch_args(args.arch_args), mean=args.mean, std=args.std,
                              classes=classes, role=args.role, cache_dir=args.cache_dir)
    renamed = imported.meta["imported_from"]["renamed"]
    print(f"wrote {imported.path}: test top-1 {imported.meta['metrics']['test_top1']:.2f}%"
          + (f" (names fitted: {renamed})" if renamed else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import main as export_main

    return export_main(args)


def _benchmark(args: argparse.Namespace) -> int:
    from .bench import run as run_benchmark

    return run_benchmark(args)


def _recipes(args: argparse.Namespace) -> int:
    for name in recipes.names():
        recipe = recipes.get(name)
        teacher = recipes.get(recipe.teacher) if recipe.teacher in recipes.names() else None
        note = "   # not shipped (too large): this trains it" if not recipe.shipped else \
            f"   # after {teacher.command}" if teacher is not None and not teacher.shipped else ""
        print(f"{name:<16} {recipe.arch:<14} {recipe.config.epochs:>3} epochs  {recipe.description}\n"
              f"{'':<16} {recipe.command}{note}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .profile import count_parameters

    for name in models.list_models():
        print(f"{name:<16} {count_parameters(models.create(name)):>12,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": lambda: _train(args, False), "distill": lambda: _train(args, True),
                "evaluate": lambda: _evaluate(args), "study": lambda: _study(args), "list": lambda: _list(args),
                "recipes": lambda: _recipes(args), "models": lambda: _models(args),
                "import": lambda: _import(args), "export": lambda: _export(args),
                "benchmark": lambda: _benchmark(args)}
    if args.command in ("train", "distill", "study"):
        reuse_freed_memory()
    try:
        if args.command in ("train", "distill", "study"):
            distributed.init_from_env()  # under torchrun: one of WORLD_SIZE processes of one run (or study)
        return handlers[args.command]()
    except KeyError as error:  # registry lookups: unknown model, loss or recipe
        print(f"error: {error.args[0]}", file=sys.stderr)
    except (UsageError, ValueError, DataError, CheckpointError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
    finally:
        distributed.shutdown()
    return 2
