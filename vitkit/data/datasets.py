"""Datasets over the prepared layouts (``vitkit.data.shapes`` / ``vitkit.data.ingest`` write them).

Classification and unlabeled images are small and few, so they are decoded
once into one uint8 tensor and augmented on the fly: an epoch then costs no
decoding at all. Detection images are larger and are decoded per item.
Augmentations are torchvision transforms v2 pipelines; images are wrapped as
``tv_tensors.Image`` and boxes as ``tv_tensors.BoundingBoxes`` so geometric
transforms move boxes together with pixels.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_convert

from vitkit.errors import DataError


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _stack_images(paths: Sequence[Path], where: Path) -> torch.Tensor:
    """Decode images of one common size into a (N, 3, H, W) uint8 tensor."""
    if not paths:
        raise DataError(f"{where} contains no images. Run the prepare stage (or check the data path).")
    with Image.open(paths[0]) as image:
        first = np.asarray(image.convert("RGB"))
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, path in enumerate(paths[1:], start=1):
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape != first.shape:
            raise DataError(
                f"{path} is {array.shape[1]}x{array.shape[0]} but {paths[0]} is "
                f"{first.shape[1]}x{first.shape[0]}; all images under {where} must share one size. "
                "Ingest them with the prepare stage, which resizes them."
            )
        out[i] = array
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class LabelledImages(NamedTuple):
    """An in-memory labelled split: uint8 images (N, 3, H, W), int64 labels (N,), class names, and
    each image's path within the split (``<class>/<file>``) where it was read from files."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    names: tuple[str, ...] = ()


def load_imagefolder_tensors(split_dir: Path) -> LabelledImages:
    """Load ``split_dir/<class>/<image>`` as (N, 3, H, W) uint8 images, (N,) int64 labels, class names.

    Classes are the sorted folder names (label = position), as in torchvision's ImageFolder.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"Classification split {split_dir} does not exist. Run the prepare stage first.")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        paths += files
        labels += [label] * len(files)
    names = tuple(path.relative_to(split_dir).as_posix() for path in paths)
    return LabelledImages(
        _stack_images(paths, split_dir), torch.tensor(labels, dtype=torch.int64), classes, names
    )


def load_image_dir_tensors(images_dir: Path) -> torch.Tensor:
    """Load every image of a flat folder (sorted by name) as a (N, 3, H, W) uint8 tensor."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"Image folder {images_dir} does not exist. Run the prepare stage first.")
    return _stack_images(_image_files(images_dir), images_dir)


class TensorImageDataset(Dataset):
    """(transformed image, label) pairs over in-memory uint8 images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"need (N, C, H, W) uint8 images and N labels, got {tuple(images.shape)} {images.dtype} "
                f"and {len(labels)} labels"
            )
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = tv_tensors.Image(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class UnlabeledImages(Dataset):
    """Images of a flat folder, in memory; ``transform`` may return several views (for SSL)."""

    def __init__(self, images_dir: Path, transform: Callable | None = None) -> None:
        self.images = load_image_dir_tensors(images_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = tv_tensors.Image(self.images[index])
        return self.transform(image) if self.transform is not None else image


class CocoDetection(Dataset):
    """A detection split ``split_dir/{annotations.json, images/}`` in COCO format.

    Items are ``(image, target)``: a uint8 ``tv_tensors.Image`` and a dict with
    ``boxes`` (``BoundingBoxes``, XYXY pixels), ``labels`` (int64 category ids),
    ``image_id`` and ``orig_size`` ``(h, w)``. Crowd annotations are left out of
    the targets (as in DETR); COCOeval still sees them through ``.coco``.
    """

    def __init__(self, split_dir: Path, transforms: Callable | None = None) -> None:
        split_dir = Path(split_dir)
        annotation_file = split_dir / "annotations.json"
        if not annotation_file.is_file():
            raise DataError(f"{annotation_file} does not exist. Run the prepare stage first.")
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            self.coco = COCO(str(annotation_file))
        self.images_dir = split_dir / "images"
        self.ids = list(self.coco.imgs)
        self.categories = self.coco.loadCats(sorted(self.coco.getCatIds()))
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = tv_tensors.Image(
            decode_image(str(self.images_dir / info["file_name"]), mode=ImageReadMode.RGB)
        )
        height, width = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                box_convert(boxes, "xywh", "xyxy"), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "orig_size": (height, width),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep detection samples as lists: images may differ in size and targets in box count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
