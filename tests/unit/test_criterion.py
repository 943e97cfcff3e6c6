"""DETR's set loss against a hand computation of its formulas on a small hand-made case."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitkit.models.detr import DETRConfig, build_criterion
from vitkit.models.detr.criterion import SetCriterion
from vitkit.models.detr.matcher import HungarianMatcher

NUM_CLASSES = 2  # classes 0 and 1; index 2 is "no object"
EOS_COEF = 0.1

# Two images, three queries each. Image 0 has targets (label 1, A) and (label 0, B); image 1 has
# (label 0, C). Query 2 of image 0 sits near A, query 0 near B, query 1 of image 1 near C, so the
# matching is {img0: q2->t0, q0->t1; img1: q1->t0}. Image 0's query 0 predicts the wrong class.
LOGITS = [
    [[0.2, 1.0, 0.1], [0.0, 0.3, 2.0], [-0.5, 1.5, 0.2]],
    [[0.1, 0.0, 1.2], [2.0, -1.0, 0.5], [0.3, 0.2, 0.9]],
]
BOXES = [
    [[0.68, 0.62, 0.28, 0.22], [0.1, 0.9, 0.05, 0.05], [0.32, 0.41, 0.18, 0.2]],
    [[0.9, 0.1, 0.1, 0.1], [0.45, 0.52, 0.42, 0.36], [0.15, 0.2, 0.1, 0.2]],
]
TARGETS = [
    {"labels": [1, 0], "boxes": [[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]},
    {"labels": [0], "boxes": [[0.5, 0.5, 0.4, 0.4]]},
]
MATCH = [{2: 0, 0: 1}, {1: 0}]  # per image: query -> target


def _giou(a: list[float], b: list[float]) -> float:
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _expected_losses() -> dict[str, float]:
    """DETR's loss written out: weighted NLL over every query, L1 and 1 - GIoU over matched pairs."""
    weights = [1.0] * NUM_CLASSES + [EOS_COEF]
    nll_sum = weight_sum = 0.0
    l1 = giou = 0.0
    wrong = 0
    cardinality = 0.0
    for logits, boxes, target, match in zip(LOGITS, BOXES, TARGETS, MATCH, strict=True):
        for q, row in enumerate(logits):
            label = target["labels"][match[q]] if q in match else NUM_CLASSES
            log_prob = row[label] - math.log(sum(math.exp(v) for v in row))
            nll_sum += -weights[label] * log_prob
            weight_sum += weights[label]
            if q in match:
                t = match[q]
                l1 += sum(abs(p - g) for p, g in zip(boxes[q], target["boxes"][t], strict=True))
                giou += 1 - _giou(boxes[q], target["boxes"][t])
                wrong += max(range(len(row)), key=row.__getitem__) != label
        predicted = sum(max(range(len(row)), key=row.__getitem__) != NUM_CLASSES for row in logits)
        cardinality += abs(predicted - len(target["labels"]))
    num_boxes = sum(len(t["labels"]) for t in TARGETS)
    return {
        "loss_ce": nll_sum / weight_sum,
        "loss_bbox": l1 / num_boxes,
        "loss_giou": giou / num_boxes,
        "class_error": 100 * wrong / num_boxes,
        "cardinality_error": cardinality / len(TARGETS),
    }


def _outputs(logits=LOGITS, boxes=BOXES) -> dict:
    return {
        "pred_logits": torch.tensor(logits, dtype=torch.float64),
        "pred_boxes": torch.tensor(boxes, dtype=torch.float64),
    }


def _targets() -> list[dict]:
    return [
        {"labels": torch.tensor(t["labels"]), "boxes": torch.tensor(t["boxes"], dtype=torch.float64)}
        for t in TARGETS
    ]


