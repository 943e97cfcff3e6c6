"""The prepare stage's reading of the data params: COCO sizes, and what data.classes means where."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from stages import prepare
from tests.conftest import smoke_params
from vitkit.config import validate_params
from vitkit.data.shapes import SHAPE_CLASSES
from vitkit.errors import ConfigError


def _context(**data) -> SimpleNamespace:
    """What prepare's data functions read of a StageContext: the validated params."""
    return SimpleNamespace(params=validate_params(smoke_params(data=data)))


def _coco_split(folder: Path) -> dict[str, str]:
    """One 200x100 image (a photo's aspect) with one box."""
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.full((100, 200, 3), 90, np.uint8)).save(folder / "images" / "wide.png")
    data = {
        "images": [{"id": 1, "file_name": "wide.png", "width": 200, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 25, 100, 50], "area": 5000, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (folder / "annotations.json").write_text(json.dumps(data))
    return {"annotations": str(folder / "annotations.json"), "images": str(folder / "images")}


def test_coco_images_are_capped_at_the_detection_image_size_with_their_aspect_ratio(tmp_path):
    coco = {split: _coco_split(tmp_path / split) for split in ("train", "val", "test")}
    ctx = _context(detection={"source": "coco", "image_size": 64, "coco": coco})
    prepare.prepare_detection(ctx, tmp_path / "out", workers=1)
    written = json.loads((tmp_path / "out" / "train" / "annotations.json").read_text())
    (entry,) = written["images"]
    assert (entry["width"], entry["height"]) == (64, 32)
    with Image.open(tmp_path / "out" / "train" / "images" / entry["file_name"]) as image:
        assert image.size == (64, 32)
    assert written["annotations"][0]["bbox"] == pytest.approx([16, 8, 32, 16])  # scaled by 64/200


def test_data_classes_draw_the_shapes_or_name_own_class_folders():
    assert prepare.shape_classes(_context(classes=None)) == list(SHAPE_CLASSES)
    assert prepare.shape_classes(_context(classes=["star", "circle"])) == ["star", "circle"]
    # own classification data: data.classes names its folders; generated detection draws every shape
    own = _context(classes=["face", "not_face"], classification={"source": "imagefolder", "path": "/x"})
    prepare.check_shape_classes(own)
    assert prepare.shape_classes(own) == list(SHAPE_CLASSES)
    with pytest.raises(ConfigError, match=r"data.classes: \['face'\] are not shapes the generator draws"):
        prepare.check_shape_classes(_context(classes=["face", "circle"]))
