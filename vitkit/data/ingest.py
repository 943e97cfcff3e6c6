"""Validate and ingest user data: ImageFolder trees for classification, COCO json for detection.

Validation reads *everything* before saying anything, so a user fixing a
dataset sees all its problems at once: one ``DataError`` names the first few
offending entries with their paths, the total count and what to do.

Ingestion writes the same layouts the shapes generator writes, so every later
stage reads user data and synthetic data through one code path. Outputs are
built in a temporary directory beside the target and renamed into place: a
failure leaves nothing behind and an existing output untouched.

What is read, and how it becomes 8-bit RGB:

- Only regular files are read from an input folder; a named pipe, socket or
  device is refused with its path (opening a pipe would wait forever), and so
  is an entry that resolves outside its root through a symbolic link: the same
  rule for ImageFolder trees, image folders and COCO ``file_name``s.
- 16-bit images (PNG, TIFF) are scaled to 8 bits (0..65535 to 0..255); 32-bit
  integer and float images are refused, as their range is not defined.
- Transparency (an alpha channel, or a palette or tRNS transparent colour) is
  composited over black: a fully transparent pixel becomes black whatever
  colour it stored. Both conversions are counted in one line on stdout.
- COCO category ids are class indices (the class head has ``max id + 1``
  outputs), so they must be integers in ``[0, MAX_CATEGORY_ID]``; the val and
  test splits may only use categories the train split declares and annotates.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vitkit.config import MAX_CATEGORY_ID
from vitkit.engine.device import warn
from vitkit.errors import DataError
from vitkit.io import atomic_dir, non_regular_kind

MAX_LISTED = 5  # offending entries quoted in one error message
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in annotation tools)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UNDEFINED_RANGE_MODES = {"I": "32-bit integer", "F": "32-bit float"}


# --------------------------------------------------------------------------- shared helpers


class _Problems:
    """Collects problems and raises them as one DataError."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self, subject: str, advice: str) -> None:
        if not self.items:
            return
        n = len(self.items)
        listed = "\n".join(f"  - {item}" for item in self.items[:MAX_LISTED])
        more = f"\n  ... and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
        raise DataError(f"{subject} has {n} problem{'s' if n > 1 else ''}:\n{listed}{more}\n{advice}")


