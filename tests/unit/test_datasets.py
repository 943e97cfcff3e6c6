"""Datasets over prepared data, and the dataset card."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from vitkit.config import load_params
from vitkit.data import shapes
from vitkit.data.card import build_dataset_card, plot_samples
from vitkit.data.datasets import (
    CocoDetection,
    ImageFiles,
    LabelledImageDataset,
    collate_detection,
    load_image_dir,
    load_imagefolder,
)
from vitkit.data.samplers import EpochSampler
from vitkit.data.transforms import train_transform
from vitkit.errors import DataError
from vitkit.tasks.contrastive import two_view_dataset

CLASSES = ("circle", "square", "star")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    shapes.generate_classification(
        root / "classification", CLASSES, {"train": 4, "val": 2}, 32, seed=3, workers=1, progress=False
    )
    shapes.generate_detection(
        root / "detection",
        CLASSES,
        {"train": 5, "val": 2},
        80,
        2,
        4,
        8,
        50,
        seed=3,
        workers=1,
        progress=False,
    )
    shapes.generate_unlabeled(root / "unlabeled", CLASSES, 7, 32, seed=3, workers=1, progress=False)
    return root


def _pil_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_load_imagefolder_streamed_or_cached(data_root, cache_mb):
    images, labels, classes, names = load_imagefolder(data_root / "classification" / "train", cache_mb)
    assert names[4 + 2] == "square/000002.png" and len(names) == 12  # each image's path in the split
    assert isinstance(images, ImageFiles) and (images.cached is None) == (cache_mb == 0)
    assert classes == sorted(CLASSES) and len(images) == 12 and images.shape == (12, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    expected = _pil_pixels(data_root / "classification" / "train" / "square" / "000002.png")
    assert images[4 + 2].dtype == torch.uint8 and torch.equal(images[4 + 2], expected)
    everything = torch.stack([_pil_pixels(images.path(i)) for i in range(12)])
    assert torch.equal(images[:], everything) and torch.equal(images[-1], everything[-1])
    assert torch.equal(images[2:9:3], everything[2:9:3])
    assert torch.equal(images[torch.tensor([7, 0])], everything[[7, 0]])
    assert torch.equal(images[[3]], everything[[3]]) and images[5:5].shape == (0, 3, 32, 32)


def test_images_of_different_sizes_are_refused_naming_the_file(tmp_path):
    for name, size in (("a.png", (8, 8)), ("b.png", (8, 9))):
        (tmp_path / "cls").mkdir(exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "cls" / name)
    refused = r"b\.png is 8x9 but .*a\.png is 8x8"
    with pytest.raises(DataError, match=refused):  # cached: when the split is opened
        load_imagefolder(tmp_path, cache_mb=1)
    streamed = load_imagefolder(tmp_path, cache_mb=0).images
    with pytest.raises(DataError, match=refused):  # streamed: when the image is read
        streamed[1]
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(tmp_path / "missing", cache_mb=1)


def test_a_broken_image_is_one_message_naming_it_even_from_a_dataloader_worker(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"2\.png: not a readable image"):
        load_image_dir(folder, cache_mb=1)
    dataset = LabelledImageDataset(load_image_dir(folder, cache_mb=0), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DataError) as raised:
        list(DataLoader(dataset, batch_size=2, num_workers=1))
    message = str(raised.value)
    assert message.startswith(f"{folder / '2.png'}: not a readable image") and "Traceback" not in message
    assert "run the prepare stage again" in message


def test_labelled_dataset_applies_a_v2_transform(data_root):
    images, labels, *_ = load_imagefolder(data_root / "classification" / "val", cache_mb=0)
    dataset = LabelledImageDataset(images, labels, v2.RandomHorizontalFlip(p=1.0))
    assert len(dataset) == 6
    image, label = dataset[3]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert torch.equal(image, images[3].flip(-1)) and label == labels[3].item() == 1
    batch_images, batch_labels = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch_images.shape == (4, 3, 32, 32) and batch_labels.dtype == torch.int64
    with pytest.raises(ValueError, match="uint8"):
        LabelledImageDataset(images[:].float(), labels)


def test_unlabeled_images(data_root):
    images = load_image_dir(data_root / "unlabeled" / "images", cache_mb=0)
    assert images.shape == (7, 3, 32, 32) and images.cached is None
    assert torch.equal(images[5], _pil_pixels(data_root / "unlabeled" / "images" / "000005.png"))


def _batches(dataset, workers: int) -> list:
    """Two epochs of batches as the Trainer draws them (its sampler, worker seeds and global RNG)."""
    torch.manual_seed(11)
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, seed=5)
    seeds = torch.Generator().manual_seed(5)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers, generator=seeds)
    batches = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches += list(loader)
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_and_streamed_splits_give_identical_batches_for_the_same_seed(data_root, workers):
    split = data_root / "classification" / "train"
    pool = data_root / "unlabeled" / "images"
    ssl = load_params(ROOT / "params.yaml").ssl
    runs = []
    for cache_mb in (1, 0):
        train = load_imagefolder(split, cache_mb)
        unlabeled = load_image_dir(pool, cache_mb)
        assert (train.images.cached is None, unlabeled.cached is None) == (cache_mb == 0,) * 2
        teacher = LabelledImageDataset(train.images, train.labels, train_transform(32, 0.5))
        runs.append((_batches(teacher, workers), _batches(two_view_dataset(unlabeled, ssl, 0.5), workers)))
    (cached_teacher, cached_ssl), (streamed_teacher, streamed_ssl) = runs
    for cached, streamed in ((cached_teacher, streamed_teacher), (cached_ssl, streamed_ssl)):
        assert len(cached) == len(streamed) > 2
        for a, b in zip(cached, streamed, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(cached_ssl[0][0], cached_ssl[0][1])  # the two views differ: augmentations ran


def test_coco_detection_items_match_the_json(data_root, capsys):
    split = data_root / "detection" / "train"
    dataset = CocoDetection(split)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed
    assert isinstance(dataset.coco, COCO) and len(dataset) == 5
    assert [c["name"] for c in dataset.categories] == list(CLASSES)
    coco = json.loads((split / "annotations.json").read_text())
    image, target = dataset[2]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 80, 80)
    assert target["image_id"] == 3 and target["orig_size"] == (80, 80)
    anns = [a for a in coco["annotations"] if a["image_id"] == 3]
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.canvas_size == (80, 80)
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    assert torch.allclose(boxes, expected)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [
        a["category_id"] for a in anns
    ]


def test_horizontal_flip_moves_boxes_with_the_pixels(data_root):
    split = data_root / "detection" / "train"
    plain, flipped = CocoDetection(split), CocoDetection(split, transforms=v2.RandomHorizontalFlip(p=1.0))
    image, target = plain[1]
    image_f, target_f = flipped[1]
    assert torch.equal(image_f, image.flip(-1))
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    assert torch.allclose(target_f["boxes"], torch.stack([80 - x1, y0, 80 - x0, y1], dim=-1))
    assert torch.equal(target_f["labels"], target["labels"]) and target_f["image_id"] == target["image_id"]


def test_crowd_annotations_are_left_out_of_targets(data_root, tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    (split / "images").symlink_to(data_root / "detection" / "train" / "images")
    coco = json.loads((data_root / "detection" / "train" / "annotations.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    first[0]["iscrowd"] = 1
    (split / "annotations.json").write_text(json.dumps(coco))
    _, target = CocoDetection(split)[0]
    assert len(target["boxes"]) == len(first) - 1


def test_collate_detection_keeps_lists(data_root):
    loader = DataLoader(
        CocoDetection(data_root / "detection" / "val"), batch_size=2, collate_fn=collate_detection
    )
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, 80, 80)
    assert [t["image_id"] for t in targets] == [1, 2]


def test_dataset_card_counts(data_root):
    card = build_dataset_card(data_root)
    cls = card["classification"]
    assert cls["classes"] == sorted(CLASSES) and cls["image_sizes"] == {"32x32": 18}
    assert cls["splits"]["train"] == {"images": 12, "per_class": dict.fromkeys(sorted(CLASSES), 4)}
    assert cls["splits"]["val"]["images"] == 6
    det = card["detection"]
    assert det["categories"] == list(CLASSES)
    coco = json.loads((data_root / "detection" / "train" / "annotations.json").read_text())
    train = det["splits"]["train"]
    assert train["images"] == 5 and train["objects"] == len(coco["annotations"]) > 5
    assert sum(train["objects_per_category"].values()) == train["objects"]
    assert sum(train["box_sizes"].values()) == train["objects"]
    small = sum(a["bbox"][2] * a["bbox"][3] < 32**2 for a in coco["annotations"])
    assert train["box_sizes"]["small"] == small
    assert 2 <= train["objects_per_image"]["min"] <= train["objects_per_image"]["max"] <= 4
    assert train["image_sizes"] == {"80x80": 5}
    assert card["unlabeled"] == {"images": 7, "image_sizes": {"32x32": 7}}
    json.dumps(card)  # JSON-able, for a DVC metrics/params file


def test_dataset_card_of_an_empty_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="Run the prepare stage"):
        build_dataset_card(tmp_path)


def test_plot_samples_writes_one_png_atomically(data_root, tmp_path):
    out = tmp_path / "plots" / "samples.png"
    plot_samples(data_root, out, n=8)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert [p.name for p in out.parent.iterdir()] == ["samples.png"]
    plot_samples(data_root, out, n=3)  # replaces the old figure
    assert [p.name for p in out.parent.iterdir()] == ["samples.png"]
