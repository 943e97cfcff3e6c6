"""Scoring a DeiT student head by head: class head, distillation head, their average, teacher agreement."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vitkit.data.datasets import Images
from vitkit.evaluation.classification import predict_logits, topk_accuracy
from vitkit.models.vit import VisionTransformer


@torch.no_grad()
def predict_heads(
    model: VisionTransformer,
    images: Images,
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class-head logits, distillation-head logits or None for a ViT without distillation token)."""
    model.eval()
    if not model.config.distilled:
        return predict_logits(model, images, transform, device, batch_size), None
    num_classes = model.config.num_classes
    both = predict_logits(
        lambda x: torch.cat(model.forward_heads(x), dim=1), images, transform, device, batch_size
    )
    return both[:, :num_classes], both[:, num_classes:]


def deit_logits(cls_logits: torch.Tensor, dist_logits: torch.Tensor | None) -> torch.Tensor:
    """DeiT's prediction: the mean of both heads' logits (without a distillation head, the class head's)."""
    return cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2


def head_scores(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor | None,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Top-1 of each head and of DeiT's prediction (the mean of both heads' logits).

    Without a distillation head, ``dist_top1`` is None and the prediction is the class head's.
    ``teacher_agreement``: how often the student's prediction is the teacher's argmax.
    """
    average = deit_logits(cls_logits, dist_logits)
    scores: dict[str, float | None] = {
        "cls_top1": topk_accuracy(cls_logits, labels, 1),
        "dist_top1": None if dist_logits is None else topk_accuracy(dist_logits, labels, 1),
        "avg_top1": topk_accuracy(average, labels, 1),
    }
    if teacher_logits is not None:
        agree = average.argmax(dim=1).eq(teacher_logits.argmax(dim=1)).float().mean().item()
        scores["teacher_agreement"] = agree
    return scores
