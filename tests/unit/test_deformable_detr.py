"""Deformable DETR: shapes, batch invariance, learning, loss / matcher / post-processing formulas,
checkpoint layout, and (slow) agreement with Hugging Face's port of the official transformer."""

from __future__ import annotations

import argparse
import functools
import itertools
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from vitkit.errors import ConfigError
from vitkit.models.deformable import (
    DeformableDETRConfig,
    FocalHungarianMatcher,
    TopKPostProcess,
    build_deformable_criterion,
    build_deformable_detr,
    deformable_param_groups,
    load_deformable_detr_checkpoint,
)
from vitkit.models.deformable.deformable_detr import MaskedGroupNorm
from vitkit.models.detr import nested_tensor_from_images
from vitkit.models.resnet import backbone_state_dict, build_resnet

VARIANTS = {
    "plain": {},
    "refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}


def _config(**overrides) -> DeformableDETRConfig:
    """Tiny but complete: 4 levels (layer2..4 at strides 8, 16, 32, one extra), 2+2 layers, 2 heads,
    2 points."""
    base = dict(
        hidden_dim=32,
        nheads=2,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        enc_n_points=2,
        dec_n_points=2,
        num_queries=8,
    )
    return DeformableDETRConfig.paper(num_classes=5, **(base | overrides))


def _targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes(variant: str):
    torch.manual_seed(0)
    cfg = _config(**VARIANTS[variant])
    model = build_deformable_detr(cfg)
    out = model(torch.randn(2, 3, 64, 48))
    assert out["pred_logits"].shape == (2, 8, 5)
    assert out["pred_boxes"].shape == (2, 8, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    # Focal prior: every (query, class) starts near probability 0.01.
    assert model.class_embed[0].bias.sigmoid().allclose(torch.tensor(0.01))
    # Box heads start with zero weights: the first layer's boxes are its reference points sized
    # sigmoid(-2) (two-stage: the proposals), and later layers keep the boxes they are given.
    first = out["aux_outputs"][0]["pred_boxes"]
    if not cfg.two_stage:
        assert first[..., 2:].allclose(torch.sigmoid(torch.tensor(-2.0)))
    torch.testing.assert_close(out["pred_boxes"], first)
    if cfg.two_stage:
        tokens = 8 * 6 + 4 * 3 + 2 * 2 + 1  # strides 8, 16, 32, 64 of a 64x48 image
        assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, 5)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, tokens, 4)
    else:
        assert "enc_outputs" not in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_image_matches_alone(variant: str):
    """Masks, valid ratios and masked GroupNorm make padding invisible: an image's detections are
    the same alone and next to a larger image."""
    torch.manual_seed(1)
    model = build_deformable_detr(_config(**VARIANTS[variant])).eval()
    small, large = torch.randn(3, 64, 48), torch.randn(3, 96, 80)
    with torch.no_grad():
        alone = model(small[None])
        batched = model(nested_tensor_from_images([small, large]))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(batched[key][0], alone[key][0], atol=1e-4, rtol=1e-4)


def test_masked_group_norm():
    """Equal to GroupNorm without padding; on a padded map, equal to GroupNorm of the valid crop,
    with zeros on the padding."""
    torch.manual_seed(2)
    norm = MaskedGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 6)
    no_padding = torch.zeros(2, 5, 6, dtype=torch.bool)
    reference = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x, no_padding), reference)
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[0, :3, :4] = False
    mask[1] = False
    out = norm(x, mask)
    crop = torch.nn.functional.group_norm(x[:1, :, :3, :4], 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out[0, :, :3, :4], crop[0])
    assert (out[0][:, mask[0]] == 0).all()
    torch.testing.assert_close(out[1], reference[1])


def test_training_step_reduces_loss():
    torch.manual_seed(3)
    cfg = _config()
    model = build_deformable_detr(cfg)
    criterion = build_deformable_criterion(cfg)
    optimizer = torch.optim.AdamW(deformable_param_groups(model, 1e-4, 1e-5, 1e-4))
    images, targets = torch.randn(2, 3, 64, 64), _targets()
    losses = []
    for _ in range(2):
        loss = criterion.weighted_sum(criterion(model(images), targets))
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[1] < losses[0]


