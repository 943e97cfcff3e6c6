"""Datasets over the prepared layouts (``vitkit.data.shapes`` / ``vitkit.data.ingest`` write them).

Images are read per item, by the DataLoader's workers when there are any:
each read decodes one file with ``torchvision.io.decode_image``, so memory does
not grow with the dataset. A split whose decoded pixels fit ``data.cache_mb`` is
decoded once instead, when it is opened, and served from memory: the same
tensors, without decoding every epoch (the built-in data is small and is
cached). Augmentations are torchvision transforms v2 pipelines; images are
wrapped as ``tv_tensors.Image`` and boxes as ``tv_tensors.BoundingBoxes`` so
geometric transforms move boxes together with pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_convert

from vitkit.errors import DataError

MB = 2**20
REPREPARE = "run the prepare stage again to rewrite the data"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_image(path: Path | str) -> torch.Tensor:
    """One prepared image as a uint8 (3, H, W) RGB tensor; a file that cannot be read is a DataError
    naming it (prepare validated every file, so it changed since)."""
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as exc:
        reason = re.sub(r"^\w+, \S+:\d+, ", "", str(exc))  # torchvision's C++ source location first
        raise DataError(f"{path}: not a readable image ({reason}); {REPREPARE}") from None
    if image.dtype != torch.uint8:
        raise DataError(f"{path}: {image.dtype} pixels, not 8-bit; {REPREPARE}")
    return image


class ImageFiles:
    """N uint8 RGB images of one size, read from their files on demand like a (N, 3, H, W) tensor.

    Indexing follows a tensor's: an int gives one (3, H, W) image; a slice, a list or a tensor of
    indices gives a stacked batch. When the decoded images take at most ``cache_mb`` megabytes they
    are all decoded here, once, into one tensor (``cached``) that every read then indexes (DataLoader
    workers share it: they are forked after it is filled); otherwise each read decodes its files.
    Both give the same tensors. The paths are one numpy bytes array rather than a list of Python
    strings: forked workers touching a list's reference counts would copy it page by page.
    """

    def __init__(self, paths: Sequence[Path], where: Path, cache_mb: float) -> None:
        if not paths:
            raise DataError(f"{where} contains no images. Run the prepare stage (or check the data path).")
        self.where = Path(where)
        self._paths = np.array([os.fsencode(p) for p in paths])
        first = read_image(paths[0])
        self.shape = torch.Size((len(paths), *first.shape))
        self.cached: torch.Tensor | None = None
        if self.nbytes <= cache_mb * MB:
            cached = torch.empty(self.shape, dtype=torch.uint8)
            cached[0] = first
            for i in range(1, len(self)):
                cached[i] = self._read(i)
            self.cached = cached

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded images (what caching them takes)."""
        return self.shape.numel()

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(self._paths[index]))

    def _read(self, index: int) -> torch.Tensor:
        image = read_image(self.path(index))
        if image.shape != self.shape[1:]:
            (_, height, width), (_, first_h, first_w) = image.shape, self.shape[1:]
            raise DataError(
                f"{self.path(index)} is {width}x{height} but {self.path(0)} is {first_w}x{first_h}; all "
                f"images under {self.where} must share one size. Ingest them with the prepare stage, "
                "which resizes them."
            )
        return image

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[index]
        if isinstance(index, torch.Tensor) and index.ndim == 0:
            index = int(index)
        if isinstance(index, int | np.integer):
            return self._read(range(len(self))[index])
        positions = range(len(self))[index] if isinstance(index, slice) else [int(i) for i in index]
        if not positions:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        return torch.stack([self._read(range(len(self))[i]) for i in positions])


Images = torch.Tensor | ImageFiles
"""uint8 images (N, 3, H, W): a tensor in memory, or ``ImageFiles`` read from disk on demand."""


def check_images(images: Images) -> None:
    """Refuse anything but uint8 RGB images (N, 3, H, W), with what was given."""
    dtype = images.dtype if isinstance(images, torch.Tensor) else torch.uint8
    if dtype != torch.uint8 or len(images.shape) != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {dtype} {tuple(images.shape)}")


class LabelledImages(NamedTuple):
    """A labelled split: uint8 images (N, 3, H, W), int64 labels (N,), class names, and each
    image's path within the split (``<class>/<file>``) where it was read from files."""

    images: Images
    labels: torch.Tensor
    classes: list[str]
    names: tuple[str, ...] = ()


def load_imagefolder(split_dir: Path, cache_mb: float) -> LabelledImages:
    """``split_dir/<class>/<image>`` as images (held in memory if they fit ``cache_mb``, see
    ``ImageFiles``), (N,) int64 labels and class names.

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
    images = ImageFiles(paths, split_dir, cache_mb)
    names = tuple(path.relative_to(split_dir).as_posix() for path in paths)
    return LabelledImages(images, torch.tensor(labels, dtype=torch.int64), classes, names)


def load_image_dir(images_dir: Path, cache_mb: float) -> ImageFiles:
    """Every image of a flat folder, sorted by name (held in memory if they fit ``cache_mb``)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"Image folder {images_dir} does not exist. Run the prepare stage first.")
    return ImageFiles(_image_files(images_dir), images_dir, cache_mb)


class LabelledImageDataset(Dataset):
    """(transformed image, label) pairs over uint8 images, in memory or read per item."""

    def __init__(self, images: Images, labels: torch.Tensor, transform: Callable | None = None) -> None:
        check_images(images)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = tv_tensors.Image(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


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
        image = tv_tensors.Image(read_image(self.images_dir / info["file_name"]))
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
