"""COCO evaluation, DETR post-processing into COCO results, and detection figures."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import matplotlib.image
import pytest
import torch
from pycocotools.coco import COCO

from vitkit.evaluation.coco import METRIC_NAMES, evaluate_coco, write_results_json
from vitkit.evaluation.detection_figures import draw_detections, plot_detections
from vitkit.models.detr.postprocess import PostProcess, to_coco_results

# Three images (one not square), boxes [x, y, w, h] of small (< 32²), medium and large area.
IMAGES = [(1, 128, 128), (2, 128, 128), (3, 96, 160)]  # id, height, width
ANNOTATIONS = [
    (1, 1, [10, 12, 20, 14]),
    (1, 2, [50, 40, 60, 70]),
    (2, 3, [5, 5, 100, 110]),
    (2, 1, [70, 20, 12, 12]),
    (3, 2, [30, 10, 40, 30]),
    (3, 3, [100, 50, 50, 40]),
]


@pytest.fixture
def coco_gt(tmp_path) -> COCO:
    dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, h, w in IMAGES],
        "categories": [{"id": c, "name": f"shape{c}"} for c in (1, 2, 3)],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(ANNOTATIONS)
        ],
    }
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _perfect_results() -> list[dict]:
    return [
        {"image_id": i, "category_id": c, "bbox": list(map(float, b)), "score": 0.9}
        for i, c, b in ANNOTATIONS
    ]


def test_perfect_predictions_score_ap_one_and_round_trip_through_json(
    coco_gt, tmp_path, capsys, caplog
) -> None:
    results = _perfect_results()
    path = tmp_path / "out" / "results.json"
    write_results_json(results, path)
    assert json.loads(path.read_text()) == results
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco_gt.loadRes(str(path))
    assert len(loaded.anns) == len(results)

    with caplog.at_level(logging.INFO, logger="vitkit.evaluation.coco"):
        metrics = evaluate_coco(coco_gt, results)
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[name] == pytest.approx(1.0), name
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured...
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in caplog.text  # ...and its table is logged
    assert "score" in results[0] and "area" not in results[0]  # the caller's dicts are left alone


def test_wrong_labels_and_shifted_boxes_score_low(coco_gt) -> None:
    shuffled = [{**r, "category_id": r["category_id"] % 3 + 1} for r in _perfect_results()]
    assert evaluate_coco(coco_gt, shuffled)["AP"] < 0.05
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] * 0.4, *r["bbox"][1:]]} for r in _perfect_results()]
    metrics = evaluate_coco(coco_gt, shifted)  # IoU of a box shifted by 40% of its width: 0.43
    assert metrics["AP50"] == pytest.approx(0.0) and metrics["AP"] == pytest.approx(0.0)


def test_no_results_score_zero(coco_gt) -> None:
    metrics = evaluate_coco(coco_gt, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AR100"] == 0.0


# ------------------------------------------------------------------------------------------ postprocess


def _logits_for(labels: list[int], num_classes: int = 4) -> torch.Tensor:
    """Confident logits: index ``num_classes`` (no object) for label -1."""
    logits = torch.zeros(len(labels), num_classes + 1)
    for q, label in enumerate(labels):
        logits[q, label if label >= 0 else num_classes] = 8.0
    return logits


def test_postprocess_keeps_top_k_real_classes_scaled_to_the_original_size() -> None:
    outputs = {
        "pred_logits": torch.stack([_logits_for([2, -1, 1]), _logits_for([3, 3, -1])]),
        "pred_boxes": torch.tensor(
            [
                [[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]],
                [[0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]],
            ]
        ),
    }
    outputs["pred_logits"][1, 1, 3] = 5.0  # image 1's second query: same class, lower score
    sizes = torch.tensor([[100, 200], [50, 80]])  # (height, width)
    detections = PostProcess(top_k=2)(outputs, sizes)

    assert detections[0]["labels"].tolist() == [2, 1]  # the no-object query 1 ranks below both
    torch.testing.assert_close(
        detections[0]["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    )
    assert detections[1]["labels"].tolist() == [3, 3]
    assert detections[1]["scores"][0] > detections[1]["scores"][1]
    assert (PostProcess(top_k=3, score_threshold=0.5)(outputs, sizes)[0]["labels"]).tolist() == [2, 1]

    results = to_coco_results(detections, image_ids=[11, 12])
    assert results[0] == {
        "image_id": 11,
        "category_id": 2,
        "bbox": pytest.approx([80.0, 30.0, 40.0, 40.0]),
        "score": pytest.approx(detections[0]["scores"][0].item()),
    }
    assert [r["image_id"] for r in results] == [11, 11, 12, 12]
    json.dumps(results)  # plain Python numbers only


def test_outputs_matching_ground_truth_score_ap_one_after_postprocess(coco_gt) -> None:
    """Normalised cxcywh predictions → PostProcess → COCO results reproduces the annotations."""
    detections_outputs, sizes, image_ids = [], [], []
    for image_id, height, width in IMAGES:
        anns = [(c, b) for i, c, b in ANNOTATIONS if i == image_id]
        anns += [(-1, [0, 0, 1, 1])] * (3 - len(anns))  # pad to 3 queries with "no object"
        boxes = torch.tensor([[x + w / 2, y + h / 2, w, h] for _, (x, y, w, h) in anns], dtype=torch.float32)
        boxes /= torch.tensor([width, height, width, height])
        detections_outputs.append((_logits_for([c for c, _ in anns]), boxes))
        sizes.append([height, width])
        image_ids.append(image_id)
    outputs = {
        "pred_logits": torch.stack([logits for logits, _ in detections_outputs]),
        "pred_boxes": torch.stack([boxes for _, boxes in detections_outputs]),
    }
    detections = PostProcess(top_k=3)(outputs, torch.tensor(sizes))
    assert evaluate_coco(coco_gt, to_coco_results(detections, image_ids))["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ figures


def test_draw_detections_colours_ground_truth_green_and_predictions_red() -> None:
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    drawn = draw_detections(
        image,
        torch.tensor([[8.0, 8.0, 24.0, 24.0]]),
        torch.tensor([[40.0, 40.0, 60.0, 56.0]]),
        ["shape1 0.93"],
    )
    assert drawn.shape == (3, 256, 256)  # enlarged 4x so labels are legible
    assert drawn[:, 32, 60].tolist() == [0, 255, 0]  # top edge of the ground-truth box
    assert drawn[:, 224, 200].tolist() == [255, 0, 0]  # bottom edge of the prediction


def test_plot_detections_writes_a_png_grid(tmp_path) -> None:
    images = [torch.full((3, 32, 32), 90, dtype=torch.uint8) for _ in range(3)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}] * 3
    detection = {
        "scores": torch.tensor([0.9, 0.2]),
        "labels": torch.tensor([1, 2]),
        "boxes": torch.tensor([[5.0, 5.0, 19.0, 21.0], [0.0, 0.0, 8.0, 8.0]]),
    }
    out = tmp_path / "plots" / "detections.png"
    plot_detections(images, targets, [detection] * 3, {1: "circle", 2: "square"}, out, columns=2)
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
