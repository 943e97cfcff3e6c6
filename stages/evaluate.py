"""evaluate: score every trained model on the held-out test split.

For the SSL backbone: kNN and linear-probe top-1 of its frozen features, next
to the same backbone with random weights. For the teacher: top-1 / top-5,
per-class accuracy and a confusion matrix.
For DETR and Deformable DETR: COCO box AP on the detection test split
(pycocotools), their predictions as COCO results json, figures of predicted
against ground-truth boxes, and the two side by side: AP per epoch and per
training second (from their training histories) and AP by object size.
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
from torch import nn

from stages.common import StageContext, stage_main
from stages.train_detr import ARCHS, build_model, config_from_meta, postprocessor_from_meta
from vitkit.data.datasets import CocoDetection, load_imagefolder_tensors
from vitkit.data.deit_transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from vitkit.data.detection_transforms import eval_transforms
from vitkit.data.ssl_transforms import SSLAugConfig, normalize_transform
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
from vitkit.evaluation.coco import evaluate_coco, write_results_json
from vitkit.evaluation.deit import head_scores, predict_heads
from vitkit.evaluation.detection import FINAL_COLUMNS, compare_runs, plot_comparison, predict_coco
from vitkit.evaluation.detection_figures import plot_detections
from vitkit.evaluation.knn import extract_features, knn_accuracy
from vitkit.evaluation.linear_probe import linear_probe
from vitkit.io import atomic_path, write_json
from vitkit.losses.distillation import DISTILLATION_TYPES
from vitkit.models.resnet import build_resnet, load_backbone
from vitkit.models.vit import ViTConfig, build_vit

TestSplit = tuple[torch.Tensor, torch.Tensor, list[str]]  # images, labels, class names


def evaluate_teacher(ctx: StageContext, test: TestSplit) -> tuple[dict, torch.Tensor]:
    """The teacher's report (top-1/5, per class, confusion figure) and its test logits, which the
    DeiT table reuses for teacher agreement."""
    state, meta = load_weights(ctx.path("artifacts/teacher/model.pt"))
    model = build_resnet(meta["arch"], num_classes=len(meta["classes"]), stem=meta["stem"])
    model.load_state_dict(state)
    model.to(ctx.device)
    images, labels, classes = test
    logits = predict_logits(model, images, eval_transform(), ctx.device, ctx.params.evaluate.batch_size)
    report = classification_report(logits, labels, classes)

    figure = ctx.path("plots/evaluate/teacher_confusion.png")
    plot_confusion(report["confusion"], classes, f"teacher (test top-1 {report['top1']:.3f})", figure)
    table = ctx.path("plots/evaluate/teacher_per_class.csv")
    with atomic_path(table) as tmp:
        per_class_table(report).to_csv(tmp, index=False)
    ctx.run.log_artifact(figure, "figures")
    ctx.run.log_artifact(table)
    return report, logits


def evaluate_ssl(ctx: StageContext, test: TestSplit) -> dict[str, dict[str, float]]:
    """kNN and linear-probe test top-1 of the frozen SSL backbone and of a randomly initialised twin.

    Both read features of ``data/classification/train`` (kNN memory, probe
    training set) and are scored on ``data/classification/test``.
    """
    state, meta = load_weights(ctx.path("artifacts/ssl/backbone.pt"))
    train_images, train_labels, classes = load_imagefolder_tensors(ctx.path("data/classification/train"))
    test_images, test_labels, _ = test
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


FIGURE_IMAGES = 8


def evaluate_detection(ctx: StageContext) -> dict:
    """COCO AP of each ``train_detr`` variant on the test split, and their comparison table."""
    test_dir = ctx.path("data/detection/test")
    finals, histories = {}, {}
    for arch in ARCHS:
        state, meta = load_weights(ctx.path(f"artifacts/detr/{arch}/model.pt"))
        model = build_model(config_from_meta(meta), backbone_state=None)
        model.load_state_dict(state)
        model.to(ctx.device)
        test = CocoDetection(test_dir, eval_transforms(meta["eval_size"]))
        detections, results = predict_coco(
            model, test, postprocessor_from_meta(meta), ctx.device, ctx.params.evaluate.batch_size
        )
        finals[arch] = evaluate_coco(test.coco, results)
        write_results_json(results, ctx.path(f"artifacts/evaluate/{arch}_test_results.json"))

        raw = CocoDetection(test_dir)  # uint8 images at their own size, boxes in pixels
        samples = [raw[i] for i in range(min(FIGURE_IMAGES, len(raw)))]
        names = {c["id"]: c["name"] for c in raw.categories}
        figure = ctx.path(f"plots/evaluate/{arch}_detections.png")
        plot_detections(
            [image for image, _ in samples],
            [{"boxes": target["boxes"].as_subclass(torch.Tensor)} for _, target in samples],
            detections[: len(samples)],
            names,
            figure,
            score_threshold=0.3,
        )
        ctx.run.log_artifact(figure, "figures")
        histories[arch] = pd.read_csv(ctx.path(f"plots/detr/{arch}/history.csv"))

    table = compare_runs(histories, finals)
    table_csv = ctx.path("plots/evaluate/detection_comparison.csv")
    with atomic_path(table_csv) as tmp:
        table.to_csv(tmp, index=False)
    figure = ctx.path("plots/evaluate/detection_comparison.png")
    plot_comparison(histories, table, figure, "DETR vs Deformable DETR")
    ctx.run.log_artifact(table_csv)
    ctx.run.log_artifact(figure, "figures")
    rows = table.set_index("arch")
    return {arch: {k: float(v) for k, v in rows.loc[arch].items()} for arch in ARCHS}


def evaluate_deit(
    ctx: StageContext, test: TestSplit, teacher_logits: torch.Tensor
) -> dict[str, dict[str, float | None]]:
    """Each DeiT student head by head, beside the teacher; attention maps of its tokens."""
    images, labels, classes = test
    batch_size = ctx.params.evaluate.batch_size
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
    test = load_imagefolder_tensors(ctx.path("data/classification/test"))
    ssl = evaluate_ssl(ctx, test)
    teacher, teacher_logits = evaluate_teacher(ctx, test)
    detection = evaluate_detection(ctx)
    metrics = {
        "ssl": ssl,
        "teacher": {k: teacher[k] for k in ("top1", "top5", "per_class")},
        "detection": detection,
        "deit": evaluate_deit(ctx, test, teacher_logits),
    }
    write_json(ctx.path("metrics/evaluate.json"), metrics)
    flat = {"teacher_top1": teacher["top1"], "teacher_top5": teacher["top5"]}
    flat.update({f"ssl_{k}": v for k, v in ssl["ssl"].items()})
    flat.update({f"random_init_{k}": v for k, v in ssl["random_init"].items()})
    flat.update({f"teacher_acc_{name}": acc for name, acc in teacher["per_class"].items()})
    flat.update(
        {
            f"{arch}_test_{k}": v
            for arch, row in detection.items()
            for k, v in row.items()
            if k in FINAL_COLUMNS
        }
    )
    ctx.run.log_metrics(flat)
    return flat


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", __doc__, run))
