"""Multi-scale deformable attention against the paper's formula written out with loops."""

from __future__ import annotations

import math

import pytest
import torch

from vitkit.models.deformable.ms_deform_attn import MSDeformAttn, ms_deform_attn_core

SHAPES = [(5, 7), (3, 4), (2, 1)]  # non-square levels, one a single column


def _bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of a (C, h, w) map at normalised (x, y): pixel i covers [i, i+1) / size, so its centre is
    at (i + 0.5) / size; the four pixels around the point are blended by their distances and any
    pixel outside the map counts as zero."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < height and 0 <= xi < width:
                out += wx * wy * image[:, yi, xi]
    return out


def _loop_reference(value, shapes, locations, weights) -> torch.Tensor:
    """Σ_l Σ_k A[b,q,m,l,k] · x^l_m(p[b,q,m,l,k]) for every batch image, query and head."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for height, width in shapes:
        starts.append(starts[-1] + height * width)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for m in range(heads):
            maps = [
                value[b, starts[lvl] : starts[lvl + 1], m].T.reshape(head_dim, *shapes[lvl])
                for lvl in range(levels)
            ]
            for q in range(queries):
                for lvl in range(levels):
                    for k in range(points):
                        x, y = locations[b, q, m, lvl, k].tolist()
                        sample = _bilinear_zero_padded(maps[lvl], x, y)
                        out[b, q, m] += weights[b, q, m, lvl, k] * sample
    return out.flatten(2)


def _random_inputs(gen, batch=2, queries=5, heads=3, head_dim=4, points=3, dtype=torch.float32):
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, total, heads, head_dim, generator=gen, dtype=dtype)
    # Spill over the [0, 1] range so zero padding and the borders are exercised too.
    locations = (
        torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
    )
    logits = torch.randn(batch, queries, heads, len(SHAPES) * points, generator=gen, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, len(SHAPES), points)
    return value, locations, weights


def test_core_matches_loop_formula():
    gen = torch.Generator().manual_seed(0)
    value, locations, weights = _random_inputs(gen)
    ours = ms_deform_attn_core(value, SHAPES, locations, weights)
    reference = _loop_reference(value, SHAPES, locations, weights)
    assert ours.shape == (2, 5, 3 * 4)
    assert (ours - reference).abs().max() <= 1e-5


def test_core_accepts_shapes_tensor():
    gen = torch.Generator().manual_seed(1)
    value, locations, weights = _random_inputs(gen)
    as_list = ms_deform_attn_core(value, SHAPES, locations, weights)
    as_tensor = ms_deform_attn_core(value, torch.tensor(SHAPES), locations, weights)
    torch.testing.assert_close(as_list, as_tensor, rtol=0, atol=0)


def test_core_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    value, locations, weights = _random_inputs(gen, batch=1, queries=2, heads=2, head_dim=2, points=2)
    value, locations, weights = (t.double().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, p, a: ms_deform_attn_core(v, SHAPES, p, a), (value, locations, weights), eps=1e-6, atol=1e-5
    )


def test_border_sampling_is_grid_sample_zero_padding():
    """With align_corners=False pixel i spans [i/w, (i+1)/w): x = 0 lies half a pixel left of the
    first pixel centre, so it blends that pixel (weight 1/2) with the zero outside; likewise x = 1
    with the last pixel; a corner gets 1/4; a point a full pixel outside reads only zeros."""
    height, width = 3, 4
    value = torch.arange(1.0, height * width + 1).view(1, height * width, 1, 1)
    image = value.view(height, width)
    row = 1
    y_centre = (row + 0.5) / height
    points = [(0.0, y_centre), (1.0, y_centre), (0.0, 0.0), (1.0, 1.0), (-1.0 / width, y_centre)]
    expected = [
        0.5 * image[row, 0],
        0.5 * image[row, -1],
        0.25 * image[0, 0],
        0.25 * image[-1, -1],
        torch.tensor(0.0),
    ]
    locations = torch.tensor(points).view(1, len(points), 1, 1, 1, 2)
    weights = torch.ones(1, len(points), 1, 1, 1)
    out = ms_deform_attn_core(value, [(height, width)], locations, weights).flatten()
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-6)


def test_module_padding_mask_zeroes_values():
    """Masked positions contribute nothing: the output equals the one with those inputs replaced by
    anything else."""
    gen = torch.Generator().manual_seed(3)
    attn = MSDeformAttn(d_model=12, n_levels=len(SHAPES), n_heads=3, n_points=2)
    total = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 4, 12, generator=gen)
    reference = torch.rand(2, 4, len(SHAPES), 2, generator=gen)
    features = torch.randn(2, total, 12, generator=gen)
    mask = torch.rand(2, total, generator=gen) < 0.3
    changed = torch.where(mask[..., None], torch.randn_like(features) * 100, features)
    out = attn(query, reference, features, SHAPES, mask)
    torch.testing.assert_close(attn(query, reference, changed, SHAPES, mask), out)
    assert not torch.allclose(attn(query, reference, changed, SHAPES), out)


@pytest.mark.parametrize("box", [False, True])
def test_module_sampling_locations(box: bool):
    """Check the location arithmetic of the module: a point reference adds offsets in pixels of each
    level; a box reference adds them in units of (w, h) / (2 * n_points)."""
    gen = torch.Generator().manual_seed(4)
    attn = MSDeformAttn(d_model=8, n_levels=len(SHAPES), n_heads=2, n_points=2)
    query = torch.randn(1, 3, 8, generator=gen)
    reference = torch.rand(1, 3, len(SHAPES), 4 if box else 2, generator=gen) * 0.5 + 0.25
    total = sum(h * w for h, w in SHAPES)
    features = torch.randn(1, total, 8, generator=gen)
    offsets = attn.sampling_offsets(query).view(1, 3, 2, len(SHAPES), 2, 2)
    if box:
        locations = (
            reference[:, :, None, :, None, :2] + offsets / 2 * reference[:, :, None, :, None, 2:] * 0.5
        )
    else:
        size = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
        locations = reference[:, :, None, :, None, :] + offsets / size[:, None, :]
    weights = attn.attention_weights(query).view(1, 3, 2, -1).softmax(-1).view(1, 3, 2, len(SHAPES), 2)
    value = attn.value_proj(features).view(1, total, 2, 4)
    expected = attn.output_proj(_loop_reference(value, SHAPES, locations, weights))
    torch.testing.assert_close(attn(query, reference, features, SHAPES), expected, rtol=1e-5, atol=1e-5)


def test_initial_offsets_follow_official_pattern():
    """Head m points along angle 2πm/H, normalised to the unit square, point k at (k + 1) times that;
    attention starts uniform."""
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for k in range(3):
        torch.testing.assert_close(bias[:, 0, k], directions * (k + 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[:, 1, k], directions * (k + 1), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
