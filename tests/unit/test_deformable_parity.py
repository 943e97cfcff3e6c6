"""Deformable DETR against the official forward, transcribed in ``tests/reference/deformable_detr.py``.

Both models load one random state dict in the official layout (every weight, bias, norm and
frozen-BN statistic drawn at random, so no zero-initialised parameter can hide a path), and must
give the same outputs to 1e-4 in float32, for the plain, box-refining and two-stage variants:

* the whole model, ResNet-18 to heads: ours on a padded batch of images of different sizes gives
  each image what the official model gives for that image alone. Our model departs on purpose
  before the transformer (backbone on unpadded images, GroupNorm over valid pixels, exact masks;
  ``DeformableDETR.levels``) so that an image's outputs do not depend on its batch mates; the
  official model's do (its pred_logits for the small image move by 0.4 to 0.9 with these random
  weights, alone against padded), so the official model on the padded batch is no reference for
  the whole model;
* the same padded batch from the projected feature levels on, against the official model on
  the padded batch: padding masks, position encodings, level embeddings, valid ratios, encoder
  reference points, two-stage proposals over padding, box refinement, heads.

Width 256 as in the releases: the official two-stage query embedding hard-codes 128 features per
box coordinate.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import Tensor, nn

from tests.reference import deformable_detr as official
from vitkit.models.deformable import DeformableDETR, DeformableDETRConfig, build_deformable_detr
from vitkit.models.detr import nested_tensor_from_images

VARIANTS = {
    "plain": {},
    "refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}
TOLERANCE = 1e-4
SIZE = dict(hidden_dim=256, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=12)
SIZE |= dict(enc_n_points=2, dec_n_points=2, dropout=0.0)


def _randomise(model: nn.Module, seed: int) -> None:
    """Every parameter and buffer at a random value of a plausible scale: embeddings ~ N(0, 1) as
    the official init draws them (so reference points spread over the image), other matrices
    ~ 1/sqrt(fan_in) (activations stay O(1) through the ResNet), norm scales around 1, biases and
    shifts around 0, BatchNorm variances in [0.5, 1.5]. Heads shared across layers are one module,
    drawn once."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            noise = torch.randn(tensor.shape, generator=gen)
            if name in ("query_embed.weight", "transformer.level_embed"):
                tensor.copy_(noise)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.dim() > 1:
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            elif name.endswith("weight"):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)


