"""A dataset card: what a prepared data root holds, as numbers and as one figure of samples.

``data_root`` may hold any of ``classification/<split>/<class>/*``,
``detection/<split>/{images/, annotations.json}`` and ``unlabeled/images/*``
(the layouts ``vitkit.data.shapes`` and ``vitkit.data.ingest`` write).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from vitkit.errors import DataError
from vitkit.io import atomic_path

# COCO's object size ranges, by area in pixels (the same thresholds COCOeval uses).
SMALL_AREA, LARGE_AREA = 32**2, 96**2


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _size_counts(paths: list[Path]) -> dict[str, int]:
    """``{"WxH": count}``, reading only the image headers."""
    counts: Counter[str] = Counter()
    for path in paths:
        with Image.open(path) as image:
            counts["{}x{}".format(*image.size)] += 1
    return dict(sorted(counts.items()))


def _classification_card(root: Path) -> dict:
    splits, all_paths = {}, []
    for split_dir in _subdirs(root):
        per_class = {}
        for class_dir in _subdirs(split_dir):
            files = _files(class_dir)
            per_class[class_dir.name] = len(files)
            all_paths += files
        splits[split_dir.name] = {"images": sum(per_class.values()), "per_class": per_class}
    classes = sorted({name for split in splits.values() for name in split["per_class"]})
    return {"classes": classes, "splits": splits, "image_sizes": _size_counts(all_paths)}


def _detection_split_card(annotation_file: Path) -> dict:
    coco = json.loads(annotation_file.read_text())
    names = {cat["id"]: cat["name"] for cat in coco["categories"]}
    per_category = Counter(names[ann["category_id"]] for ann in coco["annotations"])
    per_image = Counter(ann["image_id"] for ann in coco["annotations"])
    counts = [per_image.get(img["id"], 0) for img in coco["images"]]
    areas = [ann["bbox"][2] * ann["bbox"][3] for ann in coco["annotations"]]
    sizes = Counter("{width}x{height}".format(**img) for img in coco["images"])
    return {
        "images": len(coco["images"]),
        "objects": len(coco["annotations"]),
        "objects_per_category": {name: per_category.get(name, 0) for name in names.values()},
        "objects_per_image": {
            "min": min(counts, default=0),
            "mean": sum(counts) / len(counts) if counts else 0.0,
            "max": max(counts, default=0),
        },
        "box_sizes": {
            "small": sum(a < SMALL_AREA for a in areas),
            "medium": sum(SMALL_AREA <= a < LARGE_AREA for a in areas),
            "large": sum(a >= LARGE_AREA for a in areas),
        },
        "image_sizes": dict(sorted(sizes.items())),
    }


def _detection_card(root: Path) -> dict:
    splits = {d.name: _detection_split_card(d / "annotations.json") for d in _subdirs(root)}
    first = next(iter(_subdirs(root)))
    categories = [cat["name"] for cat in json.loads((first / "annotations.json").read_text())["categories"]]
    return {"categories": categories, "splits": splits}


def build_dataset_card(data_root: Path) -> dict:
    """Counts per split and class/category, box-size distribution and image sizes, as a JSON-able dict."""
    data_root = Path(data_root)
    card = {}
    if (data_root / "classification").is_dir():
        card["classification"] = _classification_card(data_root / "classification")
    if (data_root / "detection").is_dir():
        card["detection"] = _detection_card(data_root / "detection")
    if (data_root / "unlabeled" / "images").is_dir():
        files = _files(data_root / "unlabeled" / "images")
        card["unlabeled"] = {"images": len(files), "image_sizes": _size_counts(files)}
    if not card:
        raise DataError(
            f"{data_root} holds none of classification/, detection/, unlabeled/images/. "
            "Run the prepare stage."
        )
    return card


def _classification_samples(root: Path, n: int) -> list[tuple[Path, str]]:
    """``n`` (path, class) pairs from the train split (else the first), cycling through the classes."""
    split_dirs = _subdirs(root)
    split = next((d for d in split_dirs if d.name == "train"), split_dirs[0])
    per_class = [(d.name, _files(d)) for d in _subdirs(split)]
    samples = []
    for i in range(n):
        name, files = per_class[i % len(per_class)]
        if i // len(per_class) < len(files):
            samples.append((files[i // len(per_class)], name))
    return samples


def _detection_samples(root: Path, n: int, display_size: int = 256) -> list[torch.Tensor]:
    """Up to ``n`` detection images with their ground-truth boxes and category names drawn in."""
    split_dirs = _subdirs(root)
    split = next((d for d in split_dirs if d.name == "train"), split_dirs[0])
    coco = json.loads((split / "annotations.json").read_text())
    names = {cat["id"]: cat["name"] for cat in coco["categories"]}
    drawn = []
    for img in coco["images"][:n]:
        image = decode_image(str(split / "images" / img["file_name"]), mode=ImageReadMode.RGB)
        scale = max(1, display_size // max(image.shape[-2:]))  # enlarge small images so labels fit
        image = image.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        boxes = box_convert(
            torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy"
        )
        labels = [names[a["category_id"]] for a in anns]
        drawn.append(draw_bounding_boxes(image, boxes * scale, labels=labels, colors="yellow", width=2))
    return drawn


def plot_samples(data_root: Path, out_png: Path, n: int = 16) -> None:
    """One figure: ``n`` classification samples with class names, then detection samples with boxes."""
    data_root, out_png = Path(data_root), Path(out_png)
    has_cls, has_det = (data_root / "classification").is_dir(), (data_root / "detection").is_dir()
    if not (has_cls or has_det):
        raise DataError(f"{data_root} holds neither classification/ nor detection/. Run the prepare stage.")
    columns = 8
    cls_samples = _classification_samples(data_root / "classification", n) if has_cls else []
    det_samples = _detection_samples(data_root / "detection", columns // 2) if has_det else []
    cls_rows = math.ceil(len(cls_samples) / columns)
    det_rows = 2 if det_samples else 0  # each detection image spans 2 x 2 cells
    fig = Figure(figsize=(2 * columns, 2 * (cls_rows + det_rows)))
    grid = fig.add_gridspec(cls_rows + det_rows, columns)
    for i, (path, name) in enumerate(cls_samples):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        with Image.open(path) as image:
            ax.imshow(image.convert("RGB"), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for k, image in enumerate(det_samples):
        ax = fig.add_subplot(grid[cls_rows : cls_rows + 2, 2 * k : 2 * k + 2])
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
