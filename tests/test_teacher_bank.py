"""Teacher banks: the stored targets are exactly the live teacher's outputs on the views the student
sees (feature maps included, for the terms that read them), banks are reused from the cache folder,
and the trainer refuses what a bank cannot serve."""
from __future__ import annotations

import pytest
import torch

from helpers import synthetic_bundle
from kd_core import models
from kd_core.cam import class_activation_map
from kd_core.data import AugmentConfig, normalize
from kd_core.data.augment import crop
from kd_core.training import Callback, TrainConfig, Trainer, freeze
from kd_core.training.teacher_bank import BankLoader, bank_key, build_bank, load_or_build_bank


def teacher(arch="resnet8", seed=1) -> models.Classifier:
    torch.manual_seed(seed)
    return freeze(models.create(arch, num_classes=2, **({"input_size": 16} if arch == "lightnn" else {})))


def student(seed=0) -> models.Classifier:
    torch.manual_seed(seed)
    return models.create("camnet", num_classes=2)


AUGMENT = AugmentConfig(crop_padding=2, flip=True)


@pytest.mark.parametrize("arch, cam_target", [("resnet8", "teacher"), ("resnet8", "label"), ("lightnn", "teacher")])
def test_bank_targets_are_the_live_teachers_outputs_on_the_views_the_student_sees(arch, cam_target):
    """resnet8 has a GAP + linear head (original CAM); lightnn a flatten head (Grad-CAM)."""
    data = synthetic_bundle(train_size=40)
    model = teacher(arch)
    bank = build_bank(model, data.train, data.mean, data.std, AUGMENT, views=3, cam_target=cam_target,
                      seed=5, batch_size=16)
    assert bank.logits.shape == (3, 40, 2) and bank.offsets.shape == (3, 2, 40) and bank.flips.shape == (3, 40)
    assert bank.offsets.max() <= 4 and bank.flips.any() and not bank.flips.all()
    loader = BankLoader(data.train, bank, 8, data.mean, data.std, seed=2)
    batches = list(loader)
    assert sum(len(labels) for _, labels, _ in batches) == 40
    for images, labels, targets in batches[:2]:
        live_logits = model(images)
        classes = live_logits.argmax(1) if cam_target == "teacher" else labels
        live_cams = class_activation_map(model, model.forward_features(images), classes)
        torch.testing.assert_close(targets.logits, live_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(targets.cams, live_cams, atol=1e-5, rtol=1e-5)


def test_a_banked_view_is_the_stored_crop_and_flip_of_the_image():
    data = synthetic_bundle(train_size=12)
    bank = build_bank(teacher(), data.train, data.mean, data.std, AUGMENT, views=2, seed=0)
    index, view = torch.arange(12), torch.tensor([0, 1] * 6)
    images = data.train.images.float() / 255
    viewed = bank.view_images(images, index, view)
    for sample in range(12):
        offsets = bank.offsets[view[sample], :, sample].long()[:, None]
        expected = crop(images[sample:sample + 1], 2, offsets)
        if bank.flips[view[sample], sample]:
            expected = expected.flip(3)
        assert torch.equal(viewed[sample:sample + 1], expected)
    assert bank.cams is None  # no CAM target: no maps


def test_views_are_drawn_anew_each_epoch_from_the_bank_only():
    data = synthetic_bundle(train_size=16)
    bank = build_bank(teacher(), data.train, data.mean, data.std, AUGMENT, views=2, seed=0)
    loader = BankLoader(data.train, bank, 16, data.mean, data.std, seed=0)
    model = teacher()
    seen = set()
    for _ in range(6):
        (images, _, targets), = list(loader)
        seen.add(targets.logits.sum().item())
        torch.testing.assert_close(targets.logits, model(images), atol=1e-5, rtol=1e-5)
    assert len(seen) > 1  # epochs differ in order and views


def test_banks_are_saved_and_reused(tmp_path):
    data = synthetic_bundle(train_size=16)
    calls = []

    def build():
        calls.append(1)
        return build_bank(teacher(), data.train, data.mean, data.std, AUGMENT, views=2, cam_target="teacher")

    first = load_or_build_bank(tmp_path, "key", build, padding=2)
    second = load_or_build_bank(tmp_path, "key", build, padding=2)
    assert len(calls) == 1
    # the cached file remembers what the build cost (to the millisecond), for runs that reuse it
    assert not first.reused and first.build_seconds > 0
    assert second.reused and second.build_seconds == pytest.approx(first.build_seconds, abs=5e-4)
    for name, tensor in first.tensors().items():
        assert torch.equal(second.tensors()[name], tensor), name
    (saved,) = (tmp_path / "teacher-banks").glob("*.safetensors")
    saved.write_bytes(b"not a safetensors file")
    load_or_build_bank(tmp_path, "key", build, padding=2)
    assert len(calls) == 2  # a damaged bank is rebuilt, never trusted
    assert not list((tmp_path / "teacher-banks").glob("*.tmp*"))


def test_bank_key_names_everything_the_targets_depend_on():
    data = synthetic_bundle(train_size=16)
    base = dict(teacher_weights="abc", split=data.train, augment=AUGMENT, views=4, cam_target="teacher", seed=0)
    key = bank_key(**base)
    assert bank_key(**base) == key
    changes = [{"teacher_weights": "abd"}, {"split": data.train.subset(8, seed=0)}, {"views": 5},
               {"augment": AugmentConfig(crop_padding=3)}, {"cam_target": None}, {"seed": 1}, {"features": True},
               {"augment": AugmentConfig(crop_padding=2, rotation=10)},
               {"augment": AugmentConfig(crop_padding=2, color_jitter=0.2)},
               {"augment": AugmentConfig(crop_padding=2, cutout=4)}]
    assert len({bank_key(**{**base, **change}) for change in changes} | {key}) == len(changes) + 1


class BankWatcher(Callback):
    def __init__(self):
        self.progress = []

    def on_bank_progress(self, trainer, done, total):
        self.progress.append((done, total))


def test_trainer_distils_from_a_bank_and_reuses_it(tmp_path):
    data = synthetic_bundle(train_size=64)
    settings = TrainConfig(epochs=3, batch_size=16, lr=0.05, augment=AUGMENT, teacher_views=2,
                           loss_weights={"ce": 0.5, "kd": 0.5, "cam": 1.0})
    watcher = BankWatcher()
    trainer = Trainer(student(), data, settings, teacher=teacher(), callbacks=[watcher], bank_dir=tmp_path)
    result = trainer.fit()
    assert isinstance(trainer.train_loader, BankLoader) and trainer.train_loader.bank.cams is not None
    assert watcher.progress[-1] == (2, 2)  # 2 views x one batch of 500
    assert all(info.train["kd"] > 0 and info.train["cam"] > 0 for info in result.history)
    assert result.history[-1].train["loss"] < result.history[0].train["loss"]
    again = BankWatcher()
    second = Trainer(student(), data, settings, teacher=teacher(), callbacks=[again], bank_dir=tmp_path).fit()
    assert again.progress == []  # loaded from the cache folder
    assert [info.train["loss"] for info in second.history] == [info.train["loss"] for info in result.history]


def test_stop_and_resume_with_a_bank_equals_an_uninterrupted_run(tmp_path):
    data = synthetic_bundle(train_size=64)
    settings = TrainConfig(epochs=3, batch_size=16, lr=0.05, augment=AUGMENT, teacher_views=2,
                           loss_weights={"ce": 0.5, "kd": 0.5})
    straight = Trainer(student(), data, settings, teacher=teacher(), bank_dir=tmp_path).fit()

    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, trainer, info):
            trainer.request_stop()

    state = tmp_path / "run.safetensors"
    Trainer(student(), data, settings, teacher=teacher(), callbacks=[StopAfterFirstEpoch()], state_path=state,
            bank_dir=tmp_path).fit()
    resumed = Trainer(student(seed=9), data, settings, teacher=teacher(), state_path=state, bank_dir=tmp_path).fit()
    assert [info.train["loss"] for info in resumed.history] == [info.train["loss"] for info in straight.history]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


