"""torchvision ResNets for small images.

The shapes data is 32x32 (classification, SSL) to 128x128 (detection). Two
stems are offered (``params.yaml: backbone.stem``):

- ``imagenet``: torchvision's own 7x7 stride-2 conv + max-pool. A 32x32 image
  reaches layer1 at 8x8. Measured on 2 CPU cores it trains about 10x faster
  than the CIFAR stem, which is what lets the whole DAG run in minutes; the
  default.
- ``small``: the MoCo/SimCLR CIFAR recipe, a 3x3 stride-1 conv and no
  max-pool, keeping full resolution into layer1 (16x the compute). Better for
  tiny images when a GPU is available.

The same module serves as SSL backbone, teacher and detection backbone, so
weights move between stages by state dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "small")


def build_resnet(arch: str = "resnet18", num_classes: int = 1000, stem: str = "imagenet") -> models.ResNet:
    """A torchvision ResNet; ``stem="small"`` swaps in the CIFAR-style stem."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet arch {arch!r}; choose one of {ARCHS}")
    if stem not in STEMS:
        raise ValueError(f"unknown ResNet stem {stem!r}; choose one of {STEMS}")
    net: models.ResNet = getattr(models, arch)(weights=None, num_classes=num_classes)
    if stem == "small":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def feature_dim(net: models.ResNet) -> int:
    """Width of the pooled feature that feeds ``net.fc``."""
    return net.fc.in_features


def backbone_state_dict(net: models.ResNet) -> dict[str, torch.Tensor]:
    """The trunk's weights without the classifier: what SSL hands to later stages."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def load_backbone(net: models.ResNet, state: dict[str, torch.Tensor]) -> None:
    """Load trunk weights, keeping ``net``'s own (freshly initialised) classifier.

    Strict on every trunk key: a backbone saved for another arch or stem fails
    loudly instead of silently training from a half-loaded network.
    """
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights do not fit this ResNet: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
