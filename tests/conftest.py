"""Shared fixtures (the helpers they use are in ``helpers.py``): one thread for torch, the real
CIFAR-10 copy decoded once per run, tiny synthetic image folders and bundles, and the markers by
speed: ``slow`` (the real CIFAR-10), ``app`` (a served app), ``browser`` (Chromium)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import REAL_CIFAR, synthetic_bundle, write_image_folder
from kd_core.data import DataBundle, load_data

torch.set_num_threads(1)  # two cores, and a teacher trains in the background


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kd_cache")


@pytest.fixture(scope="session")
def real_cifar(real_cache_dir) -> DataBundle:
    """The shared CIFAR-10 JPEG copy, decoded once per test run (~15-25 s) into a session cache."""
    if not REAL_CIFAR.exists():
        pytest.skip(f"real CIFAR-10 copy missing: the shared data folder {REAL_CIFAR.parent} has no {REAL_CIFAR.name}")
    return load_data(f"folder:{REAL_CIFAR}", cache_dir=real_cache_dir)


@pytest.fixture
def all_cores():
    """Every core this process may use (the suite runs on one thread otherwise), for a test that
    runs real models over the 10,000 test images; the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``image_folder(classes=..., per_class=..., ...) -> (root, arrays per split)``."""
    def make(classes=("cat", "dog", "bird"), per_class=None, name="tree", **kwargs):
        root = tmp_path / name
        arrays = write_image_folder(root, list(classes), per_class or {"train": 4, "test": 2}, **kwargs)
        return root, arrays
    return make


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


def pytest_collection_modifyitems(config, items):
    """Mark tests by what they cost, so ``pytest -m "not slow and not app and not browser"`` is the
    fast unit suite: ``slow`` for anything on the real CIFAR-10, ``app`` for a served app, ``browser``
    for Chromium."""
    for item in items:
        module = item.path.name
        if "real_cifar" in getattr(item, "fixturenames", ()) or module == "test_shipped_checkpoints.py":
            item.add_marker(pytest.mark.slow)
        if module in ("test_app.py", "test_browser.py"):
            item.add_marker(pytest.mark.app)
        if module == "test_browser.py":
            item.add_marker(pytest.mark.browser)
