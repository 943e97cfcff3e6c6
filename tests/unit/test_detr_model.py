"""DETR model: padding invariance, parts against references, backbone init, DETR-layout checkpoints,
and the detection transforms that feed it."""

from __future__ import annotations

import argparse
import functools

import pytest
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.ops.misc import FrozenBatchNorm2d

from vitkit.data.detection_transforms import eval_transforms, train_transforms
from vitkit.errors import ConfigError
from vitkit.models.detr import (
    DETRConfig,
    build_backbone,
    build_criterion,
    build_detr,
    load_detr_checkpoint,
    nested_tensor_from_images,
    param_groups,
)
from vitkit.models.detr.position_encoding import PositionEmbeddingSine
from vitkit.models.detr.transformer import MultiheadAttention
from vitkit.models.resnet import backbone_state_dict, build_resnet


def _config(num_classes: int = 4, **overrides) -> DETRConfig:
    small = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=5)
    return DETRConfig.paper(num_classes, **{**small, **overrides})


@functools.cache
def _trained_like_state(arch: str = "resnet18", stem: str = "imagenet") -> dict[str, torch.Tensor]:
    """A trunk state dict with non-trivial BN statistics, like one saved after training."""
    torch.manual_seed(0)
    net = build_resnet(arch, stem=stem)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return backbone_state_dict(net)


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize(("stem", "scale"), [("imagenet", 4), ("small", 1)])
def test_an_image_alone_and_inside_a_padded_batch_give_the_same_outputs(stem: str, scale: int) -> None:
    torch.manual_seed(0)
    model = build_detr(_config(stem=stem), _trained_like_state(stem=stem)).eval()
    a, b, c = (torch.randn(3, h * scale, w * scale) for h, w in ((20, 28), (32, 24), (20, 28)))
    with torch.no_grad():
        batch = model(nested_tensor_from_images([a, b, c]))  # pads a and c below, b on the right
        for index, image in enumerate((a, b, c)):
            alone = model(nested_tensor_from_images([image]))
            for key in ("pred_logits", "pred_boxes"):
                assert (batch[key][index] - alone[key][0]).abs().max() <= 1e-4, (index, key)


