"""Hungarian matcher: its assignment is the cheapest one, checked by brute force over all assignments."""

from __future__ import annotations

import itertools

import pytest
import torch

from vitkit.errors import ConfigError, TrainingError
from vitkit.models.detr.matcher import HungarianMatcher


def _giou(a: list[float], b: list[float]) -> float:
    """Generalised IoU of two (cx, cy, w, h) boxes, written out from the GIoU paper."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(logits, box, label, target_box, weights) -> float:
    prob = logits.softmax(-1)[label].item()
    l1 = sum(abs(p - t) for p, t in zip(box.tolist(), target_box.tolist(), strict=True))
    return -weights[0] * prob + weights[1] * l1 - weights[2] * _giou(box.tolist(), target_box.tolist())


def _random_image(gen: torch.Generator, num_queries: int, num_targets: int, num_classes: int):
    logits = torch.randn(num_queries, num_classes + 1, generator=gen) * 2
    boxes = torch.rand(num_queries, 4, generator=gen) * 0.5 + 0.2
    target = {
        "labels": torch.randint(0, num_classes, (num_targets,), generator=gen),
        "boxes": torch.rand(num_targets, 4, generator=gen) * 0.5 + 0.2,
    }
    return logits, boxes, target


def _brute_force_cost(logits, boxes, target, weights) -> float:
    """Cheapest assignment of every target to a distinct query, over all of them."""
    num_queries, num_targets = len(boxes), len(target["boxes"])
    costs = [
        [
            _pair_cost(logits[q], boxes[q], target["labels"][t], target["boxes"][t], weights)
            for t in range(num_targets)
        ]
        for q in range(num_queries)
    ]
    return min(
        sum(costs[q][t] for t, q in enumerate(queries))
        for queries in itertools.permutations(range(num_queries), num_targets)
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("weights", [(1.0, 5.0, 2.0), (2.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_assignment_is_optimal_per_image_in_a_batch(seed: int, weights: tuple[float, float, float]) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 5, 4
    images = [_random_image(gen, num_queries, n, num_classes) for n in (3, 1, 0, 5)]
    outputs = {
        "pred_logits": torch.stack([logits for logits, _, _ in images]),
        "pred_boxes": torch.stack([boxes for _, boxes, _ in images]),
    }
    targets = [target for _, _, target in images]
    matches = HungarianMatcher(*weights)(outputs, targets)

    assert len(matches) == len(images)
    for (logits, boxes, target), (query_idx, target_idx) in zip(images, matches, strict=True):
        num_targets = len(target["boxes"])
        assert query_idx.dtype == target_idx.dtype == torch.int64
        assert len(query_idx) == num_targets
        assert sorted(target_idx.tolist()) == list(range(num_targets))
        assert len(set(query_idx.tolist())) == num_targets
        matched = sum(
            _pair_cost(logits[q], boxes[q], target["labels"][t], target["boxes"][t], weights)
            for q, t in zip(query_idx.tolist(), target_idx.tolist(), strict=True)
        )
        if num_targets:
            assert matched == pytest.approx(_brute_force_cost(logits, boxes, target, weights), abs=1e-5)


def test_obvious_case_matches_each_target_to_its_query() -> None:
    """Queries 2 and 0 sit on targets 0 and 1 with the right classes; query 1 is far off."""
    outputs = {
        "pred_logits": torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]]),
        "pred_boxes": torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05], [0.3, 0.3, 0.2, 0.1]]]),
    }
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.1], [0.7, 0.7, 0.2, 0.2]])}
    ]
    ((query_idx, target_idx),) = HungarianMatcher()(outputs, targets)
    assert dict(zip(target_idx.tolist(), query_idx.tolist(), strict=True)) == {0: 2, 1: 0}


def test_non_finite_predictions_raise_training_error() -> None:
    outputs = {"pred_logits": torch.full((1, 2, 3), float("nan")), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(TrainingError, match="diverged"):
        HungarianMatcher()(outputs, targets)


def test_all_zero_costs_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="set_cost_class"):
        HungarianMatcher(0.0, 0.0, 0.0)


def test_all_decoder_layers_in_one_transfer_match_as_each_layer_alone(monkeypatch) -> None:
    """``match_sets`` gives every layer the assignment matching that layer alone gives, and moves
    the costs of all of them to the host in one copy."""
    gen = torch.Generator().manual_seed(7)
    targets = [_random_image(gen, 6, n, 4)[2] for n in (3, 0, 6, 2)]
    layers = [
        {"pred_logits": torch.randn(4, 6, 5, generator=gen), "pred_boxes": torch.rand(4, 6, 4, generator=gen)}
        for _ in range(6)
    ]
    matcher = HungarianMatcher()
    alone = [matcher(layer, targets) for layer in layers]
    copies = {"n": 0}
    to_host = torch.Tensor.cpu

    def counted_cpu(self, *args, **kwargs):
        copies["n"] += 1
        return to_host(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    together = matcher.match_sets([(layer, targets) for layer in layers])
    assert copies["n"] == 1
    assert len(together) == len(layers)
    for one, other in zip(alone, together, strict=True):
        for (q1, t1), (q2, t2) in zip(one, other, strict=True):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)
