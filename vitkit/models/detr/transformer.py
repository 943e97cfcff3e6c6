"""DETR's encoder-decoder transformer, with attention computed by ``F.scaled_dot_product_attention``.

Follows facebookresearch/detr's ``transformer.py``: positional encodings are
added to queries and keys (never values) at every layer, the decoder's object
queries enter as ``query_pos`` with a zero target, and the decoder returns the
(final-norm'ed) output of every layer so auxiliary losses can supervise each.
Post-norm by default like DETR; ``pre_norm`` moves LayerNorm before each block
(and adds a final encoder norm). Tensors are batch-first: (B, L, C).

Module and parameter names match DETR's checkpoints (``self_attn.in_proj_weight``,
``multihead_attn``, ``linear1``, ``norm3``, ``decoder.norm``...), so released
weights load by name.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed q/k/v projection), batch-first, computed with SDPA.

    DETR feeds different query, key and value tensors (position added to q and k
    only), which ``nn.MultiheadAttention`` routes through its slow general path;
    SDPA picks a fused kernel and takes the padding mask as a boolean attn_mask.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """(B, Lq, C), (B, Lk, C), (B, Lk, C), mask (B, Lk) True on padding -> (B, Lq, C)."""
        batch, query_len, dim = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
        )
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, query_len, dim))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _feedforward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, src: Tensor, padding_mask: Tensor, pos: Tensor) -> Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            q = k = x + pos
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=padding_mask))
            return src + self._feedforward(self.norm2(src))
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=padding_mask)))
        return self.norm2(src + self._feedforward(src))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _feedforward(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        if self.pre_norm:
            x = self.norm1(tgt)
            q = k = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, k, x))
            x = self.norm2(tgt)
            cross = self.multihead_attn(
                x + query_pos, memory + pos, memory, key_padding_mask=memory_padding_mask
            )
            tgt = tgt + self.dropout2(cross)
            return tgt + self._feedforward(self.norm3(tgt))
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        cross = self.multihead_attn(
            tgt + query_pos, memory + pos, memory, key_padding_mask=memory_padding_mask
        )
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self._feedforward(tgt))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.LayerNorm | None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: Tensor, padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.LayerNorm):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        """Returns (num_layers, B, Q, C): every layer's output through the shared final norm."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_padding_mask, pos, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder = TransformerEncoder(
            encoder_layer, num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None
        )
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> Tensor:
        """src, pos_embed: (B, C, H, W); mask: (B, H, W) True on padding; query_embed: (Q, C).

        Returns the decoder's per-layer outputs, (num_decoder_layers, B, Q, C).
        """
        batch = src.shape[0]
        src = src.flatten(2).transpose(1, 2)
        pos_embed = pos_embed.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        memory = self.encoder(src, mask, pos_embed)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, mask, pos_embed, query_pos)


def build_transformer(
    hidden_dim: int,
    nheads: int,
    enc_layers: int,
    dec_layers: int,
    dim_feedforward: int,
    dropout: float,
    pre_norm: bool,
) -> Transformer:
    return Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm)
