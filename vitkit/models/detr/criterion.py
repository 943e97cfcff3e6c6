"""DETR's set loss: match predictions to targets, then supervise each matched pair.

After Hungarian matching (``matcher.py``), every query is trained to predict the
class of its matched target or, if unmatched, "no object" (class index
``num_classes``, down-weighted by ``eos_coef`` since most queries are
unmatched); matched queries also regress their box with L1 + generalised IoU.
Box losses are normalised by the number of target boxes in the whole
(distributed) batch, so each box counts the same whatever the batch split.
With auxiliary outputs, the same losses are applied to every decoder layer,
each with its own matching, under keys suffixed ``_0``, ``_1``...
Follows facebookresearch/detr's ``SetCriterion``, without its host syncs: all
layers are matched with one device-to-host copy (``HungarianMatcher.match_sets``)
and the box count stays a tensor on the device (DETR reads it back with
``.item()`` every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from vitkit.models.detr.matcher import HungarianMatcher, Match

LossFn = Callable[[dict, list[dict], list[Match], Tensor], dict[str, Tensor]]


class SetCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "boxes", "cardinality"),
    ):
        """``weight_dict``: coefficient of each loss key in ``weighted_sum`` (keys absent from it,
        like ``class_error``, are logged only). ``losses``: which of ``labels``, ``boxes``,
        ``cardinality`` to compute."""
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.loss_fns: dict[str, LossFn] = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        unknown = [name for name in losses if name not in self.loss_fns]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from {list(self.loss_fns)}")
        self.losses = tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices: list[Match], num_boxes: Tensor
    ) -> dict:
        """Cross-entropy over all queries (unmatched ones target "no object"), plus the top-1 error
        (%) on matched queries for logging."""
        logits = outputs["pred_logits"]
        idx = _prediction_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[idx] = matched_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        with torch.no_grad():
            matched = logits[idx]
            accuracy = (matched.argmax(-1) == matched_labels).float().mean() * 100 if len(matched) else 0.0
            class_error = 100 - torch.as_tensor(accuracy, device=logits.device)
        return {"loss_ce": loss_ce, "class_error": class_error}

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict, targets: list[dict], indices: list[Match], num_boxes: Tensor
    ) -> dict:
        """|number of queries not predicting "no object" - number of targets|, averaged over images.
        For logging only: it has no gradient."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: list[Match], num_boxes: Tensor) -> dict:
        """L1 and 1 - GIoU between matched (cx, cy, w, h) boxes, summed and divided by ``num_boxes``."""
        idx = _prediction_index(indices)
        src_boxes = _at_least_float32(outputs["pred_boxes"][idx])
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(
            src_boxes
        )
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="sum") / num_boxes
        giou = generalized_box_iou(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        ).diagonal()
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def prediction_sets(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
        """Every set of predictions the loss supervises, with its targets, keyed by the suffix of
        its loss terms: "" for the last decoder layer, ``_i`` for auxiliary layer i."""
        sets = {"": (outputs, targets)}
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            sets[f"_{i}"] = (aux, targets)
        return sets

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """``outputs`` from the model; ``targets`` per image: ``labels`` (M,), ``boxes`` (M, 4)
        normalised cxcywh. Returns every loss and logging term, unweighted. All prediction sets
        are matched with one device-to-host copy."""
        sets = self.prediction_sets(outputs, targets)
        matches = self.matcher.match_sets(list(sets.values()))
        num_boxes = self.num_target_boxes(targets, device=outputs["pred_logits"].device)
        losses: dict[str, Tensor] = {}
        for (suffix, (predictions, set_targets)), indices in zip(sets.items(), matches, strict=True):
            for name in self.losses:
                terms = self.loss_fns[name](predictions, set_targets, indices, num_boxes)
                losses.update(
                    {f"{k}{suffix}": v for k, v in terms.items() if not suffix or k != "class_error"}
                )
        return losses

    def weighted_sum(self, losses: dict[str, Tensor]) -> Tensor:
        """The training objective: sum of the losses that have a weight in ``weight_dict``."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    @staticmethod
    def num_target_boxes(targets: list[dict], device: torch.device) -> Tensor:
        """Target boxes per process, averaged over DDP processes and at least 1 (an image with no
        objects still contributes its "no object" classification loss). A 0-d tensor on ``device``:
        reading it back would stall the GPU every step."""
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes /= dist.get_world_size()
        return num_boxes.clamp(min=1)


def _at_least_float32(x: Tensor) -> Tensor:
    """Box arithmetic (IoU of small boxes) is too coarse in bf16/fp16 under autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prediction_index(indices: list[Match]) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction, for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx
