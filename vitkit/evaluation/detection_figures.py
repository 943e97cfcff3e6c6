"""Predicted against ground-truth boxes on sample images: the quickest check that a detector works."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from vitkit.io import atomic_path

GT_COLOR = "lime"
PRED_COLOR = "red"


def draw_detections(
    image: Tensor,
    gt_boxes: Tensor,
    pred_boxes: Tensor,
    pred_labels: Sequence[str],
    min_side: int = 256,
) -> Tensor:
    """(3, H, W) uint8 image with ground truth in green and labelled predictions in red, boxes in
    pixels (xyxy). Small images are enlarged (nearest) to ``min_side`` so the labels stay legible."""
    factor = max(1, math.ceil(min_side / min(image.shape[-2:])))
    if factor > 1:
        image = F.resize(
            image, [image.shape[-2] * factor, image.shape[-1] * factor], F.InterpolationMode.NEAREST
        )
    image = draw_bounding_boxes(image, gt_boxes * factor, colors=GT_COLOR, width=2)
    return draw_bounding_boxes(
        image, pred_boxes * factor, labels=list(pred_labels), colors=PRED_COLOR, width=1
    )


def plot_detections(
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    detections: Sequence[Mapping[str, Tensor]],
    category_names: Mapping[int, str],
    out_png: Path,
    score_threshold: float = 0.5,
    columns: int = 4,
) -> None:
    """A grid of ``images`` (uint8, original size) with their ``targets`` (``boxes`` xyxy pixels)
    and the ``detections`` of ``PostProcess`` scoring at least ``score_threshold``; saved atomically."""
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(3 * columns, 3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, image, target, detection in zip(axes, images, targets, detections, strict=False):
        keep = detection["scores"] >= score_threshold
        labels = [
            f"{category_names.get(int(label), int(label))} {score:.2f}"
            for label, score in zip(
                detection["labels"][keep], detection["scores"][keep].tolist(), strict=True
            )
        ]
        drawn = draw_detections(image, target["boxes"], detection["boxes"][keep], labels)
        ax.imshow(drawn.permute(1, 2, 0).numpy())
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"green: ground truth, red: predictions (score >= {score_threshold})")
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
