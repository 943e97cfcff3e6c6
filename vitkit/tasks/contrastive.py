"""Contrastive pretraining (SimCLR / MoCo v2) as a task, and how its backbone is judged.

The recipe: two augmented views of every unlabelled image through the SSL
model of ``ssl.method``; the step returns the contrastive loss and, for MoCo,
its pretext top-1 (is the positive key the top logit?), the earliest sign the
encoders learn, long before the kNN monitor moves. Validation is a weighted
kNN classifier on a labelled split, every ``ssl.knn.every_epochs`` epochs and
after the last. The backbone's test (``evaluate_backbone``) is kNN and a
linear probe on frozen features, beside the same trunk with random weights.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from vitkit.config import BackboneParams, KnnMonitorParams, SSLParams
from vitkit.data.datasets import Images, LabelledImages
from vitkit.data.ssl_transforms import (
    MEAN,
    STD,
    TwoViewDataset,
    TwoViews,
    build_ssl_transform,
    normalize_transform,
)
from vitkit.engine.task import TrainingTask
from vitkit.evaluation.knn import extract_features, knn_accuracy, weighted_knn_predict
from vitkit.evaluation.linear_probe import linear_probe_predict
from vitkit.models.resnet import build_resnet, load_backbone
from vitkit.models.ssl import build_ssl_model

NORMALIZE = normalize_transform(MEAN, STD)  # uint8 -> the SSL trunk's input


def two_view_dataset(images: Images, p: SSLParams, hflip: float) -> TwoViewDataset:
    """Unlabelled images served as two random views with the ``ssl.augmentation`` strengths and
    horizontal flips with probability ``hflip`` (``data.hflip``)."""
    return TwoViewDataset(images, TwoViews(build_ssl_transform(p.augmentation, images.shape[-1], hflip)))


def knn_top1(
    trunk: nn.Module, memory: LabelledImages, queries: LabelledImages, knn: KnnMonitorParams, batch_size: int
) -> float:
    """Weighted kNN top-1 of ``queries`` against ``memory`` in ``trunk``'s L2-normalised feature space."""
    features = [extract_features(trunk, split.images, batch_size, NORMALIZE) for split in (memory, queries)]
    return knn_accuracy(
        features[0],
        memory.labels,
        features[1],
        queries.labels,
        len(memory.classes),
        knn.k,
        knn.temperature,
    )


class ContrastiveTask(TrainingTask):
    """SimCLR or MoCo v2 (``p.method``) around a ``backbone`` ResNet, monitored by kNN."""

    def __init__(
        self,
        p: SSLParams,
        backbone: BackboneParams,
        knn_memory: LabelledImages,
        knn_queries: LabelledImages,
        eval_batch_size: int,
    ) -> None:
        self.p = p
        self.model = build_ssl_model(p, backbone.arch, backbone.stem)
        self.knn_memory, self.knn_queries = knn_memory, knn_queries
        self.eval_batch_size = eval_batch_size

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(*batch)
        if not isinstance(out, tuple):
            return {"loss": out}
        loss, logits, labels = out
        return {"loss": loss, "pretext_top1": (logits.detach().argmax(1) == labels).float().mean()}

    def knn_top1(self, model: nn.Module) -> float:
        return knn_top1(model.backbone, self.knn_memory, self.knn_queries, self.p.knn, self.eval_batch_size)

    def final_model(self) -> nn.Module:
        """The trunk: the projection head is thrown away after pretraining, as in both papers."""
        return self.model.backbone

    def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % self.p.knn.every_epochs and epoch != self.epochs:
            return {"knn_top1": float("nan")}
        return {"knn_top1": self.knn_top1(model)}


def load_trunk(meta: dict, state: dict[str, torch.Tensor] | None) -> nn.Module:
    """The ResNet trunk (no classifier) an SSL model file describes, with its weights or, for
    ``state=None``, the same trunk at random initialisation."""
    trunk = build_resnet(meta["arch"], num_classes=1, stem=meta["stem"])
    trunk.fc = nn.Identity()
    if state is not None:
        load_backbone(trunk, state)
    return trunk


def backbone_predictor(
    state: dict[str, torch.Tensor], meta: dict, device: torch.device, batch_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """L2-normalised features of uint8 images from an SSL model file: what kNN and the linear probe
    read in ``evaluate_backbone`` (and what its MLflow model serves, ``vitkit.serving``)."""
    trunk = load_trunk(meta, state).to(device)
    return partial(extract_features, trunk, batch_size=batch_size, normalize_fn=NORMALIZE)


def evaluate_backbone(
    trunk_state: dict[str, torch.Tensor],
    meta: dict,
    train: LabelledImages,
    test: LabelledImages,
    knn: KnnMonitorParams,
    seed: int,
    device: torch.device,
    batch_size: int,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """kNN and linear-probe test top-1 of a frozen SSL trunk and of its randomly initialised twin,
    and each test image's predicted class (``ssl_knn``, ``ssl_linear_probe``, ``random_init_knn``...).

    Both read features of ``train`` (kNN memory, probe training set) and are scored on ``test``.
    """
    rows, predictions = {}, {}
    classes = len(train.classes)
    for name, weights in (("ssl", trunk_state), ("random_init", None)):
        torch.manual_seed(seed)
        trunk = load_trunk(meta, weights).to(device)
        train_feats, test_feats = (
            extract_features(trunk, split.images, batch_size, NORMALIZE) for split in (train, test)
        )
        predictions[f"{name}_knn"] = weighted_knn_predict(
            train_feats, train.labels, test_feats, classes, knn.k, knn.temperature
        )
        predictions[f"{name}_linear_probe"] = linear_probe_predict(
            train_feats, train.labels, test_feats, classes, seed=seed
        )
        rows[name] = {
            f"{method}_top1": (predictions[f"{name}_{method}"] == test.labels).float().mean().item()
            for method in ("knn", "linear_probe")
        }
    return rows, predictions
