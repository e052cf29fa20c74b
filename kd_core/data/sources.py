"""Data sources decoded once into uint8 tensors and cached on disk.

A source string names where images come from:

- ``cifar10`` / ``mnist``: torchvision's data sets, downloaded to the cache folder when online;
- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale images, offline),
  split 80/20 per class with a fixed seed;
- ``folder:PATH``: an image-folder tree ``PATH/{train,test|val}/<class>/<image>``, or a
  ``.tar.gz``/``.tgz`` of one.

Whatever the source, :func:`load_data` returns a :class:`DataBundle` of ``(N, C, H, W)`` uint8
tensors, int64 labels, class names and the training split's per-channel mean and std. The bundle
is cached as one safetensors file keyed by the source's identity, so the second load of the
60,000-image CIFAR-10 copy is a memory map, well under two seconds.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..files import atomic_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_FORMAT = 1


HOLDOUT_SEED = 0  # one validation split for every run, whatever its training seed


class DataError(ValueError):
    """A data source that does not exist or cannot be read; the message says which and why."""


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None, seed: int = 0) -> "Split":
        """A class-balanced-in-expectation random subset of at most ``limit`` samples."""
        if limit is None or limit >= len(self):
            return self
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:limit]
        return Split(self.images[index], self.labels[index])

    def holdout(self, count: int, seed: int = HOLDOUT_SEED) -> tuple["Split", "Split", torch.Tensor]:
        """``(rest, held_out, held_out_index)``: ``count`` samples drawn per class in proportion
        (stratified, the same for every run with this seed) and the others, disjoint."""
        if not 0 < count < len(self):
            raise ValueError(f"a validation split of {count} images needs 1 to {len(self) - 1} of the "
                             f"{len(self)} training images")
        generator = torch.Generator().manual_seed(seed)
        classes = torch.unique(self.labels)
        chosen = []
        for position, label in enumerate(classes.tolist()):
            members = torch.nonzero(self.labels == label)[:, 0]
            share = round(count * (position + 1) / len(classes)) - round(count * position / len(classes))
            chosen.append(members[torch.randperm(len(members), generator=generator)[:share]])
        held = torch.cat(chosen).sort().values
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held] = False
        return Split(self.images[keep], self.labels[keep]), Split(self.images[held], self.labels[held]), held


@dataclass
class DataBundle:
    source: str
    train: Split
    test: Split                    # the split a run is evaluated on: the test split, or a validation split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    evaluated_on: str = "test"     # test | validation (held out of train/, see with_validation)
    split: str = ""                # how a source that ships no split of its own was split (digits)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # (C, H, W)

    def with_validation(self, count: int) -> "DataBundle":
        """This bundle with ``count`` training images held out (stratified, fixed seed) as the split
        it is evaluated on; normalization statistics from the images it still trains on."""
        rest, held_out, _ = self.train.holdout(count)
        mean, std = channel_stats(rest.images)
        return DataBundle(self.source, rest, held_out, self.classes, mean, std, evaluated_on="validation")

    def describe(self) -> dict:
        channels, height, width = self.input_shape
        return {"source": self.source, "classes": self.classes, "channels": channels,
                "height": height, "width": width, "mean": list(self.mean), "std": list(self.std),
                "train_size": len(self.train), "test_size": len(self.test)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd_core"))


def load_data(source: str, cache_dir: str | os.PathLike | None = None, image_size: int | None = None,
              download: bool = True) -> DataBundle:
    """Load a source (see module docstring) as in-memory tensors, decoding only on the first call."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kind, path = parse_source(source)
    if kind == "digits":
        return _digits()  # 1,797 images bundled with scikit-learn: decoded in milliseconds, never cached
    if path is None:
        key = f"{kind}-{image_size}"
        return _cached(cache_dir, source, key, lambda: _torchvision(kind, cache_dir, download, image_size))
    if not path.exists():
        raise DataError(f"data set folder {str(path)!r} does not exist")
    key = f"folder-{_fingerprint(path)}-{image_size}"
    return _cached(cache_dir, source, key, lambda: _folder(path, image_size))


TORCHVISION_SOURCES = ("cifar10", "mnist")
BUILTIN_SOURCES = (*TORCHVISION_SOURCES, "digits")
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0


