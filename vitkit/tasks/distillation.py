"""DeiT distillation as a task: a ViT student, the frozen CNN teacher, DeiT's recipe, the weights EMA.

``mode`` is ``none`` (a plain ViT on the labels, DeiT's baseline), ``soft``
(a distillation token whose head matches the teacher's softened outputs) or
``hard`` (the distillation head learns the teacher's argmax). The teacher sees
exactly the student's augmented and mixed batch, once per batch, in eval mode
and without gradients. The EMA (``deit.ema_decay`` > 0) is part of the task's
state: it is checkpointed, validated and published instead of the raw weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from vitkit.config import DeitParams
from vitkit.data.datasets import LabelledImageDataset, LabelledImages
from vitkit.data.deit_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchMixer,
    build_deit_train_transform,
    build_eval_transform,
    build_model_ema,
)
from vitkit.engine.task import TrainingTask
from vitkit.errors import DataError
from vitkit.evaluation.attention import save_attention_figure, token_attention_maps
from vitkit.evaluation.classification import predict_logits
from vitkit.evaluation.deit import deit_logits, head_scores, predict_heads
from vitkit.losses.distillation import DistillationLoss, build_base_criterion
from vitkit.models.vit import VisionTransformer, ViTConfig, build_vit, optimizer_param_groups, preset
from vitkit.tasks.classifier import load_classifier


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


def scaled_lr(p: DeitParams, world_size: int) -> float:
    """DeiT's linear scaling rule: ``deit.lr`` per 512 images of the global batch.

    As DeiT's main.py (``args.lr * args.batch_size * utils.get_world_size() / 512.0``):
    ``deit.batch_size`` is per process, so the global batch is it times the world size.
    """
    return p.lr * p.batch_size * world_size / 512


def train_dataset(train: LabelledImages, p: DeitParams, hflip: float) -> LabelledImageDataset:
    """The labelled images with DeiT's per-image augmentation (flips with probability ``hflip``,
    ``data.hflip``; RandAugment, random erasing...)."""
    return LabelledImageDataset(
        train.images, train.labels, build_deit_train_transform(p, train.images.shape[-1], hflip)
    )


def eval_transform(image_size: int) -> nn.Module:
    return build_eval_transform(image_size, IMAGENET_MEAN, IMAGENET_STD)


def load_student(state: dict[str, torch.Tensor], meta: dict) -> VisionTransformer:
    """The ViT a ``distill_deit`` model file describes (``meta["vit"]`` is its ViTConfig)."""
    model = build_vit(ViTConfig(**meta["vit"]))
    model.load_state_dict(state)
    return model


def student_predictor(
    state: dict[str, torch.Tensor], meta: dict, device: torch.device, batch_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """DeiT's prediction (the mean of both heads' logits; the class head's without distillation token)
    of a student model file for uint8 images, preprocessed as ``evaluate_student`` does."""
    model = load_student(state, meta).to(device)
    transform = eval_transform(meta["image_size"])
    return partial(predict_logits, model, transform=transform, device=device, batch_size=batch_size)


class DistillationTask(TrainingTask):
    """A DeiT student of ``p``'s size learning the labels and, unless ``mode`` is none, the teacher."""

    def __init__(
        self,
        p: DeitParams,
        mode: str,
        val: LabelledImages,
        eval_batch_size: int,
        device: torch.device,
        teacher_file: tuple[dict[str, torch.Tensor], dict] | None,
    ) -> None:
        self.p, self.mode, self.val = p, mode, val
        self.eval_batch_size, self.device = eval_batch_size, device
        image_size, classes = val.images.shape[-1], val.classes
        self.config = vit_config(p, image_size, len(classes), distilled=mode != "none")
        self.model = build_vit(self.config).to(device)
        teacher = None
        if mode != "none" and teacher_file is not None:
            state, meta = teacher_file
            if meta["classes"] != classes:
                raise DataError(
                    f"the teacher was trained on classes {meta['classes']} but the data has {classes}; "
                    "rerun train_teacher on this data (dvc repro)"
                )
            teacher = load_classifier(state, meta).to(device).eval().requires_grad_(False)
        self.mixer = BatchMixer(len(classes), p.mixup, p.cutmix, p.label_smoothing)
        # the mixer always hands over probability targets (smoothed, maybe mixed): no second smoothing
        base = build_base_criterion(p.label_smoothing, targets_are_soft=True)
        self.criterion = DistillationLoss(base, teacher, mode, p.alpha, p.tau)
        self.ema = build_model_ema(self.model, p.ema_decay) if p.ema_decay > 0 else None
        self.eval_transform = eval_transform(image_size)

    def param_groups(self) -> list[dict]:
        return optimizer_param_groups(self.model, self.p.weight_decay)

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, targets = self.mixer(images, labels)
        terms = self.criterion.terms(images, model(images), targets)
        if self.mode == "none":
            return {"loss": terms.loss}
        return {
            "loss": terms.loss,
            "base_loss": terms.base.detach(),
            "distill_loss": terms.distillation.detach(),
        }

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def final_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        cls_logits, dist_logits = predict_heads(
            self.final_model(), self.val.images, self.eval_transform, self.device, self.eval_batch_size
        )
        scores = head_scores(cls_logits, dist_logits, self.val.labels)
        return {f"val_{k}": v for k, v in scores.items() if v is not None}

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def meta(self) -> dict:
        """What a model file needs to rebuild the student (``load_student``)."""
        return {
            "mode": self.mode,
            "classes": self.val.classes,
            "image_size": self.config.img_size,
            "vit": dataclasses.asdict(self.config),
            "ema": self.ema is not None,
        }


def evaluate_student(
    state: dict[str, torch.Tensor],
    meta: dict,
    test: LabelledImages,
    teacher_logits: torch.Tensor,
    device: torch.device,
    batch_size: int,
    shown: torch.Tensor,
    figure: Path,
) -> tuple[dict[str, float | None], torch.Tensor]:
    """Each head's test top-1, their average and teacher agreement, and each test image's predicted
    class (DeiT's: the heads' average); attention maps of the ``shown`` images."""
    model = load_student(state, meta).to(device)
    transform = eval_transform(meta["image_size"])
    cls_logits, dist_logits = predict_heads(model, test.images, transform, device, batch_size)
    inputs = transform(test.images[shown]).to(device)
    predicted = deit_logits(cls_logits, dist_logits).argmax(dim=1)
    titles = [
        f"{test.classes[t]} -> {test.classes[p]}"
        for t, p in zip(test.labels[shown], predicted[shown], strict=True)
    ]
    maps = token_attention_maps(model, inputs)
    save_attention_figure(inputs, maps, figure, IMAGENET_MEAN, IMAGENET_STD, titles)
    return head_scores(cls_logits, dist_logits, test.labels, teacher_logits), predicted
