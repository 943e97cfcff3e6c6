"""pretrain_ssl: contrastive pretraining of the backbone on the unlabelled pool (MoCo v2 or SimCLR).

Trains the ``backbone`` ResNet on two augmented views of every image of
``data/unlabeled`` (``ssl.method``), monitors the representation with a
weighted kNN classifier on the labelled classification split, and writes the
trunk's weights to ``artifacts/ssl/backbone.pt``: what ``train_teacher`` and
``train_detr`` start from when their ``init`` is ``ssl``. Checkpoints go to
``checkpoints/ssl`` (a persistent DVC output): a killed run resumes from there.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch
from torch import nn

from stages.common import StageContext, fingerprint, stage_main, trainer_config
from vitkit.config import SSLParams
from vitkit.data.datasets import load_image_dir_tensors, load_imagefolder_tensors
from vitkit.data.ssl_transforms import (
    SSLAugConfig,
    TwoViewDataset,
    TwoViews,
    build_ssl_transform,
    normalize_transform,
    plot_view_pairs,
)
from vitkit.engine.checkpoint import save_weights
from vitkit.engine.trainer import Trainer
from vitkit.evaluation.classification import plot_history
from vitkit.evaluation.knn import extract_features, knn_accuracy
from vitkit.io import atomic_path, write_json
from vitkit.models.resnet import backbone_state_dict
from vitkit.models.ssl import SSLConfig, build_ssl_model


def ssl_config(p: SSLParams) -> SSLConfig:
    return SSLConfig(
        method=p.method,
        proj_dim=p.proj_dim,
        hidden_dim=p.hidden_dim,
        temperature=p.temperature,
        queue_size=p.queue_size,
        momentum=p.momentum,
        bn_splits=p.bn_splits,
    )


def augmentation_config(p: SSLParams, image_size: int) -> SSLAugConfig:
    aug = p.augmentation
    return SSLAugConfig(
        size=image_size,
        crop_scale=aug.crop_scale,
        jitter=aug.jitter,
        hue=aug.hue,
        jitter_p=aug.jitter_p,
        grayscale_p=aug.grayscale_p,
        blur_p=aug.blur_p,
    )


def run(ctx: StageContext) -> dict[str, float]:
    p, backbone = ctx.params.ssl, ctx.params.backbone
    unlabeled = load_image_dir_tensors(ctx.path("data/unlabeled/images"))
    knn_train, knn_train_labels, classes = load_imagefolder_tensors(ctx.path("data/classification/train"))
    knn_val, knn_val_labels, _ = load_imagefolder_tensors(ctx.path("data/classification/val"))
    aug = augmentation_config(p, unlabeled.shape[-1])
    two_views = TwoViews(build_ssl_transform(aug))
    normalize = normalize_transform(aug.mean, aug.std)
    model = build_ssl_model(ssl_config(p), backbone.arch, backbone.stem)

    # MoCo's pretext accuracy (is the positive key the top logit?), counted over each epoch: the
    # earliest sign that the encoders learn, long before the kNN monitor moves (MoCo starts slowly)
    pretext = torch.zeros(2, device=ctx.device)  # correct, seen; on the device: no sync per step

    def step(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = net(*batch)
        if not isinstance(out, tuple):
            return out
        loss, logits, labels = out
        pretext[0] += (logits.detach().argmax(1) == labels).sum()
        pretext[1] += len(labels)
        return loss

    def knn_top1(net: nn.Module) -> float:
        features = [
            extract_features(net.backbone, images, ctx.params.evaluate.batch_size, normalize)
            for images in (knn_train, knn_val)
        ]
        return knn_accuracy(
            features[0],
            knn_train_labels,
            features[1],
            knn_val_labels,
            len(classes),
            p.knn.k,
            p.knn.temperature,
        )

    def monitor(net: nn.Module) -> dict[str, float]:
        row = {}
        if pretext[1] > 0:
            row["pretext_top1"] = float(pretext[0] / pretext[1])
            pretext.zero_()
        epoch = len(trainer.state.history) + 1
        if epoch % p.knn.every_epochs and epoch != p.epochs:
            return {**row, "knn_top1": float("nan")}
        return {**row, "knn_top1": knn_top1(net)}

    random_init_knn = knn_top1(model) if ctx.dist.is_main else float("nan")
    cfg = trainer_config(ctx, p, f"ssl {p.method}", fingerprint(p, backbone, ctx.params.seed, len(unlabeled)))
    trainer = Trainer(
        model,
        TwoViewDataset(unlabeled, two_views),
        step,
        cfg,
        ctx.device,
        ctx.dist,
        ctx.path("checkpoints/ssl"),
        eval_fn=monitor,
        on_epoch_end=ctx.run.log_epoch,
    )
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.is_main:
        return {}

    meta = {"arch": backbone.arch, "stem": backbone.stem, "method": p.method, "image_size": aug.size}
    weights = ctx.path("artifacts/ssl/backbone.pt")
    save_weights(weights, backbone_state_dict(trainer.model.backbone), meta)
    history_csv = ctx.path("plots/ssl/history.csv")
    with atomic_path(history_csv) as tmp:
        history.to_csv(tmp, index=False)
    curves = ctx.path("plots/ssl/curves.png")
    curve_columns = [c for c in ("train_loss", "pretext_top1", "knn_top1", "images_per_s") if c in history]
    plot_history(history, curve_columns, f"{p.method} pretraining", curves)
    views = ctx.path("plots/ssl/view_pairs.png")
    plot_view_pairs(unlabeled[:8], two_views, views)

    metrics = {
        "knn_top1": float(history["knn_top1"].iloc[-1]),
        "random_init_knn_top1": random_init_knn,
        "train_loss": float(history["train_loss"].iloc[-1]),
        **({"pretext_top1": float(history["pretext_top1"].iloc[-1])} if "pretext_top1" in history else {}),
        "train_images": len(unlabeled),
        "train_time_s": float(history["epoch_time_s"].sum()),
        "images_per_s": float(history["images_per_s"].median()),
    }
    write_json(ctx.path("metrics/ssl.json"), metrics)
    ctx.run.log_metrics({"random_init_knn_top1": random_init_knn})
    ctx.run.log_artifact(weights, "weights")
    ctx.run.log_artifact(history_csv)
    for figure in (curves, views):
        ctx.run.log_artifact(figure, "figures")
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("pretrain_ssl", __doc__, run, distributed=True))
