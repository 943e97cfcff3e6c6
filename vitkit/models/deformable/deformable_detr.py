"""Deformable DETR (Zhu et al., ICLR 2021): DETR with multi-scale deformable attention.

Read top to bottom: the input projections, the model (``DeformableDETR``), its
set loss pieces where they differ from DETR's (focal class cost and loss,
top-k post-processing), the config (``DeformableDETRConfig``) and the builders.
Follows fundamentalvision/Deformable-DETR's ``models/deformable_detr.py``;
module names match its checkpoints (see ``checkpoint.py``). The backbone,
position encoding, box MLP, Hungarian matching and set loss are DETR's
(``vitkit.models.detr``), specialised here by subclassing.

What differs from DETR, and why it converges in far fewer epochs:

* several feature levels (strides 8, 16, 32 of the ResNet + an extra 64 by default,
  see ``DeformableDETRConfig``), each projected to ``hidden_dim`` by a 1x1 conv +
  GroupNorm, coarser extra levels by 3x3 stride-2 convs;
* deformable attention: each query looks at a few learned points per level
  around a reference point instead of at every pixel;
* classes are scored by independent sigmoids trained with the focal loss (no
  "no object" class), with the class bias set so every query starts at
  probability 0.01: the loss is not swamped by the many unmatched queries;
* boxes are predicted relative to the query's reference point (and, with
  ``with_box_refine``, refined layer by layer); detections are the top-k
  (query, class) pairs, so one query may yield several classes.

Classes follow DETR's convention: ``num_classes`` is the largest category id
plus one (ids are class indices), but with sigmoid scoring no extra column.

Where it departs from the official code, on purpose, so that an image's outputs do not
depend on its batch mates:

* in a padded batch (``levels``): the backbone runs on the unpadded images (DETR's
  ``Backbone``), GroupNorm counts only valid pixels and zeroes padding
  (``MaskedGroupNorm``), and each level's mask is exact, where the official code runs
  the CNN and GroupNorm over the padding and interpolates the image mask;
* two-stage: a padding or border pixel, whose proposal the official code sets to +inf,
  never becomes a query (see ``DeformableTransformer.forward``).

Otherwise an official checkpoint gives the official outputs, to 1e-4 in float32 for the plain,
box-refining and two-stage variants against a transcription of the official forward
(``tests/unit/test_deformable_parity.py``): each image of a padded batch gets what the official
model gives for that image alone, and from the projected levels on (``forward_levels``) a padded
batch gets what the official model gives for that batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from vitkit.models.deformable.deformable_transformer import DeformableTransformer, inverse_sigmoid
from vitkit.models.detr.backbone import Joiner, NestedTensor, build_backbone
from vitkit.models.detr.criterion import SetCriterion, _prediction_index
from vitkit.models.detr.detr import MLP
from vitkit.models.detr.matcher import HungarianMatcher, Match
from vitkit.models.detr.position_encoding import build_position_encoding
from vitkit.models.detr.postprocess import Detection, PostProcess

PRIOR_PROB = 0.01  # initial foreground probability of every (query, class)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics ignore padding, and which leaves padding at zero.

    The official code normalises over the whole padded map, so an image's features
    depend on how much padding its batch mates forced. Counting only valid pixels
    (and zeroing padding, which the next stride-2 conv reads as its zero padding)
    makes an image's outputs the same alone or in any batch, like DETR's backbone here.
    Without padding it is exactly ``nn.GroupNorm``.
    """

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: (B, C, H, W); ``mask``: (B, H, W), True on padding."""
        batch, channels, height, width = x.shape
        groups = x.float().view(batch, self.num_groups, channels // self.num_groups, height, width)
        valid = (~mask).to(groups.dtype)[:, None, None]
        count = valid.sum((2, 3, 4), keepdim=True) * (channels // self.num_groups)
        mean = (groups * valid).sum((2, 3, 4), keepdim=True) / count
        var = ((groups - mean).square() * valid).sum((2, 3, 4), keepdim=True) / count
        normed = ((groups - mean) * torch.rsqrt(var + self.eps)).view(batch, channels, height, width)
        if self.affine:
            normed = normed * self.weight[:, None, None] + self.bias[:, None, None]
        return (normed * valid[:, 0]).to(x.dtype)


class InputProjection(nn.Sequential):
    """conv + masked GroupNorm(32): one level's features to ``hidden_dim`` (``input_proj.<l>.{0,1}``)."""

    def __init__(self, in_channels: int, hidden_dim: int, kernel_size: int, stride: int):
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.zeros_(conv.bias)
        super().__init__(conv, MaskedGroupNorm(32, hidden_dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``mask`` is the padding mask of the *output* map."""
        conv, norm = self
        return norm(conv(x), mask)


class DeformableDETR(nn.Module):
    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        if not two_stage:
            # Each query is a (position, content) pair; the position also yields its reference point.
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)

        in_channels = backbone.num_channels
        projections = [InputProjection(channels, hidden_dim, 1, 1) for channels in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projections.append(InputProjection(extra_in, hidden_dim, 3, 2))
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(projections)

        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        # One head per decoder layer (+1 for the encoder proposals in two-stage). Box refinement needs
        # a head of its own per layer; otherwise the same head is shared (and listed once per layer,
        # as in the official checkpoints).
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        # The first layer's boxes start as its reference points with a small size (sigmoid(-2) =
        # 0.12); refining layers start by keeping the box they are given; two-stage references are
        # boxes already. (With shared heads, head 0 is every layer's.)
        if not two_stage:
            with torch.no_grad():
                self.bbox_embed[0].layers[-1].bias[2:] = -2.0
        if two_stage:
            transformer.decoder.class_embed = self.class_embed

    def forward(self, samples: NestedTensor | Tensor) -> dict:
        """Predict ``num_queries`` (class scores, box) pairs per image.

        ``samples``: a ``NestedTensor`` or a (B, 3, H, W) tensor of same-sized images. Returns
        ``pred_logits`` (B, Q, num_classes) sigmoid logits, ``pred_boxes`` (B, Q, 4) (cx, cy, w, h)
        relative to each image's unpadded size, with ``aux_loss`` the same for every earlier
        decoder layer in ``aux_outputs``, and in two-stage the encoder proposals in ``enc_outputs``.
        """
        if isinstance(samples, Tensor):
            samples = NestedTensor(
                samples, samples.new_zeros(samples.shape[0], *samples.shape[2:], dtype=torch.bool)
            )
        return self.forward_levels(*self.levels(samples))

    def levels(self, samples: NestedTensor) -> tuple[list[Tensor], list[Tensor]]:
        """The backbone's maps and the extra ones, each projected to ``hidden_dim``, with their padding
        masks (B, H_l, W_l): what the transformer reads. Here (backbone on unpadded images, masked
        GroupNorm, exact masks) is where a padded batch departs from the official code on purpose."""
        features = self.backbone[0](samples)
        srcs = [self.input_proj[level](f.tensors, f.mask) for level, f in enumerate(features)]
        masks = [f.mask for f in features]
        for level in range(len(features), self.num_feature_levels):
            source = features[-1].tensors if level == len(features) else srcs[-1]
            # A 3x3 stride-2 conv with padding 1 keeps the pixels at even indices.
            mask = masks[-1][:, ::2, ::2]
            srcs.append(self.input_proj[level](source, mask))
            masks.append(mask)
        return srcs, masks

    def forward_levels(self, srcs: list[Tensor], masks: list[Tensor]) -> dict:
        """``forward`` from the projected levels on: position encodings, transformer and heads."""
        positions = [self.backbone[1](mask).to(src.dtype) for src, mask in zip(srcs, masks, strict=True)]
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord = self.transformer(
            srcs, masks, positions, query_embed
        )
        outputs_class, outputs_coord = [], []
        for layer, output in enumerate(hs):
            reference = inverse_sigmoid(init_reference if layer == 0 else inter_references[layer - 1])
            delta = self.bbox_embed[layer](output)
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_class.append(self.class_embed[layer](output))
            outputs_coord.append(coord.sigmoid())

        out: dict = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1], strict=True)
            ]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord.sigmoid()}
        return out


class FocalHungarianMatcher(HungarianMatcher):
    """Hungarian matching with the focal loss's class cost (Deformable DETR's matcher).

    The class cost of assigning query i to a target of class c is the focal loss of
    calling (i, c) positive minus that of calling it negative, on sigmoid probabilities.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__(cost_class, cost_bbox, cost_giou)
        self.alpha = alpha
        self.gamma = gamma

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """(N, K) sigmoid logits, (M,) labels -> (N, M)."""
        prob = logits.sigmoid()[:, target_labels]
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        return positive - negative


class FocalSetCriterion(SetCriterion):
    """DETR's set loss with sigmoid focal classification, plus the two-stage proposal loss.

    Every (query, class) pair is a binary problem: matched queries are positive for their
    target's class, all other pairs negative. Summed and divided by the number of target
    boxes, like the box losses. DETR's ``eos_coef`` has no role here (there is no "no object"
    class), so the base class gets 1.0.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        losses: tuple[str, ...] = ("labels", "boxes", "cardinality"),
    ):
        super().__init__(num_classes, matcher, weight_dict, eos_coef=1.0, losses=losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list[Match], num_boxes: float) -> dict:
        logits = outputs["pred_logits"]
        idx = _prediction_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        target_classes = torch.full(
            logits.shape[:2], logits.shape[2], dtype=torch.int64, device=logits.device
        )
        target_classes[idx] = matched_labels
        # One-hot with an extra column for "unmatched", dropped: unmatched queries are all-negative.
        onehot = F.one_hot(target_classes, logits.shape[2] + 1)[..., :-1].float()
        loss = sigmoid_focal_loss(
            logits.float(), onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        with torch.no_grad():
            matched = logits[idx]
            accuracy = (matched.argmax(-1) == matched_labels).float().mean() * 100 if len(matched) else 0.0
            class_error = 100 - torch.as_tensor(accuracy, device=logits.device)
        return {"loss_ce": loss / num_boxes, "class_error": class_error}

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict, targets: list[dict], indices: list[Match], num_boxes: float
    ) -> dict:
        """|queries with some class above probability 0.5 - targets|, averaged over images (logging)."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_counts = (logits.amax(-1) > 0).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def prediction_sets(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
        """DETR's sets and, in two-stage, the encoder's proposals (``_enc``), matched in the same copy.

        Proposals are class-agnostic: every target is "an object" (class 0).
        """
        sets = super().prediction_sets(outputs, targets)
        if "enc_outputs" in outputs:
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            sets["_enc"] = (outputs["enc_outputs"], binary)
        return sets


class TopKPostProcess(PostProcess):
    """Detections are the ``top_k`` highest-scoring (query, class) pairs over all queries and classes.

    With sigmoid scores a query may be confident about several classes; ranking pairs rather
    than each query's best class lets all of them count, as in the official code.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[Detection]:
        logits = outputs["pred_logits"].float()
        num_classes = logits.shape[2]
        probs = logits.sigmoid().flatten(1)
        scores, index = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        queries = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        height, width = target_sizes.to(scores).unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy") * scale
        boxes = boxes.gather(1, queries[..., None].expand(-1, -1, 4))
        detections = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes, strict=True):
            keep = image_scores > self.score_threshold
            detections.append(
                {"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep]}
            )
        return detections


@dataclass(frozen=True)
class DeformableDETRConfig:
    """Everything that defines a Deformable DETR model and its loss.

    The fields params.yaml sets (the ``deformable`` section, the ``backbone`` trunk and
    ``num_classes``) have no default: ``vitkit.tasks.detection`` builds the config from the
    validated params. Matching costs, loss weights and the focal loss are the paper's.
    ``DeformableDETRConfig.paper(num_classes)`` is the paper's model on a ResNet-18 trunk.

    Feature levels. With the ImageNet stem (default) layer2..4 have strides 8, 16, 32 and one
    extra stride-2 conv adds 64: the paper's pyramid, on a 128x128 image 16², 8², 4², 2² = 340
    encoder tokens. With ``stem="small"`` (CIFAR-style, no downsampling before layer1) the strides
    are 1, 2, 4, 8 for layer1..4, so layer2..4 on 128x128 would be 64², 32², 16² — 5376 tokens,
    too many for a CPU; use ``return_layers=("layer3", "layer4")`` and ``num_feature_levels=3``
    there: 32², 16², 8² (strides 4, 8, 16; 1344 tokens). Official releases: ``arch="resnet50"``
    and ``paper()``.
    """

    num_classes: int  # largest category id + 1
    arch: str
    stem: str  # vitkit.models.resnet.STEMS
    train_backbone: bool
    return_layers: tuple[str, ...]
    num_feature_levels: int
    hidden_dim: int
    nheads: int
    enc_layers: int
    dec_layers: int
    dim_feedforward: int
    dropout: float
    enc_n_points: int
    dec_n_points: int
    num_queries: int
    aux_loss: bool
    with_box_refine: bool
    two_stage: bool
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    @classmethod
    def paper(cls, num_classes: int, **overrides: Any) -> DeformableDETRConfig:
        """The paper's Deformable DETR (6+6 layers of width 256, 300 queries, 4 levels) with ``overrides``."""
        return cls(**{**PAPER_DEFORMABLE, "num_classes": num_classes, **overrides})


PAPER_DEFORMABLE = {
    "arch": "resnet18",
    "stem": "imagenet",
    "train_backbone": True,
    "return_layers": ("layer2", "layer3", "layer4"),
    "num_feature_levels": 4,
    "hidden_dim": 256,
    "nheads": 8,
    "enc_layers": 6,
    "dec_layers": 6,
    "dim_feedforward": 1024,
    "dropout": 0.1,
    "enc_n_points": 4,
    "dec_n_points": 4,
    "num_queries": 300,
    "aux_loss": True,
    "with_box_refine": False,
    "two_stage": False,
}


def build_deformable_detr(
    cfg: DeformableDETRConfig, backbone_state: dict[str, Tensor] | None = None
) -> DeformableDETR:
    """The model; ``backbone_state`` is a trunk state dict (SSL or teacher) or None for scratch."""
    backbone = build_backbone(
        cfg.arch,
        backbone_state,
        cfg.return_layers,
        train_backbone=cfg.train_backbone,
        stem=cfg.stem,
    )
    # Deformable DETR's encoding puts each pixel at its centre, (i - 0.5) / n, unlike DETR's i / n.
    joiner = Joiner(backbone, build_position_encoding(cfg.hidden_dim, offset=0.5))
    transformer = DeformableTransformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.nheads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        num_feature_levels=cfg.num_feature_levels,
        dec_n_points=cfg.dec_n_points,
        enc_n_points=cfg.enc_n_points,
        two_stage=cfg.two_stage,
        two_stage_num_proposals=cfg.num_queries,
    )
    return DeformableDETR(
        joiner,
        transformer,
        cfg.num_classes,
        cfg.num_queries,
        cfg.num_feature_levels,
        aux_loss=cfg.aux_loss,
        with_box_refine=cfg.with_box_refine,
        two_stage=cfg.two_stage,
    )


