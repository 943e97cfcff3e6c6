"""DeiT's distillation loss against its formulas, written out independently here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vitkit.errors import ConfigError
from vitkit.losses.distillation import DistillationLoss, build_base_criterion

ROOT = Path(__file__).resolve().parents[2]
B, C = 4, 5


class RecordingTeacher(nn.Module):
    """A tiny frozen-able teacher with batch norm, remembering what it was called on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, C), nn.BatchNorm1d(C))
        with torch.no_grad():
            self.net[2].running_mean.uniform_(-1, 1)
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x)
        return self.net(x)


def fixed_batch():
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(B, 3, 2, 2, generator=g)
    cls_logits = torch.randn(B, C, generator=g, requires_grad=True)
    dist_logits = torch.randn(B, C, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 4])
    return inputs, cls_logits, dist_logits, labels


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        total += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    return torch.tensor(total / len(labels))


def softmax_by_hand(row: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def test_soft_distillation_matches_formula():
    inputs, cls_logits, dist_logits, labels = fixed_batch()
    teacher = RecordingTeacher()
    alpha, T = 0.3, 2.5
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, T)
    got = loss.terms(inputs, (cls_logits, dist_logits), labels)

    t_logits = teacher.net.eval()(inputs)
    kl = 0.0
    for s_row, t_row in zip(dist_logits.tolist(), t_logits.tolist(), strict=True):
        p_s, p_t = softmax_by_hand(s_row, T), softmax_by_hand(t_row, T)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    kd = kl * T * T / (B * C)  # DeiT divides the summed KL by numel, not by the batch size
    base = cross_entropy_by_hand(cls_logits, labels)
    assert got.distillation.item() == pytest.approx(kd, rel=1e-5)
    assert got.base.item() == pytest.approx(base.item(), rel=1e-5)
    assert got.loss.item() == pytest.approx((1 - alpha) * base.item() + alpha * kd, rel=1e-5)


def test_hard_distillation_matches_formula():
    inputs, cls_logits, dist_logits, labels = fixed_batch()
    teacher = RecordingTeacher()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.5, tau=1.0)
    got = loss.terms(inputs, (cls_logits, dist_logits), labels)

    teacher_labels = teacher.net.eval()(inputs).argmax(dim=1)
    assert not torch.equal(teacher_labels, labels)  # otherwise the test could not tell the targets apart
    kd = cross_entropy_by_hand(dist_logits, teacher_labels).item()
    base = cross_entropy_by_hand(cls_logits, labels).item()
    assert got.distillation.item() == pytest.approx(kd, rel=1e-5)
    assert got.loss.item() == pytest.approx(0.5 * base + 0.5 * kd, rel=1e-5)


def test_none_uses_the_class_head_only_and_needs_no_teacher():
    inputs, cls_logits, dist_logits, labels = fixed_batch()
    loss = DistillationLoss(nn.CrossEntropyLoss(), None, "none", alpha=0.5, tau=1.0)
    base = cross_entropy_by_hand(cls_logits, labels).item()
    assert loss(inputs, (cls_logits, dist_logits), labels).item() == pytest.approx(base, rel=1e-5)
    assert loss(inputs, cls_logits, labels).item() == pytest.approx(base, rel=1e-5)


def test_teacher_is_frozen_in_eval_mode_and_called_once_on_the_student_inputs():
    inputs, cls_logits, dist_logits, labels = fixed_batch()
    teacher = RecordingTeacher()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=0.5, tau=3.0)
    loss.train()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())

    loss(inputs, (cls_logits, dist_logits), labels).backward()
    assert len(teacher.calls) == 1 and teacher.calls[0] is inputs
    assert cls_logits.grad is not None and dist_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_soft_targets_and_label_smoothing_in_the_base_criterion():
    _, cls_logits, _, labels = fixed_batch()
    logits = cls_logits.detach()
    soft = torch.softmax(torch.randn(B, C, generator=torch.Generator().manual_seed(5)), dim=1)
    # timm's SoftTargetCrossEntropy: sum(-t * log_softmax(x)), averaged over the batch
    expected = (
        sum(
            -sum(t * (x - math.log(sum(math.exp(v) for v in row))) for t, x in zip(trow, row, strict=True))
            for trow, row in zip(soft.tolist(), logits.tolist(), strict=True)
        )
        / B
    )
    mixed = build_base_criterion(label_smoothing=0.1, targets_are_soft=True)
    assert mixed(logits, soft).item() == pytest.approx(expected, rel=1e-5)

    eps = 0.1
    smoothed = torch.full((B, C), eps / C)
    smoothed[torch.arange(B), labels] += 1 - eps
    plain = build_base_criterion(label_smoothing=eps, targets_are_soft=False)
    assert plain(logits, labels).item() == pytest.approx(mixed(logits, smoothed).item(), rel=1e-5)