def test_box_refinement_detaches_between_layers():
    """The last layer's boxes are refined from the previous layer's *detached* boxes, so its loss
    reaches the first layer's box head only through the decoder features, never through the boxes:
    the first head's last layer (which only feeds the boxes) gets no gradient."""
    torch.manual_seed(4)
    model = build_deformable_detr(_config(with_box_refine=True))
    model(torch.randn(1, 3, 64, 64))["pred_boxes"].sum().backward()
    assert model.bbox_embed[0].layers[-1].weight.grad is None
    assert model.bbox_embed[1].layers[-1].weight.grad.abs().sum() > 0


def test_focal_class_cost_is_focal_loss_difference():
    """cost(i, j) = focal loss of calling (i, class_j) positive - focal loss of calling it negative."""
    torch.manual_seed(5)
    matcher = FocalHungarianMatcher()
    logits = torch.randn(6, 4) * 3
    labels = torch.tensor([2, 0, 2])
    cost = matcher.class_cost(logits, labels)
    picked = logits[:, labels]
    positive = sigmoid_focal_loss(picked, torch.ones_like(picked), alpha=0.25, gamma=2.0)
    negative = sigmoid_focal_loss(picked, torch.zeros_like(picked), alpha=0.25, gamma=2.0)
    torch.testing.assert_close(cost, positive - negative, atol=1e-6, rtol=1e-5)


