"""evaluate: score every trained model on the held-out test splits.

The SSL backbone: kNN and linear-probe top-1 of its frozen features beside the same trunk with
random weights. The teacher: top-1 / top-5, per-class accuracy, a confusion matrix. DETR and
Deformable DETR: COCO box AP (pycocotools), their COCO results json, figures of predicted against
true boxes, and the two side by side (AP per epoch, by object size). The DeiT students: each
head's top-1, their average, teacher agreement, attention-rollout maps.
Writes ``metrics/evaluate.json``, tables and figures under ``plots/evaluate/``, each classifier's
class per test image (``artifacts/evaluate/test_predictions.csv``: the report's paired bootstrap
reads it, with the detectors' results json), and logs them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

from stages import paths
from stages.common import StageContext, stage_main
from vitkit.data.datasets import load_imagefolder
from vitkit.engine.checkpoint import load_weights
from vitkit.evaluation.classification import prediction_table
from vitkit.evaluation.detection import FINAL_COLUMNS
from vitkit.io import write_csv, write_json
from vitkit.losses.distillation import DISTILLATION_TYPES
from vitkit.tasks.classifier import evaluate_classifier, load_classifier
from vitkit.tasks.contrastive import evaluate_backbone
from vitkit.tasks.detection import DETECTORS, compare_detectors, evaluate_detector
from vitkit.tasks.distillation import evaluate_student


def run(ctx: StageContext) -> dict[str, float]:
    out, device, batch = ctx.out, ctx.device, ctx.params.evaluate.batch_size

    def plot(name: str) -> Path:
        return ctx.path(out.plot(name))

    cache_mb = ctx.params.data.cache_mb
    train, test = (load_imagefolder(ctx.path(paths.CLASSIFICATION / s), cache_mb) for s in ("train", "test"))
    state, meta = load_weights(ctx.path(paths.SSL.model))
    knn, seed = ctx.params.ssl.knn, ctx.params.seed
    ssl, predictions = evaluate_backbone(state, meta, train, test, knn, seed, device, batch)
    write_csv(plot("ssl_vs_random.csv"), pd.DataFrame(ssl).T.rename_axis("backbone").reset_index())

    teacher_model = load_classifier(*load_weights(ctx.path(paths.TEACHER.model)))
    figures = plot("teacher_confusion.png"), plot("teacher_per_class.csv")
    teacher, teacher_logits = evaluate_classifier(teacher_model, test, device, batch, *figures)
    predictions["teacher"] = teacher_logits.argmax(dim=1)

    finals, histories = {}, {}
    for arch in DETECTORS:
        trained = paths.stage_paths("train_detr", arch)
        outputs = ctx.path(paths.detector_results(arch)), plot(f"{arch}_detections.png")
        test_dir = ctx.path(paths.DETECTION / "test")
        finals[arch] = evaluate_detector(
            *load_weights(ctx.path(trained.model)), test_dir, device, batch, *outputs
        )
        histories[arch] = pd.read_csv(ctx.path(trained.history))
    figures = plot("detection_comparison.csv"), plot("detection_comparison.png")
    detection = compare_detectors(histories, finals, *figures)

    # a few test images spread over the (class-sorted) split, so several classes show
    shown = torch.linspace(0, len(test.images) - 1, ctx.params.evaluate.attention_images).round().long()
    deit = {"teacher": {"cls_top1": None, "dist_top1": None, "avg_top1": teacher["top1"]}}
    deit["teacher"]["teacher_agreement"] = 1.0
    for mode in DISTILLATION_TYPES:
        student = load_weights(ctx.path(paths.stage_paths("distill_deit", mode).model))
        figure = plot(f"deit_{mode}_attention.png")
        deit[mode], predictions[f"deit_{mode}"] = evaluate_student(
            *student, test, teacher_logits, device, batch, shown, figure
        )
    write_csv(plot("deit_heads.csv"), pd.DataFrame([{"model": k, **row} for k, row in deit.items()]))
    table = prediction_table(test.names, test.labels, test.classes, predictions)
    write_csv(ctx.path(paths.TEST_PREDICTIONS), table)

    teacher = {k: teacher[k] for k in ("top1", "top5", "per_class")}
    report = {
        "ssl": ssl | {"method": meta["method"]},
        "teacher": teacher,
        "detection": detection,
        "deit": deit,
    }
    write_json(ctx.path(out.metrics), report)
    flat = {"teacher_top1": teacher["top1"], "teacher_top5": teacher["top5"]}
    flat |= {f"{name}_{k}": v for name, row in ssl.items() for k, v in row.items()}
    flat |= {f"teacher_acc_{name}": acc for name, acc in teacher["per_class"].items()}
    flat |= {f"{a}_test_{k}": v for a, row in detection.items() for k, v in row.items() if k in FINAL_COLUMNS}
    flat |= {f"deit_{m}_{k}": v for m, row in deit.items() for k, v in row.items() if m != "teacher"}
    ctx.run.log_metrics(flat)
    for path in sorted(ctx.path(out.plots).iterdir()):
        ctx.run.log_artifact(path, "figures" if path.suffix == ".png" else None)
    return flat


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", __doc__, run))