@functools.cache
def _models(variant: str) -> tuple[DeformableDETR, official.DeformableDETR]:
    """Ours with random weights, and the official model loaded (strictly) from our state dict."""
    cfg = DeformableDETRConfig.paper(num_classes=5, **SIZE, **VARIANTS[variant])
    ours = build_deformable_detr(cfg).eval()
    _randomise(ours, seed=0)
    theirs = official.build(
        cfg.arch,
        [128, 256, 512],  # ResNet-18's layer2..4
        cfg.num_classes,
        cfg.hidden_dim,
        cfg.nheads,
        cfg.enc_layers,
        cfg.dec_layers,
        cfg.dim_feedforward,
        cfg.num_feature_levels,
        cfg.enc_n_points,
        cfg.dec_n_points,
        cfg.num_queries,
        cfg.with_box_refine,
        cfg.two_stage,
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _outputs(out: dict) -> dict[str, Tensor]:
    """Every prediction by name: the last layer, each earlier layer, the two-stage proposals."""
    flat = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
    for layer, aux in enumerate(out["aux_outputs"]):
        flat |= {f"{key}_{layer}": aux[key] for key in ("pred_logits", "pred_boxes")}
    for key, value in out.get("enc_outputs", {}).items():
        flat[f"{key}_enc"] = value
    return flat


def _assert_same(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    """The same predictions (``_outputs``) within 1e-4."""
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")


def _images() -> list[Tensor]:
    """A 96x80 and a 64x48 image: padded together, the small one has padding at every level."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, 96, 80, generator=gen), torch.randn(3, 64, 48, generator=gen)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_model_matches_official_on_each_image_alone(variant: str):
    """Backbone, input projections with GroupNorm, the extra stride-64 level, position encodings,
    transformer and heads: ours on the padded batch, the official model on each image alone."""
    ours, theirs = _models(variant)
    images = _images()
    with torch.no_grad():
        samples = nested_tensor_from_images(images)
        batched = _outputs(ours(samples))
        # The proposals of an image alone are those of its valid pixels in the padded batch.
        valid = ~torch.cat([mask.flatten(1) for mask in ours.levels(samples)[1]], 1)
        for index, image in enumerate(images):
            alone = {key: value[index : index + 1] for key, value in batched.items()}
            alone |= {key: value[:, valid[index]] for key, value in alone.items() if key.endswith("_enc")}
            _assert_same(alone, _outputs(theirs(official.nested_tensor_from_tensor_list([image]))))


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_matches_official_from_the_levels_on(variant: str):
    """The two images in one padded batch: given our projected levels and masks, the
    official model's position encodings, transformer and heads give our outputs. The masks of the
    backbone levels are the official ones too (interpolated from the image mask there); the extra
    level's is not: the official one calls the small image's 2x2 stride-64 map valid, ours 1x1,
    the size that image's map has alone (the second row and column are computed from padding)."""
    ours, theirs = _models(variant)
    images = _images()
    samples = official.nested_tensor_from_tensor_list(images)
    with torch.no_grad():
        srcs, masks = ours.levels(nested_tensor_from_images(images))
        official_features, _ = theirs.backbone(samples)
        positions = [
            theirs.backbone[1](official.NestedTensor(s, m)) for s, m in zip(srcs, masks, strict=True)
        ]
        expected = theirs.forward_levels(srcs, masks, positions)
        actual = ours.forward_levels(srcs, masks)
    for mask, feature in zip(masks[: len(official_features)], official_features, strict=True):
        torch.testing.assert_close(mask, feature.mask, rtol=0, atol=0)
    assert all(mask[1].any() and not mask[0].any() for mask in masks)  # the small image is padded
    if variant == "two_stage":
        # Our one departure after the levels: never a query from a padding or border pixel, whose
        # proposal box is +inf (sigmoid 1). The official top-k (by the first class) picked none
        # here, so the outputs must agree.
        enc = expected["enc_outputs"]
        picked = enc["pred_logits"][..., 0].topk(SIZE["num_queries"], dim=1).indices
        assert (enc["pred_boxes"].gather(1, picked[..., None].expand(-1, -1, 4)) < 1).all()
        assert (enc["pred_boxes"] == 1).all(-1).any()  # while there were such proposals to pick
    _assert_same(_outputs(actual), _outputs(expected))


def test_two_stage_departure_no_query_from_an_invalid_proposal():
    """Padding and border pixels all get one encoder score (their memory is zeroed) and a +inf
    proposal. Made the highest score, the official top-k turns them into queries with reference
    box (1, 1, 1, 1), as many as the batch's padding offers; ours takes valid pixels only."""
    ours, theirs = (copy.deepcopy(model) for model in _models("two_stage"))
    with torch.no_grad():
        transformer = ours.transformer
        transformer.enc_output_norm.reset_parameters()  # unit scale, zero shift: outputs of norm √C
        invalid_memory = transformer.enc_output_norm(transformer.enc_output.bias)
        ours.class_embed[-1].weight[0] = invalid_memory  # the score w·u is then largest at u = it
        theirs.load_state_dict(ours.state_dict())
        srcs, masks = ours.levels(nested_tensor_from_images(_images()))
        positions = [ours.backbone[1](mask) for mask in masks]
        _, our_reference, *_ = transformer(srcs, masks, positions)
        _, their_reference, *_ = theirs.transformer(srcs, masks, positions)
    assert (their_reference[1] == 1).all(-1).any()
    assert (our_reference < 1).all()