def test_focal_label_loss_formula():
    """Σ over every (image, query, class) of the focal term, positive only for (matched query, its
    target's class), divided by the number of boxes; written out per element."""
    torch.manual_seed(6)
    criterion = build_deformable_criterion(_config())
    logits = torch.randn(2, 4, 5)
    targets = _targets()
    indices = [(torch.tensor([2, 0]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, num_boxes=3.0)["loss_ce"]
    positives = {
        (b, q.item(), targets[b]["labels"][t].item())
        for b, (qs, ts) in enumerate(indices)
        for q, t in zip(qs, ts, strict=True)
    }
    expected = 0.0
    for b, q, c in itertools.product(range(2), range(4), range(5)):
        p = logits[b, q, c].sigmoid().item()
        if (b, q, c) in positives:
            expected += -0.25 * (1 - p) ** 2 * math.log(p)
        else:
            expected += -0.75 * p**2 * math.log(1 - p)
    assert loss.item() == pytest.approx(expected / 3.0, rel=1e-5)


def test_criterion_weights_and_two_stage_losses():
    torch.manual_seed(7)
    cfg = _config(**VARIANTS["two_stage"])
    criterion = build_deformable_criterion(cfg)
    assert criterion.weight_dict["loss_ce"] == 2 and criterion.weight_dict["loss_bbox"] == 5
    assert criterion.weight_dict["loss_giou_0"] == 2 and criterion.weight_dict["loss_ce_enc"] == 2
    losses = criterion(build_deformable_detr(cfg)(torch.randn(2, 3, 64, 64)), _targets())
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_ce_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_two_stage_proposals_are_matched_in_the_same_transfer_as_the_decoder_layers(monkeypatch):
    """Two-stage: the encoder's class-agnostic proposals join the decoder layers in one
    ``match_sets`` call (one device-to-host copy a step), with the losses matching them alone gives."""
    torch.manual_seed(7)
    cfg = _config(**VARIANTS["two_stage"])
    criterion = build_deformable_criterion(cfg)
    with torch.no_grad():
        outputs = build_deformable_detr(cfg)(torch.randn(2, 3, 64, 64))
    enc = outputs["enc_outputs"]
    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in _targets()]
    num_boxes = criterion.num_target_boxes(_targets(), torch.device("cpu"))
    alone = criterion.matcher(enc, binary)
    expected = {}
    for name in criterion.losses:
        terms = criterion.loss_fns[name](enc, binary, alone, num_boxes)
        expected |= {f"{k}_enc": v for k, v in terms.items() if k != "class_error"}
    calls = []
    match_sets = criterion.matcher.match_sets
    monkeypatch.setattr(
        criterion.matcher, "match_sets", lambda sets: calls.append(len(sets)) or match_sets(sets)
    )
    losses = criterion(outputs, _targets())
    assert calls == [cfg.dec_layers + 1]  # every decoder layer and the proposals, together
    for key, value in expected.items():
        assert torch.equal(losses[key], value), key


def test_topk_postprocess_ranks_query_class_pairs():
    """Detections are the k best (query, class) pairs by sigmoid score, brute-forced here; one query
    may appear with two classes."""
    torch.manual_seed(8)
    logits = torch.randn(2, 5, 3)
    logits[0, 1, 0], logits[0, 1, 2] = 10.0, 9.0  # query 1 is sure of two classes
    boxes = torch.rand(2, 5, 4) * 0.4 + 0.3
    sizes = torch.tensor([[100, 200], [50, 60]])
    detections = TopKPostProcess(top_k=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for image, detection in enumerate(detections):
        pairs = sorted(
            ((logits[image, q, c].sigmoid().item(), q, c) for q in range(5) for c in range(3)), reverse=True
        )[:4]
        assert detection["scores"].tolist() == pytest.approx([s for s, _, _ in pairs])
        assert detection["labels"].tolist() == [c for _, _, c in pairs]
        height, width = sizes[image].tolist()
        for box, (_, q, _) in zip(detection["boxes"], pairs, strict=True):
            cx, cy, w, h = boxes[image, q].tolist()
            expected = [
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            ]
            assert box.tolist() == pytest.approx(expected, rel=1e-5)
    assert detections[0]["labels"][:2].tolist() == [0, 2]


def test_param_groups_slow_down_sampling_predictors():
    model = build_deformable_detr(_config())
    groups = deformable_param_groups(model, lr=2e-4, lr_backbone=1e-5, weight_decay=1e-4)
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in groups}
    named = dict(model.named_parameters())
    assert id(named["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"]) in by_lr[2e-4 * 0.1]
    assert id(named["transformer.reference_points.weight"]) in by_lr[2e-4 * 0.1]
    assert id(named["backbone.0.body.layer4.0.conv1.weight"]) in by_lr[1e-5]
    assert id(named["transformer.encoder.layers.0.self_attn.value_proj.weight"]) in by_lr[2e-4]
    assert sum(len(ids) for ids in by_lr.values()) == sum(p.requires_grad for p in model.parameters())


# --- checkpoints in the official layout -------------------------------------------------------------


@functools.cache
def _trunk_keys(arch: str, stem: str) -> list[str]:
    """torchvision ResNet keys without the classifier and BatchNorm's counter (FrozenBatchNorm2d has none)."""
    trunk = backbone_state_dict(build_resnet(arch, stem=stem))
    return [k for k in trunk if not k.endswith("num_batches_tracked")]


def _official_keys(cfg: DeformableDETRConfig) -> set[str]:
    """State-dict keys of fundamentalvision/Deformable-DETR's model for ``cfg``, spelled out from
    its module tree (deformable_detr.py, deformable_transformer.py, ms_deform_attn.py)."""
    wb = ("weight", "bias")
    keys = {f"backbone.0.body.{k}" for k in _trunk_keys(cfg.arch, cfg.stem)}
    keys.add("transformer.level_embed")
    attn = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    for i in range(cfg.enc_layers):
        for module in [f"self_attn.{a}" for a in attn] + ["norm1", "linear1", "linear2", "norm2"]:
            keys |= {f"transformer.encoder.layers.{i}.{module}.{p}" for p in wb}
    for i in range(cfg.dec_layers):
        prefix = f"transformer.decoder.layers.{i}"
        for module in [f"cross_attn.{a}" for a in attn] + ["norm1", "self_attn.out_proj", "norm2"]:
            keys |= {f"{prefix}.{module}.{p}" for p in wb}
        for module in ("linear1", "linear2", "norm3"):
            keys |= {f"{prefix}.{module}.{p}" for p in wb}
        keys |= {f"{prefix}.self_attn.in_proj_weight", f"{prefix}.self_attn.in_proj_bias"}
    if cfg.two_stage:
        for module in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm"):
            keys |= {f"transformer.{module}.{p}" for p in wb}
    else:
        keys |= {
            "transformer.reference_points.weight",
            "transformer.reference_points.bias",
            "query_embed.weight",
        }
    num_pred = cfg.dec_layers + int(cfg.two_stage)
    heads = [("class_embed", "{i}"), ("bbox_embed", "{i}.layers.0"), ("bbox_embed", "{i}.layers.1")]
    heads.append(("bbox_embed", "{i}.layers.2"))
    prefixes = [""] + (["transformer.decoder."] if cfg.with_box_refine else [])
    for i in range(num_pred):
        for prefix, (head, suffix) in itertools.product(prefixes, heads):
            if prefix and head == "class_embed" and not cfg.two_stage:
                continue
            keys |= {f"{prefix}{head}.{suffix.format(i=i)}.{p}" for p in wb}
    for level in range(cfg.num_feature_levels):
        keys |= {f"input_proj.{level}.{j}.{p}" for j in (0, 1) for p in wb}
    return keys


def _official_checkpoint(
    cfg: DeformableDETRConfig, shapes: dict, path, num_classes: int | None = None
) -> dict:
    """Random weights of the given shapes under the official keys. Keys naming the same module (the
    decoder's view of the heads; heads shared across layers without box refinement) hold the same
    tensor, as in a release."""

    def canonical(key: str) -> str:
        key = key.removeprefix("transformer.decoder.")
        if key.startswith(("class_embed.", "bbox_embed.")) and not cfg.with_box_refine:
            head, _, rest = key.split(".", 2)
            key = f"{head}.0.{rest}"
        return key

    values: dict[str, torch.Tensor] = {}
    state = {}
    for key in sorted(_official_keys(cfg)):
        shape = shapes[key]
        if num_classes is not None and "class_embed" in key:
            shape = (num_classes, *shape[1:])
        state[key] = values.setdefault(canonical(key), torch.randn(shape))
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4), "epoch": 49}, path)
    return state


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_official_layout_loads(variant: str, tmp_path):
    cfg = _config(**VARIANTS[variant])
    model = build_deformable_detr(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert set(shapes) == _official_keys(cfg)
    state = _official_checkpoint(cfg, shapes, tmp_path / "ckpt.pth")
    assert load_deformable_detr_checkpoint(model, tmp_path / "ckpt.pth") == []
    own = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


def test_checkpoint_with_other_class_count_reinitialises_class_heads(tmp_path):
    cfg = _config(**VARIANTS["refine"])
    model = build_deformable_detr(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = _official_checkpoint(cfg, shapes, tmp_path / "coco.pth", num_classes=91)
    reinitialised = load_deformable_detr_checkpoint(model, tmp_path / "coco.pth")
    assert reinitialised == sorted(k for k in model.state_dict() if k.startswith("class_embed"))
    own = model.state_dict()
    assert own["class_embed.0.weight"].shape == (5, 32)
    assert own["class_embed.1.bias"].sigmoid().allclose(torch.tensor(0.01))
    torch.testing.assert_close(own["transformer.level_embed"], state["transformer.level_embed"])
    torch.testing.assert_close(own["bbox_embed.1.layers.2.bias"], state["bbox_embed.1.layers.2.bias"])


def test_checkpoint_mismatch_is_config_error(tmp_path):
    cfg = _config()
    model = build_deformable_detr(cfg)
    _official_checkpoint(cfg, {k: v.shape for k, v in model.state_dict().items()}, tmp_path / "ckpt.pth")
    with pytest.raises(ConfigError, match="num_feature_levels"):
        load_deformable_detr_checkpoint(
            build_deformable_detr(_config(num_feature_levels=5)), tmp_path / "ckpt.pth"
        )
    with pytest.raises(ConfigError, match="does not exist"):
        load_deformable_detr_checkpoint(model, tmp_path / "missing.pth")


# --- agreement with Hugging Face's port of the official transformer -----------------------------------


@pytest.mark.slow
def test_transformer_matches_huggingface():
    """Encoder and box-refining decoder against transformers' DeformableDetrEncoder/Decoder (a port of
    the official code) with the same weights, on a padded batch."""
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    torch.manual_seed(9)
    cfg = _config(with_box_refine=True)
    model = build_deformable_detr(cfg).eval()
    ours = model.transformer
    hf_cfg = hf.DeformableDetrConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="relu",
    )  # fmt: skip
    encoder, decoder = hf.DeformableDetrEncoder(hf_cfg).eval(), hf.DeformableDetrDecoder(hf_cfg).eval()
    renames = {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm", "linear1": "mlp.fc1"}
    renames["linear2"] = "mlp.fc2"
    enc_state = {}
    for key, value in ours.encoder.state_dict().items():
        layer, rest = key.split(".", 2)[1:]
        module, param = rest.rsplit(".", 1)
        enc_state[f"layers.{layer}.{renames.get(module, module)}.{param}"] = value
    encoder.load_state_dict(enc_state)
    dec_renames = {"cross_attn": "encoder_attn", "norm1": "encoder_attn_layer_norm"}
    dec_renames |= {"norm2": "self_attn_layer_norm", "norm3": "final_layer_norm", "linear1": "mlp.fc1"}
    dec_renames |= {"linear2": "mlp.fc2", "self_attn.out_proj": "self_attn.o_proj"}
    dec_state = {}
    for key, value in ours.decoder.state_dict().items():
        if key.startswith("bbox_embed"):
            continue
        layer, rest = key.split(".", 2)[1:]
        if rest.startswith("self_attn.in_proj"):
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                dec_state[f"layers.{layer}.self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = chunk
            continue
        module, param = rest.rsplit(".", 1)
        for old, new in dec_renames.items():
            if module.startswith(old):
                module = new + module[len(old) :]
                break
        dec_state[f"layers.{layer}.{module}.{param}"] = value
    decoder.load_state_dict(dec_state)
    decoder.bbox_embed = model.bbox_embed

    shapes = [(8, 6), (4, 3), (2, 2), (1, 1)]
    masks = [torch.ones(2, h, w, dtype=torch.bool) for h, w in shapes]
    for mask, (h, w) in zip(masks, shapes, strict=True):
        mask[0] = False
        mask[1, : h - 1, : w - 1] = False
    srcs = [torch.randn(2, 32, h, w) for h, w in shapes]
    pos = [torch.randn(2, 32, h, w) for h, w in shapes]
    with torch.no_grad():
        hs, init_ref, inter_refs, _, _ = ours(srcs, masks, pos, model.query_embed.weight)
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        valid = ~torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + ours.level_embed[i] for i, p in enumerate(pos)], 1
        )
        ratios = torch.stack([hf.DeformableDetrModel.get_valid_ratio(None, ~m) for m in masks], 1)
        shapes_t = torch.tensor(shapes)
        start = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
        levels = {"spatial_shapes": shapes_t, "spatial_shapes_list": shapes, "level_start_index": start}
        memory = encoder(
            inputs_embeds=flat,
            attention_mask=valid,
            spatial_position_embeddings=pos_flat,
            valid_ratios=ratios,
            **levels,
        ).last_hidden_state
        query_pos, tgt = model.query_embed.weight.split(32, dim=1)
        query_pos, tgt = query_pos.expand(2, -1, -1), tgt.expand(2, -1, -1)
        reference = ours.reference_points(query_pos).sigmoid()
        out = decoder(
            inputs_embeds=tgt,
            encoder_hidden_states=memory,
            encoder_attention_mask=valid,
            object_queries_position_embeddings=query_pos,
            reference_points=reference,
            valid_ratios=ratios,
            **levels,
        )
    torch.testing.assert_close(init_ref, reference)
    torch.testing.assert_close(hs, out.intermediate_hidden_states.transpose(0, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        inter_refs, out.intermediate_reference_points.transpose(0, 1), atol=1e-5, rtol=1e-4
    )
