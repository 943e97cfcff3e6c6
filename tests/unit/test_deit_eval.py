"""Scoring a DeiT student head by head, against direct computations."""

from __future__ import annotations

import pytest
import torch

from vitkit.evaluation.deit import head_scores, predict_heads
from vitkit.models.vit import build_vit, preset


def test_head_scores_count_hits_of_each_head_their_mean_and_the_teacher():
    labels = torch.tensor([0, 1, 2, 0])
    cls = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 1], [0, 1, 0]])  # right, right, right, wrong
    dist = torch.tensor([[1.0, 0, 0], [5, 0, 0], [0, 4, 0], [0, 0, 2]])  # right, wrong, wrong, wrong
    # their mean: [2,0,0] right, [2.5,1.5,0] wrong, [0,2,.5] wrong, [0,.5,1] wrong
    teacher = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    scores = head_scores(cls, dist, labels, teacher)
    assert scores == {
        "cls_top1": 0.75,
        "dist_top1": 0.25,
        "avg_top1": 0.25,
        "teacher_agreement": 1.0,  # the mean's argmax is the teacher's on every image
    }
    plain = head_scores(cls, None, labels)
    assert plain == {"cls_top1": 0.75, "dist_top1": None, "avg_top1": 0.75}


@pytest.mark.parametrize("distilled", [True, False])
def test_predict_heads_are_the_models_heads_in_eval_mode(distilled):
    torch.manual_seed(0)
    model = build_vit(preset("cpu_tiny", depth=1, num_classes=4, distilled=distilled)).train()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    transform = lambda x: x.float() / 255  # noqa: E731
    cls, dist = predict_heads(model, images, transform, torch.device("cpu"), batch_size=2)
    assert not model.training
    with torch.no_grad():
        if distilled:
            ref_cls, ref_dist = model.forward_heads(transform(images))
            torch.testing.assert_close(dist, ref_dist)
            torch.testing.assert_close((cls + dist) / 2, model(transform(images)))
        else:
            ref_cls = model(transform(images))
            assert dist is None
    torch.testing.assert_close(cls, ref_cls)
