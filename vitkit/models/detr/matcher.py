"""Hungarian matching between predicted and ground-truth boxes (DETR's bipartite matching).

The cost of assigning prediction i to target j is

    cost_class * (-p_i(class_j)) + cost_bbox * |b_i - b_j|_1 + cost_giou * (-GIoU(b_i, b_j))

with p the softmax over classes and boxes as normalised (cx, cy, w, h). As in
DETR, one cost matrix is computed for the whole batch on the model's device
(every prediction against every target of every image: a few large kernels
instead of many small ones), and only the per-image blocks are handed to
scipy's ``linear_sum_assignment``. Unlike DETR, which copies each decoder
layer's costs to the CPU separately, ``match_sets`` takes every layer at once
and moves all their costs in one transfer: each copy waits for the GPU to
finish everything queued before it, so six layers meant six stalls per step.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from vitkit.errors import ConfigError, TrainingError

Match = tuple[Tensor, Tensor]  # (prediction indices, target indices), int64, same length


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ConfigError(
                "the matcher costs set_cost_class, set_cost_bbox and set_cost_giou are all 0, which makes "
                "the assignment arbitrary; set at least one above 0"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """(N, K+1) logits, (M,) labels -> (N, M). The constant 1 of 1 - p is dropped: it does not
        change the assignment."""
        return -logits.softmax(-1)[:, target_labels]

    def cost_matrix(self, outputs: dict, targets: list[dict]) -> Tensor:
        """(B, Q, sum of M_b) costs of every prediction against every target of the batch, on the
        predictions' device; image b's block is its own targets' columns."""
        batch, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()
        pred_boxes = outputs["pred_boxes"].flatten(0, 1).float()
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()

        cost_bbox = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        cost = (
            self.cost_class * self.class_cost(logits, target_labels)
            + self.cost_bbox * cost_bbox
            + self.cost_giou * cost_giou
        )
        return cost.view(batch, num_queries, -1)

    @torch.no_grad()
    def match_sets(self, sets: list[tuple[dict, list[dict]]]) -> list[list[Match]]:
        """Match several prediction sets (the decoder layers, each with its targets) with one
        device-to-host copy for all of them; returns, per set, what ``forward`` returns."""
        costs = [self.cost_matrix(outputs, targets) for outputs, targets in sets]
        host = torch.cat([cost.flatten() for cost in costs]).cpu()
        if not torch.isfinite(host).all():
            raise TrainingError(
                "the model predicted non-finite boxes or class scores, so nothing can be matched: training "
                "diverged; lower the learning rate or keep gradient clipping on"
            )
        matched_sets = []
        blocks = host.split([cost.numel() for cost in costs])
        for flat, cost, (_, targets) in zip(blocks, costs, sets, strict=True):
            sizes = [len(t["boxes"]) for t in targets]
            matches = []
            for image, block in enumerate(flat.view(cost.shape).split(sizes, -1)):
                query_idx, target_idx = linear_sum_assignment(block[image].numpy())
                matches.append((torch.as_tensor(query_idx), torch.as_tensor(target_idx)))
            matched_sets.append(matches)
        return matched_sets

    def forward(self, outputs: dict, targets: list[dict]) -> list[Match]:
        """``outputs``: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4); ``targets``: per image
        ``labels`` (M_b,) and ``boxes`` (M_b, 4) normalised cxcywh. Returns, per image, the
        matched (query indices, target indices); min(Q, M_b) pairs each."""
        return self.match_sets([(outputs, targets)])[0]