def build_deformable_criterion(cfg: DeformableDETRConfig) -> FocalSetCriterion:
    """Focal Hungarian matcher + focal set loss, weighted per term, per decoder layer and (two-stage)
    for the encoder proposals (suffix ``_enc``)."""
    matcher = FocalHungarianMatcher(
        cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
    )
    final_layer = {
        "loss_ce": cfg.cls_loss_coef,
        "loss_bbox": cfg.bbox_loss_coef,
        "loss_giou": cfg.giou_loss_coef,
    }
    weight_dict = dict(final_layer)
    if cfg.aux_loss:
        weight_dict |= {f"{k}_{i}": v for i in range(cfg.dec_layers - 1) for k, v in final_layer.items()}
    if cfg.two_stage:
        weight_dict |= {f"{k}_enc": v for k, v in final_layer.items()}
    return FocalSetCriterion(cfg.num_classes, matcher, weight_dict, cfg.focal_alpha, cfg.focal_gamma)


LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def deformable_param_groups(
    model: nn.Module, lr: float, lr_backbone: float, weight_decay: float, lr_linear_proj_mult: float = 0.1
) -> list[dict]:
    """AdamW groups as in the official recipe: the CNN at ``lr_backbone``; the layers that predict
    where to look (reference points, sampling offsets) at ``lr * lr_linear_proj_mult``, so the
    sampling pattern moves slowly while the rest learns; everything else at ``lr``."""
    groups: dict[str, list[nn.Parameter]] = {"main": [], "backbone": [], "linear_proj": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(parameter)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(parameter)
        else:
            groups["main"].append(parameter)
    rates = {"main": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [
        {"params": params, "lr": rates[key], "weight_decay": weight_decay}
        for key, params in groups.items()
        if params
    ]
