"""train_teacher: the supervised CNN teacher (a torchvision ResNet, ``backbone`` params).

Starts from the self-supervised trunk of ``pretrain_ssl`` (``teacher.init: ssl``)
or from random weights (``scratch``), trains on the classification train split
(optionally a stratified fraction of its labels, ``teacher.label_fraction``),
checks validation top-1 every epoch and writes ``artifacts/teacher/model.pt``:
the teacher of ``distill_deit`` and a backbone init of ``train_detr``. A killed
run resumes from ``checkpoints/teacher``. The recipe is ``vitkit.tasks.classifier``.
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
from vitkit.errors import ConfigError
from vitkit.io import file_digest
from vitkit.serving import ClassifierModel
from vitkit.tasks.base import fingerprint, trainer_config
from vitkit.tasks.classifier import ClassifierTask, classifier_predictor, train_dataset


def run(ctx: StageContext) -> dict[str, float]:
    p, backbone, seed = ctx.params.teacher, ctx.params.backbone, ctx.params.seed
    cache_mb = ctx.params.data.cache_mb
    train, val = (load_imagefolder(ctx.path(paths.CLASSIFICATION / s), cache_mb) for s in ("train", "val"))
    dataset = train_dataset(train, p, seed, ctx.params.data.hflip)
    init_from = ctx.path(paths.SSL.model) if p.init == "ssl" else None
    if init_from is not None and not init_from.is_file():
        raise ConfigError(f"teacher.init is 'ssl' but {init_from} does not exist; run pretrain_ssl first")
    trunk = load_weights(init_from) if init_from else None
    task = ClassifierTask(p, backbone, val, ctx.params.evaluate.batch_size, ctx.device, trunk)
    # a checkpoint resumes only the same run: same params, data size and starting weights
    run_id = fingerprint(p, backbone, seed, len(dataset), file_digest(init_from))
    cfg = trainer_config(p, ctx.params.engine, seed, "teacher", run_id)
    trainer = Trainer(task, dataset, cfg, ctx.device, ctx.dist, ctx.path(ctx.out.checkpoints))
    trainer.on_epoch_end = ctx.run.log_epoch
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.writes_files:  # each node keeps its own outputs
        return {}

    metrics = {
        "val_top1": history["val_top1"].iloc[-1],
        "first_epoch_val_top1": history["val_top1"].iloc[0],
    }
    meta = {
        "arch": backbone.arch,
        "stem": backbone.stem,
        "classes": train.classes,
        "image_size": train.images.shape[-1],
        "init": p.init,
    }
    curves = ("train_loss", "val_top1")
    served = ClassifierModel(classifier_predictor)
    return publish(
        ctx, history, metrics, task.model, meta, curves, "teacher", len(dataset), served, val.images[:2]
    )


if __name__ == "__main__":
    sys.exit(stage_main("train_teacher", __doc__, run, distributed=True))
