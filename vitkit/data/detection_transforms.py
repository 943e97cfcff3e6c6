"""DETR's detection augmentations with torchvision transforms v2, plus DETR's target format.

v2 transforms move ``tv_tensors.BoundingBoxes`` together with the pixels, so
flips, resizes and crops keep boxes consistent without hand-written geometry.
The recipe follows facebookresearch/detr's ``make_coco_transforms``: random
horizontal flip (``data.hflip``), then with even odds either a multi-scale resize of the shorter
side or a random crop followed by that resize; the SSD-style ``RandomIoUCrop``
stands in for DETR's ``RandomSizeCrop`` because it never crops every object
away. Boxes whose remaining area vanished are dropped with their labels
(``SanitizeBoundingBoxes``). Last, boxes become what the set criterion
compares predictions with: (cx, cy, w, h) divided by the transformed, unpadded
image's width and height.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from vitkit.data.transforms import normalize


def normalize_boxes(image: tv_tensors.Image, target: dict) -> tuple[tv_tensors.Image, dict]:
    """Target ``boxes`` as a plain (M, 4) float tensor of (cx, cy, w, h) relative to the image size."""
    height, width = image.shape[-2:]
    boxes = v2.functional.convert_bounding_box_format(
        target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH
    ).as_subclass(Tensor)
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return image, {**target, "boxes": boxes / scale}


def train_transforms(
    scales: Sequence[int], hflip: float, max_size: int | None = None, crop: bool = True
) -> v2.Compose:
    """Training pipeline: flip with probability ``hflip`` (``data.hflip``), shorter side resized to
    one of ``scales`` (longer side capped at ``max_size``), optionally after an IoU crop (half of the
    time), then normalise."""
    resize = v2.RandomShortestSize(min_size=list(scales), max_size=max_size)
    geometric = v2.RandomChoice([resize, v2.Compose([v2.RandomIoUCrop(), resize])]) if crop else resize
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(hflip),
            geometric,
            v2.SanitizeBoundingBoxes(),
            normalize(),
            normalize_boxes,
        ]
    )


def eval_transforms(size: int | None = None, max_size: int | None = None) -> v2.Compose:
    """Evaluation pipeline: optional resize of the shorter side to ``size``, then normalise.
    Predictions are mapped back to the original image by ``PostProcess`` via ``orig_size``."""
    resize = [v2.Resize(size, max_size=max_size)] if size is not None else []
    return v2.Compose([*resize, normalize(), normalize_boxes])
