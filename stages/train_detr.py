"""train_detr@<arch>: DETR (``detr``) or Deformable DETR (``deformable``) on ``data/detection``.

``python -m stages.train_detr detr|deformable``. Both variants share the
training recipe (``detr_training`` params: AdamW, the backbone at a lower lr
or frozen, gradient clipping 0.1, warmup + cosine, transforms v2 that move the
boxes with the pixels) and take their model from the ``detr`` or
``deformable`` params. The ResNet backbone starts from the SSL backbone, the
teacher or scratch (``detr_training.init``). COCO AP on the val split every
``eval_every`` epochs goes to MLflow and ``plots/detr/<arch>/history.csv``;
checkpoints to ``checkpoints/detr/<arch>`` (a killed run resumes);
the model to ``artifacts/detr/<arch>/model.pt``, which ``evaluate`` scores
on the test split.
"""

from __future__ import annotations

import dataclasses
import sys

import pandas as pd
from torch import Tensor, nn

from stages.common import StageContext, fingerprint, stage_main, trainer_config
from vitkit.config import Params
from vitkit.data.datasets import CocoDetection, collate_detection
from vitkit.data.detection_transforms import eval_transforms, train_transforms
from vitkit.engine.checkpoint import load_weights, save_weights
from vitkit.engine.trainer import Trainer
from vitkit.errors import ConfigError, DataError
from vitkit.evaluation.classification import plot_history
from vitkit.evaluation.coco import evaluate_coco
from vitkit.evaluation.detection import predict_coco
from vitkit.io import atomic_path, write_json
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

ARCHS = ("detr", "deformable")
INIT_WEIGHTS = {"ssl": "artifacts/ssl/backbone.pt", "teacher": "artifacts/teacher/model.pt"}
AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def model_config(arch: str, params: Params, num_classes: int) -> DETRConfig | DeformableDETRConfig:
    """The library config of ``arch`` from its params section; the trunk is ``backbone``'s."""
    common = {
        "num_classes": num_classes,
        "arch": params.backbone.arch,
        "stem": params.backbone.stem,
        "train_backbone": not params.detr_training.freeze_backbone,
    }
    if arch == "detr":
        return DETRConfig(**common, **params.detr.model_dump(exclude={"lr"}))
    knobs = params.deformable.model_dump(exclude={"lr", "lr_linear_proj_mult"})
    return DeformableDETRConfig(**common, **{**knobs, "return_layers": tuple(knobs["return_layers"])})


def build_model(
    cfg: DETRConfig | DeformableDETRConfig, backbone_state: dict[str, Tensor] | None
) -> nn.Module:
    if isinstance(cfg, DETRConfig):
        return build_detr(cfg, backbone_state)
    return build_deformable_detr(cfg, backbone_state)


def config_from_meta(meta: dict) -> DETRConfig | DeformableDETRConfig:
    """Rebuild the config saved in a ``train_detr`` model file's meta."""
    if meta["model"] == "detr":
        return DETRConfig(**meta["config"])
    return DeformableDETRConfig(**{**meta["config"], "return_layers": tuple(meta["config"]["return_layers"])})


def postprocessor(arch: str, top_k: int, score_threshold: float) -> PostProcess:
    """DETR: each query's best class; Deformable DETR: the top (query, class) pairs."""
    cls = PostProcess if arch == "detr" else TopKPostProcess
    return cls(top_k=top_k, score_threshold=score_threshold)


def postprocessor_from_meta(meta: dict) -> PostProcess:
    return postprocessor(meta["model"], meta["top_k"], meta["score_threshold"])


def backbone_init(ctx: StageContext) -> dict[str, Tensor] | None:
    """Trunk weights named by ``detr_training.init`` (no ``fc``), or None for scratch."""
    init = ctx.params.detr_training.init
    if init == "scratch":
        return None
    path = ctx.path(INIT_WEIGHTS[init])
    if not path.is_file():
        stage = "pretrain_ssl" if init == "ssl" else "train_teacher"
        raise ConfigError(
            f"detr_training.init is {init!r} but {path} does not exist; run the {stage} stage first "
            "or set detr_training.init to another source (ssl | teacher | scratch)"
        )
    state, meta = load_weights(path)
    backbone = ctx.params.backbone
    if (meta.get("arch"), meta.get("stem")) != (backbone.arch, backbone.stem):
        raise ConfigError(
            f"{path} holds a {meta.get('arch')} with the {meta.get('stem')!r} stem, but the backbone "
            f"params ask for {backbone.arch} / {backbone.stem!r}; set backbone.arch and backbone.stem "
            "to match, or detr_training.init: scratch"
        )
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def detection_loss(criterion: nn.Module):
    def step(net: nn.Module, batch: tuple[list[Tensor], list[dict]]) -> Tensor:
        images, targets = batch
        targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        return criterion.weighted_sum(criterion(net(nested_tensor_from_images(images)), targets))

    return step


