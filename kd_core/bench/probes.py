"""Probes: the dashboard's latency and the cost of a distillation step, one thing at a time.

    python -m kd_core benchmark distill --teacher CHECKPOINT --student ARCH [--kd 0.75 --cam 1] \
        [--batch-size 256] [--steps 20] [--views 8] [--epochs 20] [--threads 2] [--system-malloc]

times training steps of one distillation two ways, with the teacher run at every step and with a
teacher bank (``--teacher-views``), plus the bank's build, on random images of the teacher's input
size, and prints what a run of ``--epochs`` epochs over 50,000 images costs each way.
Like the training commands it keeps freed memory for reuse (:mod:`kd_core.runtime`);
``--system-malloc`` measures glibc's default instead.

    python -m kd_core benchmark explain --checkpoints DIR --teacher NAME --student NAME \\
        [--method gradcam] [--repeats 30] [--threads 1] [--image PATH]

times whole :func:`kd_core.explain.pipeline.explain` calls as the app makes them: from an image file
(decoded every call) to probabilities, maps and overlays. The image is ``--image`` (e.g. one of
``assets/examples/``), else a synthetic 1024 x 768 JPEG (the Explain tab draws on it at 512 x 384,
decoding it at half scale).

    python -m kd_core benchmark serve [--url URL | --checkpoints DIR] [--clients 16] [--calls 20] [--rounds 2]

drives a served app over HTTP as concurrent visitors' pages would: each explains a photo
(``--image``, else the synthetic one) with the teacher and two students ``--calls`` times (upload,
queue, event stream; the overlays come inside the result). Without ``--url`` it starts ``python
app.py`` on ``--checkpoints`` itself. It prints, per round, errors by kind, median and
95th-percentile round trip, calls per second, and the server's memory growth (resident set size,
read from /proc, when the server's pid is known: started here or ``--pid``).

    python -m kd_core benchmark models [--checkpoints DIR] [--sample FILE]

times the Models tab's details for every checkpoint with a teacher, as the app computes them: the
first time (cold cache: both checkpoints loaded) and again.

``--threads`` limits torch and NumPy's BLAS (EigenCAM's SVD) alike. On a CPU shared with a
training job use one: two threads then fight the trainer for the cores and a call can take five to
ten times longer.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits  # installed with grad-cam (through scikit-learn)

from .. import models
from ..checkpoint import load_checkpoint
from ..data import AugmentConfig, DataBundle, Split
from ..explain import ModelCache, explain
from ..training import Callback, TrainConfig, Trainer


def bench_explain(checkpoint_dir: str | Path, teacher: str, student: str, image: str | Path,
                  method: str = "gradcam", repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Wall times in milliseconds of ``explain(image, [teacher, student], method)``: median, 95th
    percentile and min over ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cache = ModelCache(checkpoint_dir)
    checkpoints = [cache.get(teacher), cache.get(student)]
    timings = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        explain(image, checkpoints, method=method)
        if index >= warmup:
            timings.append(1000 * (time.perf_counter() - started))
    return {"median_ms": float(np.median(timings)), "p95_ms": float(np.percentile(timings, 95)),
            "min_ms": float(min(timings))}


BANK_BATCH = 500  # build_bank's default batch size


class _StepTimer(Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.bank_started: float | None = None
        self.bank_seconds = 0.0

    def on_bank_progress(self, trainer, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.bank_started is None:  # timing starts after the first batch, a warm-up
            self.bank_started = now
        self.bank_seconds = now - self.bank_started

    def on_train_start(self, trainer) -> None:
        self.stamps = [time.perf_counter()]

    def on_step_end(self, trainer, info) -> None:
        self.stamps.append(time.perf_counter())


def time_training(teacher: torch.nn.Module | None, student: torch.nn.Module, data: DataBundle, config: TrainConfig,
                  warmup: int = 3) -> dict[str, float]:
    """Seconds per training step of one epoch of ``config`` on ``data`` (the mean over the steps
    after ``warmup``: a steady state, data loading included) and, where ``config.teacher_views``
    asks for a teacher bank, the seconds per image-view of its build (after its first batch)."""
    timer = _StepTimer()
    trainer = Trainer(student, data, config, teacher=teacher, callbacks=[timer])
    trainer.fit()
    gaps = np.diff(timer.stamps)[warmup:]
    if len(gaps) == 0:
        raise ValueError(f"{len(timer.stamps) - 1} steps is too few to time after {warmup} warm-up steps")
    result = {"step_seconds": float(np.mean(gaps)), "median_step_seconds": float(np.median(gaps)),
              "needs_teacher": trainer.objective.needs_teacher}
    if config.teacher_views and trainer.objective.needs_teacher:
        count = len(trainer.train_split)
        timed_image_views = count * config.teacher_views - min(count, BANK_BATCH)
        result["bank_seconds_per_image_view"] = timer.bank_seconds / max(1, timed_image_views)
    return result


def bench_distill(teacher_path: str | Path, student: str, weights: dict[str, float], batch_size: int = 256,
                  steps: int = 20, views: int = 8, warmup: int = 3, seed: int = 0) -> dict[str, float]:
    """Milliseconds per training step with the live teacher and with a bank, and per image-view of
    the bank's build (medians over ``steps`` steps after ``warmup``), on random images of the
    teacher's input size. An objective without teacher terms (cross-entropy only) trains one way:
    only ``live_step_ms``."""
    if steps < 1 or views < 1 or batch_size < 1:
        raise ValueError("steps, views and batch size must be at least 1")
    teacher = load_checkpoint(teacher_path)
    channels, height, width = teacher.meta["data"]["input_size"]
    classes = teacher.classes
    generator = torch.Generator().manual_seed(seed)
    count = batch_size * (steps + warmup)

    def split(size: int) -> Split:
        return Split(torch.randint(0, 256, (size, channels, height, width), generator=generator, dtype=torch.uint8),
                     torch.randint(0, len(classes), (size,), generator=generator))

    data = DataBundle("random", split(count), split(batch_size), list(classes), teacher.mean, teacher.std)
    result = {}
    for mode, teacher_views in (("live", 0), ("banked", views)):
        config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, seed=seed, loss_weights=dict(weights),
                             teacher_views=teacher_views, augment=AugmentConfig(crop_padding=2, flip=True))
        torch.manual_seed(seed)
        model = models.create(student, **models.arch_args_for(student, len(classes), (channels, height, width)))
        timed = time_training(teacher.model, model, data, config, warmup)
        result[f"{mode}_step_ms"] = 1000 * timed["median_step_seconds"]
        if "bank_seconds_per_image_view" in timed:
            result["bank_ms_per_image_view"] = 1000 * timed["bank_seconds_per_image_view"]
        if not timed["needs_teacher"]:  # no term reads the teacher: one way to train
            break
    return result


def synthetic_photo(width: int = 1024, height: int = 768) -> Image.Image:
    """A smooth colour gradient with a bright disc: photo-sized, deterministic, compressible."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((rows - 0.4 * height) ** 2 + (columns - 0.6 * width) ** 2) < (0.15 * height) ** 2
    pixels = np.stack([columns / width, rows / height, 0.5 + 0.5 * disc], axis=-1)  # (H, W, 3)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def _print_distill(args: argparse.Namespace, malloc: str) -> int:
    weights = {term: getattr(args, term) for term in ("ce", "kd", "cam") if getattr(args, term) > 0}
    try:
        result = bench_distill(args.teacher, args.student, weights, args.batch_size, args.steps, args.views)
    except (ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images, epochs, views = 50_000, args.epochs, args.views
    steps = images / args.batch_size
    live = epochs * steps * result["live_step_ms"] / 60_000
    if "banked_step_ms" not in result:
        print(f"train {args.student} ({'+'.join(weights)}, no teacher term), batch {args.batch_size}, "
              f"{args.threads} thread(s), malloc {malloc}: {result['live_step_ms']:.0f} ms/step")
        print(f"{epochs} epochs of {images:,} images: {live:.1f} min")
        return 0
    build = images * views * result["bank_ms_per_image_view"] / 60_000
    banked = epochs * steps * result["banked_step_ms"] / 60_000
    print(f"distill {Path(args.teacher).stem} -> {args.student} ({'+'.join(weights)}), batch {args.batch_size}, "
          f"{args.threads} thread(s), malloc {malloc}: live teacher {result['live_step_ms']:.0f} ms/step, "
          f"banked {result['banked_step_ms']:.0f} ms/step, bank build "
          f"{result['bank_ms_per_image_view']:.2f} ms per image-view")
    print(f"{epochs} epochs of {images:,} images: live {live:.1f} min; {views}-view bank {build:.1f} min to build "
          f"+ {banked:.1f} min to train = {build + banked:.1f} min ({live / (build + banked):.1f}x)")
    return 0


def bench_models(checkpoint_dir: Path, sample: Path) -> dict[str, tuple[float, float]]:
    """Per student checkpoint, seconds of the Models tab's details: the first call (a fresh model
    cache) and the second."""
    from ..checkpoint import list_checkpoints
    from ..dashboard.models_tab import details

    cache = ModelCache(checkpoint_dir)
    timings = {}
    for row in list_checkpoints(checkpoint_dir):
        if "error" in row or not row["meta"].get("teacher"):
            continue
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            details(cache.get(row["name"]), cache.get, sample)
            seconds.append(time.perf_counter() - started)
        timings[row["name"]] = (seconds[0], seconds[1])
    return timings


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _start_app(checkpoints: Path, port: int):
    import os
    import subprocess
    import urllib.request

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "KD_CHECKPOINTS": str(checkpoints.resolve()), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
           "KD_RUNS": tempfile.mkdtemp(prefix="kd-bench-runs-")}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("app.py did not answer within 120 s")


