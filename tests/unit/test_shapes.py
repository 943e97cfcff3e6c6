"""The synthetic shapes generator: determinism, layouts, and boxes that sit exactly on the drawn shapes."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data import shapes
from vitkit.data.shapes import SHAPE_CLASSES, DetectionSpec

CLS_COUNTS = {"train": 5, "test": 2}
DET_COUNTS = {"train": 8, "val": 2}
SPEC = DetectionSpec(image_size=96, min_objects=2, max_objects=5, min_object_size=8, max_object_size=60)


def _generate(root: Path, seed: int, workers: int) -> None:
    shapes.generate_classification(root / "cls", SHAPE_CLASSES, CLS_COUNTS, 32, seed, workers, progress=False)
    shapes.generate_detection(
        root / "det",
        SHAPE_CLASSES,
        DET_COUNTS,
        SPEC.image_size,
        SPEC.min_objects,
        SPEC.max_objects,
        SPEC.min_object_size,
        SPEC.max_object_size,
        seed,
        workers,
        progress=False,
    )
    shapes.generate_unlabeled(root / "unl", SHAPE_CLASSES, 6, 32, seed, workers, progress=False)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    _generate(root, seed=0, workers=1)
    return root


def _coco(generated: Path, split: str = "train") -> dict:
    return json.loads((generated / "det" / split / "annotations.json").read_text())


def test_same_seed_is_byte_identical_whatever_the_worker_count(generated, tmp_path):
    _generate(tmp_path, seed=0, workers=2)
    expected = _digests(generated)
    assert len(expected) == 6 * 7 + 10 + 2 + 6  # class images, detection images, 2 json files, unlabeled
    assert _digests(tmp_path) == expected


def test_different_seeds_give_different_images(generated, tmp_path):
    shapes.generate_classification(
        tmp_path / "cls", SHAPE_CLASSES, CLS_COUNTS, 32, seed=1, workers=1, progress=False
    )
    other, base = _digests(tmp_path / "cls"), _digests(generated / "cls")
    assert other.keys() == base.keys()
    assert all(other[k] != base[k] for k in base)


def test_classification_layout_balance_size_and_variety(generated):
    for split, per_class in CLS_COUNTS.items():
        assert sorted(p.name for p in (generated / "cls" / split).iterdir()) == sorted(SHAPE_CLASSES)
        for name in SHAPE_CLASSES:
            files = sorted((generated / "cls" / split / name).glob("*.png"))
            assert [f.name for f in files] == [f"{i:06d}.png" for i in range(per_class)]
            arrays = []
            for f in files:
                with Image.open(f) as image:
                    assert image.mode == "RGB" and image.size == (32, 32)
                    arrays.append(np.asarray(image))
            assert len({a.tobytes() for a in arrays}) == per_class  # no two images of a class alike


def test_a_class_keeps_its_images_when_a_subset_of_classes_is_chosen(generated, tmp_path):
    shapes.generate_classification(
        tmp_path, ["star", "circle"], {"train": 2}, 32, seed=0, workers=1, progress=False
    )
    for name in ("star", "circle"):
        for i in range(2):
            rel = Path("train") / name / f"{i:06d}.png"
            assert (tmp_path / rel).read_bytes() == (generated / "cls" / rel).read_bytes()


def test_unlabeled_images_are_not_copies_of_classification_images(generated):
    unlabeled = {p.read_bytes() for p in (generated / "unl" / "images").glob("*.png")}
    labelled = {p.read_bytes() for p in (generated / "cls").rglob("*.png")}
    assert len(unlabeled) == 6 and not unlabeled & labelled


def test_unknown_class_and_bad_detection_spec_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="pentagon"):
        shapes.generate_classification(
            tmp_path, ["circle", "pentagon"], {"train": 1}, 32, seed=0, workers=1, progress=False
        )
    with pytest.raises(ValueError, match="min_object_size"):
        DetectionSpec(image_size=64, min_objects=1, max_objects=2, min_object_size=8, max_object_size=80)


def test_coco_annotations_are_well_formed(generated):
    for split, n_images in DET_COUNTS.items():
        coco = _coco(generated, split)
        assert coco["categories"] == [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)
        ]
        assert [img["id"] for img in coco["images"]] == list(range(1, n_images + 1))
        for img in coco["images"]:
            with Image.open(generated / "det" / split / "images" / img["file_name"]) as image:
                assert image.size == (img["width"], img["height"]) == (SPEC.image_size,) * 2
        assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
        per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=n_images + 1)[1:]
        assert per_image.min() >= SPEC.min_objects and per_image.max() <= SPEC.max_objects
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= SPEC.image_size and y + h <= SPEC.image_size
            assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] == 0
            assert 1 <= ann["category_id"] <= len(SHAPE_CLASSES)


def test_objects_come_small_and_large(generated):
    areas = np.array([a["area"] for a in _coco(generated)["annotations"]])
    assert (areas < 32**2).any() and (areas >= 32**2).any()


def test_each_box_is_the_tight_box_of_the_pixels_its_shape_changed(generated):
    """Redraw every image without one object: the pixels that change are exactly that object's box."""
    coco = _coco(generated)
    for img in coco["images"]:
        index = img["id"] - 1
        scene, image, _ = shapes.detection_image(0, "train", index, SHAPE_CLASSES, SPEC)
        with Image.open(generated / "det" / "train" / "images" / img["file_name"]) as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
        drawn = np.asarray(shapes.render_scene(scene))
        assert np.array_equal(drawn, np.asarray(image))  # the scene replays to the generated image
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert [a["category_id"] for a in anns] == [obj.class_index + 1 for obj in scene.objects]
        for k, ann in enumerate(anns):
            changed = (np.asarray(shapes.render_scene(scene, omit=[k])) != drawn).any(axis=2)
            rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
            pixel_box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            x, y, w, h = ann["bbox"]
            box = np.array([x, y, x + w, y + h])
            assert np.abs(pixel_box - box).max() <= 1.0, (img["file_name"], k, pixel_box, box)
            # No changed pixel lies outside the box.
            assert pixel_box[0] >= np.floor(box[0]) and pixel_box[1] >= np.floor(box[1])
            assert pixel_box[2] <= np.ceil(box[2]) and pixel_box[3] <= np.ceil(box[3])
