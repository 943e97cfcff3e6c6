"""The DeiT student against timm: same state-dict layout, same outputs, same resizing."""

from __future__ import annotations

import pytest
import torch

from vitkit.errors import ConfigError
from vitkit.models.vit import (
    Attention,
    ViTConfig,
    build_vit,
    load_deit_checkpoint,
    optimizer_param_groups,
    preset,
)

timm = pytest.importorskip("timm")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def timm_deit_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)


def images(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_state_dict_layout_is_timms(timm_deit_tiny):
    ours = build_vit(preset("deit_tiny"))
    theirs = timm_deit_tiny.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.items())


def test_timm_weights_give_timms_outputs_eval_and_train(timm_deit_tiny):
    ours = build_vit(preset("deit_tiny", drop_path_rate=0.0))
    load_deit_checkpoint(ours, timm_deit_tiny.state_dict())
    x = images(224)
    timm_deit_tiny.eval()
    ours.eval()
    with torch.no_grad():
        assert (ours(x) - timm_deit_tiny(x)).abs().max() <= 1e-5

    timm_deit_tiny.train()
    timm_deit_tiny.set_distilled_training(True)
    ours.train()
    with torch.no_grad():
        (cls_t, dist_t), (cls_o, dist_o) = timm_deit_tiny(x), ours(x)
    assert (cls_o - cls_t).abs().max() <= 1e-5
    assert (dist_o - dist_t).abs().max() <= 1e-5
    assert (cls_o - dist_o).abs().max() > 1e-3  # the heads are distinct, so the check above means something


def test_non_distilled_variant_matches_timm():
    torch.manual_seed(0)
    theirs = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    ours = build_vit(preset("deit_tiny", distilled=False, drop_path_rate=0.0)).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    load_deit_checkpoint(ours, theirs.state_dict())
    x = images(224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_pos_embed_interpolation_matches_timm(timm_deit_tiny, tmp_path):
    """A 224 checkpoint run at 160x160: resized at run time and at load time, both as timm does."""
    torch.manual_seed(0)
    dynamic = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, dynamic_img_size=True)
    dynamic.load_state_dict(timm_deit_tiny.state_dict())
    dynamic.eval()
    x = images(160)
    with torch.no_grad():
        expected = dynamic(x)

    at_224 = build_vit(preset("deit_tiny", drop_path_rate=0.0)).eval()
    load_deit_checkpoint(at_224, timm_deit_tiny.state_dict())
    torch.save({"model": timm_deit_tiny.state_dict()}, tmp_path / "deit.pth")  # DeiT's release format
    at_160 = build_vit(preset("deit_tiny", img_size=160, drop_path_rate=0.0)).eval()
    load_deit_checkpoint(at_160, tmp_path / "deit.pth")
    assert at_160.pos_embed.shape == (1, 2 + 10 * 10, 192)
    with torch.no_grad():
        assert (at_224(x) - expected).abs().max() <= 1e-5
        assert (at_160(x) - expected).abs().max() <= 1e-5


def test_other_num_classes_gets_fresh_heads_and_keeps_the_trunk(timm_deit_tiny):
    ours = build_vit(preset("deit_tiny"))
    load_deit_checkpoint(ours, {"model": timm_deit_tiny.state_dict()}, num_classes=6)
    assert ours.config.num_classes == 6
    assert ours.head.weight.shape == ours.head_dist.weight.shape == (6, 192)
    assert not ours.head.weight.equal(ours.head_dist.weight)
    assert torch.equal(ours.blocks[3].mlp.fc1.weight, timm_deit_tiny.blocks[3].mlp.fc1.weight)
    ours.eval()
    assert ours(images(224)).shape == (2, 6)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = build_vit(ViTConfig(embed_dim=64, num_heads=2, depth=2))
    with pytest.raises(ConfigError, match="does not fit"):
        load_deit_checkpoint(build_vit(ViTConfig(depth=2)), small.state_dict())
    with pytest.raises(ConfigError, match="does not exist"):
        load_deit_checkpoint(small, tmp_path / "missing.pth")


def test_eval_forward_averages_the_two_heads():
    model = build_vit(ViTConfig(depth=2)).eval()
    x = images(32, n=4)
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(x)
        assert torch.allclose(model(x), (cls_logits + dist_logits) / 2)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (4, 6)


def test_explicit_attention_path_equals_fused_path():
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(3, 17, 64)
    fused, none = attn(x)
    explicit, weights = attn(x, return_weights=True)
    assert none is None
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert weights.shape == (3, 4, 17, 17)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 17))


def test_init_and_stochastic_depth():
    torch.manual_seed(0)
    model = build_vit(ViTConfig(embed_dim=192, num_heads=3, drop_path_rate=0.5))
    assert model.blocks[0].drop_path.p == 0.0 and model.blocks[-1].drop_path.p == 0.5
    assert 0.015 < model.blocks[0].mlp.fc1.weight.std() < 0.025
    assert model.blocks[0].mlp.fc1.weight.abs().max() <= 2.0
    assert 0.015 < model.pos_embed.std() < 0.025
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.equal(model.norm.weight, torch.ones(192))
    x = images(32, n=8)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])  # different residual branches dropped
    model.eval()
    assert torch.equal(model(x), model(x))


def test_other_input_size_at_run_time_and_bad_sizes():
    model = build_vit(ViTConfig(depth=1)).eval()
    assert model(images(48)).shape == (2, 6)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(images(30))
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        ViTConfig(img_size=30)
    with pytest.raises(ConfigError, match="unknown ViT preset"):
        preset("deit_huge")


def test_optimizer_groups_skip_decay_on_tokens_norms_and_biases():
    model = build_vit(ViTConfig(depth=1))
    decay, no_decay = optimizer_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "dist_token", "pos_embed", "norm.weight", "head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "head.weight",
        "head_dist.weight",
    }
