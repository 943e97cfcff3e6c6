"""Deformable DETR (Zhu et al., 2021): DETR with multi-scale deformable attention.

One module per part, as in fundamentalvision/Deformable-DETR: ``ms_deform_attn``
(the attention and its pure-PyTorch core), ``deformable_transformer`` (encoder,
decoder, box refinement, two-stage proposals), ``deformable_detr`` (the model,
its focal matcher / loss / top-k post-processing, config and builders) and
``checkpoint`` (official-layout weights). Backbone, position encoding and the
set-loss machinery are DETR's (``vitkit.models.detr``).
"""

from vitkit.models.deformable.checkpoint import load_deformable_detr_checkpoint
from vitkit.models.deformable.deformable_detr import (
    DeformableDETR,
    DeformableDETRConfig,
    FocalHungarianMatcher,
    FocalSetCriterion,
    TopKPostProcess,
    build_deformable_criterion,
    build_deformable_detr,
    deformable_param_groups,
)
from vitkit.models.deformable.deformable_transformer import DeformableTransformer
from vitkit.models.deformable.ms_deform_attn import MSDeformAttn, ms_deform_attn_core

__all__ = [
    "DeformableDETR",
    "DeformableDETRConfig",
    "DeformableTransformer",
    "FocalHungarianMatcher",
    "FocalSetCriterion",
    "MSDeformAttn",
    "TopKPostProcess",
    "build_deformable_criterion",
    "build_deformable_detr",
    "deformable_param_groups",
    "load_deformable_detr_checkpoint",
    "ms_deform_attn_core",
]