RICH = AugmentConfig(crop_padding=2, flip=True, rotation=15, color_jitter=0.3, cutout=3)


def test_a_bank_replays_rotation_jitter_and_cutout_and_serves_the_teachers_outputs_on_them(tmp_path):
    """Every transform is stored as its draw and replayed in one order (rotate, crop, jitter, cut
    out, flip): the student's images are those transforms of its images, by hand, and its targets the
    live teacher's outputs on them; a mirrored view is the mirror image of that view."""
    from kd_core.data.augment import erase_squares, jitter, rotate

    data = synthetic_bundle(train_size=24)
    model = teacher()
    bank = build_bank(model, data.train, data.mean, data.std, RICH, views=3, cam_target="teacher", seed=4, batch_size=8)
    assert bank.angles.shape == (3, 24) and bank.angles.abs().max() <= torch.pi / 12
    assert bank.jitter.shape == (3, 3, 24) and ((bank.jitter - 1).abs() <= 0.3).all()
    assert bank.centers.shape == (3, 2, 24) and bank.cutout == 3
    index, view = torch.arange(24), torch.arange(24) % 3
    images = data.train.images.float() / 255
    viewed = bank.view_images(images, index, view)
    for sample in (0, 5, 13):
        v, one = view[sample], images[sample:sample + 1]
        expected = rotate(one, bank.angles[v, sample:sample + 1])
        expected = crop(expected, 2, bank.offsets[v, :, sample:sample + 1].long())
        expected = jitter(expected, bank.jitter[v, :, sample:sample + 1])
        expected = erase_squares(expected, 3, bank.centers[v, :, sample:sample + 1])
        expected = expected.flip(3) if bank.flips[v, sample] else expected
        torch.testing.assert_close(viewed[sample:sample + 1], expected)
    mirror = torch.ones(24, dtype=torch.bool)
    torch.testing.assert_close(bank.view_images(images, index, view, mirror), viewed.flip(3))
    for images_, labels, targets in BankLoader(data.train, bank, 8, data.mean, data.std, seed=1):
        torch.testing.assert_close(targets.logits, model(images_), atol=1e-5, rtol=1e-5)
    # what a job is told the bank holds: every stored draw, besides the logits and maps
    from kd_core.training.teacher_bank import bank_bytes

    stored = sum(tensor.numel() * tensor.element_size() for tensor in bank.tensors().values())
    assert bank_bytes(3, 24, 2, bank.cams.shape[2:], None, RICH) == stored
    # saved and read back with every draw
    saved = load_or_build_bank(tmp_path, "rich", lambda: bank, 2, cutout=3)
    read = load_or_build_bank(tmp_path, "rich", lambda: pytest.fail("rebuilt"), 2, cutout=3)
    assert read.reused and read.cutout == 3 and saved.tensors().keys() == read.tensors().keys()
    torch.testing.assert_close(read.view_images(images, index, view), viewed)


