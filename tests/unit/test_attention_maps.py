"""Attention rollout of the class and distillation tokens, and its figure."""

from __future__ import annotations

import torch

from vitkit.evaluation.attention import attention_rollout, save_attention_figure, token_attention_maps
from vitkit.models.vit import ViTConfig, build_vit

torch.set_num_threads(1)


def random_attention(b: int, h: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, t, generator=g).softmax(dim=-1)


def test_rollout_is_row_stochastic_and_matches_the_recurrence():
    layers = [random_attention(2, 3, 5, seed) for seed in range(4)]
    rollout = attention_rollout(layers)
    assert rollout.shape == (2, 5, 5)
    assert torch.allclose(rollout.sum(dim=-1), torch.ones(2, 5), atol=1e-6)

    expected = torch.eye(5).expand(2, 5, 5)
    for attn in layers:  # R_l = (A_l / 2 + I / 2) R_{l-1}, A_l averaged over heads
        expected = (0.5 * attn.mean(dim=1) + 0.5 * torch.eye(5)) @ expected
    assert torch.allclose(rollout, expected, atol=1e-6)


def test_rollout_of_self_attention_only_is_the_identity():
    eye = torch.eye(4).expand(1, 2, 4, 4)
    assert torch.allclose(attention_rollout([eye, eye, eye]), torch.eye(4).expand(1, 4, 4))


def test_token_maps_cover_the_patch_grid_for_both_tokens():
    torch.manual_seed(0)
    model = build_vit(ViTConfig(depth=2)).train()
    maps = token_attention_maps(model, torch.randn(3, 3, 32, 32))
    assert model.training  # mode restored
    assert set(maps) == {"cls", "dist"}
    for m in maps.values():
        assert m.shape == (3, 8, 8)
        assert m.amin() >= 0 and m.amax() <= 1
        assert torch.allclose(m.flatten(1).amax(dim=1), torch.ones(3))
    assert not torch.allclose(maps["cls"], maps["dist"])

    plain = build_vit(ViTConfig(depth=1, distilled=False))
    assert set(token_attention_maps(plain, torch.randn(1, 3, 32, 32))) == {"cls"}


def test_figure_is_written_atomically(tmp_path):
    torch.manual_seed(0)
    model = build_vit(ViTConfig(depth=1))
    images = torch.randn(2, 3, 32, 32)
    maps = token_attention_maps(model, images)
    out = save_attention_figure(
        images, maps, tmp_path / "plots" / "attn.png", mean=(0.5,) * 3, std=(0.25,) * 3, titles=["a", "b"]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["attn.png"]  # no temp file left behind
