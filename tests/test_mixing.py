"""Mixing augmentation: mixup and CutMix images and labels, cross-entropy over both labels, and a
teacher bank whose mixed views' targets are the teacher's outputs for exactly that mixed image."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import synthetic_bundle
from kd_core import models
from kd_core.data import AugmentConfig, BatchLoader
from kd_core.data.mixing import MixDraw, MixedLabels, draw_mix, mix_images
from kd_core.losses import ModelOutput, StepOutputs
from kd_core.losses.terms import CrossEntropy
from kd_core.training import TrainConfig, Trainer, freeze
from kd_core.training.teacher_bank import BankLoader, bank_key, build_bank, load_or_build_bank


def test_mixup_blends_by_the_share_and_cutmix_pastes_a_box_of_that_area():
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    blended = mix_images(a, b, MixDraw(torch.tensor([1, 0]), torch.tensor([0.25, 0.5]), None))
    assert torch.allclose(blended[0], torch.full((3, 8, 8), 0.75)) and torch.allclose(blended[1], torch.full((3, 8, 8), 0.5))
    generator = torch.Generator().manual_seed(0)
    draw = draw_mix("cutmix", 1.0, 64, 10, 8, 8, generator)
    pasted = mix_images(torch.zeros(64, 3, 8, 8), torch.ones(64, 3, 8, 8), draw)
    # lam is the share of the own image left showing, the box clipped at the border
    torch.testing.assert_close(1 - pasted[:, 0].mean((1, 2)), draw.lam)
    assert 0 <= draw.lam.min() and draw.lam.max() <= 1 and (draw.lam < 1).any() and draw.partners.max() < 10
    with pytest.raises(ValueError, match="mixing must be one of"):
        draw_mix("blend", 1.0, 4, 4, 8, 8, generator)
    with pytest.raises(ValueError, match="alpha must be positive"):
        draw_mix("mixup", 0.0, 4, 4, 8, 8, generator)


def test_cross_entropy_of_mixed_images_weighs_both_labels_by_their_shares():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    labels, partners, lam = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2]), torch.tensor([0.7, 0.5, 0.2, 1.0])
    log_probs = logits.log_softmax(1)
    expected = -(lam * log_probs[torch.arange(4), labels] + (1 - lam) * log_probs[torch.arange(4), partners]).mean()
    mixed = MixedLabels(labels, partners, lam)
    student = ModelOutput(None, logits, None)
    loss = CrossEntropy()(StepOutputs(student, None, mixed.dominant, mixed))["loss"]
    torch.testing.assert_close(loss, expected)
    assert mixed.dominant.tolist() == [0, 1, 0, 0]  # lam 0.2: the partner covers more


def test_a_mixing_loader_yields_mixed_labels_and_training_runs():
    data = synthetic_bundle(train_size=32)
    loader = BatchLoader(data.train, 8, data.mean, data.std, shuffle=True, augment=AugmentConfig(mix="mixup"), seed=1)
    images, labels = next(iter(loader))
    assert isinstance(labels, MixedLabels) and images.shape == (8, 3, 16, 16)
    assert 0 < labels.lam.min() and labels.lam.max() < 1
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, augment=AugmentConfig(mix="cutmix"), eval_every=0)
    train = Trainer(models.create("camnet", num_classes=2), data, config).fit().history[-1].train
    assert train["loss"] > 0 and train["ce"] > 0 and 0 <= train["train_top1"] <= 100
    with pytest.raises(ValueError, match="mixing must be one of"):
        TrainConfig(augment=AugmentConfig(mix="blend")).validate()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_mixed_bank_views_targets_are_the_teachers_outputs_for_exactly_that_mixed_image(kind, tmp_path):
    data = synthetic_bundle(train_size=24)
    torch.manual_seed(1)
    teacher = freeze(models.create("resnet8", num_classes=2))
    augment = AugmentConfig(crop_padding=2, flip=True, mix=kind)
    bank = build_bank(teacher, data.train, data.mean, data.std, augment, views=2, cam_target="teacher", seed=3,
                      batch_size=10)
    assert bank.partners.shape == (2, 24) and bank.lam.shape == (2, 24)
    assert (bank.boxes is not None) == (kind == "cutmix")
    loader = BankLoader(data.train, bank, 8, data.mean, data.std, seed=2)
    for images, labels, targets in loader:
        assert isinstance(labels, MixedLabels)
        torch.testing.assert_close(targets.logits, teacher(images), atol=1e-5, rtol=1e-5)
    # by hand, for one sample: its view's partner, share, box, crop and flip
    sample, view = 5, 1
    own, partner = data.train.images[sample].float() / 255, data.train.images[bank.partners[view, sample]].float() / 255
    if kind == "mixup":
        mixed = bank.lam[view, sample] * own + (1 - bank.lam[view, sample]) * partner
    else:
        top, bottom, left, right = bank.boxes[view, :, sample].tolist()
        mixed = own.clone()
        mixed[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    padded = F.pad(mixed[None], (2,) * 4, mode="reflect")[0]
    row, col = bank.offsets[view, :, sample].tolist()
    expected = padded[:, row:row + 16, col:col + 16]
    expected = expected.flip(2) if bank.flips[view, sample] else expected
    index, views = torch.tensor([sample]), torch.tensor([view])
    torch.testing.assert_close(bank.view_images(bank.source_images(data.train, index, views), index, views)[0], expected)
    # the mixing is part of the cache key, and a saved bank reads back with its partners
    plain = bank_key("w", data.train, AugmentConfig(crop_padding=2, flip=True), 2, "teacher", 3)
    assert bank_key("w", data.train, augment, 2, "teacher", 3) != plain
    saved = load_or_build_bank(tmp_path, "k", lambda: bank, 2)
    loaded = load_or_build_bank(tmp_path, "k", lambda: pytest.fail("rebuilt"), 2)
    assert saved is bank and torch.equal(loaded.partners, bank.partners) and torch.equal(loaded.lam, bank.lam)


def test_a_run_distils_from_a_mixed_bank():
    data = synthetic_bundle(train_size=32)
    torch.manual_seed(1)
    teacher = freeze(models.create("resnet8", num_classes=2))
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, teacher_views=2, eval_every=0,
                         augment=AugmentConfig(crop_padding=2, flip=True, mix="mixup"),
                         loss_weights={"ce": 0.5, "kd": 0.5})
    train = Trainer(models.create("camnet", num_classes=2), data, config, teacher=teacher).fit().history[-1].train
    assert train["loss"] > 0 and train["kd"] > 0 and train["ce"] > 0
