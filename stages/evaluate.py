"""evaluate: score every trained model on the held-out test split.

For the SSL backbone: kNN and linear-probe top-1 of its frozen features, next
to the same backbone with random weights. For the teacher: top-1 / top-5,
per-class accuracy and a confusion matrix.
Writes ``metrics/evaluate.json`` (DVC metrics), per-class tables under
``plots/evaluate/`` and figures, and logs the same to MLflow.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch
from torch import nn

from stages.common import StageContext, stage_main
from vitkit.data.datasets import load_imagefolder_tensors
from vitkit.data.ssl_transforms import SSLAugConfig, normalize_transform
from vitkit.data.transforms import eval_transform
from vitkit.engine.checkpoint import load_weights
from vitkit.evaluation.classification import (
    classification_report,
    per_class_table,
    plot_confusion,
    predict_logits,
)
from vitkit.evaluation.knn import extract_features, knn_accuracy
from vitkit.evaluation.linear_probe import linear_probe
from vitkit.io import atomic_path, write_json
from vitkit.models.resnet import build_resnet, load_backbone


def evaluate_teacher(ctx: StageContext) -> dict:
    state, meta = load_weights(ctx.path("artifacts/teacher/model.pt"))
    model = build_resnet(meta["arch"], num_classes=len(meta["classes"]), stem=meta["stem"])
    model.load_state_dict(state)
    model.to(ctx.device)
    images, labels, classes = load_imagefolder_tensors(ctx.path("data/classification/test"))
    logits = predict_logits(model, images, eval_transform(), ctx.device, ctx.params.evaluate.batch_size)
    report = classification_report(logits, labels, classes)

    figure = ctx.path("plots/evaluate/teacher_confusion.png")
    plot_confusion(report["confusion"], classes, f"teacher (test top-1 {report['top1']:.3f})", figure)
    table = ctx.path("plots/evaluate/teacher_per_class.csv")
    with atomic_path(table) as tmp:
        per_class_table(report).to_csv(tmp, index=False)
    ctx.run.log_artifact(figure, "figures")
    ctx.run.log_artifact(table)
    return report


def evaluate_ssl(ctx: StageContext) -> dict[str, dict[str, float]]:
    """kNN and linear-probe test top-1 of the frozen SSL backbone and of a randomly initialised twin.

    Both read features of ``data/classification/train`` (kNN memory, probe
    training set) and are scored on ``data/classification/test``.
    """
    state, meta = load_weights(ctx.path("artifacts/ssl/backbone.pt"))
    train_images, train_labels, classes = load_imagefolder_tensors(ctx.path("data/classification/train"))
    test_images, test_labels, _ = load_imagefolder_tensors(ctx.path("data/classification/test"))
    knn = ctx.params.ssl.knn
    normalize = normalize_transform(SSLAugConfig.mean, SSLAugConfig.std)
    rows = {}
    for name, weights in (("ssl", state), ("random_init", None)):
        torch.manual_seed(ctx.params.seed)
        net = build_resnet(meta["arch"], num_classes=1, stem=meta["stem"])
        net.fc = nn.Identity()
        if weights is not None:
            load_backbone(net, weights)
        net.to(ctx.device)
        train_feats, test_feats = (
            extract_features(net, images, ctx.params.evaluate.batch_size, normalize)
            for images in (train_images, test_images)
        )
        rows[name] = {
            "knn_top1": knn_accuracy(
                train_feats, train_labels, test_feats, test_labels, len(classes), knn.k, knn.temperature
            ),
            "linear_probe_top1": linear_probe(
                train_feats, train_labels, test_feats, test_labels, len(classes), seed=ctx.params.seed
            ),
        }
    table = ctx.path("plots/evaluate/ssl_vs_random.csv")
    with atomic_path(table) as tmp:
        pd.DataFrame(rows).T.rename_axis("backbone").reset_index().to_csv(tmp, index=False)
    ctx.run.log_artifact(table)
    return {**rows, "method": meta["method"]}


def run(ctx: StageContext) -> dict[str, float]:
    ssl = evaluate_ssl(ctx)
    teacher = evaluate_teacher(ctx)
    metrics = {"ssl": ssl, "teacher": {k: teacher[k] for k in ("top1", "top5", "per_class")}}
    write_json(ctx.path("metrics/evaluate.json"), metrics)
    flat = {"teacher_top1": teacher["top1"], "teacher_top5": teacher["top5"]}
    flat.update({f"ssl_{k}": v for k, v in ssl["ssl"].items()})
    flat.update({f"random_init_{k}": v for k, v in ssl["random_init"].items()})
    flat.update({f"teacher_acc_{name}": acc for name, acc in teacher["per_class"].items()})
    ctx.run.log_metrics(flat)
    return flat


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", __doc__, run))