def run(ctx: StageContext) -> dict[str, float]:
    arch, p = ctx.variant, ctx.params.detr_training
    data_dir = ctx.path("data/detection")
    train = CocoDetection(data_dir / "train", train_transforms(p.train_scales, crop=p.crop))
    val = CocoDetection(data_dir / "val", eval_transforms(p.eval_size))
    category_ids = [c["id"] for c in train.categories]
    if not category_ids or min(category_ids) < 0:
        raise DataError(f"{data_dir / 'train/annotations.json'}: categories need non-negative integer ids")
    cfg = model_config(arch, ctx.params, num_classes=max(category_ids) + 1)
    if p.release_checkpoint:
        # the release holds every weight, backbone included; only the class head starts fresh
        model = build_model(cfg, None)
        load = load_detr_checkpoint if arch == "detr" else load_deformable_detr_checkpoint
        fresh = load(model, ctx.path(p.release_checkpoint))
        print(f"[{ctx.name}] loaded {p.release_checkpoint}; re-initialised: {', '.join(fresh) or 'nothing'}")
    else:
        model = build_model(cfg, backbone_init(ctx))
    lr = getattr(ctx.params, arch).lr or p.lr
    if arch == "detr":
        criterion = build_criterion(cfg)
        groups = param_groups(model, lr, p.lr_backbone, p.weight_decay)
    else:
        criterion = build_deformable_criterion(cfg)
        groups = deformable_param_groups(
            model, lr, p.lr_backbone, p.weight_decay, ctx.params.deformable.lr_linear_proj_mult
        )
    criterion.to(ctx.device)
    post = postprocessor(arch, p.top_k, p.score_threshold)
    batch_size = ctx.params.evaluate.batch_size

    trainer: Trainer | None = None

    def validate(net: nn.Module) -> dict[str, float]:
        epoch = trainer.state.epoch + 1
        if epoch % p.eval_every and epoch != p.epochs:
            return {}
        _, results = predict_coco(net, val, post, ctx.device, batch_size)
        metrics = evaluate_coco(val.coco, results)
        return {f"val_{name}": metrics[name] for name in AP_COLUMNS}

    trainer_cfg = trainer_config(
        ctx,
        p,
        ctx.name,
        fingerprint(p, getattr(ctx.params, arch), dataclasses.asdict(cfg), ctx.params.seed, len(train)),
        lr=lr,
    )
    trainer = Trainer(
        model,
        train,
        detection_loss(criterion),
        trainer_cfg,
        ctx.device,
        ctx.dist,
        ctx.path(f"checkpoints/detr/{arch}"),
        param_groups=groups,
        collate_fn=collate_detection,
        eval_fn=validate,
        on_epoch_end=ctx.run.log_epoch,
    )
    history = pd.DataFrame(trainer.fit())
    if not ctx.dist.is_main:
        return {}
    # wall-clock of training so far (evaluation excluded): the x axis of the convergence race
    history.insert(1, "train_time_s", history["epoch_time_s"].cumsum())

    meta = {
        "model": arch,
        "config": dataclasses.asdict(cfg),
        "categories": train.categories,
        "eval_size": p.eval_size,
        "top_k": p.top_k,
        "score_threshold": p.score_threshold,
    }
    weights = ctx.path(f"artifacts/detr/{arch}/model.pt")
    save_weights(weights, trainer.model.state_dict(), meta)
    history_csv = ctx.path(f"plots/detr/{arch}/history.csv")
    with atomic_path(history_csv) as tmp:
        history.to_csv(tmp, index=False)
    curves = ctx.path(f"plots/detr/{arch}/curves.png")
    plot_history(history, ["train_loss", "val_AP", "val_AP50"], f"{arch} training", curves)

    final = history.iloc[-1]
    metrics = {f"val_{name}": float(final[f"val_{name}"]) for name in AP_COLUMNS}
    metrics |= {
        "epochs": int(final["epoch"]),
        "train_images": len(train),
        "train_time_s": float(final["train_time_s"]),
        "images_per_s": float(history["images_per_s"].median()),
        "final_train_loss": float(final["train_loss"]),
    }
    write_json(ctx.path(f"metrics/detr/{arch}.json"), metrics)
    ctx.run.log_artifact(weights, "weights")
    ctx.run.log_artifact(history_csv)
    ctx.run.log_artifact(curves, "figures")
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("train_detr", __doc__, run, distributed=True, variants=ARCHS))