def _probe_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` for a decodable image, else ``(None, reason)``.

    Anything but a regular file is refused unopened. ``verify()`` catches broken
    structure cheaply but not truncated pixel data, so the image is also fully decoded.
    """
    kind = non_regular_kind(path)
    if kind is not None:
        return None, f"{kind}, not an image file; remove it"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            if image.mode in UNDEFINED_RANGE_MODES:
                return None, (
                    f"{UNDEFINED_RANGE_MODES[image.mode]} pixels (mode {image.mode}), whose range is not "
                    "defined; save it with 8 or 16 bits per channel"
                )
            return image.size, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"not a readable image ({type(exc).__name__}: {exc})"


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """``image`` as 8-bit RGB, and what was done beyond a plain conversion (``16-bit``, ``alpha``).

    16-bit grey is scaled to 8 bits (65535 -> 255; Pillow's own conversion clips it to 255, which
    turns most of an image white); 16-bit colour PNGs already arrive scaled from Pillow.
    Transparency is composited over black.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32)
        scaled = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB"), "16-bit"
    if image.mode in UNDEFINED_RANGE_MODES:
        raise ValueError(f"{UNDEFINED_RANGE_MODES[image.mode]} pixels (mode {image.mode}) are not supported")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB"), "alpha"
    return image.convert("RGB"), None


class _Conversions:
    """Counts the images ``to_rgb`` did more than convert, reported in one line per dataset."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def rgb(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                rgb, note = to_rgb(image)
        except (OSError, ValueError) as exc:  # validated before; a file changed since, or a rare mode
            raise DataError(f"{path}: cannot be converted to RGB ({type(exc).__name__}: {exc})") from None
        if note:
            self.counts[note] += 1
        return rgb

    def report(self, subject: str) -> None:
        done = []
        if self.counts["16-bit"]:
            done.append(f"{self.counts['16-bit']} 16-bit image(s) scaled to 8 bits")
        if self.counts["alpha"]:
            done.append(f"{self.counts['alpha']} image(s) with transparency composited over black")
        if done:
            print(f"{subject}: {'; '.join(done)}", flush=True)


def _visible_entries(folder: Path) -> list[Path]:
    """Entries of a folder, sorted, without hidden ones (.DS_Store, .ipynb_checkpoints, ...)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _escapes(path: Path, root: Path) -> str | None:
    """Why ``path`` may not be read as part of ``root`` (a link resolving outside it), or None."""
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return f"symbolic link to {target}, outside the root {root.resolve()}; copy the file into the root"


def _save_png(image: Image.Image, path: Path) -> None:
    image.convert("RGB").save(path, format="PNG")


def to_square(image: Image.Image, size: int) -> Image.Image:
    """``size`` x ``size`` with the aspect ratio kept: the shorter side resized to ``size``, the longer
    centre-cropped to it (torchvision's Resize + CenterCrop), so no object is squashed."""
    return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------- ImageFolder


@dataclass(frozen=True)
class ImageFolderIndex:
    """A validated ImageFolder: sorted class names and, per split, (path relative to root, class index)."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]


IMAGEFOLDER_ADVICE = (
    "Expected layout: <root>/<split>/<class>/<image>, the same class folders in every split, "
    "at least one decodable image in each. Fix or remove the entries above and run again."
)


def validate_imagefolder(
    root: Path, splits: Sequence[str], classes: Sequence[str] | None = None
) -> ImageFolderIndex:
    """Check ``root/<split>/<class>/<image>`` for every split; raise one DataError listing all problems.

    ``classes`` (``data.classes``): the class folders to use, each needed in every split; the
    others are left out unread, with a warning. None: the class folders of ``train`` (or of the
    first split when there is no ``train``) are the reference every other split must match.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"ImageFolder root {root} does not exist or is not a folder. Point the data root at a "
            "folder laid out as <root>/<split>/<class>/<image>."
        )
    problems = _Problems()
    reference = "train" if "train" in splits else splits[0]
    class_dirs: dict[str, list[Path]] = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            problems.add(f"{split_dir}: split folder '{split}' is missing")
            continue
        if escape := _escapes(split_dir, root):
            problems.add(f"{split_dir}: {escape}")
            continue
        entries = _visible_entries(split_dir)
        class_dirs[split] = []
        for entry in entries:
            if not entry.is_dir():
                problems.add(f"{entry}: file directly in the split folder; move it into <split>/<class>/")
            elif escape := _escapes(entry, root):
                problems.add(f"{entry}: {escape}")
            else:
                class_dirs[split].append(entry)
        if not class_dirs[split]:
            problems.add(f"{split_dir}: split '{split}' has no class folders")

    if classes is not None:
        class_dirs = _select_classes(root, class_dirs, classes, problems)
        classes = sorted(classes)
    else:
        classes = sorted(p.name for p in class_dirs.get(reference, []))
        for split, dirs in class_dirs.items():
            names = {p.name for p in dirs}
            if split != reference and reference in class_dirs:
                for missing in sorted(set(classes) - names):
                    problems.add(f"{root / split / missing}: class folder missing ('{reference}' has it)")
                for extra in sorted(names - set(classes)):
                    problems.add(f"{root / split / extra}: class folder '{extra}' is not in '{reference}'")

    samples: dict[str, list[tuple[str, int]]] = {}
    for split, dirs in class_dirs.items():
        samples[split] = []
        for class_dir in dirs:
            files = _visible_entries(class_dir)
            if not files:
                problems.add(f"{class_dir}: class folder has no images")
            for path in files:
                if path.is_dir():
                    problems.add(
                        f"{path}: nested folder inside a class folder; images must sit directly in it"
                    )
                    continue
                if escape := _escapes(path, root):
                    problems.add(f"{path}: {escape}")
                    continue
                _, reason = _probe_image(path)
                if reason:
                    problems.add(f"{path}: {reason}")
                elif class_dir.name in classes:
                    samples[split].append((str(path.relative_to(root)), classes.index(class_dir.name)))
    problems.raise_if_any(f"ImageFolder {root}", IMAGEFOLDER_ADVICE)
    return ImageFolderIndex(root=root, classes=classes, samples=samples)


def _select_classes(
    root: Path, class_dirs: dict[str, list[Path]], classes: Sequence[str], problems: _Problems
) -> dict[str, list[Path]]:
    """Each split's folders named in ``classes``; a named one a split lacks is a problem."""
    selected: dict[str, list[Path]] = {}
    left_out: set[str] = set()
    for split, dirs in class_dirs.items():
        by_name = {d.name: d for d in dirs}
        for name in classes:
            if name not in by_name:
                there = ", ".join(sorted(by_name)) or "none"
                problems.add(
                    f"{root / split / name}: class folder named in data.classes is missing (the class "
                    f"folders there: {there}); set data.classes to null to use every class folder"
                )
        selected[split] = [by_name[name] for name in sorted(set(classes) & set(by_name))]
        left_out |= set(by_name) - set(classes)
    if left_out and not problems.items:
        warn(
            f"ImageFolder {root}: class folder(s) {', '.join(sorted(left_out))} left out: not in data.classes"
        )
    return selected


def ingest_imagefolder(
    root: Path, out_dir: Path, splits: Sequence[str], image_size: int, classes: Sequence[str] | None = None
) -> ImageFolderIndex:
    """Validate an ImageFolder and write it to ``out_dir`` as RGB PNGs of ``image_size`` x ``image_size``
    (aspect ratio kept: ``to_square``), the class folders ``classes`` only (None: every one).

    Files are renamed ``<out_dir>/<split>/<class>/<index:06d>.png`` (index in
    sorted source order), the generator's layout, which also avoids clashes
    between e.g. ``a.jpg`` and ``a.png``. Returns the index of the written copy.
    """
    index = validate_imagefolder(root, splits, classes)
    written: dict[str, list[tuple[str, int]]] = {}
    conversions = _Conversions()
    with atomic_dir(out_dir) as tmp:
        for split, items in index.samples.items():
            written[split] = []
            counters = dict.fromkeys(range(len(index.classes)), 0)
            for rel_path, label in items:
                class_dir = tmp / split / index.classes[label]
                class_dir.mkdir(parents=True, exist_ok=True)
                rel_out = f"{split}/{index.classes[label]}/{counters[label]:06d}.png"
                counters[label] += 1
                rgb = conversions.rgb(index.root / rel_path)
                _save_png(to_square(rgb, image_size), tmp / rel_out)
                written[split].append((rel_out, label))
    conversions.report(f"ImageFolder {root}")
    return ImageFolderIndex(root=Path(out_dir), classes=index.classes, samples=written)


def validate_image_dir(images_dir: Path) -> list[Path]:
    """Check a flat folder of images (an unlabeled pool); return its image paths, sorted."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(
            f"Image folder {images_dir} does not exist or is not a folder. Point the path at one."
        )
    problems = _Problems()
    paths = []
    for path in _visible_entries(images_dir):
        if path.is_dir():
            problems.add(f"{path}: sub-folder; put every image directly in {images_dir}")
            continue
        if escape := _escapes(path, images_dir):
            problems.add(f"{path}: {escape}")
            continue
        _, reason = _probe_image(path)
        if reason:
            problems.add(f"{path}: {reason}")
        else:
            paths.append(path)
    if not paths and not problems.items:
        problems.add(f"{images_dir}: no images")
    problems.raise_if_any(
        f"Image folder {images_dir}", "It must hold decodable images only. Fix or remove these entries."
    )
    return paths


def ingest_image_dir(images_dir: Path, out_dir: Path, image_size: int) -> int:
    """Validate a flat image folder; write it as ``out_dir/images/<index:06d>.png``, RGB and square
    (aspect ratio kept: ``to_square``).

    Returns the number of images written.
    """
    paths = validate_image_dir(images_dir)
    conversions = _Conversions()
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for i, path in enumerate(paths):
            _save_png(to_square(conversions.rgb(path), image_size), tmp / "images" / f"{i:06d}.png")
    conversions.report(f"Image folder {images_dir}")
    return len(paths)


# --------------------------------------------------------------------------- COCO

COCO_ADVICE = (
    "Fix these entries in the annotation file (or the image files), then run again. "
    "See https://cocodataset.org/#format-data for the format."
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _describe_ids(ids: Sequence[int]) -> str:
    ordered = sorted(ids)
    if ordered and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"[{ordered[0]}..{ordered[-1]}]"
    shown = ", ".join(map(str, ordered[:10]))
    return f"[{shown}{', ...' if len(ordered) > 10 else ''}]"


def _load_coco_json(annotation_file: Path) -> dict:
    """Parse the file and check its top-level structure; anything wrong here is fatal at once."""
    kind = non_regular_kind(annotation_file)
    if kind == "missing":
        raise DataError(f"COCO annotation file {annotation_file} does not exist. Check the annotations path.")
    if kind is not None:
        raise DataError(
            f"COCO annotation file {annotation_file} is {kind}, not a file. Check the annotations path."
        )
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{annotation_file} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            "Fix the syntax there and run again."
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{annotation_file} is not UTF-8 text ({exc}). Save it as UTF-8 JSON.") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"{annotation_file}: the top level must be a JSON object with 'images', 'annotations' and "
            f"'categories', got a {type(data).__name__}."
        )
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise DataError(
            f"{annotation_file}: missing top-level key(s) {missing}; a COCO file needs all three."
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DataError(f"{annotation_file}: '{key}' must be a list, got a {type(data[key]).__name__}.")
    return data


def _check_categories(categories: list, problems: _Problems) -> set[int]:
    seen: dict[int, int] = {}
    if not categories:
        problems.add("categories: empty; at least one category is needed")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            problems.add(f"categories[{i}]: needs an integer 'id' and a string 'name', got {cat!r:.80}")
            continue
        if not 0 <= cat["id"] <= MAX_CATEGORY_ID:
            problems.add(
                f"categories[{i}] (id {cat['id']}): ids must be in [0, {MAX_CATEGORY_ID}]: they are class "
                f"indices, and the class head gets max id + 1 outputs; renumber the categories from 0 or 1"
            )
            continue
        if cat["id"] in seen:
            problems.add(
                f"categories[{i}] (id {cat['id']}): duplicate id (also categories[{seen[cat['id']]}])"
            )
        else:
            seen[cat["id"]] = i
    return set(seen)


def _check_images(images: list, image_root: Path, problems: _Problems) -> dict[int, tuple[int, int]]:
    """Check every image entry and its file; return ``{id: (width, height)}`` of the usable ones."""
    root = image_root.resolve()
    seen: dict[int, int] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.add(f"images[{i}]: needs an integer 'id', got {img!r:.80}")
            continue
        where = f"images[{i}] (id {img['id']})"
        if img["id"] in seen:
            problems.add(f"{where}: duplicate id (also images[{seen[img['id']]}])")
            continue
        seen[img["id"]] = i
        width, height, name = img.get("width"), img.get("height"), img.get("file_name")
        if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            problems.add(f"{where}: width and height must be positive integers, got {width!r}, {height!r}")
            continue
        if not isinstance(name, str) or not name:
            problems.add(f"{where}: 'file_name' must be a non-empty string, got {name!r}")
            continue
        if Path(name).is_absolute():
            problems.add(
                f"{where}: file_name '{name}' is absolute; make it relative to the image root {root}"
            )
            continue
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            problems.add(f"{where}: file_name '{name}' resolves to {path}, outside the image root {root}")
            continue
        kind = non_regular_kind(path)
        if kind == "missing":
            problems.add(f"{where}: image file {path} does not exist")
            continue
        if kind is not None:
            problems.add(f"{where}: {path} is {kind}, not an image file")
            continue
        actual, reason = _probe_image(path)
        if reason:
            problems.add(f"{where}: {path}: {reason}")
        elif actual != (width, height):
            problems.add(
                f"{where}: {path} is {actual[0]}x{actual[1]} but the json says width {width}, height {height}"
            )
        else:
            sizes[img["id"]] = (width, height)
    return sizes


def _check_annotations(
    annotations: list,
    image_ids: set[int],
    sizes: dict[int, tuple[int, int]],
    category_ids: set[int],
    problems: _Problems,
) -> None:
    seen: dict[int, int] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            problems.add(f"annotations[{i}]: needs an integer 'id', got {ann!r:.80}")
            continue
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["id"] in seen:
            problems.add(f"{where}: duplicate id (also annotations[{seen[ann['id']]}])")
        else:
            seen[ann["id"]] = i
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if ann.get("iscrowd", 0) not in (0, 1):
            problems.add(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if not _is_int(image_id) or image_id not in image_ids:
            problems.add(f"{where}: image_id {image_id!r} is not the id of any image")
        if not _is_int(category_id):
            problems.add(f"{where}: category_id must be an integer, got {category_id!r:.40}")
        elif category_id not in category_ids:
            problems.add(
                f"{where}: category_id {category_id!r} is not in categories {_describe_ids(category_ids)}"
            )
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problems.add(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r:.80}")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            problems.add(f"{where}: bbox {bbox} has non-positive width or height")
            continue
        if image_id in sizes:
            width, height = sizes[image_id]
            tol = BOX_TOLERANCE
            outside = x < -tol or y < -tol or x + w > width + tol or y + h > height + tol
            if outside or min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
                problems.add(
                    f"{where}: bbox {bbox} lies outside its image ({width}x{height}, image_id {image_id})"
                )


def validate_coco(annotation_file: Path, image_root: Path) -> dict:
    """Check a COCO detection file and the images it names; return the parsed json.

    All entry-level problems are collected and raised as one DataError.
    """
    annotation_file, image_root = Path(annotation_file), Path(image_root)
    data = _load_coco_json(annotation_file)
    if not image_root.is_dir():
        raise DataError(f"Image root {image_root} for {annotation_file} does not exist or is not a folder.")
    problems = _Problems()
    category_ids = _check_categories(data["categories"], problems)
    sizes = _check_images(data["images"], image_root, problems)
    image_ids = {img["id"] for img in data["images"] if isinstance(img, dict) and _is_int(img.get("id"))}
    _check_annotations(data["annotations"], image_ids, sizes, category_ids, problems)
    problems.raise_if_any(f"COCO file {annotation_file} (images under {image_root})", COCO_ADVICE)
    return data


def ingest_coco(annotation_file: Path, image_root: Path, out_dir: Path, max_size: int | None = None) -> dict:
    """Validate a COCO dataset and write ``out_dir/images/<index:06d>.png`` + ``out_dir/annotations.json``.

    Image, annotation and category ids and names are kept; boxes are clipped to
    their image. With ``max_size``, images whose longer side exceeds it are
    scaled down to it, boxes and areas with them. Segmentations are dropped
    (nothing downstream uses them). Returns the written json.
    """
    annotation_file, image_root = Path(annotation_file), Path(image_root)
    data = validate_coco(annotation_file, image_root)
    scales: dict[int, tuple[float, float, int, int]] = {}  # id -> (sx, sy, new width, new height)
    images_out = []
    conversions = _Conversions()
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for position, img in enumerate(data["images"]):
            width, height = img["width"], img["height"]
            scale = min(1.0, max_size / max(width, height)) if max_size else 1.0
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            file_name = f"{position:06d}.png"
            image = conversions.rgb(image_root / img["file_name"])
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            _save_png(image, tmp / "images" / file_name)
            scales[img["id"]] = (new_w / width, new_h / height, width, height)
            images_out.append({"id": img["id"], "file_name": file_name, "width": new_w, "height": new_h})
        annotations_out = []
        for ann in data["annotations"]:
            sx, sy, width, height = scales[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(width), x + w), min(float(height), y + h)
            box = [x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy]
            area = ann["area"] * sx * sy if _is_number(ann.get("area")) else box[2] * box[3]
            annotations_out.append(
                {
                    "id": ann["id"],
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "bbox": box,
                    "area": area,
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
        categories = [
            {key: cat[key] for key in ("id", "name", "supercategory") if key in cat}
            for cat in data["categories"]
        ]
        out = {"images": images_out, "annotations": annotations_out, "categories": categories}
        (tmp / "annotations.json").write_text(json.dumps(out))
    conversions.report(f"COCO images of {annotation_file}")
    return out


def check_coco_splits(splits: dict[str, dict], reference: str = "train") -> None:
    """The categories of every other split against ``reference``'s (validated COCO dicts by split).

    The model's class head is built from the train split's categories and learns only those it
    sees annotated; a val or test category it does not know, a name that differs for one id, or
    annotations of a category train never annotates would score classes the model never learned.
    All such problems are raised as one ``DataError``.
    """
    ref = splits[reference]
    ref_names = {c["id"]: c["name"] for c in ref["categories"]}
    ref_used = {a["category_id"] for a in ref["annotations"]}
    problems = _Problems()
    for split, data in splits.items():
        if split == reference:
            continue
        for i, cat in enumerate(data["categories"]):
            if cat["id"] not in ref_names:
                problems.add(
                    f"{split} categories[{i}] (id {cat['id']}, {cat['name']!r}): not a category of the "
                    f"{reference} split (its ids: {_describe_ids(ref_names)})"
                )
            elif cat["name"] != ref_names[cat["id"]]:
                problems.add(
                    f"{split} categories[{i}] (id {cat['id']}): named {cat['name']!r}, but "
                    f"{ref_names[cat['id']]!r} in the {reference} split"
                )
        used = Counter(a["category_id"] for a in data["annotations"])
        for category_id in sorted(set(used) - ref_used):
            if category_id in ref_names:
                problems.add(
                    f"{split}: {used[category_id]} annotation(s) of category {category_id} "
                    f"({ref_names[category_id]!r}), which no {reference} annotation has"
                )
    problems.raise_if_any(
        f"The COCO splits' categories ({', '.join(splits)})",
        f"The model learns the categories of the {reference} split; val and test may only use those, "
        f"under the same names, and only ones {reference} annotates. Remove the other categories and "
        f"their annotations from val/test, or add {reference} examples of them.",
    )
