"""CNN backbone of DETR: a torchvision ResNet with frozen BatchNorm, plus exact padding masks.

As in facebookresearch/detr, BatchNorm becomes ``FrozenBatchNorm2d`` (detection
batches are small, so batch statistics would be noise) and, when the trunk
starts from trained weights, the stem and ``layer1`` stay frozen too.

One departure, on purpose: DETR runs the CNN on the zero-padded batch and
downsamples the pixel mask by nearest-neighbour interpolation. After the first
conv + BN, padding is no longer zero, so the features along an image's right
and bottom border depend on how much padding its batch mates forced. Here the
CNN runs once per distinct image size on the unpadded images and the feature
maps are padded afterwards, so an image's features (and therefore DETR's
predictions) are the same alone or in any batch, and each feature mask is exact.
When every image in a batch has the same size (the shapes data, any eval
resize to a fixed size) that is a single batched call, as in DETR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from vitkit.errors import ConfigError
from vitkit.models.detr.position_encoding import PositionEmbeddingSine
from vitkit.models.resnet import build_resnet, load_backbone


class NestedTensor(NamedTuple):
    """A batch of images of different sizes: zero-padded at the bottom/right, and where the padding is."""

    tensors: Tensor  # (B, C, H, W)
    mask: Tensor  # (B, H, W), True on padding


def nested_tensor_from_images(images: Sequence[Tensor]) -> NestedTensor:
    """Pad (C, h, w) images into one (B, C, max h, max w) tensor, each image at the top-left corner."""
    channels = images[0].shape[0]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    tensors = images[0].new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for image, padded, padded_mask in zip(images, tensors, mask, strict=True):
        padded[:, : image.shape[-2], : image.shape[-1]].copy_(image)
        padded_mask[: image.shape[-2], : image.shape[-1]] = False
    return NestedTensor(tensors, mask)


def image_sizes(mask: Tensor) -> list[tuple[int, int]]:
    """(h, w) of each image's valid region, for images placed at the top-left as above."""
    heights = (~mask[:, :, 0]).sum(1).tolist()
    widths = (~mask[:, 0, :]).sum(1).tolist()
    return list(zip(heights, widths, strict=True))


class Backbone(nn.Module):
    """ResNet trunk returning the requested stages, each as a padded feature map with its mask."""

    def __init__(self, body: IntermediateLayerGetter, num_channels: list[int]):
        super().__init__()
        self.body = body
        self.num_channels = num_channels

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(image_sizes(samples.mask)):
            groups.setdefault(size, []).append(index)
        batch = samples.tensors.shape[0]
        if len(groups) == 1:
            ((height, width),) = groups
            features = self.body(samples.tensors[:, :, :height, :width]).values()
            return [NestedTensor(f, f.new_zeros((batch, *f.shape[-2:]), dtype=torch.bool)) for f in features]

        device = samples.tensors.device
        per_group = [
            (
                torch.tensor(indices, device=device),
                list(self.body(samples.tensors[indices, :, :h, :w]).values()),
            )
            for (h, w), indices in groups.items()
        ]
        outputs = []
        for level in range(len(self.num_channels)):
            maps = [(indices, features[level]) for indices, features in per_group]
            height = max(f.shape[-2] for _, f in maps)
            width = max(f.shape[-1] for _, f in maps)
            padded = maps[0][1].new_zeros((batch, maps[0][1].shape[1], height, width))
            mask = torch.ones((batch, height, width), dtype=torch.bool, device=device)
            for indices, f in maps:
                padded[indices, :, : f.shape[-2], : f.shape[-1]] = f
                mask[indices, : f.shape[-2], : f.shape[-1]] = False
            outputs.append(NestedTensor(padded, mask))
        return outputs


class Joiner(nn.Sequential):
    """The backbone plus a position encoding per returned map: ``backbone.0`` / ``backbone.1`` in DETR."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, samples: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        features = self[0](samples)
        positions = [self[1](f.mask).to(f.tensors.dtype) for f in features]
        return features, positions


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for buffer in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buffer).copy_(getattr(child, buffer))
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def build_backbone(
    arch: str,
    init_state: dict[str, Tensor] | None,
    return_layers: Sequence[str] = ("layer4",),
    train_backbone: bool = True,
    stem: str = "imagenet",
) -> Backbone:
    """A frozen-BN ResNet returning ``return_layers`` (in network order).

    ``init_state``: trunk weights (SSL or teacher, ``vitkit.models.resnet.backbone_state_dict``
    layout) or None to train from scratch. ``train_backbone=False`` freezes the whole trunk;
    otherwise, as in DETR, a pretrained stem and ``layer1`` stay frozen (they hold generic
    edges, and their gradients cost the most memory), while a scratch trunk trains entirely;
    note that from scratch the frozen BN holds identity statistics, so that trunk trains without
    normalisation (DETR always starts from trained weights).
    ``stem`` (``vitkit.models.resnet.STEMS``) must be the one the weights were trained with
    (DETR releases: "imagenet"); with the "small" stem layer4 has stride 8 instead of 32.
    """
    net = build_resnet(arch, stem=stem)
    if init_state is not None:
        try:
            load_backbone(net, init_state)
        except ValueError as err:
            raise ConfigError(
                f"the DETR backbone init weights do not fit arch={arch!r}, stem={stem!r}: {err}; set the "
                "DETR backbone arch and stem to those the weights were trained with"
            ) from err
    freeze_batch_norm(net)
    stages = [name for name, _ in net.named_children() if name.startswith("layer")]
    unknown = [name for name in return_layers if name not in stages]
    if unknown:
        raise ConfigError(f"backbone return_layers {unknown} are not ResNet stages; choose from {stages}")
    ordered = [name for name in stages if name in return_layers]
    body = IntermediateLayerGetter(net, return_layers={name: name for name in ordered})
    for name, parameter in body.named_parameters():
        pretrained_generic = init_state is not None and not name.startswith(("layer2", "layer3", "layer4"))
        parameter.requires_grad_(train_backbone and not pretrained_generic)
    num_channels = [getattr(net, name)[-1].expansion * 64 * 2 ** (int(name[-1]) - 1) for name in ordered]
    return Backbone(body, num_channels)
