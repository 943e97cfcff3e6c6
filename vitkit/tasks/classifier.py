"""The supervised CNN teacher as a task: cross-entropy on labelled images, top-1 on a validation split."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from vitkit.config import BackboneParams, TeacherParams
from vitkit.data.datasets import LabelledImageDataset, LabelledImages
from vitkit.data.transforms import eval_transform, train_transform
from vitkit.engine.task import TrainingTask
from vitkit.errors import ConfigError
from vitkit.evaluation.classification import (
    classification_report,
    per_class_table,
    plot_confusion,
    predict_logits,
    topk_accuracy,
)
from vitkit.io import write_csv
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


def train_dataset(train: LabelledImages, p: TeacherParams, seed: int, hflip: float) -> Subset:
    """``teacher.label_fraction`` of the labelled images (stratified), with the training augmentation
    (horizontal flips with probability ``hflip``, ``data.hflip``).

    A ``Subset`` of the whole split: its images are read (or taken from memory) only when sampled.
    """
    subset = stratified_subset(train.labels, p.label_fraction, seed)
    dataset = LabelledImageDataset(train.images, train.labels, train_transform(train.images.shape[-1], hflip))
    return Subset(dataset, subset.tolist())


def load_classifier(state: dict[str, torch.Tensor], meta: dict) -> nn.Module:
    """The ResNet classifier a teacher model file describes (``meta``: arch, stem, classes)."""
    model = build_resnet(meta["arch"], num_classes=len(meta["classes"]), stem=meta["stem"])
    model.load_state_dict(state)
    return model


def classifier_predictor(
    state: dict[str, torch.Tensor], meta: dict, device: torch.device, batch_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a teacher model file for uint8 images, preprocessed as ``evaluate_classifier`` does
    (what its MLflow model serves, ``vitkit.serving``)."""
    model = load_classifier(state, meta).to(device)
    return partial(predict_logits, model, transform=eval_transform(), device=device, batch_size=batch_size)


class ClassifierTask(TrainingTask):
    """A ``backbone`` ResNet classifier, from random weights or an SSL trunk (``init_trunk``)."""

    def __init__(
        self,
        p: TeacherParams,
        backbone: BackboneParams,
        val: LabelledImages,
        eval_batch_size: int,
        device: torch.device,
        init_trunk: tuple[dict[str, torch.Tensor], dict] | None = None,
    ) -> None:
        self.p, self.val, self.eval_batch_size, self.device = p, val, eval_batch_size, device
        self.model = build_resnet(backbone.arch, num_classes=len(val.classes), stem=backbone.stem)
        if init_trunk is not None:
            state, meta = init_trunk
            try:
                load_backbone(self.model, state)
            except ValueError as exc:
                raise ConfigError(
                    f"the SSL backbone (a {meta.get('arch')}/{meta.get('stem')} trunk) does not fit the "
                    f"backbone params: {exc}. Rerun pretrain_ssl with the same backbone params, "
                    "or set teacher.init: scratch"
                ) from None

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"loss": F.cross_entropy(model(images), labels, label_smoothing=self.p.label_smoothing)}

    def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        logits = predict_logits(model, self.val.images, eval_transform(), self.device, self.eval_batch_size)
        return {"val_top1": topk_accuracy(logits, self.val.labels, 1)}


def evaluate_classifier(
    model: nn.Module,
    test: LabelledImages,
    device: torch.device,
    batch_size: int,
    confusion_png: Path,
    per_class_csv: Path,
) -> tuple[dict, torch.Tensor]:
    """Top-1 / top-5 / per-class report on ``test`` with its confusion figure and per-class table,
    and the test logits (the DeiT table reuses them for teacher agreement)."""
    logits = predict_logits(model.to(device), test.images, eval_transform(), device, batch_size)
    report = classification_report(logits, test.labels, test.classes)
    plot_confusion(
        report["confusion"], test.classes, f"teacher (test top-1 {report['top1']:.3f})", confusion_png
    )
    write_csv(per_class_csv, per_class_table(report))
    return report, logits