def test_a_bank_without_the_newer_transforms_keeps_the_draws_it_always_had():
    """Rotation, jitter and cutout are drawn after crop and flip, so adding them to the bank changed
    no existing bank: the crop offsets and flips of the same seed are those of a crop-and-flip bank."""
    data = synthetic_bundle(train_size=16)
    plain = build_bank(teacher(), data.train, data.mean, data.std, AUGMENT, views=2, seed=7)
    rich = build_bank(teacher(), data.train, data.mean, data.std, RICH, views=2, seed=7)
    assert plain.angles is None and plain.jitter is None and plain.centers is None
    assert torch.equal(plain.offsets, rich.offsets) and torch.equal(plain.flips, rich.flips)
    assert set(plain.tensors()) == {"offsets", "flips", "logits"}


def test_a_trainer_distils_from_a_bank_of_rotated_jittered_views(tmp_path):
    settings = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=RICH, teacher_views=2,
                           loss_weights={"ce": 0.5, "kd": 0.5})
    trainer = Trainer(student(), synthetic_bundle(train_size=32), settings, teacher=teacher(), bank_dir=tmp_path)
    result = trainer.fit()
    assert isinstance(trainer.train_loader, BankLoader) and trainer.train_loader.bank.angles is not None
    assert all(info.train["kd"] > 0 for info in result.history)


