"""train_detr@<arch>: DETR (``detr``) or Deformable DETR (``deformable``) on the detection data.

    python -m stages.train_detr {detr,deformable}

Both share DETR's training recipe (``detr_training`` params) and take their model from the
``detr`` or ``deformable`` params; the ResNet trunk starts from the SSL backbone, the teacher
or scratch (``detr_training.init``), or the whole model from an official release
(``detr_training.release_checkpoint``). COCO AP on the val split every ``eval_every`` epochs and
every loss term go to MLflow and ``plots/detr/<arch>/history.csv``; the model to
``artifacts/detr/<arch>/model.pt``. A killed run resumes from ``checkpoints/detr/<arch>``.
The recipe is ``vitkit.tasks.detection``.
"""

from __future__ import annotations

import dataclasses
import sys

import pandas as pd
from torch import Tensor

from stages import paths
from stages.common import StageContext, stage_main
from stages.publish import publish
from vitkit.config import MAX_CATEGORY_ID
from vitkit.data.datasets import CocoDetection, collate_detection
from vitkit.data.detection_transforms import eval_transforms, train_transforms
from vitkit.engine.checkpoint import load_weights
from vitkit.engine.trainer import Trainer
from vitkit.errors import ConfigError, DataError
from vitkit.evaluation.detection import FINAL_COLUMNS
from vitkit.serving import DetectorModel
from vitkit.tasks.base import fingerprint, trainer_config
from vitkit.tasks.detection import DETECTORS, DetectionTask, detector_predictor, init_trunk

INIT_WEIGHTS = {"ssl": (paths.SSL.model, "pretrain_ssl"), "teacher": (paths.TEACHER.model, "train_teacher")}


def trunk_init(ctx: StageContext) -> dict | None:
    """Trunk weights named by ``detr_training.init`` (no ``fc``), or None for scratch."""
    if ctx.params.detr_training.init == "scratch":
        return None
    path, stage = INIT_WEIGHTS[ctx.params.detr_training.init]
    if not ctx.path(path).is_file():
        raise ConfigError(
            f"detr_training.init is {ctx.params.detr_training.init!r} but {path} does not exist; run the "
            f"{stage} stage first or set detr_training.init to another source (ssl | teacher | scratch)"
        )
    return init_trunk(*load_weights(ctx.path(path)), ctx.params.backbone, str(path))


def run(ctx: StageContext) -> dict[str, float]:
    arch, p = ctx.variant, ctx.params.detr_training
    train = CocoDetection(
        ctx.path(paths.DETECTION / "train"),
        train_transforms(p.train_scales, ctx.params.data.hflip, crop=p.crop),
    )
    val = CocoDetection(ctx.path(paths.DETECTION / "val"), eval_transforms(p.eval_size))
    ids = [c["id"] for c in train.categories]
    if not ids or min(ids) < 0 or max(ids) > MAX_CATEGORY_ID:  # prepare checks them; guard the allocation
        raise DataError(
            f"{paths.DETECTION}/train/annotations.json: categories need integer ids in "
            f"[0, {MAX_CATEGORY_ID}] (the class head gets max id + 1 outputs), got "
            f"{min(ids, default=None)}..{max(ids, default=None)}; run the prepare stage"
        )
    release = ctx.path(p.release_checkpoint) if p.release_checkpoint else None
    section, batch_size = getattr(ctx.params, arch), ctx.params.evaluate.batch_size
    trunk = None if release else trunk_init(ctx)
    task = DetectionTask(
        arch, p, section, ctx.params.backbone, train.categories, val, batch_size, ctx.device, trunk, release
    )
    if release:
        print(f"[{ctx.name}] loaded {release}; re-initialised: {', '.join(task.reinitialised) or 'nothing'}")
    run_id = fingerprint(p, section, dataclasses.asdict(task.config), ctx.params.seed, len(train))
    cfg = trainer_config(p, ctx.params.engine, ctx.params.seed, ctx.name, run_id, lr=task.lr)
    trainer = Trainer(
        task, train, cfg, ctx.device, ctx.dist, ctx.path(ctx.out.checkpoints), collate_fn=collate_detection
    )
    trainer.on_epoch_end = ctx.run.log_epoch
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.writes_files:  # each node keeps its own outputs
        return {}
    final = history.iloc[-1]
    metrics = {f"val_{name}": final[f"val_{name}"] for name in FINAL_COLUMNS}
    metrics |= {"epochs": int(final["epoch"]), "final_train_loss": final["train_loss"]}
    curves = ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "val_AP", "val_AP50")
    raw = CocoDetection(ctx.path(paths.DETECTION / "val"))  # uint8 images at their own size
    examples = [raw[i][0].as_subclass(Tensor) for i in range(min(2, len(raw)))]
    served, title = DetectorModel(detector_predictor), f"{arch} training"
    meta = task.meta()
    return publish(ctx, history, metrics, task.model, meta, curves, title, len(train), served, examples)


if __name__ == "__main__":
    sys.exit(stage_main("train_detr", __doc__, run, distributed=True, variants=tuple(DETECTORS)))