def _criterion(weight_dict: dict[str, float] | None = None) -> SetCriterion:
    weights = weight_dict or {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return SetCriterion(NUM_CLASSES, HungarianMatcher(1.0, 5.0, 2.0), weights, EOS_COEF).double()


def test_matching_of_the_hand_made_case() -> None:
    matches = HungarianMatcher(1.0, 5.0, 2.0)(_outputs(), _targets())
    assert [dict(zip(q.tolist(), t.tolist(), strict=True)) for q, t in matches] == MATCH


def test_losses_equal_the_hand_computation() -> None:
    losses = _criterion()(_outputs(), _targets())
    expected = _expected_losses()
    assert set(losses) == set(expected)
    for key, value in expected.items():
        tolerance = 1e-6 if key == "class_error" else 1e-9  # a float32 logging metric
        assert losses[key].item() == pytest.approx(value, rel=tolerance, abs=tolerance), key
    assert expected["class_error"] == pytest.approx(100 / 3)


def test_aux_losses_rematch_each_layer_and_are_weighted_in_the_total() -> None:
    """An auxiliary layer predicting the same set in another query order must get the same losses
    (the set loss is invariant to query order), under suffixed keys, each weighted in the total."""
    order = [2, 0, 1]
    permuted = _outputs(
        [[row[i] for i in order] for row in LOGITS], [[row[i] for i in order] for row in BOXES]
    )
    outputs = {**_outputs(), "aux_outputs": [permuted]}
    weights = {
        "loss_ce": 1.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
        "loss_ce_0": 0.5,
        "loss_bbox_0": 3.0,
        "loss_giou_0": 1.0,
    }
    criterion = _criterion(weights)
    losses = criterion(outputs, _targets())
    for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
        assert losses[f"{key}_0"].item() == pytest.approx(losses[key].item(), rel=1e-12)
    assert "class_error_0" not in losses
    total = sum(losses[k].item() * w for k, w in weights.items())
    assert criterion.weighted_sum(losses).item() == pytest.approx(total, rel=1e-12)


def test_no_targets_means_all_no_object_and_zero_box_loss() -> None:
    outputs = _outputs()
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}
    ] * 2
    losses = _criterion()(outputs, targets)
    log_probs = outputs["pred_logits"].log_softmax(-1)[..., NUM_CLASSES]
    assert losses["loss_ce"].item() == pytest.approx(-log_probs.mean().item(), rel=1e-12)
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_giou"].item() == 0.0


def test_gradients_reach_logits_and_boxes() -> None:
    outputs = _outputs()
    for value in outputs.values():
        value.requires_grad_(True)
    criterion = _criterion()
    criterion.weighted_sum(criterion(outputs, _targets())).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    # Unmatched queries get no box gradient: query 1 of image 0 matches nothing.
    assert outputs["pred_boxes"].grad[0, 1].abs().sum() == 0
    assert outputs["pred_boxes"].grad[0, 2].abs().sum() > 0


def test_build_criterion_weights_every_decoder_layer() -> None:
    criterion = build_criterion(DETRConfig.paper(7, dec_layers=3, bbox_loss_coef=4.0))
    assert criterion.weight_dict == {
        f"{k}{suffix}": w
        for suffix in ("", "_0", "_1")
        for k, w in {"loss_ce": 1.0, "loss_bbox": 4.0, "loss_giou": 2.0}.items()
    }
    assert criterion.empty_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])


def _distributed_worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        targets = [{"labels": torch.zeros(n, dtype=torch.int64)} for n in ((3, 2), (1,))[rank]]
        num_boxes = SetCriterion.num_target_boxes(targets, torch.device("cpu"))
        torch.save(num_boxes, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_box_normaliser_is_averaged_across_processes() -> None:
    """Rank 0 holds 5 boxes and rank 1 one: both must normalise by the mean, 3, as DETR does."""
    with tempfile.TemporaryDirectory() as tmp:
        results = str(Path(tmp) / "num_boxes")
        # fork: the children need no fresh interpreter (spawning two costs ~10 s of imports here).
        mp.start_processes(
            _distributed_worker, args=(str(Path(tmp) / "init"), results), nprocs=2, start_method="fork"
        )
        assert [torch.load(f"{results}.{rank}").item() for rank in (0, 1)] == [3.0, 3.0]
    assert SetCriterion.num_target_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0


def test_every_decoder_layer_is_matched_in_one_transfer_with_the_losses_of_layer_by_layer(
    monkeypatch,
) -> None:
    """The criterion matches the final and auxiliary layers through one ``match_sets`` call (one
    device-to-host copy) and gets the losses that matching and scoring each layer alone gives."""
    gen = torch.Generator().manual_seed(11)
    layers = [
        {
            "pred_logits": torch.randn(2, 3, NUM_CLASSES + 1, generator=gen, dtype=torch.float64),
            "pred_boxes": torch.rand(2, 3, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.2,
        }
        for _ in range(3)
    ]
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    criterion = _criterion()
    num_boxes = criterion.num_target_boxes(_targets(), torch.device("cpu"))
    expected = {}
    for suffix, layer in [("", layers[-1]), ("_0", layers[0]), ("_1", layers[1])]:
        indices = criterion.matcher(layer, _targets())  # the layer alone, as before
        for name in criterion.losses:
            terms = criterion.loss_fns[name](layer, _targets(), indices, num_boxes)
            expected |= {f"{k}{suffix}": v for k, v in terms.items() if not (suffix and k == "class_error")}
    calls = {"n": 0}
    match_sets = criterion.matcher.match_sets

    def counted(sets):
        calls["n"] += 1
        return match_sets(sets)

    monkeypatch.setattr(criterion.matcher, "match_sets", counted)
    losses = criterion(outputs, _targets())
    assert calls["n"] == 1
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert torch.equal(losses[key], value), key
    assert isinstance(num_boxes, torch.Tensor) and num_boxes.dim() == 0
