"""Validation and ingestion of user ImageFolder and COCO data: every bad case names its entry."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data import ingest
from vitkit.data.ingest import ingest_coco, ingest_imagefolder, validate_coco, validate_imagefolder
from vitkit.errors import DataError

SPLITS = ("train", "val")


def _write_image(
    path: Path, size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", seed: int = 0
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path, format=fmt)


def _truncated_png(path: Path) -> None:
    _write_image(path, (40, 40))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- ImageFolder


@pytest.fixture
def folder(tmp_path) -> Path:
    """train/val x cat/dog, with mixed sizes, modes and formats."""
    root = tmp_path / "src"
    for s, split in enumerate(SPLITS):
        _write_image(root / split / "cat" / "a.png", (20, 16), seed=s)
        _write_image(root / split / "cat" / "b.jpg", (40, 40), fmt="JPEG", seed=s + 10)
        _write_image(root / split / "dog" / "c.png", (33, 21), mode="L", seed=s + 20)
        _write_image(root / split / "dog" / "d.png", (8, 8), mode="RGBA", seed=s + 30)
    (root / "train" / "dog" / ".DS_Store").write_text("hidden files are ignored")
    return root


def test_good_imagefolder_validates(folder):
    index = validate_imagefolder(folder, SPLITS)
    assert index.classes == ["cat", "dog"]
    assert index.samples["train"] == [
        ("train/cat/a.png", 0),
        ("train/cat/b.jpg", 0),
        ("train/dog/c.png", 1),
        ("train/dog/d.png", 1),
    ]


def test_ingest_imagefolder_writes_resized_rgb_pngs(folder, tmp_path):
    out = tmp_path / "out"
    index = ingest_imagefolder(folder, out, SPLITS, image_size=24)
    assert index.root == out and index.classes == ["cat", "dog"]
    for split in SPLITS:
        assert index.samples[split] == [
            (f"{split}/cat/000000.png", 0),
            (f"{split}/cat/000001.png", 0),
            (f"{split}/dog/000000.png", 1),
            (f"{split}/dog/000001.png", 1),
        ]
        for rel, _ in index.samples[split]:
            with Image.open(out / rel) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (24, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dirs left


def test_data_classes_pick_class_folders_and_the_rest_are_left_out_with_a_warning(folder, tmp_path, capsys):
    _write_image(folder / "train" / "bird" / "e.png", (10, 10))  # in train only: not read at all
    index = ingest_imagefolder(folder, tmp_path / "out", SPLITS, image_size=8, classes=["dog"])
    assert index.classes == ["dog"]
    assert [rel for rel, _ in index.samples["train"]] == ["train/dog/000000.png", "train/dog/000001.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "val").iterdir()) == ["dog"]
    assert "class folder(s) bird, cat left out: not in data.classes" in capsys.readouterr().err


def test_a_class_named_in_data_classes_but_missing_is_an_error_naming_the_folders_there(folder):
    with pytest.raises(DataError) as caught:
        validate_imagefolder(folder, SPLITS, classes=["cat", "cow"])
    message = str(caught.value)
    assert f"{folder / 'train' / 'cow'}: class folder named in data.classes is missing" in message
    assert "(the class folders there: cat, dog); set data.classes to null" in message


def test_own_images_keep_their_aspect_ratio(tmp_path):
    """A wide image's centre square is kept, not squashed: a 60x20 image whose middle third is white
    and the rest black becomes an all-white 20x20 square (squashing would keep the black sides)."""
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, 20:40] = 255
    square = ingest.to_square(Image.fromarray(array), 20)
    assert square.size == (20, 20) and np.asarray(square).min() >= 250


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root / rel)


def _empty_class(root: Path) -> None:
    for f in (root / "train" / "dog").glob("*.png"):
        f.unlink()


BAD_FOLDERS = {
    "missing split": (_remove("val"), "split folder 'val' is missing"),
    "class missing in a split": (_remove("val/dog"), "val/dog: class folder missing"),
    "extra class in a split": (
        lambda root: _write_image(root / "val" / "bird" / "e.png", (8, 8)),
        "val/bird: class folder 'bird' is not in 'train'",
    ),
    "empty class": (_empty_class, "train/dog: class folder has no images"),
    "non-image file": (
        lambda root: (root / "train" / "cat" / "notes.txt").write_text("hello"),
        "train/cat/notes.txt: not a readable image",
    ),
    "truncated image": (
        lambda root: _truncated_png(root / "val" / "cat" / "a.png"),
        "val/cat/a.png: not a readable",
    ),
    "image outside class folders": (
        lambda root: _write_image(root / "val" / "loose.png", (8, 8)),
        "val/loose.png: file directly in the split folder",
    ),
    "split without classes": (
        lambda root: (shutil.rmtree(root / "val"), _write_image(root / "val" / "x.png", (8, 8))),
        "split 'val' has no class folders",
    ),
    # opening a named pipe would wait for a writer forever: refused unopened
    "named pipe in a class folder": (
        lambda root: os.mkfifo(root / "train" / "cat" / "pipe.png"),
        "train/cat/pipe.png: a named pipe (FIFO), not an image file",
    ),
    # the rule COCO file_names follow: nothing is read from outside the root
    "image linked from outside the root": (
        lambda root: _link_outside(root / "train" / "cat" / "link.png", root.parent / "outside.png"),
        "train/cat/link.png: symbolic link to",
    ),
    "class folder linked from outside the root": (
        lambda root: _link_outside(root / "val" / "dog", root.parent / "elsewhere", folder=True),
        "val/dog: symbolic link to",
    ),
    "32-bit float image": (
        lambda root: Image.fromarray(np.zeros((8, 8), np.float32)).save(root / "train" / "cat" / "f.tiff"),
        "train/cat/f.tiff: 32-bit float pixels (mode F), whose range is not defined",
    ),
}


def _link_outside(link: Path, target: Path, folder: bool = False) -> None:
    """``link`` becomes a symbolic link to ``target``, a good image (or a folder of one) outside the root."""
    if folder:
        shutil.rmtree(link)
        _write_image(target / "e.png", (8, 8))
    else:
        _write_image(target, (8, 8))
    link.symlink_to(target)


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_imagefolder_is_reported_by_entry(folder, case):
    corrupt, expected = BAD_FOLDERS[case]
    corrupt(folder)
    with pytest.raises(DataError, match="problem") as info:
        validate_imagefolder(folder, SPLITS)
    assert expected in str(info.value)
    assert "<root>/<split>/<class>/<image>" in str(info.value)  # says what to do
    if "outside the root" in case:
        assert "outside the root" in str(info.value)


def test_links_inside_the_root_are_followed(folder):
    (folder / "train" / "cat" / "again.png").symlink_to(folder / "val" / "cat" / "a.png")
    index = validate_imagefolder(folder, SPLITS)
    assert ("train/cat/again.png", 0) in index.samples["train"]


def _gradient16(path: Path, alpha: bool = False) -> np.ndarray:
    """A 16-bit grey horizontal ramp 0..65535 (the case Pillow's own conversion clips almost white)."""
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    return ramp


def test_16_bit_images_are_scaled_to_8_bits(tmp_path, capsys):
    src = tmp_path / "pool"
    src.mkdir()
    ramp = _gradient16(src / "ramp.png")
    ingest.ingest_image_dir(src, tmp_path / "out", image_size=32)  # the 256x32 ramp's centre 32 columns
    with Image.open(tmp_path / "out" / "images" / "000000.png") as image:
        pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    centre = ramp[0, 112:144].astype(np.float64) / 257  # 65535 -> 255
    assert abs(pixels.mean() - centre.mean()) < 1.0  # not near-white (the bug: mean 254.4)
    assert len(np.unique(pixels)) == 32
    assert (pixels.min(), pixels.max()) == (round(centre[0]), round(centre[-1]))
    assert f"Image folder {src}: 1 16-bit image(s) scaled to 8 bits" in capsys.readouterr().out


def test_transparency_is_composited_over_black_and_counted(tmp_path, capsys):
    src = tmp_path / "pool"
    src.mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, stored
    rgba[:, :4, 3] = 255  # opaque on the left, fully transparent on the right
    Image.fromarray(rgba, "RGBA").save(src / "a.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.save(src / "b.png", transparency=1)  # a palette colour marked transparent
    ingest.ingest_image_dir(src, tmp_path / "out", image_size=8)
    with Image.open(tmp_path / "out" / "images" / "000000.png") as image:
        pixels = np.asarray(image).astype(int)
    assert (pixels[:, :3] >= 250).all() and (pixels[:, 5:] <= 5).all()  # transparent became black
    with Image.open(tmp_path / "out" / "images" / "000001.png") as image:
        assert np.asarray(image).max() <= 5
    assert "2 image(s) with transparency composited over black" in capsys.readouterr().out


def test_to_rgb_leaves_plain_images_alone():
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb, note = ingest.to_rgb(image)
    assert note is None and rgb.getpixel((0, 0)) == (10, 20, 30)
    grey, note = ingest.to_rgb(Image.new("L", (4, 4), 77))
    assert note is None and grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)


def test_missing_imagefolder_root(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        validate_imagefolder(tmp_path / "nowhere", SPLITS)


def test_many_problems_list_the_first_five_and_the_total(folder):
    for i in range(7):
        (folder / "train" / "cat" / f"bad{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        validate_imagefolder(folder, SPLITS)
    message = str(info.value)
    assert "7 problems" in message and "... and 2 more" in message
    assert "bad4.png" in message and "bad5.png" not in message


def test_failed_ingest_leaves_existing_output_untouched(folder, tmp_path):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "sentinel.txt").write_text("old")
    (folder / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"broken\.png"):
        ingest_imagefolder(folder, out, SPLITS, image_size=16)
    assert (out / "keep" / "sentinel.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_failure_while_writing_removes_the_temp_dir(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("old")
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        image.save(path, format="PNG")

    monkeypatch.setattr(ingest, "_save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ingest_imagefolder(folder, out, SPLITS, image_size=16)
    assert calls[0].parent.parent.parent.parent == tmp_path  # it was writing beside out/
    assert [p.name for p in out.iterdir()] == ["sentinel.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_successful_ingest_replaces_existing_output(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ingest_imagefolder(folder, out, SPLITS, image_size=16)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --------------------------------------------------------------------------- COCO


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    """Three images (one in a sub-folder), two categories, four boxes; returns (json file, image root)."""
    root = tmp_path / "imgs"
    _write_image(root / "a.png", (64, 48), seed=1)
    _write_image(root / "b.jpg", (32, 32), fmt="JPEG", seed=2)
    _write_image(root / "sub" / "c.png", (100, 50), mode="L", seed=3)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 32, "height": 32},
            {"id": 7, "file_name": "sub/c.png", "width": 100, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 10], "area": 150.0, "iscrowd": 0},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [40.5, 30, 24, 18.5],
                "area": 400,
                "iscrowd": 0,
            },
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 32, 32], "area": 1024, "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [-0.5, 10, 50, 20], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "ring"}, {"id": 2, "name": "box", "supercategory": "thing"}],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(data, indent=1))
    return annotation_file, root


def test_good_coco_validates(coco):
    annotation_file, root = coco
    data = validate_coco(annotation_file, root)
    assert len(data["images"]) == 3 and len(data["annotations"]) == 4


def test_ingest_coco_writes_the_generator_layout_and_scales_boxes(coco, tmp_path):
    annotation_file, root = coco
    out = tmp_path / "det"
    written = ingest_coco(annotation_file, root, out, max_size=50)
    assert json.loads((out / "annotations.json").read_text()) == written
    assert written["categories"] == [
        {"id": 1, "name": "ring"},
        {"id": 2, "name": "box", "supercategory": "thing"},
    ]
    assert written["images"] == [
        {"id": 1, "file_name": "000000.png", "width": 50, "height": 38},  # 64x48 scaled by 50/64
        {"id": 2, "file_name": "000001.png", "width": 32, "height": 32},  # already small enough
        {"id": 7, "file_name": "000002.png", "width": 50, "height": 25},
    ]
    for img in written["images"]:
        with Image.open(out / "images" / img["file_name"]) as image:
            assert (
                image.format == "PNG" and image.mode == "RGB" and image.size == (img["width"], img["height"])
            )
    anns = {a["id"]: a for a in written["annotations"]}
    sx, sy = 50 / 64, 38 / 48
    assert anns[1]["bbox"] == pytest.approx([4 * sx, 4 * sy, 20 * sx, 10 * sy])
    assert anns[1]["area"] == pytest.approx(150 * sx * sy)
    # Sticking out by up to a pixel is accepted, then clipped to the image.
    assert anns[2]["bbox"] == pytest.approx([40.5 * sx, 30 * sy, 23.5 * sx, 18 * sy])
    assert anns[3]["bbox"] == [0, 0, 32, 32]
    assert anns[4]["bbox"] == pytest.approx([0, 5, 24.75, 10])
    assert anns[4]["area"] == pytest.approx(24.75 * 10)  # no area given: box area
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det", "imgs", "instances.json"]


def _edit(change: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def corrupt(annotation_file: Path, root: Path) -> None:
        data = json.loads(annotation_file.read_text())
        change(data)
        annotation_file.write_text(json.dumps(data))

    return corrupt


def _set(section: str, index: int, **values) -> Callable[[Path, Path], None]:
    return _edit(lambda data: data[section][index].update(values))


def _escaping_symlink(annotation_file: Path, root: Path) -> None:
    (root / "link.png").symlink_to(annotation_file.parent / "outside.png")
    _write_image(annotation_file.parent / "outside.png", (64, 48))
    _set("images", 0, file_name="link.png")(annotation_file, root)


BAD_COCO = {
    "invalid json": (
        lambda f, root: f.write_text('{"images": [],\n "annotations": [,]}'),
        "not valid JSON: Expecting value at line 2, column 18",
    ),
    "not an object": (lambda f, root: f.write_text("[1, 2]"), "the top level must be a JSON object"),
    "missing key": (_edit(lambda d: d.pop("categories")), "missing top-level key(s) ['categories']"),
    "wrong type": (_edit(lambda d: d.update(images={})), "'images' must be a list, got a dict"),
    "duplicate image id": (_set("images", 1, id=1), "images[1] (id 1): duplicate id (also images[0])"),
    "duplicate annotation id": (_set("annotations", 2, id=1), "annotations[2] (id 1): duplicate id"),
    "duplicate category id": (_set("categories", 1, id=1), "categories[1] (id 1): duplicate id"),
    "unknown image id": (_set("annotations", 0, image_id=99), "annotations[0] (id 1): image_id 99 is not"),
    "unknown category id": (
        _set("annotations", 3, category_id=9),
        "annotations[3] (id 4): category_id 9 is not in categories [1..2]",
    ),
    "bbox not 4 numbers": (_set("annotations", 1, bbox=[1, 2, 3]), "annotations[1] (id 2): bbox must be 4"),
    "bbox with a string": (
        _set("annotations", 1, bbox=[1, 2, "3", 4]),
        "annotations[1] (id 2): bbox must be 4",
    ),
    "zero width": (
        _set("annotations", 0, bbox=[1, 2, 0, 4]),
        "annotations[0] (id 1): bbox [1, 2, 0, 4] has non",
    ),
    "bbox outside": (
        _set("annotations", 2, bbox=[10, 10, 30, 10]),
        "annotations[2] (id 3): bbox [10, 10, 30, 10] lies outside its image (32x32",
    ),
    "bad iscrowd": (_set("annotations", 0, iscrowd=2), "annotations[0] (id 1): iscrowd must be 0 or 1"),
    "non-integer size": (
        _set("images", 0, width="64"),
        "images[0] (id 1): width and height must be positive",
    ),
    "absolute file_name": (
        _set("images", 1, file_name="/etc/passwd"),
        "images[1] (id 2): file_name '/etc/passwd' is absolute",
    ),
    "file_name escaping with ..": (
        _set("images", 1, file_name="../instances.json"),
        "images[1] (id 2): file_name '../instances.json' resolves to",
    ),
    "file_name escaping via symlink": (
        _escaping_symlink,
        "images[0] (id 1): file_name 'link.png' resolves to",
    ),
    "missing image file": (_set("images", 2, file_name="sub/nope.png"), "images[2] (id 7): image file"),
    "image file is a named pipe": (
        lambda f, root: (os.mkfifo(root / "pipe.png"), _set("images", 1, file_name="pipe.png")(f, root)),
        "images[1] (id 2): ",
    ),
    "category_id true": (
        _set("annotations", 0, category_id=True),
        "annotations[0] (id 1): category_id must be an integer, got True",
    ),
    "category_id 1.0": (
        _set("annotations", 0, category_id=1.0),
        "annotations[0] (id 1): category_id must be an integer, got 1.0",
    ),
    "image_id true": (_set("annotations", 0, image_id=True), "annotations[0] (id 1): image_id True is not"),
    "category id 2e9": (
        _set("categories", 1, id=2_000_000_000),
        "categories[1] (id 2000000000): ids must be in [0, 9999]",
    ),
    "negative category id": (_set("categories", 0, id=-1), "categories[0] (id -1): ids must be in [0, 9999]"),
    "corrupt image": (lambda f, root: _truncated_png(root / "a.png"), "images[0] (id 1): "),
    "size mismatch": (_set("images", 2, width=101), "images[2] (id 7): "),
}
BAD_COCO_DETAIL = {
    "corrupt image": "not a readable image",
    "size mismatch": "is 100x50 but the json says width 101, height 50",
    "missing image file": "does not exist",
    "file_name escaping with ..": "outside the image root",
    "file_name escaping via symlink": "outside the image root",
    "image file is a named pipe": "is a named pipe (FIFO), not an image file",
    "category id 2e9": "class indices",
}


@pytest.mark.parametrize("case", BAD_COCO)
def test_bad_coco_is_reported_by_entry(coco, case):
    annotation_file, root = coco
    corrupt, expected = BAD_COCO[case]
    corrupt(annotation_file, root)
    with pytest.raises(DataError) as info:
        validate_coco(annotation_file, root)
    message = str(info.value)
    assert str(annotation_file) in message and expected in message
    assert BAD_COCO_DETAIL.get(case, "") in message


def test_failed_coco_ingest_leaves_existing_output_untouched(coco, tmp_path):
    annotation_file, root = coco
    out = tmp_path / "det"
    ingest_coco(annotation_file, root, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _set("annotations", 0, category_id=5)(annotation_file, root)
    with pytest.raises(DataError, match="category_id 5"):
        ingest_coco(annotation_file, root, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det", "imgs", "instances.json"]


# --------------------------------------------------------------------------- flat image folder


def test_ingest_image_dir_writes_square_rgb_pngs(tmp_path):
    src = tmp_path / "pool"
    _write_image(src / "x.jpg", (30, 20), fmt="JPEG")
    _write_image(src / "y.png", (12, 12), mode="L")
    assert ingest.ingest_image_dir(src, tmp_path / "out", image_size=16) == 2
    written = sorted((tmp_path / "out" / "images").iterdir())
    assert [p.name for p in written] == ["000000.png", "000001.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (16, 16)


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda src: (src / "notes.txt").write_text("hi"), "notes.txt: not a readable image"),
        (lambda src: _write_image(src / "nested" / "z.png", (8, 8)), "nested: sub-folder"),
        (lambda src: (src / "x.jpg").unlink(), "pool: no images"),
    ],
)
def test_bad_image_dir_is_reported_by_entry(tmp_path, corrupt, expected):
    src = tmp_path / "pool"
    _write_image(src / "x.jpg", (30, 20), fmt="JPEG")
    corrupt(src)
    with pytest.raises(DataError, match="problem") as info:
        ingest.ingest_image_dir(src, tmp_path / "out", image_size=16)
    assert expected in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]


def test_a_named_pipe_or_a_link_outside_an_image_folder_is_refused_unopened(tmp_path):
    src = tmp_path / "pool"
    _write_image(src / "x.jpg", (30, 20), fmt="JPEG")
    os.mkfifo(src / "pipe.jpg")
    _write_image(tmp_path / "outside.png", (8, 8))
    (src / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(DataError, match="2 problems") as info:
        ingest.ingest_image_dir(src, tmp_path / "out", image_size=16)
    message = str(info.value)
    assert f"{src / 'pipe.jpg'}: a named pipe (FIFO), not an image file" in message
    assert f"{src / 'link.png'}: symbolic link to {tmp_path / 'outside.png'}, outside the root" in message


# --------------------------------------------------------------------------- categories across splits


def _split(categories: list[tuple[int, str]], annotated: list[int]) -> dict:
    """A validated COCO dict with these categories and one annotation per id in ``annotated``."""
    return {
        "categories": [{"id": i, "name": n} for i, n in categories],
        "annotations": [{"id": k, "image_id": 1, "category_id": c} for k, c in enumerate(annotated)],
        "images": [{"id": 1}],
    }


def test_val_and_test_may_only_use_the_categories_train_learns():
    train = _split([(1, "ring"), (2, "box"), (3, "star")], [1, 2, 3, 3])
    val = _split([(1, "ring"), (3, "star")], [1, 3])
    ingest.check_coco_splits({"train": train, "val": val, "test": train})
    bad = {
        "train": _split([(1, "ring"), (2, "box"), (3, "star")], [1, 2]),  # star declared, never annotated
        "val": _split([(1, "ring"), (7, "zebra")], [1, 7, 7]),
        "test": _split([(2, "crate"), (3, "star")], [2, 3]),
    }
    with pytest.raises(DataError) as info:
        ingest.check_coco_splits(bad)
    message = str(info.value)
    assert "3 problems" in message
    assert "val categories[1] (id 7, 'zebra'): not a category of the train split (its ids: [1..3])" in message
    assert "test categories[0] (id 2): named 'crate', but 'box' in the train split" in message
    assert "test: 1 annotation(s) of category 3 ('star'), which no train annotation has" in message
    assert "The model learns the categories of the train split" in message
