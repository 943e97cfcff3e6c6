"""DeiT's distillation loss: the student's distillation head learns from a CNN teacher.

Follows facebookresearch/deit ``losses.py`` (``DistillationLoss``) term for term:

* ``none``: the base criterion on the class head only;
* ``soft``: ``(1 - alpha) * base + alpha * KL(teacher/T || dist/T) * T^2``, where the
  KL divergence is summed and divided by ``dist_logits.numel()`` (batch x classes),
  not by the batch size: DeiT's own normalisation, kept so ``alpha``/``tau`` mean
  what they mean in the paper's recipe;
* ``hard``: ``(1 - alpha) * base + alpha * CE(dist, argmax teacher)``; DeiT uses
  ``alpha = 0.5`` (``hard_distillation_alpha``) so both heads weigh equally.

The teacher sees exactly the images the student sees (after augmentation and
MixUp/CutMix), once per batch, frozen, in eval mode and without gradients.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import ConfigError

DistillationType = Literal["none", "soft", "hard"]
DISTILLATION_TYPES: tuple[str, ...] = ("none", "soft", "hard")


def build_base_criterion(label_smoothing: float, targets_are_soft: bool) -> nn.CrossEntropyLoss:
    """Cross-entropy for the class head, for hard labels or soft (MixUp/CutMix) targets.

    ``nn.CrossEntropyLoss`` with probability targets is timm's ``SoftTargetCrossEntropy``
    (``sum(-t * log_softmax(x))`` averaged over the batch). When the batch mixer
    already smoothed the targets (``targets_are_soft``), smoothing here again would
    count it twice, so it is only applied for integer labels (DeiT does the same:
    ``SoftTargetCrossEntropy`` with mixup, ``LabelSmoothingCrossEntropy`` without).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return nn.CrossEntropyLoss(label_smoothing=0.0 if targets_are_soft else label_smoothing)


class DistillationTerms(NamedTuple):
    """The total loss and its two parts (``distillation`` is zero for ``none``), for logging."""

    loss: torch.Tensor
    base: torch.Tensor
    distillation: torch.Tensor


class DistillationLoss(nn.Module):
    """Base loss on the class head plus a teacher-matching loss on the distillation head."""

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher: nn.Module | None,
        distillation_type: DistillationType,
        alpha: float,
        tau: float,
    ) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ConfigError(f"distillation_type {distillation_type!r} is not one of {DISTILLATION_TYPES}")
        if distillation_type != "none" and teacher is None:
            raise ConfigError(f"distillation_type {distillation_type!r} needs a teacher model")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ConfigError(f"distillation tau must be > 0, got {tau}")
        self.base_criterion = base_criterion
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.teacher = None if distillation_type == "none" else teacher
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DistillationLoss:
        """Keep the teacher in eval mode (batch-norm statistics frozen) whatever the loss's mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def terms(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
    ) -> DistillationTerms:
        """``outputs`` is the student's train-mode output: a tensor, or (cls_logits, dist_logits)."""
        cls_logits, dist_logits = (outputs, None) if isinstance(outputs, torch.Tensor) else outputs
        base = self.base_criterion(cls_logits, targets)
        if self.distillation_type == "none":
            return DistillationTerms(base, base, torch.zeros_like(base))
        if dist_logits is None:
            raise ValueError(
                "distillation needs the student's (cls_logits, dist_logits); "
                "use a distilled ViT in train mode"
            )
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)

        if self.distillation_type == "soft":
            T = self.tau
            kl = F.kl_div(
                F.log_softmax(dist_logits / T, dim=1),
                F.log_softmax(teacher_logits / T, dim=1),
                reduction="sum",
                log_target=True,
            )
            kd = kl * (T * T) / dist_logits.numel()
        else:  # hard
            kd = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        loss = (1 - self.alpha) * base + self.alpha * kd
        return DistillationTerms(loss, base, kd)

    def forward(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
    ) -> torch.Tensor:
        return self.terms(inputs, outputs, targets).loss
