"""pretrain_ssl: contrastive pretraining of the backbone on the unlabelled pool (SimCLR or MoCo v2).

Trains the ``backbone`` ResNet on two augmented views of every unlabelled image
(``ssl.method``), monitors it with a weighted kNN classifier on the labelled
classification split, and writes the trunk to ``artifacts/ssl/model.pt``: what
``train_teacher`` and ``train_detr`` start from when their ``init`` is ``ssl``.
A killed run resumes from ``checkpoints/ssl``. The recipe is
``vitkit.tasks.contrastive``.
"""

from __future__ import annotations

import math
import sys

import pandas as pd

from stages import paths
from stages.common import StageContext, stage_main
from stages.publish import publish
from vitkit.data.datasets import load_image_dir, load_imagefolder
from vitkit.data.ssl_transforms import plot_view_pairs
from vitkit.engine.trainer import Trainer
from vitkit.serving import EmbeddingModel
from vitkit.tasks.base import fingerprint, trainer_config
from vitkit.tasks.contrastive import ContrastiveTask, backbone_predictor, two_view_dataset


def run(ctx: StageContext) -> dict[str, float]:
    p, backbone, seed = ctx.params.ssl, ctx.params.backbone, ctx.params.seed
    cache_mb = ctx.params.data.cache_mb
    unlabeled = load_image_dir(ctx.path(paths.UNLABELED_IMAGES), cache_mb)
    train, val = (load_imagefolder(ctx.path(paths.CLASSIFICATION / s), cache_mb) for s in ("train", "val"))
    dataset = two_view_dataset(unlabeled, p, ctx.params.data.hflip)
    task = ContrastiveTask(p, backbone, train, val, ctx.params.evaluate.batch_size)
    random_init_knn = task.knn_top1(task.model) if ctx.dist.writes_files else math.nan
    cfg = trainer_config(
        p, ctx.params.engine, seed, f"ssl {p.method}", fingerprint(p, backbone, seed, len(unlabeled))
    )
    trainer = Trainer(task, dataset, cfg, ctx.device, ctx.dist, ctx.path(ctx.out.checkpoints))
    trainer.on_epoch_end = ctx.run.log_epoch
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.writes_files:  # each node keeps its own outputs
        return {}

    final = history.iloc[-1]
    metrics = {"knn_top1": final["knn_top1"], "random_init_knn_top1": random_init_knn}
    metrics["train_loss"] = final["train_loss"]
    if "train_pretext_top1" in history:
        metrics["pretext_top1"] = final["train_pretext_top1"]
    meta = {
        "arch": backbone.arch,
        "stem": backbone.stem,
        "method": p.method,
        "image_size": unlabeled.shape[-1],
    }
    curves = ("train_loss", "train_pretext_top1", "knn_top1")
    title, served = f"{p.method} pretraining", EmbeddingModel(backbone_predictor)
    metrics = publish(
        ctx, history, metrics, task.final_model(), meta, curves, title, len(unlabeled), served, unlabeled[:2]
    )
    views = ctx.path(ctx.out.plot("view_pairs.png"))
    plot_view_pairs(unlabeled[:8], dataset.two_views, views)
    ctx.run.log_artifact(views, "figures")
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("pretrain_ssl", __doc__, run, distributed=True))