def test_cross_entropy_alone_ignores_teacher_views():
    settings = TrainConfig(epochs=1, batch_size=16, teacher_views=2, loss_weights={"ce": 1.0})
    trainer = Trainer(student(), synthetic_bundle(), settings, teacher=teacher())
    trainer.fit()
    assert not isinstance(trainer.train_loader, BankLoader)


def test_teacher_views_must_not_be_negative():
    with pytest.raises(ValueError, match="teacher views must not be negative"):
        TrainConfig(teacher_views=-1).validate()


def test_a_stop_during_the_bank_build_abandons_it_and_trains_nothing(tmp_path):
    class StopAtFirstBatch(BankWatcher):
        def on_bank_progress(self, trainer, done, total):
            super().on_bank_progress(trainer, done, total)
            trainer.request_stop()

    settings = TrainConfig(epochs=2, batch_size=16, teacher_views=3, loss_weights={"ce": 0.5, "kd": 0.5})
    watcher = StopAtFirstBatch()
    trainer = Trainer(student(), synthetic_bundle(), settings, teacher=teacher(), callbacks=[watcher], bank_dir=tmp_path)
    result = trainer.fit()
    assert result.stopped and result.epochs_done == 0 and trainer.global_step == 0
    assert watcher.progress == [(1, 3)]
    assert not (tmp_path / "teacher-banks").exists() or not list((tmp_path / "teacher-banks").iterdir())


def test_a_bank_for_feature_terms_keeps_the_teachers_feature_maps_of_each_view(tmp_path):
    """With a FitNets hint (or AT, cosine) the bank also stores the teacher's feature maps, in
    bfloat16, and the student's batches carry those of exactly its views."""
    data = synthetic_bundle(train_size=40)
    model = teacher()
    bank = build_bank(model, data.train, data.mean, data.std, AUGMENT, views=2, seed=3, features=True, batch_size=16)
    assert bank.features.dtype == torch.bfloat16 and bank.features.shape == (2, 40, 64, 4, 4)
    loader = BankLoader(data.train, bank, 8, data.mean, data.std, seed=1)
    images, _, targets = next(iter(loader))
    live = model.forward_features(images)
    torch.testing.assert_close(targets.features, live.to(torch.bfloat16).float())
    assert targets.features.dtype == torch.float32

    settings = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=AUGMENT, teacher_views=2,
                           loss_weights={"ce": 0.5, "kd": 0.5, "feature": 1.0, "at": 1.0})
    trainer = Trainer(student(), synthetic_bundle(train_size=64), settings, teacher=teacher(), bank_dir=tmp_path)
    result = trainer.fit()
    assert isinstance(trainer.train_loader, BankLoader) and trainer.train_loader.bank.features is not None
    assert all(info.train["feature"] > 0 and info.train["at"] > 0 for info in result.history)
    (saved,) = (tmp_path / "teacher-banks").iterdir()
    plain = TrainConfig(**{**vars(settings), "loss_weights": {"ce": 0.5, "kd": 0.5}})
    other = Trainer(student(), synthetic_bundle(train_size=64), plain, teacher=teacher(), bank_dir=tmp_path)
    other.fit()
    assert other.train_loader.bank.features is None  # KD alone keeps a small bank of its own
    assert len(list((tmp_path / "teacher-banks").iterdir())) == 2 and saved.exists()


