"""From DETR's raw outputs to detections in pixels and to COCO result entries.

Each query yields one detection: its most likely real class (the "no object"
class is dropped before the max, as in DETR) with that probability as score.
Boxes are predicted relative to the unpadded, transformed image, so scaling by
the *original* image size maps them back onto the original image whatever
resizing the eval transform did.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

Detection = dict[str, Tensor]  # scores (K,), labels (K,), boxes (K, 4) xyxy in pixels


class PostProcess(nn.Module):
    def __init__(self, top_k: int = 100, score_threshold: float = 0.0):
        """Keep at most ``top_k`` queries per image (COCO AP counts 100) scoring above ``score_threshold``."""
        super().__init__()
        self.top_k = top_k
        self.score_threshold = score_threshold

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[Detection]:
        """``target_sizes``: (B, 2) original (height, width) of each image. Returns one
        ``Detection`` per image, sorted by decreasing score."""
        probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        height, width = target_sizes.to(scores).unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy") * scale

        detections = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes, strict=True):
            top = image_scores.topk(min(self.top_k, len(image_scores))).indices
            top = top[image_scores[top] > self.score_threshold]
            detections.append(
                {"scores": image_scores[top], "labels": image_labels[top], "boxes": image_boxes[top]}
            )
        return detections


def to_coco_results(detections: list[Detection], image_ids: list[int]) -> list[dict]:
    """COCO result entries (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``) with plain
    Python numbers, ready for ``json.dump`` and ``COCO.loadRes``. Labels are category ids (DETR's
    convention), so they are written as they are."""
    results = []
    for detection, image_id in zip(detections, image_ids, strict=True):
        boxes = box_convert(detection["boxes"], "xyxy", "xywh").tolist()
        for box, label, score in zip(
            boxes, detection["labels"].tolist(), detection["scores"].tolist(), strict=True
        ):
            results.append({"image_id": int(image_id), "category_id": label, "bbox": box, "score": score})
    return results