class _ExplainClient:
    """One visitor of the served app, speaking Gradio's HTTP protocol as its page does: upload the
    image, join the queue for ``/explain``, read the event stream to the result, download the
    overlays. (Raw HTTP, not ``gradio_client``: that library's own work, on the same two cores,
    cost more than the server's and was counted in every round trip.)"""

    def __init__(self, url: str, image: Path, inputs: list) -> None:
        import httpx

        self.api = url.rstrip("/") + "/gradio_api"
        self.http = httpx.Client(timeout=120)
        self.image, self.inputs = image, inputs
        try:
            config = self.http.get(url.rstrip("/") + "/config").raise_for_status().json()
            self.fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "explain")
        except BaseException:
            self.http.close()
            raise
        self.session = uuid.uuid4().hex  # one page, one session, as a browser tab keeps it

    def explain(self) -> None:
        """One round trip; raises on any error (HTTP, protocol, or the app's own message)."""
        with open(self.image, "rb") as file:
            uploaded = self.http.post(f"{self.api}/upload", files={"files": (self.image.name, file)})
        path = uploaded.raise_for_status().json()[0]
        payload = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": self.image.name}
        joined = self.http.post(f"{self.api}/queue/join", json={"data": [payload, *self.inputs],
                                                                "fn_index": self.fn_index, "session_hash": self.session})
        event = joined.raise_for_status().json()["event_id"]
        result = None
        with self.http.stream("GET", f"{self.api}/queue/data", params={"session_hash": self.session}) as stream:
            stream.raise_for_status()
            # read to the stream's end (the server's close_stream), as a page does: a client that
            # hangs up first makes the server clean up the session's events, the next call's too
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") in ("unexpected_error", "server_stopped"):
                    raise RuntimeError(f"the server ended the call ({message['msg']}): {message.get('message')}")
                if message.get("msg") == "process_completed" and message.get("event_id") == event:
                    result = message
        if result is None:
            raise RuntimeError("the event stream ended before the result")
        if not result.get("success"):
            raise RuntimeError(f"the app answered with an error: {result.get('output')}")
        for value in result["output"]["data"]:  # files the page would fetch (data: URLs came inline)
            if isinstance(value, dict) and str(value.get("url")).startswith(("http://", "https://")):
                self.http.get(value["url"]).raise_for_status()

    def close(self) -> None:
        self.http.close()


