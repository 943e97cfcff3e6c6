"""Two-view augmentation for contrastive pretraining (MoCo v2 / SimCLR), sized for 32 px images.

The augmentation *is* the pretext task: whatever it changes, the encoder learns
to ignore. The recipe follows MoCo v2 / SimCLR's CIFAR settings: random resized
crop (the most important part -- it forces local/global and part/whole
matching), strong colour jitter + random grayscale (so colour histograms alone
cannot identify an image), a little blur and horizontal flips (``data.hflip``: off
for data a mirror changes). Blur uses a 3x3 kernel with small sigmas: the ImageNet
recipe's 23 px kernel (10% of 224) would wipe out a 32 px image, which is why
SimCLR drops blur on CIFAR altogether.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset
from torchvision.transforms import v2

from vitkit.config import SSLAugmentation
from vitkit.data.datasets import Images, check_images
from vitkit.io import atomic_path

BLUR_SIGMA = (0.1, 1.0)
# maps [0, 1] to [-1, 1]; exact dataset statistics matter little since a BN follows conv1
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def normalize_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """uint8 -> float in [0, 1] -> standardised; works on one image or a batch (N, 3, H, W)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def build_ssl_transform(aug: SSLAugmentation, size: int, hflip: float) -> v2.Compose:
    """One random view of a uint8 (3, H, W) image, as a normalised float tensor.

    ``aug`` is the ``ssl.augmentation`` params section: the strengths of each part; ``hflip`` the
    probability of a horizontal flip (``data.hflip``).
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=aug.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(hflip),
            v2.RandomApply([v2.ColorJitter(aug.jitter, aug.jitter, aug.jitter, aug.hue)], p=aug.jitter_p),
            v2.RandomGrayscale(p=aug.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=BLUR_SIGMA)], p=aug.blur_p),
            normalize_transform(MEAN, STD),
        ]
    )


class TwoViews:
    """Apply ``transform`` twice, independently: the positive pair of contrastive learning.

    Must be applied per image: v2 transforms draw one set of random parameters
    per call, so a batched call would give every image the same crop.
    """

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


class TwoViewDataset(Dataset):
    """Unlabelled uint8 images (N, 3, H, W), in memory or read per item, served as two augmented views."""

    def __init__(self, images: Images, two_views: TwoViews) -> None:
        check_images(images)
        self.images = images
        self.two_views = two_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.two_views(self.images[index])


def _display(view: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """Undo the pipeline's final Normalize (if any) so a view can be shown as an image."""
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    for step in reversed(steps):
        if isinstance(step, v2.Compose):
            return _display(view, step)
        if isinstance(step, v2.Normalize):
            mean = torch.tensor(step.mean).view(-1, 1, 1)
            std = torch.tensor(step.std).view(-1, 1, 1)
            return (view * std + mean).clamp(0, 1)
    return view.float().div(255) if view.dtype == torch.uint8 else view.clamp(0, 1)


def plot_view_pairs(images: Images, two_views: TwoViews, out_png: str | Path, n: int = 8) -> None:
    """Figure of ``n`` originals (top row) and their two augmented views (rows 2 and 3).

    Written to a temporary file in the destination folder and renamed into place,
    so an interrupted run never leaves a truncated PNG behind.
    """
    n = min(n, len(images))
    # a bare Figure renders with Agg without touching pyplot's global backend state
    fig = Figure(figsize=(1.2 * n, 3.8))
    axes = fig.subplots(3, n, squeeze=False)
    for col in range(n):
        views = two_views(images[col])
        panels = [images[col].float().div(255), *(_display(v, two_views.transform) for v in views)]
        for row, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    for row, title in enumerate(["original", "view 1", "view 2"]):
        axes[row][0].set_ylabel(title)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