def test_the_trunk_runs_once_per_batch_of_mixed_sizes_without_reading_the_mask_back(monkeypatch) -> None:
    """One trunk call for five sizes, exact masks for every returned stage, and no host read of a
    tensor (each would stall a GPU) in the backbone's forward."""
    backbone = build_backbone("resnet18", _trained_like_state(), ("layer2", "layer3", "layer4"))
    sides = ((37, 50), (64, 64), (33, 17), (64, 20), (8, 64))
    samples = nested_tensor_from_images([torch.randn(3, h, w) for h, w in sides])
    calls = {"trunk": 0, "reads": 0}
    body_forward = backbone.body.forward

    def counted_body(x):
        calls["trunk"] += 1
        return body_forward(x)

    monkeypatch.setattr(backbone.body, "forward", counted_body)
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad():
        levels = backbone(samples)
    monkeypatch.undo()
    assert calls == {"trunk": 1, "reads": 0}
    for level, stride in zip(levels, (8, 16, 32), strict=True):
        for features, mask, (h, w) in zip(level.tensors, level.mask, sides, strict=True):
            valid = (-(-h // stride), -(-w // stride))  # ceil: every ResNet downsampling rounds up
            assert not mask[: valid[0], : valid[1]].any() and mask.sum() == mask.numel() - valid[0] * valid[1]
            assert features[:, mask].abs().sum() == 0  # the padding is zero, as on the image alone


def test_outputs_have_detr_shapes_and_boxes_in_unit_range() -> None:
    cfg = _config()
    model = build_detr(cfg)
    out = model(torch.randn(2, 3, 32, 32))
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert "aux_outputs" not in build_detr(_config(aux_loss=False))(torch.randn(1, 3, 32, 32))


def test_a_few_steps_fit_one_image() -> None:
    """Transformer and heads train: the set loss on a fixed image with two boxes falls within a few
    AdamW steps (CNN frozen to keep the test fast)."""
    torch.manual_seed(0)
    cfg = _config(dropout=0.0, train_backbone=False, stem="small")  # 4x4 feature map
    model, criterion = build_detr(cfg), build_criterion(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 5e-3, 0.0, 1e-4))
    images = torch.randn(1, 3, 32, 32)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.4, 0.3]])}
    ]
    losses = []
    for _ in range(30):
        loss = criterion.weighted_sum(criterion(model(images), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize(("layer", "channels", "side"), [("layer4", 512, 4), ("layer3", 256, 8)])
def test_return_layer_is_the_stage_whose_map_the_transformer_reads(layer, channels, side) -> None:
    model = build_detr(_config(return_layer=layer)).eval()
    assert model.input_proj.in_channels == channels
    features, positions = model.backbone(nested_tensor_from_images([torch.randn(3, 128, 128)]))
    assert features[-1].tensors.shape[-2:] == (side, side) == positions[-1].shape[-2:]
    with pytest.raises(ConfigError, match="not ResNet stages"):
        build_detr(_config(return_layer="layer5"))


# ------------------------------------------------------------------------------------------ parts


def test_position_encoding_ignores_padding() -> None:
    embed = PositionEmbeddingSine(num_pos_feats=8)
    mask = torch.zeros(1, 7, 9, dtype=torch.bool)
    mask[:, 5:, :] = True
    mask[:, :, 6:] = True
    padded = embed(mask)
    alone = embed(torch.zeros(1, 5, 6, dtype=torch.bool))
    assert padded.shape == (1, 16, 7, 9)
    torch.testing.assert_close(padded[:, :, :5, :6], alone)


def test_attention_matches_torch_multihead_attention_with_padding() -> None:
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    query, key, value = torch.randn(2, 3, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    expected, _ = reference(query, key, value, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(ours(query, key, value, key_padding_mask=padding), expected)


def test_backbone_freezes_batch_norm_with_the_given_statistics() -> None:
    state = _trained_like_state()
    backbone = build_backbone("resnet18", state, ("layer4",), train_backbone=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    frozen = backbone.body.layer3[1].bn2
    assert isinstance(frozen, FrozenBatchNorm2d)
    torch.testing.assert_close(frozen.running_var, state["layer3.1.bn2.running_var"])
    torch.testing.assert_close(frozen.bias, state["layer3.1.bn2.bias"])
    torch.testing.assert_close(backbone.body.conv1.weight, state["conv1.weight"])
    trainable = {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # pretrained stem and layer1 stay frozen, as in DETR


def test_backbone_trainability_and_returned_layers() -> None:
    scratch = build_backbone(
        "resnet18", None, ("layer2", "layer4", "layer3"), train_backbone=True, stem="small"
    )
    assert all(p.requires_grad for p in scratch.parameters())
    frozen = build_backbone("resnet18", None, ("layer4",), train_backbone=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert scratch.num_channels == [128, 256, 512]
    features = scratch(nested_tensor_from_images([torch.randn(3, 32, 32), torch.randn(3, 24, 32)]))
    assert [tuple(f.tensors.shape[-2:]) for f in features] == [(16, 16), (8, 8), (4, 4)]  # strides 2, 4, 8
    assert [int((~f.mask[1]).sum()) for f in features] == [12 * 16, 6 * 8, 3 * 4]
    imagenet = build_backbone("resnet50", None, ("layer4",))
    assert imagenet.num_channels == [2048]
    (feature,) = imagenet(nested_tensor_from_images([torch.randn(3, 64, 96)]))
    assert feature.tensors.shape[-2:] == (2, 3)  # stride 32


def test_backbone_weights_for_another_arch_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="resnet34"):
        build_backbone("resnet34", _trained_like_state("resnet18"), ("layer4",))


def test_param_groups_give_the_backbone_its_own_lr() -> None:
    model = build_detr(_config(), _trained_like_state())
    groups = param_groups(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    backbone_params = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    assert {id(p) for p in groups[1]["params"]} == backbone_params
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    frozen = build_detr(_config(train_backbone=False))
    assert [g["lr"] for g in param_groups(frozen, 1e-4, 1e-5, 1e-4)] == [1e-4]


# ------------------------------------------------------------------------------------------ checkpoints

# Keys as they appear in facebookresearch/detr's released checkpoints.
DETR_RELEASE_KEYS = [
    "backbone.0.body.conv1.weight",
    "backbone.0.body.bn1.running_mean",
    "backbone.0.body.layer1.0.conv1.weight",
    "backbone.0.body.layer4.1.bn2.weight",
    "transformer.encoder.layers.0.self_attn.in_proj_weight",
    "transformer.encoder.layers.0.self_attn.out_proj.bias",
    "transformer.encoder.layers.0.linear1.weight",
    "transformer.encoder.layers.0.norm2.bias",
    "transformer.decoder.layers.1.self_attn.in_proj_bias",
    "transformer.decoder.layers.1.multihead_attn.out_proj.weight",
    "transformer.decoder.layers.1.norm3.weight",
    "transformer.decoder.norm.weight",
    "class_embed.weight",
    "bbox_embed.layers.2.bias",
    "query_embed.weight",
    "input_proj.weight",
]


def test_state_dict_uses_detr_checkpoint_names() -> None:
    keys = set(build_detr(_config()).state_dict())
    assert set(DETR_RELEASE_KEYS) <= keys
    prefixes = (
        "backbone.0.body.",
        "transformer.",
        "class_embed.",
        "bbox_embed.",
        "query_embed.",
        "input_proj.",
    )
    assert all(key.startswith(prefixes) for key in keys)


def test_detr_checkpoint_loads_with_a_fresh_class_head_for_other_classes(tmp_path) -> None:
    torch.manual_seed(1)
    source = build_detr(_config(num_classes=91))
    path = tmp_path / "detr-r18.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)

    torch.manual_seed(2)
    model = build_detr(_config(num_classes=4))
    reinitialised = load_detr_checkpoint(model, path)
    assert reinitialised == ["class_embed.weight", "class_embed.bias"]
    loaded, original = model.state_dict(), source.state_dict()
    for key in loaded:
        if not key.startswith("class_embed."):
            torch.testing.assert_close(loaded[key], original[key], msg=key)
    assert model.class_embed.weight.shape == (5, 32)

    same = build_detr(_config(num_classes=91))
    assert load_detr_checkpoint(same, path) == []
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(images)["pred_logits"], source.eval()(images)["pred_logits"])


def test_mismatched_checkpoints_are_config_errors_naming_the_key(tmp_path) -> None:
    model = build_detr(_config())
    path = tmp_path / "wide.pth"
    torch.save({"model": build_detr(_config(dim_feedforward=128)).state_dict()}, path)
    with pytest.raises(ConfigError, match=r"linear1\.weight"):
        load_detr_checkpoint(model, path)
    deeper = tmp_path / "deeper.pth"
    torch.save({"model": build_detr(_config(enc_layers=2)).state_dict()}, deeper)
    with pytest.raises(ConfigError, match="unexpected"):
        load_detr_checkpoint(model, deeper)
    with pytest.raises(ConfigError, match="does not exist"):
        load_detr_checkpoint(model, tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------ transforms


def _white_box_sample(box: list[float], size: int = 96) -> tuple[tv_tensors.Image, dict]:
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    x0, y0, x1, y1 = (int(v) for v in box)
    image[:, y0:y1, x0:x1] = 255
    boxes = tv_tensors.BoundingBoxes(torch.tensor([box]), format="XYXY", canvas_size=(size, size))
    return tv_tensors.Image(image), {
        "boxes": boxes,
        "labels": torch.tensor([2]),
        "image_id": 7,
        "orig_size": (size, size),
    }


@pytest.mark.parametrize("seed", range(8))
def test_train_transforms_keep_boxes_on_their_pixels(seed: int) -> None:
    """After flips, multi-scale resizes and IoU crops, the normalised box still frames the white square."""
    torch.manual_seed(seed)
    image, target = _white_box_sample([20.0, 30.0, 60.0, 54.0])
    out_image, out_target = train_transforms(scales=[64, 80, 96, 112], hflip=0.5)(image, target)
    assert out_image.dtype == torch.float32
    assert out_target["image_id"] == 7 and out_target["orig_size"] == (96, 96)
    height, width = out_image.shape[-2:]
    bright = (out_image[0] > 0).nonzero()
    if len(out_target["boxes"]) == 0:  # the crop cut the square out: it must be (nearly) gone
        assert len(bright) < 0.25 * 40 * 24 * (height / 96) * (width / 96)
        return
    ((cx, cy, w, h),) = out_target["boxes"].tolist()
    assert out_target["labels"].tolist() == [2]
    found = [bright[:, 1].min().item() / width, bright[:, 0].min().item() / height]
    found += [(bright[:, 1].max().item() + 1) / width, (bright[:, 0].max().item() + 1) / height]
    expected = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    assert found == pytest.approx(expected, abs=2.5 / min(height, width))


def test_eval_transforms_resize_and_normalise_boxes() -> None:
    image, target = _white_box_sample([24.0, 12.0, 72.0, 36.0])
    out_image, out_target = eval_transforms(size=48)(image, target)
    assert out_image.shape == (3, 48, 48)
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.5, 0.25, 0.5, 0.25]]))