def test_misuse_is_reported():
    inputs, cls_logits, _, labels = fixed_batch()
    with pytest.raises(ConfigError, match="not one of"):
        DistillationLoss(nn.CrossEntropyLoss(), RecordingTeacher(), "medium", 0.5, 1.0)
    with pytest.raises(ConfigError, match="needs a teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "hard", 0.5, 1.0)
    with pytest.raises(ConfigError, match="tau"):
        DistillationLoss(nn.CrossEntropyLoss(), RecordingTeacher(), "soft", 0.5, 0.0)
    loss = DistillationLoss(nn.CrossEntropyLoss(), RecordingTeacher(), "soft", 0.5, 1.0)
    with pytest.raises(ValueError, match="distilled ViT"):
        loss(inputs, cls_logits, labels)


# --- the targets the loss receives: DeiT's batch mixer, per-image transforms and weights EMA


def test_mixer_smooths_like_timm_then_mixes():
    from vitkit.data.deit_transforms import BatchMixer

    labels = torch.tensor([0, 3, 1, 4])
    images = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = 0.1
    off, on = eps / C, 1 - eps + eps / C  # timm's mixup_target on/off values

    def timm_target(y: torch.Tensor) -> torch.Tensor:
        t = torch.full((B, C), off)
        t[torch.arange(B), y] = on
        return t

    same_images, targets = BatchMixer(C, 0.0, 0.0, eps)(images, labels)
    assert same_images is images and torch.allclose(targets, timm_target(labels))

    torch.manual_seed(0)
    mixup = BatchMixer(C, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=eps)
    mixed, targets = mixup(images, labels)
    lam = ((mixed - images.roll(1, 0)) / (images - images.roll(1, 0))).median().item()
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-5)
    expected = lam * timm_target(labels) + (1 - lam) * timm_target(labels.roll(1, 0))
    assert torch.allclose(targets, expected, atol=1e-5)

    torch.manual_seed(0)
    cutmix = BatchMixer(C, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=eps)
    cut, targets = cutmix(images, labels)
    kept = (cut == images).all(dim=1).float().mean().item()  # share of pixels still the image's own
    expected = kept * timm_target(labels) + (1 - kept) * timm_target(labels.roll(1, 0))
    assert torch.allclose(targets, expected, atol=1e-5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(B))


def test_train_and_eval_transforms_produce_normalised_tensors():
    from PIL import Image

    from vitkit.config import load_params
    from vitkit.data.deit_transforms import build_deit_train_transform, build_eval_transform

    # the deit section at the old library defaults: DeiT's recipe, with a crop scale for small images
    deit = load_params(ROOT / "params.yaml").deit.model_copy(
        update={"crop_scale": 0.35, "randaug_ops": 2, "randaug_magnitude": 9, "random_erasing": 0.25}
    )
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    train = build_deit_train_transform(deit, img_size=32, hflip=0.5)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    for inp in (pixels, pil):
        out = train(inp)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(build_eval_transform(32, mean, std)(pixels), expected, atol=1e-5)
    assert build_eval_transform(24, mean, std, crop_pct=0.875)(pil).shape == (3, 24, 24)


def test_model_ema_follows_the_ema_formula():
    from vitkit.data.deit_transforms import build_model_ema

    model = nn.Linear(3, 2)
    ema = build_model_ema(model, decay=0.9)
    start = model.weight.detach().clone()
    ema.update_parameters(model)  # first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, 0.9 * start + 0.1 * (start + 1.0))
