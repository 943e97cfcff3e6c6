"""DETR learns: model, Hungarian matcher, set criterion and post-processing, trained together.

DETR on the default data stays on its known long plateau within the CPU budget (README), so the
stage's AP cannot show that the parts fit. Overfitting a handful of images can: if the matcher,
the loss or the box format were wrong, the detections scored by COCOeval would not converge.
"""

from __future__ import annotations

import pytest
import torch

from vitkit.data.datasets import CocoDetection
from vitkit.data.detection_transforms import eval_transforms
from vitkit.data.shapes import SHAPE_CLASSES, generate_detection
from vitkit.evaluation.coco import evaluate_coco
from vitkit.evaluation.detection import predict_coco
from vitkit.models.detr import (
    DETRConfig,
    PostProcess,
    build_criterion,
    build_detr,
    nested_tensor_from_images,
    param_groups,
)

IMAGES, BATCH, STEPS = 8, 4, 1200


@pytest.mark.slow
def test_detr_overfits_a_few_images(tmp_path):
    torch.manual_seed(0)
    generate_detection(
        tmp_path, SHAPE_CLASSES, {"train": IMAGES}, image_size=64, min_objects=1, max_objects=3,
        min_object_size=16, max_object_size=40, seed=0, workers=1, progress=False,
    )  # fmt: skip
    dataset = CocoDetection(tmp_path / "train", eval_transforms(None))
    samples = [dataset[i] for i in range(len(dataset))]
    cfg = DETRConfig.paper(
        len(SHAPE_CLASSES) + 1, return_layer="layer3", hidden_dim=64, nheads=4, enc_layers=1,
        dec_layers=2, dim_feedforward=128, dropout=0.0, num_queries=8,
    )  # fmt: skip
    model, criterion = build_detr(cfg), build_criterion(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 2e-4, 2e-4, 1e-4), lr=2e-4, weight_decay=1e-4)
    model.train()
    step_losses = []
    for _ in range(STEPS):
        batch = [samples[i] for i in torch.randperm(IMAGES)[:BATCH]]
        targets = [{"labels": t["labels"], "boxes": t["boxes"]} for _, t in batch]
        losses = criterion(model(nested_tensor_from_images([image for image, _ in batch])), targets)
        loss = criterion.weighted_sum(losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        step_losses.append(loss.item())
    first_loss, last_loss = step_losses[0], step_losses[-1]
    _, results = predict_coco(model, dataset, PostProcess(top_k=cfg.num_queries), torch.device("cpu"), IMAGES)
    metrics = evaluate_coco(dataset.coco, results)
    assert last_loss < first_loss / 4, (first_loss, last_loss)
    assert metrics["AP50"] >= 0.8, metrics
