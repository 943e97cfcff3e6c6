"""distill_deit: a ViT student learns from the CNN teacher through a distillation token (DeiT).

    python -m stages.distill_deit {none,soft,hard}

none: a plain ViT (class token only) trained on the labels, DeiT's baseline;
soft: a distillation token whose head matches the teacher's softened outputs (KL at temperature tau);
hard: the distillation head learns the teacher's argmax, half and half with the class head's labels.

DeiT's recipe with the ``deit`` params: RandAugment, random erasing, MixUp/CutMix with label
smoothing, repeated augmentation, optional weights EMA, lr scaled by batch/512, warmup + cosine.
The frozen teacher (``artifacts/teacher/model.pt``, eval mode, no grad) sees exactly the
student's augmented and mixed batch, once per batch. Writes ``artifacts/deit/<mode>/model.pt``,
``metrics/deit/<mode>.json`` and ``plots/deit/<mode>/``; checkpoints in ``checkpoints/deit/<mode>``
(a killed run resumes there). Run with ``engine.nproc > 1`` to train under torchrun (DDP).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from stages.common import StageContext, file_digest, fingerprint, stage_main, trainer_config
from vitkit.config import DeitParams
from vitkit.data.datasets import TensorImageDataset, load_imagefolder_tensors
from vitkit.data.deit_transforms import (
    DeiTAugConfig,
    build_batch_mixer,
    build_deit_train_transform,
    build_eval_transform,
    build_model_ema,
)
from vitkit.engine.checkpoint import load_weights, save_weights
from vitkit.engine.trainer import Trainer
from vitkit.errors import DataError
from vitkit.evaluation.classification import plot_history
from vitkit.evaluation.deit import head_scores, predict_heads
from vitkit.io import atomic_path, write_json
from vitkit.losses.distillation import DISTILLATION_TYPES, DistillationLoss, build_base_criterion
from vitkit.models.resnet import build_resnet
from vitkit.models.vit import ViTConfig, build_vit, optimizer_param_groups, preset

TEACHER_WEIGHTS = "artifacts/teacher/model.pt"


def vit_config(p: DeitParams, image_size: int, num_classes: int, distilled: bool) -> ViTConfig:
    """The ``deit.preset`` at the data's image size, with the params' explicit sizes replacing its own."""
    sizes = {k: getattr(p, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    return preset(
        p.preset,
        img_size=image_size,
        num_classes=num_classes,
        drop_path_rate=p.drop_path,
        distilled=distilled,
        **{k: v for k, v in sizes.items() if v is not None},
    )


def load_teacher(path: Path, classes: list[str], device: torch.device) -> tuple[nn.Module, str]:
    """The frozen teacher and a digest of its weights file (a new teacher invalidates checkpoints)."""
    state, meta = load_weights(path)
    if meta["classes"] != classes:
        raise DataError(
            f"{path} was trained on classes {meta['classes']} but data/classification has {classes}; "
            "rerun train_teacher on this data (dvc repro)"
        )
    teacher = build_resnet(meta["arch"], num_classes=len(classes), stem=meta["stem"])
    teacher.load_state_dict(state)
    digest = file_digest(Path(path))
    return teacher.to(device).eval().requires_grad_(False), digest


def run(ctx: StageContext) -> dict[str, float]:
    mode, p = ctx.variant, ctx.params.deit
    # the model's shape is checked before any data is read; image size and classes come from the data
    config = vit_config(p, ctx.params.data.classification.image_size, 1, distilled=mode != "none")
    data_dir = ctx.path("data/classification")
    train_images, train_labels, classes = load_imagefolder_tensors(data_dir / "train")
    val_images, val_labels, _ = load_imagefolder_tensors(data_dir / "val")
    image_size = train_images.shape[-1]
    aug = DeiTAugConfig(
        img_size=image_size,
        crop_scale=(p.crop_scale, 1.0),
        randaug_num_ops=p.randaug_ops,
        randaug_magnitude=p.randaug_magnitude,
        reprob=p.random_erasing,
    )
    dataset = TensorImageDataset(train_images, train_labels, build_deit_train_transform(aug))
    eval_transform = build_eval_transform(image_size, aug.mean, aug.std)

    config = dataclasses.replace(config, img_size=image_size, num_classes=len(classes))
    model = build_vit(config).to(ctx.device)
    teacher, teacher_digest = None, ""
    if mode != "none":
        teacher, teacher_digest = load_teacher(ctx.path(TEACHER_WEIGHTS), classes, ctx.device)
    mixer = build_batch_mixer(len(classes), p.mixup, p.cutmix, p.label_smoothing)
    # the mixer always hands over probability targets (smoothed, maybe mixed): no second smoothing
    criterion = DistillationLoss(build_base_criterion(p.label_smoothing, True), teacher, mode, p.alpha, p.tau)
    ema = build_model_ema(model, p.ema_decay) if p.ema_decay > 0 else None

    def step(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        images, targets = mixer(images, labels)
        return criterion(images, net(images), targets)

    def evaluated(net: nn.Module) -> nn.Module:
        return ema.module if ema is not None else net

    def validate(net: nn.Module) -> dict[str, float]:
        net = evaluated(net)
        cls_logits, dist_logits = predict_heads(
            net, val_images, eval_transform, ctx.device, ctx.params.evaluate.batch_size
        )
        scores = head_scores(cls_logits, dist_logits, val_labels)
        return {f"val_{k}": v for k, v in scores.items() if v is not None}

    ema_hooks: dict[str, Any] = {}
    if ema is not None:
        ema_hooks = {
            "after_step": lambda net: ema.update_parameters(net),
            "extra_state": lambda: {"ema": ema.state_dict()},
            "load_extra_state": lambda state: ema.load_state_dict(state["ema"]),
        }
    cfg = trainer_config(
        ctx,
        p,
        f"deit {mode}",
        fingerprint(p, ctx.params.seed, len(dataset), mode, teacher_digest),
        lr=p.lr * p.batch_size / 512,  # DeiT's linear scaling rule
        repeated_augmentations=p.repeated_aug,
    )
    trainer = Trainer(
        model,
        dataset,
        step,
        cfg,
        ctx.device,
        ctx.dist,
        ctx.path(f"checkpoints/deit/{mode}"),
        param_groups=optimizer_param_groups(model, p.weight_decay),
        eval_fn=validate,
        on_epoch_end=ctx.run.log_epoch,
        **ema_hooks,
    )
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.is_main:
        return {}

    final_model = evaluated(trainer.model)
    meta = {
        "mode": mode,
        "classes": classes,
        "image_size": image_size,
        "vit": dataclasses.asdict(config),
        "ema": ema is not None,
    }
    weights = ctx.path(f"artifacts/deit/{mode}/model.pt")
    save_weights(weights, final_model.state_dict(), meta)
    history_csv = ctx.path(f"plots/deit/{mode}/history.csv")
    with atomic_path(history_csv) as tmp:
        history.to_csv(tmp, index=False)
    curves = ctx.path(f"plots/deit/{mode}/curves.png")
    columns = ["train_loss", "val_cls_top1", "val_dist_top1", "val_avg_top1", "images_per_s"]
    plot_history(history, columns, f"DeiT student, distillation {mode}", curves)
    final = history.iloc[-1]
    metrics = {k: float(final[k]) for k in ("val_cls_top1", "val_dist_top1", "val_avg_top1") if k in final}
    metrics |= {
        "parameters": sum(t.numel() for t in final_model.parameters()),
        "train_images": len(dataset),
        "train_time_s": float(history["epoch_time_s"].sum()),
        "images_per_s": float(history["images_per_s"].median()),
    }
    write_json(ctx.path(f"metrics/deit/{mode}.json"), metrics)

    ctx.run.log_artifact(weights, "weights")
    ctx.run.log_artifact(history_csv)
    ctx.run.log_artifact(curves, "figures")
    example = eval_transform(val_images[:2]).numpy()
    ctx.run.log_model(final_model.cpu().eval(), f"deit_{mode}", example)
    return metrics


if __name__ == "__main__":
    sys.exit(
        stage_main(
            "distill_deit",
            __doc__,
            run,
            distributed=True,
            variants=DISTILLATION_TYPES,
        )
    )