def test_a_bank_whose_feature_maps_would_not_fit_is_refused(monkeypatch):
    from kd_core.training import teacher_bank

    monkeypatch.setattr(teacher_bank, "MAX_FEATURE_BYTES", 1000)
    settings = TrainConfig(epochs=1, batch_size=16, teacher_views=2, loss_weights={"ce": 0.5, "feature": 1.0})
    with pytest.raises(ValueError, match=r"would hold 0\.0 GB of teacher feature maps \(\(64, 4, 4\) per view"):
        Trainer(student(), synthetic_bundle(train_size=64), settings, teacher=teacher())


def test_a_mirrored_view_is_the_views_mirror_image_with_its_logits_and_mirrored_maps():
    data = synthetic_bundle(train_size=40)
    model = teacher()
    bank = build_bank(model, data.train, data.mean, data.std, AUGMENT, views=2, cam_target="teacher", seed=4,
                      features=True, batch_size=16)
    index, view = torch.arange(40), torch.tensor([0, 1] * 20)
    mirror = torch.arange(40) % 3 == 0
    images = data.train.images.float() / 255
    plain, mirrored = bank.view_images(images, index, view), bank.view_images(images, index, view, mirror)
    assert torch.equal(mirrored[mirror], plain[mirror].flip(3)) and torch.equal(mirrored[~mirror], plain[~mirror])
    same, flipped = bank.targets(index, view, torch.device("cpu")), bank.targets(index, view, torch.device("cpu"), mirror)
    assert torch.equal(flipped.logits, same.logits)  # the view's own logits
    assert torch.equal(flipped.cams[mirror], same.cams[mirror].flip(-1))
    assert torch.equal(flipped.cams[~mirror], same.cams[~mirror])
    assert torch.equal(flipped.features[mirror], same.features[mirror].flip(-1))


def test_a_mirroring_loader_shows_both_orientations_of_every_view_with_its_targets(tmp_path):
    data = synthetic_bundle(train_size=16)
    bank = build_bank(teacher(), data.train, data.mean, data.std, AugmentConfig(crop_padding=0, flip=False),
                      views=1, seed=0)
    loader = BankLoader(data.train, bank, 16, data.mean, data.std, seed=0, mirror=True)
    upright = normalize(data.train.images.float() / 255, data.mean, data.std)
    seen = set()
    for _ in range(8):
        for images, _, targets in loader:
            for image, logits in zip(images, targets.logits):
                sample = int(torch.argmin(torch.minimum((upright - image).abs().flatten(1).sum(1),
                                                        (upright.flip(3) - image).abs().flatten(1).sum(1))))
                mirrored = torch.equal(image, upright[sample].flip(2))
                assert mirrored or torch.equal(image, upright[sample])
                assert torch.equal(logits, bank.logits[0, sample])  # a mirror keeps its view's logits
                seen.add((sample, mirrored))
    assert len(seen) == 32  # every image in both orientations (8 draws each)

    settings = TrainConfig(epochs=1, batch_size=16, augment=AUGMENT, teacher_views=2, mirror_views=True,
                           loss_weights={"ce": 0.5, "kd": 0.5})
    trainer = Trainer(student(), data, settings, teacher=teacher(), bank_dir=tmp_path)
    trainer.fit()
    assert trainer.train_loader.mirror


def test_mirrored_views_without_a_bank_change_nothing(tmp_path):
    """A recipe with mirrored views run with the live teacher (teacher views 0) trains exactly as
    without them: fresh draws already flip."""
    data = synthetic_bundle(train_size=32)
    runs = []
    for mirror in (False, True):
        settings = TrainConfig(epochs=1, batch_size=16, augment=AUGMENT, teacher_views=0, mirror_views=mirror,
                               loss_weights={"ce": 0.5, "kd": 0.5})
        trainer = Trainer(student(), data, settings, teacher=teacher(), bank_dir=tmp_path)
        trainer.fit()
        runs.append([p.detach().clone() for p in trainer.model.parameters()])
        assert not isinstance(trainer.train_loader, BankLoader)
    for plain, mirrored in zip(*runs):
        assert torch.equal(plain, mirrored)
