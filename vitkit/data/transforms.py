"""Classification transforms (torchvision transforms v2) for small images."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

# ImageNet statistics: a neutral default that also suits users' photos.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def train_transform(image_size: int, hflip: float) -> v2.Compose:
    """Standard small-image recipe: padded random crop + a horizontal flip with probability ``hflip``
    (``data.hflip``: 0 for data a mirror changes, such as text)."""
    return v2.Compose(
        [
            v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
            v2.RandomHorizontalFlip(hflip),
            normalize(),
        ]
    )


def eval_transform() -> v2.Compose:
    return normalize()


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] for figures."""
    mean = torch.tensor(MEAN, device=images.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=images.device).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)
