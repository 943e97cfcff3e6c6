"""DETR and Deformable DETR as one task behind a registry: callers never branch on the architecture.

A ``Detector`` bundles what differs between the two (config class, model and
criterion builders, optimizer groups, post-processing, official-release
loading); ``DETECTORS`` names them as the ``train_detr`` variants do. The task
trains either with DETR's recipe (the ``detr_training`` params) and returns
every loss term of the last decoder layer beside the weighted objective, as
DETR's own engine logs them. A model file's meta rebuilds the model and its
post-processing (``load_detector``), so ``evaluate`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel
from torch import Tensor, nn
from torchvision import tv_tensors

from vitkit.config import BackboneParams, DetrTrainingParams
from vitkit.data.datasets import CocoDetection
from vitkit.data.detection_transforms import eval_transforms
from vitkit.engine.task import TrainingTask
from vitkit.errors import ConfigError
from vitkit.evaluation.coco import evaluate_coco, write_results_json
from vitkit.evaluation.detection import FINAL_COLUMNS, compare_runs, plot_comparison, predict_coco
from vitkit.evaluation.detection_figures import plot_detections
from vitkit.io import write_csv
from vitkit.models.deformable import (
    DeformableDETRConfig,
    TopKPostProcess,
    build_deformable_criterion,
    build_deformable_detr,
    deformable_param_groups,
    load_deformable_detr_checkpoint,
)
from vitkit.models.detr import (
    DETRConfig,
    PostProcess,
    build_criterion,
    build_detr,
    load_detr_checkpoint,
    nested_tensor_from_images,
    param_groups,
)
from vitkit.models.detr.postprocess import Detection

FIGURE_IMAGES = 8  # test images in each detector's figure of predicted and true boxes
LOGGED_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")


@dataclass(frozen=True)
class Detector:
    """One member of the DETR family, as the task and ``evaluate`` use it."""

    config_cls: type[DETRConfig] | type[DeformableDETRConfig]
    build: Callable[[Any, dict[str, Tensor] | None], nn.Module]
    criterion: Callable[[Any], nn.Module]
    # (model, lr, training params, the arch's params section) -> AdamW groups
    param_groups: Callable[[nn.Module, float, DetrTrainingParams, Any], list[dict]]
    postprocess: type[PostProcess]  # DETR: each query's best class; Deformable: the top (query, class) pairs
    load_release: Callable[[nn.Module, Path], list[str]]


DETECTORS: dict[str, Detector] = {
    "detr": Detector(
        DETRConfig,
        build_detr,
        build_criterion,
        lambda model, lr, t, _: param_groups(model, lr, t.lr_backbone, t.weight_decay),
        PostProcess,
        load_detr_checkpoint,
    ),
    "deformable": Detector(
        DeformableDETRConfig,
        build_deformable_detr,
        build_deformable_criterion,
        lambda model, lr, t, s: deformable_param_groups(
            model, lr, t.lr_backbone, t.weight_decay, s.lr_linear_proj_mult
        ),
        TopKPostProcess,
        load_deformable_detr_checkpoint,
    ),
}


def _config(detector: Detector, fields: dict[str, Any]) -> DETRConfig | DeformableDETRConfig:
    """The detector's config from plain values (lists become the tuples the frozen config holds)."""
    known = {f.name for f in dataclasses.fields(detector.config_cls)}
    return detector.config_cls(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
    )


def detector_config(
    arch: str, section: BaseModel, backbone: BackboneParams, train: DetrTrainingParams, num_classes: int
) -> DETRConfig | DeformableDETRConfig:
    """``arch``'s model config from its params section (``detr`` / ``deformable``) and the shared trunk."""
    return _config(
        DETECTORS[arch],
        {
            **section.model_dump(),
            "num_classes": num_classes,
            "arch": backbone.arch,
            "stem": backbone.stem,
            "train_backbone": not train.freeze_backbone,
        },
    )


def init_trunk(
    state: dict[str, Tensor], meta: dict, backbone: BackboneParams, source: str
) -> dict[str, Tensor]:
    """Trunk weights (no ``fc``) of an SSL backbone or teacher file, checked against ``backbone``."""
    if (meta.get("arch"), meta.get("stem")) != (backbone.arch, backbone.stem):
        raise ConfigError(
            f"{source} holds a {meta.get('arch')} with the {meta.get('stem')!r} stem, but the backbone "
            f"params ask for {backbone.arch} / {backbone.stem!r}; set backbone.arch and backbone.stem "
            "to match, or detr_training.init: scratch"
        )
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_detector(state: dict[str, Tensor], meta: dict) -> tuple[nn.Module, PostProcess]:
    """The model and post-processing a ``train_detr`` model file describes."""
    detector = DETECTORS[meta["model"]]
    model = detector.build(_config(detector, meta["config"]), None)
    model.load_state_dict(state)
    return model, detector.postprocess(top_k=meta["top_k"], score_threshold=meta["score_threshold"])