def bench_serve(url: str, image: Path, teacher: str, students: list[str], clients: int = 16, calls: int = 20,
                rounds: int = 2, pid: int | None = None) -> list[dict[str, Any]]:
    """Rounds of ``clients`` concurrent visitors (:class:`_ExplainClient`) making ``calls`` explain
    calls each; per round the errors (and their kinds), median and p95 round trip (ms), calls per
    second and the server's RSS growth."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    inputs = [teacher, students, "gradcam", "each model's own prediction", 5, 0.5]
    pool = []
    try:
        for _ in range(clients):
            pool.append(_ExplainClient(url, Path(image), inputs))
        pool[0].explain()  # warm-up: models loaded, code paths taken once
        results = []
        start_rss = _rss_bytes(pid) if pid else None
        for _ in range(rounds):
            def work(client: _ExplainClient) -> tuple[list[float], Counter]:
                times, errors = [], Counter()
                for _ in range(calls):
                    started = time.perf_counter()
                    try:
                        client.explain()
                        times.append(1000 * (time.perf_counter() - started))
                    except Exception as error:  # counted by kind, not raised: the point is how many
                        errors[type(error).__name__] += 1
                return times, errors

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as executor:
                outcomes = list(executor.map(work, pool))
            elapsed = time.perf_counter() - started
            times = [value for outcome in outcomes for value in outcome[0]]
            errors = sum((outcome[1] for outcome in outcomes), Counter())
            rss = _rss_bytes(pid) if pid else None
            results.append({"calls": clients * calls, "errors": sum(errors.values()), "error_kinds": dict(errors),
                            "median_ms": float(np.median(times)) if times else float("nan"),
                            "p95_ms": float(np.percentile(times, 95)) if times else float("nan"),
                            "calls_per_second": len(times) / elapsed,
                            "rss_growth_mb": None if rss is None or start_rss is None else (rss - start_rss) / 1e6})
    finally:
        for client in pool:
            client.close()
    return results


def _print_serve(args) -> int:
    import socket

    image = args.image
    with tempfile.TemporaryDirectory() as scratch:
        if image is None:
            image = Path(scratch) / "synthetic.jpg"
            synthetic_photo().save(image, quality=90)
        process, url, pid = None, args.url, args.pid
        if url is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            process, url = _start_app(args.checkpoints, port)
            pid = process.pid
        try:
            with Image.open(image) as opened:
                size = f"{opened.width}x{opened.height}"
            idle = bench_serve(url, image, args.teacher, args.students, clients=1, calls=args.calls, rounds=1, pid=pid)
            loaded = bench_serve(url, image, args.teacher, args.students, args.clients, args.calls, args.rounds, pid)
        finally:
            if process is not None:
                import os
                import signal
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    print(f"explain {args.teacher} + {' + '.join(args.students)} through {url} ({size} image)")
    for label, rows in (("1 client (idle server)", idle), (f"{args.clients} clients", loaded)):
        for number, row in enumerate(rows, 1):
            growth = "n/a" if row["rss_growth_mb"] is None else f"{row['rss_growth_mb']:+.0f} MB"
            kinds = f" ({', '.join(f'{n} {kind}' for kind, n in row['error_kinds'].items())})" if row["errors"] else ""
            print(f"  {label}, round {number}: {row['calls']} calls, {row['errors']} errors{kinds}, median "
                  f"{row['median_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, {row['calls_per_second']:.1f} calls/s, "
                  f"server memory {growth}")
    return 0


def _print_models(args: argparse.Namespace) -> int:
    for name, (first, second) in bench_models(args.checkpoints, args.sample).items():
        print(f"models tab details of {name}: first {1000 * first:.0f} ms, again {1000 * second:.0f} ms")
    return 0


def _print_explain(args: argparse.Namespace) -> int:
    with threadpool_limits(limits=args.threads), tempfile.TemporaryDirectory() as scratch:
        image, label = args.image, str(args.image)
        if image is None:
            image, label = Path(scratch) / "synthetic.jpg", "synthetic"
            synthetic_photo().save(image, quality=90)
        try:
            result = bench_explain(args.checkpoints, args.teacher, args.student, image,
                                   args.method, args.repeats)
        except ValueError as error:  # CheckpointError, ImageError, bad arguments
            print(f"error: {error}", file=sys.stderr)
            return 2
        with Image.open(image) as opened:
            size = f"{opened.width}x{opened.height}"
    print(f"explain {args.teacher} + {args.student}, {args.method}, {size} image "
          f"({label}), {args.repeats} repeats, "
          f"{args.threads} thread(s): median {result['median_ms']:.1f} ms, "
          f"p95 {result['p95_ms']:.1f} ms, min {result['min_ms']:.1f} ms")
    return 0
