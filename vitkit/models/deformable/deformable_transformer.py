"""Deformable DETR's encoder-decoder: deformable attention over multi-scale features.

Follows fundamentalvision/Deformable-DETR's ``deformable_transformer.py`` (and
its parameter names, so released weights load by name):

* the **encoder** runs deformable self-attention over the flattened features of
  all levels at once; each pixel is a query whose reference point is its own
  centre, and a learned level embedding tells the levels apart;
* the **decoder** runs plain self-attention among the object queries, then
  deformable cross-attention from each query to the features around its
  reference point, which a linear layer predicts from the query's positional
  embedding (or, in the two-stage variant, the encoder's top-scoring proposals);
* ``with_box_refine``: every decoder layer refines the reference boxes with its
  own box head; the refined boxes are detached before the next layer, so each
  layer's head learns to correct its input boxes rather than to steer earlier ones;
* ``two_stage``: the encoder output at every pixel proposes a box (a fixed-size
  anchor at that pixel, refined), and the top-scoring proposals become the
  decoder's queries and reference boxes.

Coordinates are normalised to each image's *valid* (unpadded) region and
scaled by the per-level valid ratios when sampling, so padding never moves a
query's reference point. Tensors are batch-first: (B, L, C).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.models.deformable.ms_deform_attn import MSDeformAttn, SpatialShapes
from vitkit.models.detr.transformer import MultiheadAttention


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so boxes at 0 or 1 stay finite; turns sigmoid outputs back into offsets."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2): the unpadded fraction of the map's width and height."""
    _, height, width = mask.shape
    valid_height = (~mask[:, :, 0]).sum(1)
    valid_width = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_width / width, valid_height / height], -1).float()


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor,
    ) -> Tensor:
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: SpatialShapes, ratios: Tensor) -> Tensor:
        """Each pixel's centre as its reference point: (B, S, L, 2).

        The centre is normalised by the valid extent of its own level, then scaled by each
        level's valid ratio, so that the point lands on the same place of the image in every
        level's (padded) map.
        """
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            ys = torch.arange(height, dtype=torch.float32, device=ratios.device) + 0.5
            xs = torch.arange(width, dtype=torch.float32, device=ratios.device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(1, -1) / (ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(1, -1) / (ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * ratios[:, None]

    def forward(
        self,
        src: Tensor,
        spatial_shapes: SpatialShapes,
        ratios: Tensor,
        pos: Tensor,
        padding_mask: Tensor,
    ) -> Tensor:
        reference_points = self.reference_points(spatial_shapes, ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        memory_padding_mask: Tensor,
    ) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt)))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """Returns every layer's output and the reference points each layer's output is relative to.

    ``bbox_embed`` (box refinement) and ``class_embed`` (two-stage) are the detection heads,
    attached by ``DeformableDETR`` as in the official code; None when unused.
    """

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        ratios: Tensor,
        query_pos: Tensor,
        memory_padding_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``reference_points``: (B, Q, 2) points or (B, Q, 4) boxes in [0, 1] of the valid image.
        Returns (num_layers, B, Q, C) outputs and (num_layers, B, Q, 2 or 4) reference points
        after each layer (refined ones with ``bbox_embed``, else the input ones repeated)."""
        outputs, references = [], []
        for layer_index, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference_points.shape[-1] == 4 else ratios
            level_points = reference_points[:, :, None] * scale[:, None]
            tgt = layer(tgt, query_pos, level_points, memory, spatial_shapes, memory_padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[layer_index](tgt)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    refined = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    )
                reference_points = refined.sigmoid().detach()
            outputs.append(tgt)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


class DeformableTransformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points
        )
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for every matrix, then each deformable attention's own init, as the official code."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine embedding of (B, K, 4) unnormalised proposal boxes: d_model / 2 features per
        coordinate, 2 * d_model in all (the official code hard-codes 128 per coordinate for 256)."""
        num_pos_feats = self.d_model // 2
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)

    def encoder_proposals(
        self, memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes
    ) -> tuple[Tensor, Tensor]:
        """One anchor per encoder pixel: centred on it, 0.05 * 2^level of the image wide and high.

        Returns the encoder output re-projected for the proposal heads and the anchors as logits
        (+inf on padding and near the border, where a proposal is not trusted; those pixels' memory
        is zeroed too), to which the box head's output is added.
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (height, width) in enumerate(spatial_shapes):
            mask = padding_mask[:, start : start + height * width].view(batch, height, width)
            valid_height = (~mask[:, :, 0]).sum(1)
            valid_width = (~mask[:, 0, :]).sum(1)
            ys = torch.arange(height, dtype=torch.float32, device=memory.device)
            xs = torch.arange(width, dtype=torch.float32, device=memory.device)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_width, valid_height], -1).view(batch, 1, 1, 2)
            grid = (grid[None] + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * 2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
        proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
        memory = memory.masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals.to(memory.dtype)

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos_embeds: list[Tensor],
        query_embed: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``srcs``/``pos_embeds``: per level (B, C, H_l, W_l); ``masks``: per level (B, H_l, W_l), True on
        padding; ``query_embed``: (Q, 2C) learned query position + content (not used in two-stage).

        Returns the decoder outputs (num_layers, B, Q, C), the initial reference points (B, Q, 2|4),
        those after each layer (num_layers, B, Q, 2|4) and, in two-stage, the encoder's proposal
        logits (B, S, num_classes) and unnormalised boxes (B, S, 4).
        """
        spatial_shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flatten = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[level]
                for level, pos in enumerate(pos_embeds)
            ],
            1,
        )
        ratios = torch.stack([valid_ratios(mask) for mask in masks], 1)
        memory = self.encoder(src_flatten, spatial_shapes, ratios, pos_flatten, mask_flatten)

        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.encoder_proposals(memory, mask_flatten, spatial_shapes)
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = (
                self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            )
            # Rank by the first class's logit, as the official code; never pick a pixel whose proposal
            # is invalid (padding, border): the official code does when their shared score (memory
            # zeroed there) ranks high enough, and then its queries depend on the batch's padding.
            scores = enc_outputs_class[..., 0].masked_fill(output_proposals[..., 0].isinf(), float("-inf"))
            topk = scores.topk(self.two_stage_num_proposals, dim=1).indices
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk[..., None].expand(-1, -1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = pos_trans.split(self.d_model, dim=2)
        else:
            if query_embed is None:
                raise ValueError("query_embed is required unless two_stage")
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            batch = src_flatten.shape[0]
            query_pos = query_pos[None].expand(batch, -1, -1)
            tgt = tgt[None].expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, ratios, query_pos, mask_flatten
        )
        return hs, reference_points, inter_references, enc_outputs_class, enc_outputs_coord_unact