def detector_predictor(
    state: dict[str, Tensor], meta: dict, device: torch.device, batch_size: int
) -> Callable[[list[Tensor]], list[Detection]]:
    """Detections of a ``train_detr`` model file for uint8 images of any size, in their own pixels:
    each image goes through ``evaluate_detector``'s transform as a test image without annotations
    would, and the same ``predict_coco`` (what its MLflow model serves, ``vitkit.serving``)."""
    model, post = load_detector(state, meta)
    model.to(device)
    transform = eval_transforms(meta["eval_size"])

    def predict(images: list[Tensor]) -> list[Detection]:
        items = []
        for index, image in enumerate(images):
            size = tuple(image.shape[-2:])
            none = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size)
            target = {"boxes": none, "image_id": index, "orig_size": size}
            items.append(transform(tv_tensors.Image(image), target))
        return predict_coco(model, items, post, device, batch_size)[0]

    return predict


def coco_metrics(
    model: nn.Module, dataset: CocoDetection, post: PostProcess, device: torch.device, batch_size: int
) -> tuple[dict[str, float], list[dict], list[dict]]:
    """COCO box metrics of ``model`` on ``dataset``, with its detections and COCO results."""
    detections, results = predict_coco(model, dataset, post, device, batch_size)
    return evaluate_coco(dataset.coco, results), detections, results


class DetectionTask(TrainingTask):
    """DETR or Deformable DETR (``arch``) trained with DETR's recipe, COCO AP on ``val``."""

    def __init__(
        self,
        arch: str,
        train: DetrTrainingParams,
        section: BaseModel,
        backbone: BackboneParams,
        categories: list[dict],
        val: CocoDetection,
        eval_batch_size: int,
        device: torch.device,
        trunk: dict[str, Tensor] | None = None,
        release: Path | None = None,
    ) -> None:
        self.arch, self.train, self.section, self.detector = arch, train, section, DETECTORS[arch]
        self.categories, self.val, self.eval_batch_size, self.device = (
            categories,
            val,
            eval_batch_size,
            device,
        )
        self.config = detector_config(arch, section, backbone, train, max(c["id"] for c in categories) + 1)
        self.model = self.detector.build(self.config, trunk)
        # a release holds every weight, backbone included; only the class head starts fresh
        self.reinitialised = self.detector.load_release(self.model, release) if release else []
        self.lr = section.lr or train.lr
        self.criterion = self.detector.criterion(self.config).to(device)
        self.post = self.detector.postprocess(top_k=train.top_k, score_threshold=train.score_threshold)

    def param_groups(self) -> list[dict]:
        return self.detector.param_groups(self.model, self.lr, self.train, self.section)

    def step(self, model: nn.Module, batch: tuple[list[Tensor], list[dict]]) -> dict[str, Tensor]:
        images, targets = batch
        targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        losses = self.criterion(model(nested_tensor_from_images(images)), targets)
        terms = {name: losses[name].detach() for name in LOGGED_TERMS if name in losses}
        return {"loss": self.criterion.weighted_sum(losses), **terms}

    def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % self.train.eval_every and epoch != self.epochs:
            return {}
        metrics, _, _ = coco_metrics(model, self.val, self.post, self.device, self.eval_batch_size)
        return {f"val_{name}": metrics[name] for name in FINAL_COLUMNS}

    def meta(self) -> dict:
        """What a model file needs to rebuild the model and its post-processing (``load_detector``)."""
        return {
            "model": self.arch,
            "config": dataclasses.asdict(self.config),
            "categories": self.categories,
            "eval_size": self.train.eval_size,
            "top_k": self.train.top_k,
            "score_threshold": self.train.score_threshold,
        }


def evaluate_detector(
    state: dict[str, Tensor],
    meta: dict,
    test_dir: Path,
    device: torch.device,
    batch_size: int,
    results_json: Path,
    figure: Path,
) -> dict[str, float]:
    """COCO metrics of a model file on a test split, its COCO results json and a figure of boxes."""
    model, post = load_detector(state, meta)
    test = CocoDetection(test_dir, eval_transforms(meta["eval_size"]))
    metrics, detections, results = coco_metrics(model.to(device), test, post, device, batch_size)
    write_results_json(results, results_json)
    raw = CocoDetection(test_dir)  # uint8 images at their own size, boxes in pixels
    samples = [raw[i] for i in range(min(FIGURE_IMAGES, len(raw)))]
    plot_detections(
        [image for image, _ in samples],
        [{"boxes": target["boxes"].as_subclass(Tensor)} for _, target in samples],
        detections[: len(samples)],
        {c["id"]: c["name"] for c in raw.categories},
        figure,
        score_threshold=0.3,
    )
    return metrics


def compare_detectors(
    histories: dict[str, pd.DataFrame], finals: dict[str, dict[str, float]], table_csv: Path, figure: Path
) -> dict[str, dict[str, float]]:
    """The detectors side by side (final test metrics, AP per epoch, AP by object size)."""
    table = compare_runs(histories, finals)
    write_csv(table_csv, table)
    plot_comparison(histories, table, figure, "DETR vs Deformable DETR")
    rows = table.set_index("arch")
    return {arch: {k: float(v) for k, v in rows.loc[arch].items()} for arch in histories}
