"""DETR (Carion et al., 2020): end-to-end set prediction with a transformer and Hungarian matching.

One module per part, as in facebookresearch/detr: ``backbone`` (frozen-BN
ResNet + padding masks), ``position_encoding``, ``transformer``, ``detr`` (the
model, its config and builders), ``matcher``, ``criterion`` (set loss),
``postprocess`` (to COCO results) and ``checkpoint`` (DETR-layout weights).
"""

from vitkit.models.detr.backbone import NestedTensor, build_backbone, nested_tensor_from_images
from vitkit.models.detr.checkpoint import load_detr_checkpoint
from vitkit.models.detr.criterion import SetCriterion
from vitkit.models.detr.detr import DETR, DETRConfig, build_criterion, build_detr, param_groups
from vitkit.models.detr.matcher import HungarianMatcher
from vitkit.models.detr.postprocess import PostProcess, to_coco_results

__all__ = [
    "DETR",
    "DETRConfig",
    "HungarianMatcher",
    "NestedTensor",
    "PostProcess",
    "SetCriterion",
    "build_backbone",
    "build_criterion",
    "build_detr",
    "load_detr_checkpoint",
    "nested_tensor_from_images",
    "param_groups",
    "to_coco_results",
]
