"""The method recipes are usable from a notebook: params from params.yaml, tensors in, no stage context."""

from __future__ import annotations

from pathlib import Path

import torch

from vitkit.config import load_params
from vitkit.data.datasets import LabelledImages
from vitkit.engine.distributed import DistInfo
from vitkit.engine.trainer import Trainer
from vitkit.tasks.base import trainer_config
from vitkit.tasks.classifier import ClassifierTask, train_dataset
from vitkit.tasks.contrastive import ContrastiveTask, two_view_dataset
from vitkit.tasks.distillation import DistillationTask

ROOT = Path(__file__).resolve().parents[2]
PARAMS = load_params(ROOT / "params.yaml")
CLASSES = ["a", "b"]


def split(n: int, seed: int) -> LabelledImages:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return LabelledImages(images, torch.arange(n) % 2, CLASSES)


def fit(task, dataset, optim, tmp_path: Path, **overrides) -> list[dict]:
    cfg = trainer_config(optim, PARAMS.engine, 0, "notebook", "nb", progress=False, **overrides)
    return Trainer(task, dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path).fit()


def test_a_teacher_trains_from_a_notebook(tmp_path):
    p = PARAMS.teacher.model_copy(update={"epochs": 1, "batch_size": 8, "init": "scratch"})
    train, val = split(16, 0), split(8, 1)
    task = ClassifierTask(p, PARAMS.backbone, val, 8, torch.device("cpu"))
    (row,) = fit(task, train_dataset(train, p, seed=0), p, tmp_path)
    assert {"train_loss", "val_top1", "lr", "images_per_s"} <= set(row)
    assert (tmp_path / "last.pt").is_file()


def test_contrastive_and_distillation_tasks_return_their_terms(tmp_path):
    ssl = PARAMS.ssl.model_copy(
        update={"method": "mocov2", "queue_size": 16, "bn_splits": 2, "batch_size": 8}
    )
    task = ContrastiveTask(ssl, PARAMS.backbone, split(8, 0), split(4, 1), 8)
    views = two_view_dataset(split(8, 2).images, ssl)
    batch = tuple(torch.stack(v) for v in zip(*(views[i] for i in range(8)), strict=True))
    terms = task.step(task.model, batch)
    assert set(terms) == {"loss", "pretext_top1"} and 0.0 <= float(terms["pretext_top1"]) <= 1.0
    assert task.final_model() is task.model.backbone  # the trunk is what later stages keep

    deit = PARAMS.deit.model_copy(update={"depth": 1, "ema_decay": 0.9})
    teacher = ClassifierTask(PARAMS.teacher, PARAMS.backbone, split(4, 3), 4, torch.device("cpu")).model
    teacher_file = (teacher.state_dict(), {"arch": "resnet18", "stem": "imagenet", "classes": CLASSES})
    student = DistillationTask(deit, "hard", split(4, 3), 4, torch.device("cpu"), teacher_file)
    images, labels = split(4, 4)[:2]
    terms = student.step(student.model, (images.float() / 255, labels))
    assert set(terms) == {"loss", "base_loss", "distill_loss"}
    student.after_step()
    assert set(student.state_dict()) == {"ema"} and student.final_model() is student.ema.module
