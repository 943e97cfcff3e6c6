"""evaluate: score every trained model on the held-out test split.

For the teacher: top-1 / top-5, per-class accuracy and a confusion matrix.
For the DeiT students (none / soft / hard): top-1 of the class head, of the
distillation head and of their average, agreement with the teacher, one table
beside the teacher, and attention-rollout maps of the class and distillation
tokens on sample test images.
Writes ``metrics/evaluate.json`` (DVC metrics), per-class tables under
``plots/evaluate/`` and figures, and logs the same to MLflow.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch

from stages.common import StageContext, stage_main
from vitkit.data.datasets import load_imagefolder_tensors
from vitkit.data.deit_transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from vitkit.data.transforms import eval_transform
from vitkit.engine.checkpoint import load_weights
from vitkit.evaluation.attention import save_attention_figure, token_attention_maps
from vitkit.evaluation.classification import (
    classification_report,
    per_class_table,
    plot_confusion,
    predict_logits,
    topk_accuracy,
)
from vitkit.evaluation.deit import head_scores, predict_heads
from vitkit.io import atomic_path, write_json
from vitkit.losses.distillation import DISTILLATION_TYPES
from vitkit.models.resnet import build_resnet
from vitkit.models.vit import ViTConfig, build_vit


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


def evaluate_deit(ctx: StageContext) -> dict[str, dict[str, float | None]]:
    """Each DeiT student head by head, beside the teacher; attention maps of its tokens."""
    state, meta = load_weights(ctx.path("artifacts/teacher/model.pt"))
    teacher = build_resnet(meta["arch"], num_classes=len(meta["classes"]), stem=meta["stem"])
    teacher.load_state_dict(state)
    images, labels, classes = load_imagefolder_tensors(ctx.path("data/classification/test"))
    batch_size = ctx.params.evaluate.batch_size
    teacher_logits = predict_logits(teacher.to(ctx.device), images, eval_transform(), ctx.device, batch_size)
    table: dict[str, dict[str, float | None]] = {
        "teacher": {
            "cls_top1": None,
            "dist_top1": None,
            "avg_top1": topk_accuracy(teacher_logits, labels, 1),
            "teacher_agreement": 1.0,
        }
    }
    # a few test images spread over the (class-sorted) split, so several classes show
    shown = torch.linspace(0, len(images) - 1, ctx.params.evaluate.attention_images).round().long()
    for mode in DISTILLATION_TYPES:
        state, meta = load_weights(ctx.path(f"artifacts/deit/{mode}/model.pt"))
        model = build_vit(ViTConfig(**meta["vit"]))
        model.load_state_dict(state)
        model.to(ctx.device)
        transform = build_eval_transform(meta["image_size"], IMAGENET_MEAN, IMAGENET_STD)
        cls_logits, dist_logits = predict_heads(model, images, transform, ctx.device, batch_size)
        table[mode] = head_scores(cls_logits, dist_logits, labels, teacher_logits)
        inputs = transform(images[shown]).to(ctx.device)
        predicted = (cls_logits if dist_logits is None else cls_logits + dist_logits)[shown].argmax(1)
        titles = [f"{classes[t]} -> {classes[p]}" for t, p in zip(labels[shown], predicted, strict=True)]
        figure = save_attention_figure(
            inputs,
            token_attention_maps(model, inputs),
            ctx.path(f"plots/evaluate/deit_{mode}_attention.png"),
            IMAGENET_MEAN,
            IMAGENET_STD,
            titles,
        )
        ctx.run.log_artifact(figure, "figures")
    csv = ctx.path("plots/evaluate/deit_heads.csv")
    with atomic_path(csv) as tmp:
        pd.DataFrame([{"model": name, **row} for name, row in table.items()]).to_csv(tmp, index=False)
    ctx.run.log_artifact(csv)
    ctx.run.log_metrics(
        {f"deit_{name}_{k}": v for name, row in table.items() for k, v in row.items() if name != "teacher"}
    )
    return table


def run(ctx: StageContext) -> dict[str, float]:
    teacher = evaluate_teacher(ctx)
    metrics = {"teacher": {k: teacher[k] for k in ("top1", "top5", "per_class")}}
    metrics["deit"] = evaluate_deit(ctx)
    write_json(ctx.path("metrics/evaluate.json"), metrics)
    flat = {"teacher_top1": teacher["top1"], "teacher_top5": teacher["top5"]}
    flat.update({f"teacher_acc_{name}": acc for name, acc in teacher["per_class"].items()})
    ctx.run.log_metrics(flat)
    return flat


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", __doc__, run))
