"""Two-view augmentation: independent views, reproducible with a seed, the view-pair figure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitkit.config import SSLAugmentation, load_params
from vitkit.data import ssl_transforms
from vitkit.data.ssl_transforms import (
    TwoViewDataset,
    TwoViews,
    _display,
    build_ssl_transform,
    normalize_transform,
    plot_view_pairs,
)

ROOT = Path(__file__).resolve().parents[2]
# the ssl.augmentation section at the old library defaults (MoCo v2 / SimCLR CIFAR recipe)
FORMER_DEFAULTS = dict(crop_scale=(0.2, 1.0), jitter=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.2)
AUG: SSLAugmentation = load_params(ROOT / "params.yaml").ssl.augmentation.model_copy(update=FORMER_DEFAULTS)
SIZE = 32


def _images(n: int = 4) -> torch.Tensor:
    """Images with structure (a bright square on a gradient) so crops and flips change them."""
    ramp = torch.linspace(0, 200, 32).view(1, 1, 32).expand(n, 3, 32, 32).clone()
    for i in range(n):
        ramp[i, i % 3, 4 + i : 14 + i, 6:20] = 255
    return ramp.to(torch.uint8)


def test_two_views_of_one_image_differ_and_are_normalised_floats() -> None:
    two_views = TwoViews(build_ssl_transform(AUG, SIZE, 0.5))
    torch.manual_seed(0)
    v1, v2_ = two_views(_images()[0])
    assert v1.shape == v2_.shape == (3, 32, 32)
    assert v1.dtype == torch.float32
    assert not torch.allclose(v1, v2_)
    # (x / 255 - 0.5) / 0.5 lies in [-1, 1]
    assert v1.min() >= -1.0 - 1e-6 and v1.max() <= 1.0 + 1e-6


def test_same_seed_reproduces_the_views() -> None:
    two_views = TwoViews(build_ssl_transform(AUG, SIZE, 0.5))
    image = _images()[1]
    torch.manual_seed(42)
    first = two_views(image)
    torch.manual_seed(42)
    second = two_views(image)
    torch.manual_seed(43)
    other = two_views(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.allclose(first[0], other[0])


def test_figure_shows_views_with_the_normalisation_undone(monkeypatch) -> None:
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    # other constants than the module's, so the test sees the figure read them off the transform
    monkeypatch.setattr(ssl_transforms, "MEAN", mean)
    monkeypatch.setattr(ssl_transforms, "STD", std)
    image = _images()[2]
    view = normalize_transform(mean, std)(image)
    torch.testing.assert_close(_display(view, build_ssl_transform(AUG, SIZE, 0.5)), image.float() / 255)


def test_dataset_serves_two_views_and_rejects_float_images() -> None:
    dataset = TwoViewDataset(_images(3), TwoViews(build_ssl_transform(AUG, SIZE, 0.5)))
    assert len(dataset) == 3
    v1, v2_ = dataset[2]
    assert v1.shape == v2_.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        TwoViewDataset(_images(3).float(), dataset.two_views)


def test_plot_view_pairs_writes_a_png_atomically(tmp_path) -> None:
    out = tmp_path / "plots" / "views.png"
    torch.manual_seed(0)
    plot_view_pairs(_images(5), TwoViews(build_ssl_transform(AUG, SIZE, 0.5)), out, n=4)
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size[0] > png.size[1]  # 4 columns wider than 3 rows
    assert os.listdir(out.parent) == ["views.png"]  # no temporary file left behind