def parse_source(source: object) -> tuple[str, Path | None]:
    """The data-source grammar, in one place: ``cifar10`` / ``mnist`` -> ``(name, None)``;
    ``folder:PATH`` -> ``("folder", PATH)``; anything else raises :class:`DataError`."""
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        return source, None
    if isinstance(source, str) and source.startswith("folder:") and len(source) > len("folder:"):
        return "folder", Path(source[len("folder:"):]).expanduser()
    raise DataError(f"unknown data source {source!r}; use {', '.join(BUILTIN_SOURCES)} or folder:PATH")


def source_name(source: str) -> str:
    """How a data source is named to people: a built-in's name, else the folder's or archive's own
    name without its path (``folder:/srv/data/cifar10-jpeg.tar.gz`` -> ``cifar10-jpeg``)."""
    kind, path = parse_source(source)
    if path is None:
        return kind
    name = path.name
    for suffix in (".tar.gz", ".tgz"):
        name = name.removesuffix(suffix)
    return name or kind


def _cached(cache_dir: Path, source: str, key: str, build) -> DataBundle:
    cache_file = cache_dir / f"{key}.safetensors"
    if cache_file.exists():
        try:
            return _read_cache(cache_file, source)
        except Exception:  # a stale or damaged cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    bundle = build()
    bundle.source = source
    _write_cache(cache_file, bundle)
    return bundle


def _write_cache(cache_file: Path, bundle: DataBundle) -> None:
    tensors = {"train_images": bundle.train.images.contiguous(), "train_labels": bundle.train.labels,
               "test_images": bundle.test.images.contiguous(), "test_labels": bundle.test.labels}
    meta = {"format": str(CACHE_FORMAT), "classes": json.dumps(bundle.classes),
            "mean": json.dumps(bundle.mean), "std": json.dumps(bundle.std)}
    with atomic_path(cache_file) as temporary:
        save_file(tensors, str(temporary), metadata=meta)


def _read_cache(cache_file: Path, source: str) -> DataBundle:
    from safetensors import safe_open

    with safe_open(str(cache_file), "pt") as handle:
        meta = handle.metadata()
    if meta.get("format") != str(CACHE_FORMAT):
        raise DataError("old cache format")
    tensors = load_file(str(cache_file))
    return DataBundle(source, Split(tensors["train_images"], tensors["train_labels"]),
                      Split(tensors["test_images"], tensors["test_labels"]),
                      json.loads(meta["classes"]), tuple(json.loads(meta["mean"])),
                      tuple(json.loads(meta["std"])))


def _fingerprint(path: Path) -> str:
    """Identity of a folder or archive: its absolute path plus every file's name, size and mtime."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    if path.is_file():
        stat = path.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                stat = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``(N, C, H, W)``, on the 0..1 scale."""
    channels = images.shape[1]
    flat = images.transpose(0, 1).reshape(channels, -1)
    mean = torch.zeros(channels, dtype=torch.float64)
    square = torch.zeros(channels, dtype=torch.float64)
    for chunk in flat.split(1 << 22, dim=1):  # chunks keep the float copy small
        chunk = chunk.double() / 255
        mean += chunk.sum(1)
        square += (chunk * chunk).sum(1)
    count = flat.shape[1]
    mean /= count
    std = (square / count - mean**2).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _bundle(train: Split, test: Split, classes: list[str]) -> DataBundle:
    mean, std = channel_stats(train.images)
    return DataBundle("", train, test, classes, mean, std)


# ---------------------------------------------------------------------------------------------
# image-folder trees and archives of them


def _decode(data: bytes, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert(mode)
        if size is not None and image.size != size:
            image = _resize_center_crop(image, size)
        array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BILINEAR)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _split_names(names: set[str], where: str) -> tuple[str, str]:
    if "train" not in names:
        raise DataError(f"{where} has no train/ folder (found: {', '.join(sorted(names)) or 'nothing'})")
    for test_name in ("test", "val"):
        if test_name in names:
            return "train", test_name
    raise DataError(f"{where} has no test/ or val/ folder next to train/")


