"""The method recipes are usable from a notebook: params from params.yaml, tensors in, no stage context."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vitkit.config import load_params
from vitkit.data.datasets import LabelledImages
from vitkit.engine.device import autocast
from vitkit.engine.distributed import DistInfo
from vitkit.engine.trainer import Trainer
from vitkit.tasks.base import trainer_config
from vitkit.tasks.classifier import ClassifierTask, train_dataset
from vitkit.tasks.contrastive import ContrastiveTask, two_view_dataset
from vitkit.tasks.detection import DetectionTask
from vitkit.tasks.distillation import DistillationTask

ROOT = Path(__file__).resolve().parents[2]
PARAMS = load_params(ROOT / "params.yaml")
ENGINE = PARAMS.engine.model_copy(update={"min_steps": 0})  # a few steps on a few images, as written
CLASSES = ["a", "b"]


def split(n: int, seed: int) -> LabelledImages:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return LabelledImages(images, torch.arange(n) % 2, CLASSES)


def fit(task, dataset, optim, tmp_path: Path, **overrides) -> list[dict]:
    cfg = trainer_config(optim, ENGINE, 0, "notebook", "nb", progress=False, **overrides)
    return Trainer(task, dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path).fit()


def test_a_teacher_trains_from_a_notebook(tmp_path):
    p = PARAMS.teacher.model_copy(update={"epochs": 1, "batch_size": 8, "init": "scratch"})
    train, val = split(16, 0), split(8, 1)
    task = ClassifierTask(p, PARAMS.backbone, val, 8, torch.device("cpu"))
    (row,) = fit(task, train_dataset(train, p, seed=0, hflip=0.5), p, tmp_path)
    assert {"train_loss", "val_top1", "lr", "images_per_s"} <= set(row)
    assert (tmp_path / "last.pt").is_file()


def test_contrastive_and_distillation_tasks_return_their_terms(tmp_path):
    ssl = PARAMS.ssl.model_copy(
        update={"method": "mocov2", "queue_size": 16, "bn_splits": 2, "batch_size": 8}
    )
    task = ContrastiveTask(ssl, PARAMS.backbone, split(8, 0), split(4, 1), 8)
    views = two_view_dataset(split(8, 2).images, ssl, 0.5)
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


def _backward_under_cpu_bf16(task, batch) -> dict[str, torch.Tensor]:
    """One training step of ``task`` as the Trainer runs it with ``engine.amp: always`` on a CPU."""
    with autocast(torch.device("cpu"), "always"):
        terms = task.step(task.model, batch)
    terms["loss"].backward()
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    return terms


def test_every_model_stage_trains_under_cpu_bf16_autocast(tmp_path):
    """The dtypes a GPU run meets (bf16 activations from autocast into losses, matchers, queues and
    box arithmetic), met on a CPU: a mistake fails here rather than on the first GPU run."""
    teacher_p = PARAMS.teacher.model_copy(update={"epochs": 1, "batch_size": 8, "init": "scratch"})
    teacher = ClassifierTask(teacher_p, PARAMS.backbone, split(8, 1), 8, torch.device("cpu"))
    (row,) = fit(
        teacher, train_dataset(split(16, 0), teacher_p, seed=0, hflip=0.5), teacher_p, tmp_path, amp="always"
    )
    assert math.isfinite(row["train_loss"])

    for method in ("simclr", "mocov2"):
        ssl = PARAMS.ssl.model_copy(
            update={"method": method, "queue_size": 16, "bn_splits": 2, "batch_size": 8}
        )
        task = ContrastiveTask(ssl, PARAMS.backbone, split(8, 0), split(4, 1), 8)
        views = two_view_dataset(split(8, 2).images, ssl, 0.5)
        _backward_under_cpu_bf16(
            task, tuple(torch.stack(v) for v in zip(*(views[i] for i in range(8)), strict=True))
        )

    deit = PARAMS.deit.model_copy(update={"depth": 1})
    teacher_file = (teacher.model.state_dict(), {"arch": "resnet18", "stem": "imagenet", "classes": CLASSES})
    student = DistillationTask(deit, "soft", split(4, 3), 4, torch.device("cpu"), teacher_file)
    images, labels = split(4, 4)[:2]
    _backward_under_cpu_bf16(student, (images.float() / 255, labels))

    tiny = {
        "hidden_dim": 32,
        "nheads": 2,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 32,
        "num_queries": 4,
    }
    sections = {
        "detr": PARAMS.detr.model_copy(update=tiny),
        "deformable": PARAMS.deformable.model_copy(update=tiny),
    }
    categories = [{"id": i, "name": f"c{i}"} for i in range(3)]
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 56)]
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]])},
    ]
    for arch, section in sections.items():
        task = DetectionTask(
            arch, PARAMS.detr_training, section, PARAMS.backbone, categories, None, 2, torch.device("cpu")
        )
        terms = _backward_under_cpu_bf16(task, (images, targets))
        assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(terms)


@pytest.mark.slow  # compiling a ResNet-18's forward and backward takes about a minute on 2 cores
def test_the_teacher_trains_compiled_on_cpu_as_it_does_eager(tmp_path):
    """``engine.compile``: the Trainer trains a torch.compile'd model and checkpoints the plain one;
    the losses match the eager run's (compilation fuses and reorders float arithmetic only)."""
    p = PARAMS.teacher.model_copy(
        update={"epochs": 1, "batch_size": 8, "init": "scratch", "warmup_epochs": 0}
    )
    rows = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        task = ClassifierTask(p, PARAMS.backbone, split(8, 1), 8, torch.device("cpu"))
        trainer_dir = tmp_path / str(compiled)
        cfg = trainer_config(p, ENGINE, 0, "nb", "nb", progress=False, compile=compiled)
        trainer = Trainer(
            task,
            train_dataset(split(16, 0), p, seed=0, hflip=0.5),
            cfg,
            torch.device("cpu"),
            DistInfo(),
            trainer_dir,
        )
        assert (trainer.train_model is not trainer.model) == compiled
        (rows[compiled],) = trainer.fit()
        assert not any(key.startswith("_orig_mod") for key in torch.load(trainer_dir / "last.pt")["model"])
    assert rows[True]["train_loss"] == pytest.approx(rows[False]["train_loss"], rel=1e-3)
