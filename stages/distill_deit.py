"""distill_deit@{none,soft,hard}: a ViT student learns from the CNN teacher through a distillation token.

    python -m stages.distill_deit {none,soft,hard}

none: a plain ViT trained on the labels, DeiT's baseline; soft: a distillation head that matches
the teacher's softened outputs; hard: a distillation head that learns the teacher's argmax.
DeiT's recipe with the ``deit`` params (RandAugment, random erasing, MixUp/CutMix, repeated
augmentation, weights EMA, lr scaled by the global batch/512); the frozen teacher is
``artifacts/teacher/model.pt``. Writes ``artifacts/deit/<mode>/model.pt``; a killed run resumes
from ``checkpoints/deit/<mode>``. The recipe is ``vitkit.tasks.distillation``.
"""

from __future__ import annotations

import sys

import pandas as pd

from stages import paths
from stages.common import StageContext, stage_main
from stages.publish import publish
from vitkit.data.datasets import load_imagefolder
from vitkit.engine.checkpoint import load_weights
from vitkit.engine.trainer import Trainer
from vitkit.io import file_digest
from vitkit.losses.distillation import DISTILLATION_TYPES
from vitkit.serving import ClassifierModel
from vitkit.tasks.base import fingerprint, trainer_config
from vitkit.tasks.distillation import (
    DistillationTask,
    scaled_lr,
    student_predictor,
    train_dataset,
    vit_config,
)


def run(ctx: StageContext) -> dict[str, float]:
    mode, p, seed = ctx.variant, ctx.params.deit, ctx.params.seed
    vit_config(p, ctx.params.data.classification.image_size, 1, mode != "none")  # bad sizes: before any data
    cache_mb = ctx.params.data.cache_mb
    train, val = (load_imagefolder(ctx.path(paths.CLASSIFICATION / s), cache_mb) for s in ("train", "val"))
    dataset = train_dataset(train, p, ctx.params.data.hflip)
    teacher = ctx.path(paths.TEACHER.model) if mode != "none" else None
    task = DistillationTask(
        p, mode, val, ctx.params.evaluate.batch_size, ctx.device, load_weights(teacher) if teacher else None
    )
    run_id = fingerprint(p, seed, len(dataset), mode, file_digest(teacher))
    cfg = trainer_config(
        p,
        ctx.params.engine,
        seed,
        f"deit {mode}",
        run_id,
        lr=scaled_lr(p, ctx.dist.world_size),
        repeated_augmentations=p.repeated_aug,
    )
    trainer = Trainer(task, dataset, cfg, ctx.device, ctx.dist, ctx.path(ctx.out.checkpoints))
    trainer.on_epoch_end = ctx.run.log_epoch
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.writes_files:  # each node keeps its own outputs
        return {}

    final, model = history.iloc[-1], task.final_model()
    metrics = {k: final[k] for k in ("val_cls_top1", "val_dist_top1", "val_avg_top1") if k in final}
    metrics["parameters"] = sum(t.numel() for t in model.parameters())
    curves = ("train_loss", "val_cls_top1", "val_dist_top1", "val_avg_top1")
    title = f"DeiT student, distillation {mode}"
    served = ClassifierModel(student_predictor)
    return publish(
        ctx, history, metrics, model, task.meta(), curves, title, len(dataset), served, val.images[:2]
    )


if __name__ == "__main__":
    sys.exit(stage_main("distill_deit", __doc__, run, distributed=True, variants=DISTILLATION_TYPES))
