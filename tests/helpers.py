"""Helpers the tests share: tiny image folders and bundles whose pixel values are known, the real
CIFAR-10 copy's location, and a served app on tiny checkpoints (for the app and browser tests)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from kd_core.data import DataBundle, Split, channel_stats
from kd_core.jobs import JobStore
from kd_core.run import RunSpec, run
from kd_core.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
REAL_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CAT = ROOT / "assets" / "examples" / "cat_0000.jpg"
STARTUP_TIMEOUT = 120.0


def class_color(index: int, image_index: int) -> tuple[int, int, int]:
    """A distinct, exactly known RGB colour per (class, image)."""
    return ((40 * index + 10) % 256, (200 - 7 * image_index) % 256, (31 * index + 13 * image_index) % 256)


def write_image_folder(root: Path, classes: list[str], per_class: dict[str, int], size: int = 8,
                       mode: str = "RGB", suffix: str = ".png") -> dict[str, list[np.ndarray]]:
    """Write ``root/<split>/<class>/<i><suffix>`` images of one flat colour each (a bright top-left
    pixel makes them non-constant). Returns the arrays written per split, in class-sorted order."""
    written: dict[str, list[np.ndarray]] = {}
    for split, count in per_class.items():
        arrays = []
        for class_index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for image_index in range(count):
                array = np.empty((size, size, 3), dtype=np.uint8)
                array[:] = class_color(class_index, image_index)
                array[0, 0] = 255
                if mode == "L":
                    array = array[:, :, :1]
                    image = Image.fromarray(array[:, :, 0], mode="L")
                else:
                    image = Image.fromarray(array, mode="RGB")
                image.save(folder / f"{image_index:03d}{suffix}")
                arrays.append(array)
        written[split] = arrays
    return written


def make_tar(tree: Path, archive: Path, top: str | None = None) -> Path:
    """Pack ``tree`` into ``archive`` (.tar.gz), optionally wrapped in a folder ``top``."""
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(tree, arcname=top or ".")
    return archive


def synthetic_bundle(train_size: int = 64, test_size: int = 32, side: int = 16, seed: int = 0) -> DataBundle:
    """Two learnable classes: class 0 images are dark, class 1 images bright."""
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> Split:
        labels = torch.arange(count) % 2
        images = torch.randint(0, 128, (count, 3, side, side), generator=generator, dtype=torch.uint8)
        images[labels == 1] += 127
        return Split(images, labels)

    train, test = split(train_size), split(test_size)
    mean, std = channel_stats(train.images)
    return DataBundle("synthetic", train, test, ["dark", "bright"], mean, std)


# -- a tiny bench: data, checkpoints, a server -----------------------------------------------------


def write_dataset(root: Path, per_class: dict[str, int], side: int = 32) -> None:
    """``root/<split>/<class>/<i>.png``: noisy 32x32 RGB images, one dominant channel level per class."""
    generator = np.random.default_rng(0)
    for split, count in per_class.items():
        for index, name in enumerate(CIFAR_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                pixels = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
                pixels[:, :, index % 3] = 25 * index
                Image.fromarray(pixels).save(folder / f"{number}.png")


def build_bench(root: Path) -> SimpleNamespace:
    """A lightnn teacher and a camnet student distilled from it (1 epoch each), a copy of the
    student, a digits teacher and MLP student, and the environment a server on them needs."""
    data, checkpoints, cache = root / "data", root / "checkpoints", root / "cache"
    write_dataset(data, {"train": 6, "test": 2})
    source = f"folder:{data}"
    run(RunSpec(arch="lightnn", data=source, config=TrainConfig(epochs=1, batch_size=32, lr=0.05),
                output=checkpoints / "teacher.safetensors", role="teacher", cache_dir=cache))
    run(RunSpec(arch="camnet", data=source, output=checkpoints / "student.safetensors",
                config=TrainConfig(epochs=1, batch_size=32, lr=0.05, loss_weights={"ce": 0.5, "kd": 0.5}),
                teacher=checkpoints / "teacher.safetensors", cache_dir=cache))
    run(RunSpec(arch="lightnn", data="digits", config=TrainConfig(epochs=1, batch_size=64, lr=0.05, limit=256),
                output=checkpoints / "digits-teacher.safetensors", role="teacher", cache_dir=cache))
    run(RunSpec(arch="mlp", data="digits", output=checkpoints / "digits-student.safetensors",
                config=TrainConfig(epochs=1, batch_size=64, lr=0.05, limit=256, loss_weights={"ce": 0.5, "kd": 0.5}),
                teacher=checkpoints / "digits-teacher.safetensors", cache_dir=cache))
    shutil.copy(checkpoints / "student.safetensors", checkpoints / "student-copy.safetensors")
    missing = root / "gone"  # offered by the server, but not on disk
    env = {"KD_CHECKPOINTS": str(checkpoints), "KD_RUNS": str(root / "runs"), "KD_CACHE_DIR": str(cache),
           "KD_DATA_SOURCES": f"{source},folder:{missing},digits", "GRADIO_TEMP_DIR": str(root / "gradio"),
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "KD_MAX_JOBS_PER_CLIENT": "3",
           "KD_MAX_QUEUED_JOBS": "5"}
    return SimpleNamespace(root=root, source=source, missing_source=f"folder:{missing}", data_name="data",
                           missing_name="gone", checkpoints=checkpoints,
                           runs=root / "runs", env=env)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """``python app.py`` in a session of its own; returns once the page answers."""
    port = free_port()
    environment = {**os.environ, **env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=environment, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    stop_app(process)
    raise RuntimeError(f"app.py did not answer within {STARTUP_TIMEOUT:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_app(process: subprocess.Popen, runs: Path | None = None) -> None:
    """Kill the server's process group and any job worker still running (each has a group of its own)."""
    groups = [process.pid]
    if runs is not None and (runs / "jobs.sqlite3").exists():
        groups += [job["pgid"] for job in JobStore(runs).list_jobs(("running",)) if job["pgid"]]
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)
