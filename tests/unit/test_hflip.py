"""``data.hflip``: every training augmentation flips with that probability, never when it is 0.

Data a mirror changes (text, digits, left/right labels) must be able to turn flips off; a test image
white on its left and black on its right shows whether a transform flipped it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from vitkit.config import load_params
from vitkit.data.deit_transforms import build_deit_train_transform
from vitkit.data.detection_transforms import train_transforms
from vitkit.data.ssl_transforms import build_ssl_transform
from vitkit.data.transforms import train_transform

PARAMS = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
SIZE = 32
DRAWS = 12


def _left_white() -> torch.Tensor:
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    image[..., : SIZE // 2] = 255
    return image


def _flipped(out: torch.Tensor) -> bool:
    quarter = out.shape[-1] // 4
    return bool(out[..., :quarter].mean() < out[..., -quarter:].mean())


def _classification_transforms(hflip: float) -> dict:
    whole = PARAMS.ssl.augmentation.model_copy(update={"crop_scale": (1.0, 1.0)})  # crops keep both halves
    deit = PARAMS.deit.model_copy(update={"crop_scale": 1.0, "randaug_ops": 0, "random_erasing": 0.0})
    return {
        "teacher": train_transform(SIZE, hflip),
        "ssl": build_ssl_transform(whole, SIZE, hflip),
        "deit": build_deit_train_transform(deit, SIZE, hflip),
    }


@pytest.mark.parametrize(("hflip", "expected"), [(0.0, False), (1.0, True)])
def test_classification_augmentations_flip_as_data_hflip_says(hflip, expected):
    torch.manual_seed(0)
    for name, transform in _classification_transforms(hflip).items():
        flips = {_flipped(transform(_left_white())) for _ in range(DRAWS)}
        assert flips == {expected}, name


@pytest.mark.parametrize(("hflip", "expected"), [(0.0, False), (1.0, True)])
def test_detection_augmentation_flips_image_and_boxes_as_data_hflip_says(hflip, expected):
    torch.manual_seed(0)
    transform = train_transforms([SIZE], hflip, crop=False)
    for _ in range(DRAWS):
        boxes = tv_tensors.BoundingBoxes([[0, 0, SIZE // 2, SIZE]], format="XYXY", canvas_size=(SIZE, SIZE))
        image, target = transform(
            tv_tensors.Image(_left_white()), {"boxes": boxes, "labels": torch.tensor([1])}
        )
        ((cx, _, _, _),) = target["boxes"].tolist()
        assert _flipped(image) == expected and (cx > 0.5) == expected
