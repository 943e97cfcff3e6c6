"""train_teacher: the supervised CNN teacher (a torchvision ResNet, ``backbone`` params).

Starts from the self-supervised backbone of ``pretrain_ssl`` (``teacher.init:
ssl``) or from random weights (``scratch``), trains on
``data/classification/train`` (optionally a stratified fraction of its labels,
``teacher.label_fraction``) with transforms v2 augmentation through the shared engine, checks
validation top-1 every epoch, and writes ``artifacts/teacher/model.pt``.
Checkpoints go to ``checkpoints/teacher`` (a persistent DVC output): a killed
run resumes from there. Run with ``engine.nproc > 1`` to train under torchrun (DDP).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.common import StageContext, file_digest, fingerprint, stage_main, trainer_config
from vitkit.data.datasets import TensorImageDataset, load_imagefolder_tensors
from vitkit.data.transforms import eval_transform, train_transform
from vitkit.engine.checkpoint import load_weights, save_weights
from vitkit.engine.trainer import Trainer
from vitkit.errors import ConfigError
from vitkit.evaluation.classification import plot_history, predict_logits, topk_accuracy
from vitkit.io import atomic_path, write_json
from vitkit.models.resnet import build_resnet, load_backbone


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``fraction`` of each class (at least one per class), drawn with ``seed``."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values


def load_ssl_backbone(model: nn.Module, weights: Path) -> None:
    """Initialise ``model``'s trunk from pretrain_ssl's backbone; a mismatched arch/stem is a ConfigError."""
    if not weights.is_file():
        raise ConfigError(f"teacher.init is 'ssl' but {weights} does not exist; run pretrain_ssl first")
    state, meta = load_weights(weights)
    try:
        load_backbone(model, state)
    except ValueError as exc:
        raise ConfigError(
            f"{weights} (a {meta.get('arch')}/{meta.get('stem')} backbone) does not fit the backbone params: "
            f"{exc}. Rerun pretrain_ssl with the same backbone params, or set teacher.init: scratch"
        ) from None


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.teacher
    data_dir = ctx.path("data/classification")
    train_images, train_labels, classes = load_imagefolder_tensors(data_dir / "train")
    val_images, val_labels, _ = load_imagefolder_tensors(data_dir / "val")
    subset = stratified_subset(train_labels, p.label_fraction, ctx.params.seed)
    image_size = train_images.shape[-1]
    dataset = TensorImageDataset(train_images[subset], train_labels[subset], train_transform(image_size))

    backbone = ctx.params.backbone
    model = build_resnet(backbone.arch, num_classes=len(classes), stem=backbone.stem)
    init_from = None
    if p.init == "ssl":
        init_from = ctx.path("artifacts/ssl/backbone.pt")
        load_ssl_backbone(model, init_from)
    label_smoothing = p.label_smoothing

    def step(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(net(images), labels, label_smoothing=label_smoothing)

    def validate(net: nn.Module) -> dict[str, float]:
        logits = predict_logits(net, val_images, eval_transform(), ctx.device, ctx.params.evaluate.batch_size)
        return {"val_top1": topk_accuracy(logits, val_labels, 1)}

    cfg = trainer_config(
        ctx,
        p,
        "teacher",
        # a checkpoint resumes only the same run: same params, data size and starting weights
        fingerprint(p, backbone, ctx.params.seed, len(dataset), file_digest(init_from)),
    )
    trainer = Trainer(
        model,
        dataset,
        step,
        cfg,
        ctx.device,
        ctx.dist,
        ctx.path("checkpoints/teacher"),
        eval_fn=validate,
        on_epoch_end=ctx.run.log_epoch,
    )
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.is_main:
        return {}

    meta = {
        "arch": backbone.arch,
        "stem": backbone.stem,
        "classes": classes,
        "image_size": image_size,
        "init": p.init,
    }
    weights = ctx.path("artifacts/teacher/model.pt")
    save_weights(weights, trainer.model.state_dict(), meta)
    history_csv = ctx.path("plots/teacher/history.csv")
    with atomic_path(history_csv) as tmp:
        history.to_csv(tmp, index=False)
    curves = ctx.path("plots/teacher/curves.png")
    plot_history(history, ["train_loss", "val_top1", "images_per_s"], "teacher training", curves)
    final = history.iloc[-1]
    metrics = {
        "val_top1": float(final["val_top1"]),
        "first_epoch_val_top1": float(history["val_top1"].iloc[0]),
        "train_images": len(dataset),
        "train_time_s": float(history["epoch_time_s"].sum()),
        "images_per_s": float(history["images_per_s"].median()),
    }
    write_json(ctx.path("metrics/teacher.json"), metrics)

    ctx.run.log_artifact(weights, "weights")
    ctx.run.log_artifact(history_csv)
    ctx.run.log_artifact(curves, "figures")
    example = eval_transform()(val_images[:2]).numpy()
    ctx.run.log_model(trainer.model.cpu().eval(), "teacher", example)
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("train_teacher", __doc__, run, distributed=True))