def _folder(path: Path, image_size: int | None) -> DataBundle:
    """Collect ``split/class/file`` entries (from a directory or a tar archive) and decode them."""
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"{str(path)!r} is neither a folder nor a .tar.gz archive")
        try:
            with tarfile.open(path) as archive:
                entries = [(member.name, archive.extractfile(member).read())
                           for member in archive.getmembers()
                           if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise DataError(f"{str(path)!r} is a damaged archive (truncated copy?): {error}") from None
        listing = [(Path(name).parts, data) for name, data in entries]
    else:
        listing = [(file.relative_to(path).parts, file)
                   for file in sorted(path.rglob("*")) if file.suffix.lower() in IMAGE_SUFFIXES]
    # archives may wrap the tree in a top folder: find the level that holds train/
    for depth in range(4):
        split_names = {parts[depth] for parts, _ in listing if len(parts) > depth + 2}
        if "train" in split_names:
            break
    else:  # no train/ at any level: name what the top level holds
        split_names = {parts[0] for parts, _ in listing if len(parts) > 1}
    train_name, test_name = _split_names(split_names, str(path))
    per_split: dict[str, list[tuple[str, object]]] = {train_name: [], test_name: []}
    for parts, item in listing:
        if len(parts) == depth + 3 and parts[depth] in per_split:
            per_split[parts[depth]].append((parts[depth + 1], item))
    classes = sorted({label for label, _ in per_split[train_name]})
    if not classes:
        raise DataError(f"{path}/train has no class folders with images")
    train, mode, size = _decode_split(per_split[train_name], classes, image_size, str(path))
    test, _, _ = _decode_split(per_split[test_name], classes, image_size, str(path), mode, size)
    return _bundle(train, test, classes)


def _decode_split(items: list[tuple[str, object]], classes: list[str], image_size: int | None,
                  where: str, mode: str | None = None,
                  size: tuple[int, int] | None = None) -> tuple[Split, str, tuple[int, int]]:
    """Decode one split; mode and size come from its first image unless given (the test split
    takes the training split's, so both have one shape)."""
    class_index = {name: index for index, name in enumerate(classes)}
    items = [(label, item) for label, item in items if label in class_index]
    if not items:
        raise DataError(f"{where}: a split holds no images of the training classes")
    read = lambda item: item if isinstance(item, bytes) else Path(item).read_bytes()  # noqa: E731
    if mode is None or size is None:
        first = Image.open(io.BytesIO(read(items[0][1])))
        mode = "L" if first.mode in ("L", "I;16", "I", "1") else "RGB"
        size = (image_size, image_size) if image_size else first.size

    def decode(entry: tuple[str, object]) -> np.ndarray:
        try:
            return _decode(read(entry[1]), mode, size)
        except Exception as error:
            raise DataError(f"{where}: cannot decode image {entry[1] if not isinstance(entry[1], bytes) else entry[0]}: {error}") from error

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        arrays = list(pool.map(decode, items, chunksize=256))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    labels = torch.tensor([class_index[label] for label, _ in items], dtype=torch.int64)
    return Split(images, labels), mode, size


# ---------------------------------------------------------------------------------------------
# torchvision data sets (need internet the first time)


def _digits() -> DataBundle:
    """scikit-learn's handwritten digits (UCI optdigits: 8x8, 17 grey levels) as uint8 images and a
    fixed stratified split, the same on every machine."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8))[:, None]   # (N, 1, 8, 8)
    everything = Split(images.contiguous(), torch.as_tensor(digits.target, dtype=torch.int64))
    count = round(DIGITS_TEST_FRACTION * len(everything))
    train, test, _ = everything.holdout(count, seed=DIGITS_SPLIT_SEED)
    bundle = _bundle(train, test, [str(digit) for digit in range(10)])
    bundle.source = "digits"
    bundle.split = (f"stratified {len(train)} train / {len(test)} test of scikit-learn's 1,797 digits "
                    f"(seed {DIGITS_SPLIT_SEED})")
    return bundle


def _torchvision(name: str, cache_dir: Path, download: bool, image_size: int | None) -> DataBundle:
    import torchvision

    dataset_class = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}[name]
    root = cache_dir / "downloads"
    try:
        splits = [dataset_class(str(root), train=train, download=download) for train in (True, False)]
    except Exception as error:
        raise DataError(
            f"could not load {name} into {root}: {error}. Without internet, use an image-folder copy "
            "with --data folder:PATH (for example the CIFAR-10 JPEG tree)"
        ) from error
    tensors = []
    for dataset in splits:
        data = torch.as_tensor(np.asarray(dataset.data))
        images = data.permute(0, 3, 1, 2) if data.ndim == 4 else data[:, None]  # (N, C, H, W)
        if image_size and images.shape[-1] != image_size:
            images = torch.nn.functional.interpolate(images.float(), size=image_size, mode="bilinear",
                                                     antialias=True).round().clamp(0, 255).to(torch.uint8)
        tensors.append(Split(images.contiguous(), torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)))
    return _bundle(tensors[0], tensors[1], list(splits[0].classes))
