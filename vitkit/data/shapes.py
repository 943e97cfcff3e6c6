"""The built-in synthetic *shapes* dataset: classification, detection and an unlabeled pool.

Every image is drawn from its own ``numpy.random.Generator`` seeded with
``(seed, task, split, [class,] index)``, so an image depends on nothing but its
own coordinates: generation order, worker count and the other images never
change it, and two runs with one seed write byte-identical files.

An image is a *scene*: a smooth colour gradient, low-contrast blobs and stripes,
distractors that belong to no class (line segments, dots, arcs), then the
shape(s) on top, all drawn at ``SUPERSAMPLE`` x the output size and box-filtered
down (anti-aliasing), then per-pixel Gaussian noise. Shapes vary in size,
position, rotation, aspect, colour and style (filled or outlined); their colour
keeps a minimum distance to the local background, usually a comfortable one and
sometimes a low one, so the task stays learnable but not trivial.

Detection boxes are the tight box of the pixels each shape *actually covers*
after later shapes have been drawn over it, measured on the supersampled mask.
Shapes are drawn largest first and a placement that hides too much of an
earlier shape is rejected, so every annotated shape stays mostly visible.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitkit.progress import progress_bar

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

SUPERSAMPLE = 4
# Task codes keep the three datasets on separate random streams.
_CLASSIFICATION, _DETECTION, _UNLABELED = 0, 1, 2
# Classification sizes, as a fraction of the image side (circumscribed diameter). The
# hardest pair is hexagon vs circle: a hexagon's corners stick out of its inscribed
# circle by only 13% of the radius, about 1.1 px for the smallest shape at 32x32.
CLASS_MIN_SIZE, CLASS_MAX_SIZE = 0.55, 0.95
MAX_BOX_IOU = 0.3  # detection: max IoU of a new shape's box with any placed one
MIN_VISIBLE = 0.7  # detection: min fraction of a shape left visible by later ones


# --------------------------------------------------------------------------- geometry


def _regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_outline(name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices of shape ``name`` inside the unit circle, centred on 0, before rotation."""
    if name == "circle":
        return _regular_polygon(48)
    if name == "square":
        return _regular_polygon(4, math.pi / 4)
    if name == "triangle":
        return _regular_polygon(3, -math.pi / 2) + rng.uniform(-0.08, 0.08, size=(3, 2))
    if name == "hexagon":
        return _regular_polygon(6)
    if name == "star":
        outer = _regular_polygon(5, -math.pi / 2)
        inner = rng.uniform(0.4, 0.55) * _regular_polygon(5, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if name == "cross":
        w = rng.uniform(0.28, 0.4)  # half-width of an arm
        quarter = np.array([[w, w], [w, 1.0], [-w, 1.0], [-w, w]])
        rot = np.array([[0.0, -1.0], [1.0, 0.0]])  # 90 degrees
        parts = [quarter @ np.linalg.matrix_power(rot, k).T for k in range(4)]
        return np.concatenate([p[:3] for p in parts])  # 12 vertices
    raise ValueError(f"unknown shape class {name!r}; known: {', '.join(SHAPE_CLASSES)}")


def _shape_vertices(name: str, diameter: float, rng: np.random.Generator) -> np.ndarray:
    """A randomly rotated and slightly stretched outline of the given diameter, centred on 0."""
    pts = _unit_outline(name, rng)
    stretch = rng.uniform(0.93, 1.07)
    pts = pts * np.array([stretch, 1.0 / stretch])
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    pts = pts @ np.array([[c, -s], [s, c]]).T
    return pts * (diameter / 2)


def _place(vertices: np.ndarray, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """Translate centred vertices to a uniformly random position fully inside the canvas.

    A shape stretched beyond the canvas is first shrunk to fit it.
    """
    vertices = vertices * min(1.0, (canvas - 1) / np.ptp(vertices, axis=0).max())
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    # the bounds are equal (up to rounding) when the shape fills the canvas
    offset = rng.uniform(-lo, np.maximum(canvas - 1 - hi, -lo))
    return vertices + offset


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class DrawOp:
    """One ``PIL.ImageDraw`` call (``method`` with keyword ``args``), so a scene can be redrawn."""

    method: str
    args: dict


@dataclass(frozen=True)
class ShapeObject:
    """A shape as drawn: supersampled-canvas vertices, colour and style (outline width 0 = filled)."""

    class_index: int
    vertices: np.ndarray
    color: tuple[int, int, int]
    outline_width: int


@dataclass
class Scene:
    """Everything needed to redraw one image exactly; see :func:`render_scene`."""

    image_size: int
    background: np.ndarray  # small (g, g, 3) uint8 grid, bilinearly stretched over the canvas
    ops: list[DrawOp]  # texture and distractors, drawn under the shapes
    objects: list[ShapeObject] = field(default_factory=list)
    noise: np.ndarray | None = None  # (S, S, 3) float32, added after downsampling


def _image_rng(seed: int, task: int, split: str, *index: int) -> np.random.Generator:
    # crc32 is stable across processes and Python versions, unlike hash().
    return np.random.default_rng([seed, task, zlib.crc32(split.encode()), *index])


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _shift_color(base: np.ndarray, delta: float, rng: np.random.Generator) -> tuple[int, int, int]:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    return tuple(int(v) for v in np.clip(base + delta * direction, 0, 255))


def _sample_base(image_size: int, n_distractors: int, rng: np.random.Generator) -> Scene:
    """Background gradient, low-contrast texture and class-free distractors."""
    canvas = image_size * SUPERSAMPLE
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 5)),) * 2 + (3,), dtype=np.uint8)
    # The gradient at output resolution, to give each blob a colour close to what lies under it.
    gradient = np.asarray(Image.fromarray(grid).resize((image_size,) * 2, Image.Resampling.BILINEAR), float)
    ops: list[DrawOp] = []
    for _ in range(int(rng.integers(1, 4))):  # low-contrast blobs and stripes
        if rng.random() < 0.5:
            center, radii = rng.uniform(0, canvas, 2), rng.uniform(0.05, 0.35, 2) * canvas
            xy, method, extra = [*(center - radii), *(center + radii)], "ellipse", {}
        else:
            xy = rng.uniform(-0.2, 1.2, 4) * canvas
            center = np.clip((xy[:2] + xy[2:]) / 2, 0, canvas - 1)
            xy, method, extra = xy.tolist(), "line", {"width": int(rng.uniform(0.04, 0.15) * canvas)}
        under = gradient[int(center[1]) // SUPERSAMPLE, int(center[0]) // SUPERSAMPLE]
        ops.append(DrawOp(method, {"xy": xy, "fill": _shift_color(under, rng.uniform(5, 18), rng), **extra}))
    for _ in range(n_distractors):
        fill = _random_color(rng)
        kind = rng.integers(3)
        if kind == 0:  # line segment, 0.5 to 1.5 output px wide
            start = rng.uniform(0, canvas, 2)
            end = start + rng.uniform(-0.5, 0.5, 2) * canvas
            width = int(rng.uniform(0.5, 1.5) * SUPERSAMPLE)
            ops.append(DrawOp("line", {"xy": [*start, *end], "fill": fill, "width": width}))
        elif kind == 1:  # dot, 1 to 3 output px across
            center, r = rng.uniform(0, canvas, 2), rng.uniform(0.5, 1.5) * SUPERSAMPLE
            ops.append(DrawOp("ellipse", {"xy": [*(center - r), *(center + r)], "fill": fill}))
        else:  # open arc, never a closed circle
            center, r = rng.uniform(0, canvas, 2), rng.uniform(0.1, 0.45) * canvas
            start = rng.uniform(0, 360)
            args = {
                "xy": [*(center - r), *(center + r)],
                "start": start,
                "end": start + rng.uniform(40, 200),
                "fill": fill,
                "width": int(rng.uniform(0.75, 1.5) * SUPERSAMPLE),
            }
            ops.append(DrawOp("arc", args))
    return Scene(image_size=image_size, background=grid, ops=ops)


def _draw_base(scene: Scene) -> Image.Image:
    canvas = scene.image_size * SUPERSAMPLE
    image = Image.fromarray(scene.background).resize((canvas, canvas), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for op in scene.ops:
        getattr(draw, op.method)(**op.args)
    return image


def _object_mask(obj: ShapeObject, canvas: int) -> Image.Image:
    mask = Image.new("L", (canvas, canvas), 0)
    xy = [tuple(p) for p in obj.vertices.tolist()]
    if obj.outline_width:
        ImageDraw.Draw(mask).polygon(xy, outline=255, width=obj.outline_width)
    else:
        ImageDraw.Draw(mask).polygon(xy, fill=255)
    return mask


def _pick_color(canvas: Image.Image, vertices: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour far enough (in RGB) from the local background: usually clearly, sometimes barely."""
    x0, y0 = np.floor(vertices.min(axis=0)).astype(int)
    x1, y1 = np.ceil(vertices.max(axis=0)).astype(int) + 1
    local = np.asarray(canvas.crop((x0, y0, x1, y1)), dtype=np.float32).reshape(-1, 3).mean(axis=0)
    min_distance = 40.0 if rng.random() < 0.15 else 70.0
    best, best_distance = None, -1.0
    for _ in range(32):
        color = _random_color(rng)
        distance = float(np.linalg.norm(np.asarray(color) - local))
        if distance >= min_distance:
            return color
        if distance > best_distance:
            best, best_distance = color, distance
    return best


def _sample_style(diameter_px: float, rng: np.random.Generator) -> int:
    """Outline width on the supersampled canvas (0 = filled); outlines stay >= 1.5 output px."""
    if rng.random() >= 0.25:
        return 0
    return round(SUPERSAMPLE * max(1.5, 0.1 * diameter_px))


def _finish(canvas: Image.Image, scene: Scene) -> Image.Image:
    """Box-filter the supersampled canvas down to the output size and add the per-pixel noise."""
    small = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(small + scene.noise), 0, 255).astype(np.uint8))


def _sample_noise(image_size: int, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(2.0, 10.0)
    return rng.normal(0.0, sigma, size=(image_size, image_size, 3)).astype(np.float32)


def render_scene(scene: Scene, omit: Iterable[int] = ()) -> Image.Image:
    """Redraw a scene, leaving out the objects whose positions are in ``omit``.

    Generation draws scenes incrementally; this replays them. Tests use it to
    check that each box is exactly where the pixels changed by its shape are.
    """
    omitted = set(omit)
    canvas = _draw_base(scene)
    size = canvas.size[0]
    for k, obj in enumerate(scene.objects):
        if k not in omitted:
            canvas.paste(obj.color, mask=_object_mask(obj, size))
    return _finish(canvas, scene)


def sample_classification_scene(
    class_index: int, classes: Sequence[str], image_size: int, rng: np.random.Generator
) -> tuple[Scene, Image.Image]:
    """One shape of class ``classes[class_index]``, anywhere in the image, over a busy background."""
    scene = _sample_base(image_size, int(rng.integers(0, 4)), rng)
    canvas = _draw_base(scene)
    diameter = rng.uniform(CLASS_MIN_SIZE, CLASS_MAX_SIZE) * image_size
    vertices = _place(_shape_vertices(classes[class_index], diameter * SUPERSAMPLE, rng), canvas.size[0], rng)
    obj = ShapeObject(class_index, vertices, _pick_color(canvas, vertices, rng), _sample_style(diameter, rng))
    canvas.paste(obj.color, mask=_object_mask(obj, canvas.size[0]))
    scene.objects.append(obj)
    scene.noise = _sample_noise(image_size, rng)
    return scene, _finish(canvas, scene)


@dataclass(frozen=True)
class DetectionSpec:
    """Image size, object count range and object size range (circumscribed diameter, px)."""

    image_size: int
    min_objects: int
    max_objects: int
    min_object_size: int
    max_object_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 4 <= self.min_object_size <= self.max_object_size <= self.image_size:
            raise ValueError(
                "need 4 <= min_object_size <= max_object_size <= image_size, got "
                f"{self.min_object_size}, {self.max_object_size}, {self.image_size}"
            )


def _mask_bbox(mask: np.ndarray) -> np.ndarray:
    """Tight [x0, y0, x1, y1] of a boolean mask, in output pixels (edges, not centres)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64) / SUPERSAMPLE


def sample_detection_scene(
    classes: Sequence[str], spec: DetectionSpec, rng: np.random.Generator
) -> tuple[Scene, Image.Image, list[np.ndarray]]:
    """Several shapes, small and large, with limited overlap.

    Returns the scene, the image and one tight XYXY box (output pixels) per
    object, in the order of ``scene.objects``.
    """
    area_scale = (spec.image_size / 64) ** 2
    n_distractors = int(rng.integers(2, 4 + round(4 * area_scale)))
    scene = _sample_base(spec.image_size, n_distractors, rng)
    canvas = _draw_base(scene)
    side = canvas.size[0]
    n_objects = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    log_lo, log_hi = math.log(spec.min_object_size), math.log(spec.max_object_size)
    # Largest first, so a later (smaller) shape can only ever cover part of an earlier one.
    diameters = sorted(np.exp(rng.uniform(log_lo, log_hi, n_objects)), reverse=True)
    visible: list[np.ndarray] = []  # per placed object: boolean mask of its still-visible pixels
    boxes: list[np.ndarray] = []  # per placed object: box of its full outline (for the IoU test)
    for diameter in diameters:
        class_index = int(rng.integers(len(classes)))
        placed = _place_object(class_index, classes, diameter, side, visible, boxes, rng)
        if placed is None:
            continue  # no room left for this one; the image gets one object fewer
        vertices, mask = placed  # mask: the filled shape
        obj = ShapeObject(
            class_index, vertices, _pick_color(canvas, vertices, rng), _sample_style(diameter, rng)
        )
        if obj.outline_width:  # only the outline is drawn, so only the outline is visible or occludes
            mask = np.asarray(_object_mask(obj, side)) > 0
        canvas.paste(obj.color, mask=Image.fromarray(mask))
        visible = [v & ~mask for v in visible] + [mask]
        boxes.append(np.concatenate([vertices.min(axis=0), vertices.max(axis=0)]))
        scene.objects.append(obj)
    scene.noise = _sample_noise(spec.image_size, rng)
    return scene, _finish(canvas, scene), [_mask_bbox(v) for v in visible]


def _place_object(
    class_index: int,
    classes: Sequence[str],
    diameter: float,
    side: int,
    visible: list[np.ndarray],
    boxes: list[np.ndarray],
    rng: np.random.Generator,
    tries: int = 40,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Vertices and filled mask of a placement that overlaps no placed shape too much, or None."""
    for _ in range(tries):
        vertices = _place(_shape_vertices(classes[class_index], diameter * SUPERSAMPLE, rng), side, rng)
        box = np.concatenate([vertices.min(axis=0), vertices.max(axis=0)])
        if any(_box_iou(box, other) > MAX_BOX_IOU for other in boxes):
            continue
        mask = np.asarray(_object_mask(ShapeObject(class_index, vertices, (0, 0, 0), 0), side)) > 0
        if all((v & ~mask).sum() >= MIN_VISIBLE * v.sum() for v in visible):
            return vertices, mask
    return None


# --------------------------------------------------------------------------- one image by its coordinates


def classification_image(
    seed: int, split: str, class_index: int, index: int, classes: Sequence[str], image_size: int
) -> tuple[Scene, Image.Image]:
    """Image ``index`` of class ``classes[class_index]`` in ``split``.

    Its stream is keyed by the class *name*, so a class keeps its images
    whichever subset of classes is chosen.
    """
    code = SHAPE_CLASSES.index(classes[class_index])
    rng = _image_rng(seed, _CLASSIFICATION, split, code, index)
    return sample_classification_scene(class_index, classes, image_size, rng)


def unlabeled_image(
    seed: int, index: int, classes: Sequence[str], image_size: int
) -> tuple[Scene, Image.Image]:
    """Unlabeled image ``index``: a classification-style image of a random class, on its own stream."""
    rng = _image_rng(seed, _UNLABELED, "unlabeled", index)
    return sample_classification_scene(int(rng.integers(len(classes))), classes, image_size, rng)


def detection_image(
    seed: int, split: str, index: int, classes: Sequence[str], spec: DetectionSpec
) -> tuple[Scene, Image.Image, list[np.ndarray]]:
    """Detection image ``index`` of ``split``, with one tight XYXY box per object of the scene."""
    return sample_detection_scene(classes, spec, _image_rng(seed, _DETECTION, split, index))


# --------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class _ClassificationJob:
    out_dir: Path
    classes: tuple[str, ...]
    image_size: int
    seed: int

    def __call__(self, item: tuple[str, int, int]) -> None:
        split, class_index, index = item
        _, image = classification_image(self.seed, split, class_index, index, self.classes, self.image_size)
        image.save(self.out_dir / split / self.classes[class_index] / f"{index:06d}.png")


@dataclass(frozen=True)
class _UnlabeledJob:
    out_dir: Path
    classes: tuple[str, ...]
    image_size: int
    seed: int

    def __call__(self, index: int) -> None:
        _, image = unlabeled_image(self.seed, index, self.classes, self.image_size)
        image.save(self.out_dir / "images" / f"{index:06d}.png")


@dataclass(frozen=True)
class _DetectionJob:
    out_dir: Path
    classes: tuple[str, ...]
    spec: DetectionSpec
    seed: int

    def __call__(self, item: tuple[str, int]) -> list[tuple[int, list[float]]]:
        split, index = item
        scene, image, boxes = detection_image(self.seed, split, index, self.classes, self.spec)
        image.save(self.out_dir / split / "images" / f"{index:06d}.png")
        return [(obj.class_index, box.tolist()) for obj, box in zip(scene.objects, boxes, strict=True)]


def _run(job: Callable, items: list, workers: int, progress: bool, desc: str) -> list:
    """Map ``job`` over ``items`` in order, in-process or on a spawn pool (safe after torch import)."""
    bar = progress_bar(len(items), desc, progress, unit="img")
    results = []
    if workers <= 1:
        for item in items:
            results.append(job(item))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            chunk = max(1, min(64, len(items) // (4 * workers)))
            for result in pool.imap(job, items, chunksize=chunk):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {list(classes)}")
    return tuple(classes)


def generate_classification(
    out_dir: Path,
    classes: Sequence[str],
    counts: Mapping[str, int],
    image_size: int,
    seed: int,
    workers: int,
    progress: bool,
) -> None:
    """Write ``out_dir/<split>/<class>/<index:06d>.png``, ``counts[split]`` RGB images per class.

    Files are written in place; callers wanting atomicity write into a
    temporary directory and rename it.
    """
    classes = _check_classes(classes)
    items = []
    for split, per_class in counts.items():
        for class_index, name in enumerate(classes):
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
            items += [(split, class_index, i) for i in range(per_class)]
    _run(
        _ClassificationJob(Path(out_dir), classes, image_size, seed),
        items,
        workers,
        progress,
        "classification",
    )


def generate_detection(
    out_dir: Path,
    classes: Sequence[str],
    counts: Mapping[str, int],
    image_size: int,
    min_objects: int,
    max_objects: int,
    min_object_size: int,
    max_object_size: int,
    seed: int,
    workers: int,
    progress: bool,
) -> None:
    """Write ``out_dir/<split>/images/<index:06d>.png`` and ``out_dir/<split>/annotations.json`` (COCO).

    ``counts[split]`` is the number of images. Image ids are ``index + 1``,
    category ids ``position in classes + 1``; boxes are ``[x, y, w, h]`` pixels.
    """
    classes = _check_classes(classes)
    spec = DetectionSpec(image_size, min_objects, max_objects, min_object_size, max_object_size)
    job = _DetectionJob(Path(out_dir), classes, spec, seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    items = []
    for split, n_images in counts.items():
        (out_dir / split / "images").mkdir(parents=True, exist_ok=True)
        items += [(split, i) for i in range(n_images)]
    results = iter(_run(job, items, workers, progress, "detection"))
    for split, n_images in counts.items():
        images, annotations = [], []
        for index in range(n_images):
            objects = next(results)
            images.append(
                {"id": index + 1, "file_name": f"{index:06d}.png", "width": image_size, "height": image_size}
            )
            for class_index, (x0, y0, x1, y1) in objects:
                w, h = x1 - x0, y1 - y0
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": class_index + 1,
                        "bbox": [x0, y0, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (out_dir / split / "annotations.json").write_text(json.dumps(coco))


def generate_unlabeled(
    out_dir: Path,
    classes: Sequence[str],
    count: int,
    image_size: int,
    seed: int,
    workers: int,
    progress: bool,
) -> None:
    """Write ``count`` classification-style images, with no labels, to ``out_dir/images/<index:06d>.png``.

    They come from their own random stream, so none repeats a classification image.
    """
    classes = _check_classes(classes)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    _run(
        _UnlabeledJob(Path(out_dir), classes, image_size, seed),
        list(range(count)),
        workers,
        progress,
        "unlabeled",
    )
