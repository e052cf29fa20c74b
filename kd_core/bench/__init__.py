"""``python -m kd_core benchmark``: how fast this distils, against the usual loop and the machine.

    python -m kd_core benchmark [--quick] [--epochs 10] [--views 2] [--json FILE] [--threads 2] [--time-to-accuracy 72]

measures everything in one run and prints it as tables (:mod:`.suite`: the reference loop, the
engine live and on a teacher bank, the machine's dense-kernel peak and each row's fraction of
it, explain latency, every shipped checkpoint's evaluation throughput and batch-1 latency).
``--quick`` is the CI run (a few steps of each, under two minutes); the figures in the README come
from a full run. ``--time-to-accuracy PCT`` then also distils deepnn -> lightnn both ways until the
test accuracy reaches PCT, teacher bank included (:mod:`.accuracy`): the engine over an
``--epochs``-epoch schedule, the reference loop for at most ``--max-epochs`` (default the same).
``--views`` sets the engine's bank size in both (default: each recipe's own, 8 or 16, made for 40 epochs
and more; a short run pays less for fewer).

    python -m kd_core benchmark {distill,explain,serve,models,scaling,cost} ...

are single probes (:mod:`.probes`): one distillation's step cost on random images, one Explain-tab
call, explain round trips through a served app under concurrent clients, the Models tab;
(:mod:`.scaling`) one run as 1 process x 2 threads against 2 processes x 1 thread under torchrun;
and (:mod:`.cost`) a teacher's and its students' inference cost, side by side, with the ratios.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..runtime import reuse_freed_memory
from .probes import bench_distill, bench_explain, bench_models, bench_serve, synthetic_photo, time_training

__all__ = ["add_arguments", "bench_distill", "bench_explain", "bench_models", "bench_serve", "main",
           "synthetic_photo", "time_training"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..explain import cam_methods
    from ..experiments import recipes

    parser.add_argument("--quick", action="store_true", help="a few steps of each row (CI: under two minutes)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the run whose cost is given (default 10)")
    parser.add_argument("--views", type=int,
                        help="teacher views of the engine's bank in that run (default: each recipe's own)")
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    parser.add_argument("--checkpoints", type=Path, default=recipes.CHECKPOINTS,
                        help="folder of the shipped checkpoints (default checkpoints/)")
    parser.add_argument("--data", default=recipes.CIFAR10_JPEG,
                        help="the recipes' data (an image-folder tree or a .tar.gz of one; default: the CIFAR-10 copy)")
    parser.add_argument("--cache-dir", type=Path, help="cache folder for decoded data (default KD_CACHE_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--time-to-accuracy", type=float, metavar="PCT",
                        help="also distil deepnn -> lightnn both ways until the test top-1 reaches PCT (the "
                             "published KD figure: 72) and report each wall time, teacher bank included")
    parser.add_argument("--max-epochs", type=int,
                        help="time to accuracy: the reference loop gives up after N epochs (default --epochs)")
    probes = parser.add_subparsers(dest="probe", metavar="{distill,explain,serve,models,scaling,cost}",
                                   help="run one probe instead of the whole benchmark")

    distill = probes.add_parser("distill", help="cost of a distillation step, live teacher vs teacher bank")
    distill.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint")
    distill.add_argument("--student", required=True, help="student architecture")
    for term, default in (("ce", 0.25), ("kd", 0.75), ("cam", 0.0)):
        distill.add_argument(f"--{term}", type=float, default=default, help=f"weight of the {term} term")
    distill.add_argument("--batch-size", type=int, default=256)
    distill.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    distill.add_argument("--views", type=int, default=8, help="teacher views of the bank (default 8)")
    distill.add_argument("--epochs", type=int, default=20, help="epochs of the run to cost (default 20)")
    distill.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    distill.add_argument("--system-malloc", action="store_true",
                         help="leave glibc's malloc as it is (training commands keep freed memory: kd_core.runtime)")
    explain = probes.add_parser("explain", help="latency of one Explain-tab call (teacher + student)")
    explain.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder")
    explain.add_argument("--teacher", required=True, help="teacher checkpoint name (file stem)")
    explain.add_argument("--student", required=True, help="student checkpoint name (file stem)")
    explain.add_argument("--method", default="gradcam", choices=cam_methods())
    explain.add_argument("--repeats", type=int, default=30, help="timed calls (default 30)")
    explain.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    explain.add_argument("--image", type=Path, help="image file (default: a synthetic 1024 x 768 photo)")
    serve = probes.add_parser("serve", help="explain round trips through a served app under concurrent clients")
    serve.add_argument("--url", help="a running app (default: start python app.py on --checkpoints)")
    serve.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="checkpoint folder to serve")
    serve.add_argument("--pid", type=int, help="the running app's pid, to report its memory growth")
    serve.add_argument("--teacher", default="airnet")
    serve.add_argument("--students", nargs="+", default=["camnet-kd-cam", "camnet-ce"])
    serve.add_argument("--clients", type=int, default=16)
    serve.add_argument("--calls", type=int, default=20, help="calls per client per round")
    serve.add_argument("--rounds", type=int, default=2)
    serve.add_argument("--image", type=Path, help="image file (default: a synthetic 1024 x 768 photo)")
    models = probes.add_parser("models", help="time the Models tab's details for every distilled checkpoint")
    models.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    models.add_argument("--sample", type=Path, default=Path("assets/cifar10-test-sample.safetensors"))
    scaling = probes.add_parser("scaling", help="one distillation run, 1 process x N threads against N processes "
                                                "x 1 thread (torchrun, Gloo)")
    scaling.add_argument("--recipe", default="lightnn-kd", help="the recipe to run (default lightnn-kd, live teacher)")
    scaling.add_argument("--processes", type=int, default=2, help="N (default 2, the cores here)")
    scaling.add_argument("--limit", type=int, default=10_000, help="training images (default 10,000)")
    scaling.add_argument("--epochs", type=int, default=2)
    cost = probes.add_parser("cost", help="a teacher's and its students' inference cost (parameters, MACs, file, "
                                          "CPU latency, peak memory) and the ratios")
    cost.add_argument("teacher", type=Path, help="teacher checkpoint")
    cost.add_argument("students", type=Path, nargs="+", help="student checkpoints")
    cost.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    cost.add_argument("--repeats", type=int, default=30, help="timed batch-1 passes (default 30; batch 256: a sixth)")
    cost.add_argument("--json", type=Path, help="also write the report here as JSON")


def run(args: argparse.Namespace) -> int:
    from . import probes

    if args.probe == "models":
        return probes._print_models(args)
    if args.probe == "serve":
        return probes._print_serve(args)
    if args.probe == "scaling":
        return _print_scaling(args)
    torch.set_num_threads(args.threads)
    if args.probe == "distill":
        tuned = not args.system_malloc and reuse_freed_memory()
        return probes._print_distill(args, "reusing freed memory" if tuned else "system")
    if args.probe == "explain":
        return probes._print_explain(args)
    if args.probe == "cost":
        return _print_cost(args)
    return _run_suite(args)


def _run_suite(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from . import suite

    reuse_freed_memory()  # as the training commands run
    try:
        report = suite.run(args.checkpoints, args.data, quick=args.quick, epochs=args.epochs, views=args.views,
                           cache_dir=args.cache_dir, progress=lambda line: print(f"- {line}", file=sys.stderr))
    except (ValueError, DataError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(suite.format_report(report))
    if args.time_to_accuracy is not None:
        from .accuracy import format_time_to_accuracy, time_to_accuracy

        try:
            report["time_to_accuracy"] = time_to_accuracy(
                "lightnn-kd", args.data, args.checkpoints, args.time_to_accuracy, args.epochs, args.max_epochs,
                args.views, args.cache_dir, log=lambda line: print(f"- {line}", file=sys.stderr))
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("\n" + format_time_to_accuracy(report["time_to_accuracy"]))
    if args.json:
        suite.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _print_scaling(args: argparse.Namespace) -> int:
    from .scaling import format_scaling, measure_scaling

    try:
        rows = measure_scaling(args.recipe, args.data, args.limit, args.epochs, args.processes, args.cache_dir)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_scaling(rows, args.recipe, args.limit, args.epochs))
    return 0


def _print_cost(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from .cost import format_cost, measure_cost, write_json

    try:
        report = measure_cost(args.teacher, args.students, args.repeats)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_cost(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_core benchmark", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
