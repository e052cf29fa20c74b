"""Data: image-folder trees and archives decoded to exactly the pixels written, the cache, clear
errors, the real CIFAR-10 copy, batch augmentation against hand-made references, the loader."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CIFAR_CLASSES, REAL_CIFAR, make_tar
from kd_core.data import AugmentConfig, BatchLoader, DataError, Split, augment_batch, load_data, normalize
from kd_core.data import augment as aug
from kd_core.data import sources


def by_label(bundle_split, classes):
    """{class name: sorted list of (H, W, C) byte strings} of a split, for order-free comparison."""
    grouped: dict[str, list[bytes]] = {name: [] for name in classes}
    for image, label in zip(bundle_split.images, bundle_split.labels.tolist()):
        grouped[classes[label]].append(image.permute(1, 2, 0).contiguous().numpy().tobytes())
    return {name: sorted(items) for name, items in grouped.items()}


def written_by_class(arrays, classes, per_class):
    """The arrays ``write_image_folder`` returned, grouped like :func:`by_label`."""
    return {name: sorted(array.tobytes() for array in arrays[index * per_class:(index + 1) * per_class])
            for index, name in enumerate(classes)}


def hand_stats(arrays):
    stacked = np.stack(arrays).astype(np.float64) / 255  # (N, H, W, C)
    return stacked.mean(axis=(0, 1, 2)), stacked.std(axis=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# image folders


def test_folder_tree(image_folder, tmp_path):
    root, arrays = image_folder(classes=("cat", "dog", "bird"), per_class={"train": 4, "test": 2})
    bundle = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    classes = ["bird", "cat", "dog"]  # folder names, sorted; written in the order cat, dog, bird
    assert bundle.classes == classes and bundle.source == f"folder:{root}"
    assert bundle.train.images.shape == (12, 3, 8, 8) and bundle.test.images.shape == (6, 3, 8, 8)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.labels.dtype == torch.int64
    assert torch.bincount(bundle.train.labels).tolist() == [4, 4, 4]
    for split, count in (("train", 4), ("test", 2)):
        written = written_by_class(arrays[split], ["cat", "dog", "bird"], count)
        assert by_label(getattr(bundle, split), classes) == written  # PNG: every pixel exact, right label
    mean, std = hand_stats(arrays["train"])
    assert bundle.mean == pytest.approx(tuple(mean), abs=1e-6)
    assert bundle.std == pytest.approx(tuple(std), abs=1e-6)
    assert bundle.input_shape == (3, 8, 8)
    assert bundle.describe()["train_size"] == 12 and bundle.describe()["test_size"] == 6


def test_val_folder_serves_as_test_split(image_folder, tmp_path):
    root, arrays = image_folder(classes=("a", "b"), per_class={"train": 3, "val": 2})
    bundle = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    assert len(bundle.test) == 4
    assert by_label(bundle.test, ["a", "b"]) == written_by_class(arrays["val"], ["a", "b"], 2)


@pytest.mark.parametrize("top", [None, "mini-set"])
def test_tar_gz_archive_equals_the_folder(image_folder, tmp_path, top):
    root, _ = image_folder(classes=("x", "y"), per_class={"train": 3, "test": 2})
    archive = make_tar(root, tmp_path / "mini.tar.gz", top=top)
    from_folder = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    from_archive = load_data(f"folder:{archive}", cache_dir=tmp_path / "cache")
    assert from_archive.classes == from_folder.classes == ["x", "y"]
    for split in ("train", "test"):
        assert torch.equal(getattr(from_archive, split).images, getattr(from_folder, split).images)
        assert torch.equal(getattr(from_archive, split).labels, getattr(from_folder, split).labels)
    assert from_archive.mean == from_folder.mean


def test_grayscale_images_give_one_channel(image_folder, tmp_path):
    root, arrays = image_folder(classes=("zero", "one"), per_class={"train": 3, "test": 1}, mode="L")
    bundle = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    assert bundle.input_shape == (1, 8, 8) and len(bundle.mean) == 1
    assert by_label(bundle.train, ["one", "zero"]) == written_by_class(arrays["train"], ["zero", "one"], 3)
    mean, std = hand_stats(arrays["train"])
    assert bundle.mean[0] == pytest.approx(mean[0], abs=1e-6) and bundle.std[0] == pytest.approx(std[0], abs=1e-6)


def test_jpeg_images_decode_close_to_their_colour(image_folder, tmp_path):
    root, arrays = image_folder(classes=("a", "b"), per_class={"train": 3, "test": 1}, suffix=".jpg", size=16)
    bundle = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    for image, label in zip(bundle.train.images, bundle.train.labels.tolist()):
        centre = image[:, 8:, 8:].float().mean(dim=(1, 2))  # away from the bright corner pixel
        colours = torch.tensor(np.stack([array[8, 8] for array in arrays["train"][label * 3:(label + 1) * 3]]))
        assert (centre - colours.float()).abs().amax(1).min() <= 16  # JPEG: close to one of its class's colours


def test_train_decides_size_and_mode_for_both_splits(tmp_path):
    """A test split whose first image is larger or grayscale still matches the training split."""
    root = tmp_path / "mixed"
    for split, size, mode in (("train", 8, "RGB"), ("test", 12, "L")):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            Image.new(mode, (size, size), 200 if mode == "L" else (10, 200, 30)).save(root / split / name / "0.png")
    bundle = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    assert bundle.train.images.shape[1:] == bundle.test.images.shape[1:] == (3, 8, 8)
    assert bundle.test.images[0, :, 4, 4].tolist() == [200, 200, 200]


def test_image_size_resizes(image_folder, tmp_path):
    root, arrays = image_folder(classes=("a", "b"), per_class={"train": 2, "test": 1}, size=16)
    bundle = load_data(f"folder:{root}", cache_dir=tmp_path / "cache", image_size=4)
    assert bundle.input_shape == (3, 4, 4)
    centres = sorted(tuple(image[:, 3, 3].tolist()) for image in bundle.train.images)
    assert centres == sorted(tuple(int(v) for v in array[8, 8]) for array in arrays["train"])


# ---------------------------------------------------------------------------------------------
# the cache


def test_second_load_reads_the_cache(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder()
    cache = tmp_path / "cache"
    first = load_data(f"folder:{root}", cache_dir=cache)
    assert len(list(cache.glob("folder-*.safetensors"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(sources, "_decode", no_decoding)
    started = time.perf_counter()
    second = load_data(f"folder:{root}", cache_dir=cache)
    assert time.perf_counter() - started < 1.0
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.test.labels, first.test.labels)
    assert (second.classes, second.mean, second.std) == (first.classes, first.mean, first.std)

    # a changed folder is a new data set: it is decoded again (and here the decoder refuses)
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "new.png")
    with pytest.raises(DataError, match="cannot decode image"):
        load_data(f"folder:{root}", cache_dir=cache)


def test_damaged_cache_is_rebuilt(image_folder, tmp_path):
    root, _ = image_folder()
    cache = tmp_path / "cache"
    first = load_data(f"folder:{root}", cache_dir=cache)
    (cache_file,) = cache.glob("folder-*.safetensors")
    cache_file.write_bytes(b"garbage")
    again = load_data(f"folder:{root}", cache_dir=cache)
    assert torch.equal(again.train.images, first.train.images)
    assert cache_file.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# bad sources


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data set folder '.*nowhere' does not exist"):
        load_data(f"folder:{tmp_path / 'nowhere'}", cache_dir=tmp_path)


def test_unknown_source(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'imagenet'; use cifar10, mnist, digits or folder:PATH"):
        load_data("imagenet", cache_dir=tmp_path)


def test_tree_without_train(image_folder, tmp_path):
    root, _ = image_folder(per_class={"stuff": 2, "test": 1})
    with pytest.raises(DataError, match=r"has no train/ folder \(found: stuff, test\)"):
        load_data(f"folder:{root}", cache_dir=tmp_path / "cache")


def test_tree_without_test_or_val(image_folder, tmp_path):
    root, _ = image_folder(per_class={"train": 2})
    with pytest.raises(DataError, match="has no test/ or val/ folder next to train/"):
        load_data(f"folder:{root}", cache_dir=tmp_path / "cache")


def test_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "data.tar.gz"
    path.write_text("not an archive")
    with pytest.raises(DataError, match="neither a folder nor a .tar.gz archive"):
        load_data(f"folder:{path}", cache_dir=tmp_path / "cache")


def test_truncated_archive(image_folder, tmp_path):
    root, _ = image_folder(per_class={"train": 20, "test": 5}, size=32)
    archive = make_tar(root, tmp_path / "full.tar.gz")
    half = tmp_path / "half.tar.gz"
    half.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="half.tar.gz' is a damaged archive"):
        load_data(f"folder:{half}", cache_dir=tmp_path / "cache")


def test_undecodable_image(image_folder, tmp_path):
    root, _ = image_folder()
    (root / "train" / "dog" / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        load_data(f"folder:{root}", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# the real CIFAR-10 copy (../shared/data, decoded once per run in conftest)


def test_real_cifar10_copy(real_cifar):
    assert real_cifar.classes == CIFAR_CLASSES
    assert real_cifar.train.images.shape == (50_000, 3, 32, 32) and real_cifar.test.images.shape == (10_000, 3, 32, 32)
    assert real_cifar.train.images.dtype == torch.uint8 and real_cifar.train.labels.dtype == torch.int64
    assert torch.bincount(real_cifar.train.labels).tolist() == [5_000] * 10
    assert torch.bincount(real_cifar.test.labels).tolist() == [1_000] * 10
    # the well-known CIFAR-10 channel statistics; the JPEG copy is within a hair of them
    assert real_cifar.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.003)
    assert real_cifar.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=0.005)


def test_real_cifar10_second_load_is_fast(real_cifar, real_cache_dir):
    started = time.perf_counter()
    again = load_data(f"folder:{REAL_CIFAR}", cache_dir=real_cache_dir)
    assert time.perf_counter() - started < 2.0
    assert torch.equal(again.test.labels, real_cifar.test.labels) and again.classes == real_cifar.classes


# ---------------------------------------------------------------------------------------------
# augmentation


def batch(seed=0, shape=(6, 2, 5, 7)) -> torch.Tensor:
    return 0.1 + 0.9 * torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_crop_with_no_padding_is_identity():
    images = batch()
    assert torch.equal(aug.random_crop(images, 0, torch.Generator().manual_seed(1)), images)


def test_crop_is_a_window_of_the_reflect_padded_image():
    images, padding = batch(), 2
    cropped = aug.random_crop(images, padding, torch.Generator().manual_seed(1))
    offsets = torch.randint(0, 2 * padding + 1, (2, 6), generator=torch.Generator().manual_seed(1))
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (padding, padding), (padding, padding)), mode="reflect")
    for index, (row, col) in enumerate(offsets.T.tolist()):
        window = padded[index, :, row:row + 5, col:col + 7]
        assert np.array_equal(cropped[index].numpy(), window)
    assert len(set(map(tuple, offsets.T.tolist()))) > 1  # the samples really were shifted differently


def test_flip_flips_the_drawn_samples():
    images = batch()
    flipped = aug.random_flip(images, torch.Generator().manual_seed(1))
    chosen = (torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5).tolist()
    assert any(chosen) and not all(chosen)
    for index, flip in enumerate(chosen):
        expected = images[index].numpy()[:, :, ::-1] if flip else images[index].numpy()
        assert np.array_equal(flipped[index].numpy(), expected)


def test_cutout_zeroes_exactly_a_square():
    images, size = batch(shape=(8, 3, 16, 16)), 4
    out = aug.cutout(images, size, torch.Generator().manual_seed(5))
    centres = torch.rand(2, 8, generator=torch.Generator().manual_seed(5))
    full_squares = 0
    for index in range(8):
        top = int(centres[0, index] * 16) - size // 2
        left = int(centres[1, index] * 16) - size // 2
        mask = np.zeros((16, 16), dtype=bool)
        mask[max(top, 0):max(top + size, 0), max(left, 0):max(left + size, 0)] = True
        assert np.array_equal((out[index] == 0).numpy(), np.broadcast_to(mask, (3, 16, 16)))
        assert torch.equal(out[index][:, ~torch.from_numpy(mask)], images[index][:, ~torch.from_numpy(mask)])
        full_squares += int(mask.sum() == size * size)
    assert full_squares >= 1


def test_no_rotation_and_no_jitter_change_nothing():
    images = batch(shape=(4, 3, 8, 8))
    assert torch.allclose(aug.random_rotation(images, 0.0), images, atol=1e-6)
    assert torch.allclose(aug.color_jitter(images, 0.0), images, atol=1e-6)


def test_augment_batch_keeps_shape_range_and_is_deterministic():
    images = batch(shape=(16, 3, 12, 12))
    config = AugmentConfig(crop_padding=2, flip=True, rotation=10, color_jitter=0.3, cutout=4)
    first = augment_batch(images, config, torch.Generator().manual_seed(7))
    again = augment_batch(images, config, torch.Generator().manual_seed(7))
    other = augment_batch(images, config, torch.Generator().manual_seed(8))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(augment_batch(images, AugmentConfig.none()), images)


# ---------------------------------------------------------------------------------------------
# batches


def test_normalize_by_hand():
    images = torch.tensor([[[[51, 255]], [[0, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize(images, (0.5, 0.2), (0.25, 0.1))
    expected = torch.tensor([[[[(0.2 - 0.5) / 0.25, (1.0 - 0.5) / 0.25]], [[(0 - 0.2) / 0.1, (0.4 - 0.2) / 0.1]]]])
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)


def small_split(count=10) -> Split:
    images = torch.arange(count, dtype=torch.uint8)[:, None, None, None].expand(count, 1, 2, 2).contiguous()
    return Split(images * 20, torch.arange(count))


def test_loader_batches_in_order_without_shuffle():
    loader = BatchLoader(small_split(), batch_size=4, mean=(0.0,), std=(1.0,))
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(labels) for _, labels in batches] == [4, 4, 2]
    labels = torch.cat([labels for _, labels in batches])
    images = torch.cat([images for images, _ in batches])
    assert labels.tolist() == list(range(10))
    assert torch.allclose(images[:, 0, 0, 0], torch.arange(10) * 20 / 255)


def test_loader_shuffles_a_permutation_and_can_drop_the_last_batch():
    loader = BatchLoader(small_split(), batch_size=4, mean=(0.0,), std=(1.0,), shuffle=True, drop_last=True, seed=3)
    epochs = [torch.cat([labels for _, labels in loader]) for _ in range(2)]
    assert len(loader) == 2 and all(len(labels) == 8 for labels in epochs)
    assert len(set(epochs[0].tolist())) == 8 and not torch.equal(epochs[0], epochs[1])
    for images, labels in loader:  # image i still carries label i
        assert torch.allclose(images[:, 0, 0, 0], labels.float() * 20 / 255)


def test_loader_refuses_empty_batches():
    with pytest.raises(ValueError, match="batch size must be positive"):
        BatchLoader(small_split(), batch_size=0, mean=(0.0,), std=(1.0,))


def test_subset():
    split = small_split(100)
    assert split.subset(None) is split and split.subset(1000) is split
    part = split.subset(10, seed=1)
    assert len(part) == 10 and len(set(part.labels.tolist())) == 10
    assert torch.equal(part.labels, split.subset(10, seed=1).labels)
    assert torch.equal(part.images[:, 0, 0, 0], part.labels.to(torch.uint8) * 20)


def test_validation_split_is_stratified_fixed_and_disjoint_from_training():
    from kd_core.data.sources import DataBundle, Split

    images = torch.arange(300, dtype=torch.int64).view(300, 1, 1, 1).expand(300, 3, 2, 2).to(torch.uint8).contiguous()
    labels = torch.arange(300) % 3
    identity = torch.arange(300)  # which training image each row is
    split = Split(images, labels)
    rest, held, index = split.holdout(30)
    assert len(rest) == 270 and len(held) == 30
    assert torch.bincount(held.labels).tolist() == [10, 10, 10]                   # stratified
    assert set(index.tolist()).isdisjoint(set(identity[torch.isin(identity, index, invert=True)].tolist()))
    assert torch.equal(held.labels, labels[index]) and torch.equal(held.images, images[index])
    kept = torch.ones(300, dtype=torch.bool)
    kept[index] = False
    assert torch.equal(rest.images, images[kept])                               # nothing trained on is held out
    assert torch.equal(split.holdout(30)[2], index)                              # the same for every run
    bundle = DataBundle("s", split, Split(images[:5], labels[:5]), ["a", "b", "c"], (0.5,) * 3, (0.2,) * 3)
    validation = bundle.with_validation(30)
    assert validation.evaluated_on == "validation" and len(validation.train) == 270 and len(validation.test) == 30
    assert torch.equal(validation.test.images, held.images)
    with pytest.raises(ValueError, match="validation split of 300 images needs 1 to 299"):
        split.holdout(300)


def test_digits_is_scikit_learns_bundled_set_with_a_fixed_stratified_split():
    from sklearn.datasets import load_digits

    first, again = load_data("digits"), load_data("digits")
    assert first.input_shape == (1, 8, 8) and first.classes == [str(digit) for digit in range(10)]
    assert len(first.train) + len(first.test) == 1797 and len(first.test) == 359
    assert torch.bincount(first.test.labels).tolist() == [36] * 5 + [35] + [36] * 4    # every class, evenly
    assert torch.equal(first.test.images, again.test.images)                         # the same split every time
    raw = load_digits()
    assert first.train.images.max() == 255 and first.train.images.dtype == torch.uint8
    pixels = {tuple(image.flatten().tolist()) for image in torch.cat([first.train.images, first.test.images])}
    assert tuple((raw.images[0] * 255 / 16).round().astype("uint8").flatten().tolist()) in pixels
    assert "stratified 1438 train / 359 test" in first.split


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX file format: magic (0, 0, dtype 0x08 = ubyte, dimensions), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_loads_through_torchvision_from_files_in_its_own_format(tmp_path):
    """What a user online gets: torchvision's MNIST reader over the IDX files it downloads, here
    written by hand into the cache folder, so the download itself is skipped."""
    raw = tmp_path / "downloads" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    train_images, test_images = generator.integers(0, 256, (20, 28, 28)), generator.integers(0, 256, (10, 28, 28))
    train_labels, test_labels = np.arange(20) % 10, np.arange(10)
    write_idx(raw / "train-images-idx3-ubyte", train_images)
    write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)
    bundle = load_data("mnist", cache_dir=tmp_path)
    assert bundle.input_shape == (1, 28, 28) and len(bundle.train) == 20 and len(bundle.test) == 10
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(train_images.astype(np.uint8)))
    assert bundle.test.labels.tolist() == test_labels.tolist()
    assert bundle.classes[0].startswith("0")


@pytest.mark.parametrize("source, name", [("cifar10", "cifar10"), ("digits", "digits"),
                                          ("folder:/srv/data/cifar10-jpeg.tar.gz", "cifar10-jpeg"),
                                          ("folder:../shared/data/my_photos", "my_photos"), ("folder:/x/y.tgz", "y")])
def test_a_data_source_is_named_without_its_path(source, name):
    from kd_core.data.sources import source_name

    assert source_name(source) == name
