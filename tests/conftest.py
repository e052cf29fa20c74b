"""Shared fixtures: one thread for torch, the real CIFAR-10 copy decoded once per run, and tiny
synthetic image folders and bundles whose pixel values the tests know."""
from __future__ import annotations

import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_core.data import DataBundle, Split, channel_stats, load_data

torch.set_num_threads(1)  # two cores, and a teacher trains in the background

REAL_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kd_cache")


@pytest.fixture(scope="session")
def real_cifar(real_cache_dir) -> DataBundle:
    """The shared CIFAR-10 JPEG copy, decoded once per test run (~15-25 s) into a session cache."""
    if not REAL_CIFAR.exists():
        pytest.skip(f"real CIFAR-10 copy missing: the shared data folder {REAL_CIFAR.parent} has no {REAL_CIFAR.name}")
    return load_data(f"folder:{REAL_CIFAR}", cache_dir=real_cache_dir)


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


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``image_folder(classes=..., per_class=..., ...) -> (root, arrays per split)``."""
    def make(classes=("cat", "dog", "bird"), per_class=None, name="tree", **kwargs):
        root = tmp_path / name
        arrays = write_image_folder(root, list(classes), per_class or {"train": 4, "test": 2}, **kwargs)
        return root, arrays
    return make


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


@pytest.fixture
def tiny_bundle() -> DataBundle:
    return synthetic_bundle()


@pytest.fixture
def keep_signal_handlers():
    """The CLI installs SIGINT/SIGTERM handlers for graceful stops; put the originals back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
