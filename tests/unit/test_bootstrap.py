"""The paired bootstrap: its intervals on known cases, and the resampled AP against pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from vitkit.evaluation.bootstrap import (
    NOISE,
    REAL,
    accuracy_difference,
    ap_difference,
    coco_matches,
    weighted_ap,
)
from vitkit.evaluation.coco import evaluate_coco

CATEGORIES = (1, 2, 3)


def make_coco(tmp_path, boxes_per_image: list[list[tuple[int, list[float]]]]) -> COCO:
    """A ground truth with image i (id i + 1) holding ``boxes_per_image[i]``: (category, [x, y, w, h])."""
    dataset = {
        "images": [
            {"id": i + 1, "height": 128, "width": 128, "file_name": f"{i}.png"}
            for i in range(len(boxes_per_image))
        ],
        "categories": [{"id": c, "name": f"shape{c}"} for c in CATEGORIES],
        "annotations": [
            {"id": n, "image_id": i + 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, (c, b)) in enumerate(
                ((i, box) for i, boxes in enumerate(boxes_per_image) for box in boxes), start=1
            )
        ],
    }
    path = tmp_path / f"gt-{len(boxes_per_image)}.json"
    path.write_text(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def random_scene(rng: np.random.Generator, images: int) -> list[list[tuple[int, list[float]]]]:
    scene = []
    for _ in range(images):
        count = int(rng.integers(1, 4))
        xy, wh = rng.uniform(0, 70, (count, 2)), rng.uniform(8, 50, (count, 2))
        scene.append(
            [
                (int(rng.choice(CATEGORIES)), [*map(float, p), *map(float, s)])
                for p, s in zip(xy, wh, strict=True)
            ]
        )
    return scene


def noisy_detections(rng: np.random.Generator, scene, jitter: float, wrong_class: float) -> list[dict]:
    """Each true box found with a shift of up to ``jitter`` pixels, sometimes with the wrong class,
    plus a spurious box per image; every score distinct."""
    results = []
    for i, boxes in enumerate(scene):
        for category, (x, y, w, h) in boxes:
            dx, dy = rng.uniform(-jitter, jitter, 2)
            if rng.random() < wrong_class:
                category = int(rng.choice([c for c in CATEGORIES if c != category]))
            results.append({"image_id": i + 1, "category_id": category, "bbox": [x + dx, y + dy, w, h]})
        results.append(
            {"image_id": i + 1, "category_id": int(rng.choice(CATEGORIES)), "bbox": [90.0, 90.0, 20.0, 20.0]}
        )
    for r, score in zip(results, rng.permutation(len(results)) / len(results) + 0.01, strict=True):
        r["score"] = float(score)
    return results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_of_unit_weights_is_pycocotools_ap(tmp_path, seed):
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, 30)
    coco_gt = make_coco(tmp_path, scene)
    results = noisy_detections(rng, scene, jitter=6.0, wrong_class=0.2)
    ours = weighted_ap(coco_matches(coco_gt, results), np.ones((1, len(scene))))[0]
    assert ours == pytest.approx(evaluate_coco(coco_gt, results)["AP"], abs=1e-12)


def test_integer_weights_score_as_a_split_with_those_images_repeated(tmp_path):
    """Resampling by weights is exactly AP on a split where each image appears that many times."""
    rng = np.random.default_rng(3)
    scene = random_scene(rng, 12)
    results = noisy_detections(rng, scene, jitter=6.0, wrong_class=0.2)
    counts = np.array([0, 1, 2, 3, 0, 1, 1, 2, 0, 1, 1, 0])
    repeated_scene, repeated_results = [], []
    for i, count in enumerate(counts):
        for _ in range(count):
            repeated_scene.append(scene[i])
            new_id = len(repeated_scene)
            repeated_results += [r | {"image_id": new_id} for r in results if r["image_id"] == i + 1]
    expected = evaluate_coco(make_coco(tmp_path, repeated_scene), repeated_results)["AP"]
    ours = weighted_ap(coco_matches(make_coco(tmp_path, scene), results), counts[None].astype(float))[0]
    assert ours == pytest.approx(expected, abs=1e-12)


def test_identical_predictions_give_an_interval_around_zero():
    correct = np.random.default_rng(0).random(300) < 0.7
    result = accuracy_difference(correct, correct.copy(), resamples=500, confidence_level=0.95, seed=0)
    assert result.difference == 0.0
    assert result.low <= 0.0 <= result.high and result.high - result.low < 1e-12
    assert result.verdict == NOISE


def test_a_clearly_better_model_is_real_and_a_tiny_gap_is_noise():
    rng = np.random.default_rng(1)
    strong, weak = rng.random(400) < 0.9, rng.random(400) < 0.5
    result = accuracy_difference(strong, weak, resamples=1000, confidence_level=0.95, seed=0)
    assert result.low > 0.25 and result.verdict == REAL
    assert result.low < result.difference < result.high
    flipped = strong.copy()
    flipped[np.flatnonzero(~strong)[:2]] = True  # right on two more images out of 400
    close = accuracy_difference(flipped, strong, resamples=1000, confidence_level=0.95, seed=0)
    assert close.difference == pytest.approx(2 / 400)
    assert close.low <= 0.0 <= close.high and close.verdict == NOISE
    backwards = accuracy_difference(weak, strong, resamples=1000, confidence_level=0.95, seed=0)
    assert backwards.high < 0 and backwards.verdict == REAL


def test_the_interval_widens_with_fewer_images_and_narrows_with_confidence():
    rng = np.random.default_rng(2)
    a, b = rng.random(2000) < 0.8, rng.random(2000) < 0.75
    width = {}
    for n, level in ((2000, 0.95), (200, 0.95), (2000, 0.5)):
        result = accuracy_difference(a[:n], b[:n], resamples=1000, confidence_level=level, seed=0)
        width[n, level] = result.high - result.low
    assert width[200, 0.95] > 2 * width[2000, 0.95] > 2 * width[2000, 0.5]


def test_detector_differences(tmp_path):
    rng = np.random.default_rng(4)
    scene = random_scene(rng, 40)
    coco_gt = make_coco(tmp_path, scene)
    good = noisy_detections(rng, scene, jitter=1.0, wrong_class=0.0)
    poor = noisy_detections(rng, scene, jitter=12.0, wrong_class=0.5)
    same = ap_difference(coco_gt, good, [dict(r) for r in good], resamples=200, confidence_level=0.95, seed=0)
    assert same.difference == 0.0 and same.low == same.high == 0.0 and same.verdict == NOISE
    better = ap_difference(coco_gt, good, poor, resamples=200, confidence_level=0.95, seed=0)
    assert better.score_a == pytest.approx(evaluate_coco(coco_gt, good)["AP"], abs=1e-12)
    assert better.score_b == pytest.approx(evaluate_coco(coco_gt, poor)["AP"], abs=1e-12)
    assert 0 < better.low < better.difference < better.high and better.verdict == REAL
    assert better.distribution.shape == (200,)


def test_no_detections_score_zero(tmp_path):
    scene = random_scene(np.random.default_rng(5), 5)
    assert weighted_ap(coco_matches(make_coco(tmp_path, scene), []), np.ones((2, 5))).tolist() == [0.0, 0.0]
