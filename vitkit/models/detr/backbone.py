"""CNN backbone of DETR: a torchvision ResNet with frozen BatchNorm, plus exact padding masks.

As in facebookresearch/detr, BatchNorm becomes ``FrozenBatchNorm2d`` (detection
batches are small, so batch statistics would be noise) and, when the trunk
starts from trained weights, the stem and ``layer1`` stay frozen too.

One departure, on purpose: DETR runs the CNN on the zero-padded batch and
downsamples the pixel mask by nearest-neighbour interpolation. After the first
conv + BN, padding is no longer zero, so the features along an image's right
and bottom border depend on how much padding its batch mates forced. Here the
CNN also runs once on the whole padded batch, but every frozen BatchNorm and the
max-pool set the padding back to zero (a forward hook): a conv then reads zeros
beyond an image's edge exactly as it would on the image alone (max-pool inputs
are ReLU outputs, >= 0, so a zero never wins over the window's valid values),
so an image's features (and DETR's predictions) are the same alone or in any
batch, and each feature mask is exact. Every ResNet downsampling (7x7/2, 3x3/2
and 1x1/2 convs, the 3x3/2 max-pool) maps a side of n pixels to ceil(n / 2), so
the valid size at every resolution is known on the device from the input's
(no host read). An earlier version ran the CNN once per distinct image size
instead: 13-18 trunk calls per batch under multi-scale training with crops.
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


def _valid_sides(mask: Tensor) -> Tensor:
    """(B, 2): height and width of each image's valid region (top-left placed), on the mask's device."""
    return torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], dim=1)


def _downsampled(valid: Tensor, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Valid sides (B, 2) of a ``padded``-sized input, at a map of ``size`` the ResNet made from it.

    Each stride-2 step maps n to ceil(n / 2); the number of steps is the smallest k with
    ceil(padded / 2^k) == size (ambiguous only at size 1, where every valid side is 1 too).
    """
    sides = []
    for axis in range(2):
        steps = next(k for k in range(32) if -(-padded[axis] // 2**k) == size[axis])
        sides.append(torch.div(valid[:, axis] + 2**steps - 1, 2**steps, rounding_mode="floor"))
    return torch.stack(sides, dim=1)


def _padding_mask(valid: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) True outside each image's ``valid`` (B, 2) top-left region."""
    rows = torch.arange(size[0], device=valid.device)[None, :] >= valid[:, :1]
    cols = torch.arange(size[1], device=valid.device)[None, :] >= valid[:, 1:]
    return rows[:, :, None] | cols[:, None, :]


class Backbone(nn.Module):
    """ResNet trunk returning the requested stages, each as a padded feature map with its exact mask."""

    def __init__(self, body: IntermediateLayerGetter, num_channels: list[int]):
        super().__init__()
        self.body = body
        self.num_channels = num_channels
        # the current batch's valid sides and padded size, for the hooks (set only during forward)
        self._valid: tuple[Tensor, tuple[int, int]] | None = None
        for module in body.modules():
            if isinstance(module, FrozenBatchNorm2d | nn.MaxPool2d):
                module.register_forward_hook(self._zero_padding)

    def _zero_padding(self, module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> Tensor | None:
        if self._valid is None:
            return None
        valid, padded = self._valid
        size = (output.shape[-2], output.shape[-1])
        return output.masked_fill(_padding_mask(_downsampled(valid, padded, size), size)[:, None], 0)

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        padded = (samples.tensors.shape[-2], samples.tensors.shape[-1])
        valid = _valid_sides(samples.mask)
        self._valid = (valid, padded)
        try:
            features = list(self.body(samples.tensors).values())
        finally:
            self._valid = None
        outputs = []
        for f in features:
            size = (f.shape[-2], f.shape[-1])
            outputs.append(NestedTensor(f, _padding_mask(_downsampled(valid, padded, size), size)))
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
