"""Sine positional encoding of a (possibly padded) feature map, as in DETR.

Coordinates are counted over the *valid* pixels only (a cumulative sum of the
inverted padding mask) and normalised by the valid extent, so a position means
"fraction of the way across this image" whatever padding its batch mates forced.
That is what lets an image alone and the same image inside a padded batch see
the same encodings.

DETR and Deformable DETR normalise differently: DETR's pixel i (counted from 1) sits at
i / n of the way, Deformable DETR's at (i - 0.5) / n, its centre (``offset=0.5``, which
``models/position_encoding.py`` of fundamentalvision/Deformable-DETR subtracts). Each
model uses its own official form, so released weights see the encodings they were
trained with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """``num_pos_feats`` sine/cosine features per axis; the output has ``2 * num_pos_feats`` channels.

    ``offset`` is subtracted from each pixel's 1-based valid-pixel count before normalising:
    0 for DETR, 0.5 for Deformable DETR (see the module docstring).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000.0,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """``mask``: (B, H, W), True on padding. Returns (B, 2 * num_pos_feats, H, W) float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def build_position_encoding(hidden_dim: int, offset: float = 0.0) -> PositionEmbeddingSine:
    """Half the channels encode y and half x, so the encoding adds onto ``hidden_dim`` features;
    ``offset``: 0 for DETR, 0.5 for Deformable DETR."""
    return PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, offset=offset)
