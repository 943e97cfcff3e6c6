"""DETR: a CNN, a transformer and N object queries decoded in parallel into a set of boxes.

Read top to bottom: the model (``DETR``), its box head (``MLP``), the config
(``DETRConfig``) and the builders that wire model, matcher and loss from it,
then the optimizer parameter groups. Follows facebookresearch/detr's
``models/detr.py``; module names match its checkpoints (see ``checkpoint.py``).

Classes follow DETR's convention: ``num_classes`` is the largest category id
plus one (category ids are used as class indices directly, so the shapes
data's ids 1..6 need ``num_classes=7``), and index ``num_classes`` is "no object".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.models.detr.backbone import Joiner, NestedTensor, build_backbone
from vitkit.models.detr.criterion import SetCriterion
from vitkit.models.detr.matcher import HungarianMatcher
from vitkit.models.detr.position_encoding import build_position_encoding
from vitkit.models.detr.transformer import Transformer, build_transformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head: 3 layers)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip(dims, [*dims[1:], output_dim], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.aux_loss = aux_loss

    def forward(self, samples: NestedTensor | Tensor) -> dict:
        """Predict ``num_queries`` (class, box) pairs per image.

        ``samples``: a ``NestedTensor`` (see ``nested_tensor_from_images``), or a plain
        (B, 3, H, W) tensor of same-sized images. Returns ``pred_logits`` (B, Q,
        num_classes + 1), ``pred_boxes`` (B, Q, 4) as (cx, cy, w, h) relative to each
        image's unpadded size, and, with ``aux_loss``, ``aux_outputs``: the same two
        for every decoder layer but the last.
        """
        if isinstance(samples, Tensor):
            samples = NestedTensor(
                samples, samples.new_zeros(samples.shape[0], *samples.shape[2:], dtype=torch.bool)
            )
        features, positions = self.backbone(samples)
        src, mask = features[-1]
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, positions[-1])
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out: dict = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1], strict=True)
            ]
        return out


@dataclass(frozen=True)
class DETRConfig:
    """Everything that defines a DETR model and its set loss.

    The fields params.yaml sets (the ``detr`` section, the ``backbone`` trunk and ``num_classes``
    from the data) have no default: ``vitkit.tasks.detection`` builds the config from the params,
    which validate them. The matching costs and loss weights are the paper's; no param changes
    them. ``DETRConfig.paper(num_classes)`` is the paper's model on a ResNet-18 trunk.
    """

    num_classes: int  # largest category id + 1
    arch: str
    stem: str  # vitkit.models.resnet.STEMS; "small" puts layer4 at stride 8 instead of 32
    train_backbone: bool
    # The ResNet stage whose map feeds the transformer. DETR: layer4 (stride 32); on small images an
    # earlier stage gives more tokens (128 px: layer4 4x4, layer3 8x8) at the price of fewer channels.
    return_layer: str
    hidden_dim: int
    nheads: int
    enc_layers: int
    dec_layers: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool
    num_queries: int
    aux_loss: bool
    eos_coef: float
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0

    @classmethod
    def paper(cls, num_classes: int, **overrides: Any) -> DETRConfig:
        """The paper's DETR (6+6 layers of width 256, 100 queries, layer4) with ``overrides``."""
        return cls(**{**PAPER_DETR, "num_classes": num_classes, **overrides})


PAPER_DETR = {
    "arch": "resnet18",
    "stem": "imagenet",
    "train_backbone": True,
    "return_layer": "layer4",
    "hidden_dim": 256,
    "nheads": 8,
    "enc_layers": 6,
    "dec_layers": 6,
    "dim_feedforward": 2048,
    "dropout": 0.1,
    "pre_norm": False,
    "num_queries": 100,
    "aux_loss": True,
    "eos_coef": 0.1,
}


def build_detr(cfg: DETRConfig, backbone_state: dict[str, Tensor] | None = None) -> DETR:
    """The model; ``backbone_state`` is a trunk state dict (SSL or teacher) or None for scratch."""
    backbone = build_backbone(
        cfg.arch, backbone_state, (cfg.return_layer,), train_backbone=cfg.train_backbone, stem=cfg.stem
    )
    joiner = Joiner(backbone, build_position_encoding(cfg.hidden_dim))
    transformer = build_transformer(
        cfg.hidden_dim,
        cfg.nheads,
        cfg.enc_layers,
        cfg.dec_layers,
        cfg.dim_feedforward,
        cfg.dropout,
        cfg.pre_norm,
    )
    return DETR(joiner, transformer, cfg.num_classes, cfg.num_queries, aux_loss=cfg.aux_loss)


def build_criterion(cfg: DETRConfig) -> SetCriterion:
    """Hungarian matcher + set loss, with one weight per loss term and per auxiliary decoder layer."""
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou)
    final_layer = {
        "loss_ce": cfg.ce_loss_coef,
        "loss_bbox": cfg.bbox_loss_coef,
        "loss_giou": cfg.giou_loss_coef,
    }
    weight_dict = dict(final_layer)
    if cfg.aux_loss:
        weight_dict |= {f"{k}_{i}": v for i in range(cfg.dec_layers - 1) for k, v in final_layer.items()}
    return SetCriterion(
        cfg.num_classes, matcher, weight_dict, cfg.eos_coef, losses=("labels", "boxes", "cardinality")
    )


def param_groups(model: nn.Module, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
    """AdamW groups: the CNN at ``lr_backbone`` (DETR: lr / 10) so pretrained features are not wrecked
    while the randomly initialised transformer catches up; frozen parameters are left out."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not n.startswith("backbone.")], "lr": lr},
        {"params": [p for n, p in trainable if n.startswith("backbone.")], "lr": lr_backbone},
    ]
    return [{**group, "weight_decay": weight_decay} for group in groups if group["params"]]
