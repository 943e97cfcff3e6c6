"""DeiT's data recipe with torchvision transforms v2, sized for small images.

Per image (DeiT / timm ``create_transform(is_training=True)``):
RandomResizedCrop -> horizontal flip -> RandAugment(2 ops, magnitude 9) ->
float + Normalize -> RandomErasing(p=0.25, per-pixel random values).

Per batch: MixUp or CutMix, one of the two chosen at random per batch (timm's
``switch_prob=0.5``), with label smoothing. The order matters only in words:
label smoothing is affine (``t -> (1 - eps) * t + eps / C``) and mixing is a
convex combination, so smoothing the one-hot labels and then mixing (what
timm's ``Mixup`` does) gives exactly the same targets as mixing and then
smoothing. Here the labels are smoothed first, then handed to v2 MixUp/CutMix
as probabilities, so the criterion must *not* smooth again (see
``vitkit.losses.distillation.build_base_criterion``).

Also DeiT's weights EMA, built on ``torch.optim.swa_utils.AveragedModel``.

Differences from timm's recipe, on purpose: the default crop scale is
(0.35, 1) instead of (0.08, 1), because an 8 % crop of a 32x32 image is a
handful of pixels and no longer shows the shape; torchvision's RandAugment has a
fixed magnitude (no ``mstd0.5`` noise, no ``inc1`` increasing-severity variant).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import InterpolationMode, v2

from vitkit.config import DeitParams
from vitkit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


CROP_RATIO = (3 / 4, 4 / 3)


def build_deit_train_transform(p: DeitParams, img_size: int, hflip: float) -> v2.Compose:
    """Per-image training transform: PIL image or uint8 tensor in, normalised float tensor out.

    ``p`` is the ``deit`` params section: crop_scale, randaug_ops / randaug_magnitude, random_erasing;
    ``hflip`` the probability of a horizontal flip (``data.hflip``; DeiT's 0.5).
    """
    steps: list[nn.Module] = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            img_size,
            scale=(p.crop_scale, 1.0),
            ratio=CROP_RATIO,
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(hflip),
    ]
    if p.randaug_ops > 0:
        steps.append(
            v2.RandAugment(
                num_ops=p.randaug_ops,
                magnitude=p.randaug_magnitude,
                interpolation=InterpolationMode.BILINEAR,
            )
        )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if p.random_erasing > 0:
        steps.append(v2.RandomErasing(p=p.random_erasing, value="random"))  # timm's re_mode="pixel"
    return v2.Compose(steps)


def build_eval_transform(
    img_size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    crop_pct: float = 1.0,
) -> v2.Compose:
    """Resize to ``img_size / crop_pct`` and centre-crop ``img_size`` (DeiT uses crop_pct 0.875 at 224).

    The default crop_pct 1.0 keeps the whole image, right for small images
    whose object may touch the border.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class BatchMixer:
    """(images, int labels) -> (mixed images, soft targets), as timm's ``Mixup`` in batch mode."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha))
        self.mix: Callable | None = v2.RandomChoice(mixers) if mixers else None

    def smooth(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot labels smoothed to ``1 - eps + eps/C`` on the class and ``eps/C`` elsewhere."""
        one_hot = F.one_hot(labels, self.num_classes).float()
        return one_hot * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = self.smooth(labels)
        if self.mix is None:
            return images, targets
        return self.mix(images, targets)


def build_model_ema(model: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of weights and buffers (DeiT's ``--model-ema``).

    Call ``ema.update_parameters(model)`` after each optimizer step; the first
    call copies the weights. Evaluate ``ema.module`` and save
    ``ema.module.state_dict()`` (the wrapper adds an ``n_averaged`` counter).
    DeiT's decay 0.99996 assumes ~1250 steps per epoch on ImageNet; on a few
    hundred steps in all, something like 0.99 to 0.999 is the useful range.
    """
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
