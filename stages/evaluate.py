"""evaluate: score every trained model on the held-out test split.

For the teacher: top-1 / top-5, per-class accuracy and a confusion matrix.
Writes ``metrics/evaluate.json`` (DVC metrics), per-class tables under
``plots/evaluate/`` and figures, and logs the same to MLflow.
"""

from __future__ import annotations

import sys

from stages.common import StageContext, stage_main
from vitkit.data.datasets import load_imagefolder_tensors
from vitkit.data.transforms import eval_transform
from vitkit.engine.checkpoint import load_weights
from vitkit.evaluation.classification import (
    classification_report,
    per_class_table,
    plot_confusion,
    predict_logits,
)
from vitkit.io import atomic_path, write_json
from vitkit.models.resnet import build_resnet


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


def run(ctx: StageContext) -> dict[str, float]:
    teacher = evaluate_teacher(ctx)
    metrics = {"teacher": {k: teacher[k] for k in ("top1", "top5", "per_class")}}
    write_json(ctx.path("metrics/evaluate.json"), metrics)
    flat = {"teacher_top1": teacher["top1"], "teacher_top5": teacher["top5"]}
    flat.update({f"teacher_acc_{name}": acc for name, acc in teacher["per_class"].items()})
    ctx.run.log_metrics(flat)
    return flat


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", __doc__, run))
