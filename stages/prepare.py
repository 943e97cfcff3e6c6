"""prepare: build the datasets every later stage reads.

By default it generates the built-in synthetic *shapes* data (classification
ImageFolder splits, a COCO-format detection split, an unlabelled pool); with
``data.*.source`` set it ingests the user's ImageFolder / COCO data instead,
validating every entry first. Each output folder is written beside its final
place and the three are renamed in together, so a failure leaves the previous data untouched.
Outputs: ``data/classification``, ``data/detection``, ``data/unlabeled``,
``reports/dataset_card.json``, ``plots/prepare/samples.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages.common import StageContext, stage_main
from vitkit.data import ingest, shapes
from vitkit.data.card import build_dataset_card, plot_samples
from vitkit.io import atomic_dir, write_json

SPLITS = ("train", "val", "test")


def prepare_classification(ctx: StageContext, out: Path) -> None:
    cfg, data = ctx.params.data.classification, ctx.params.data
    if cfg.source == "imagefolder":
        ingest.ingest_imagefolder(Path(cfg.path), out, SPLITS, cfg.image_size)
        return
    counts = {
        "train": cfg.shapes.train_per_class,
        "val": cfg.shapes.val_per_class,
        "test": cfg.shapes.test_per_class,
    }
    with atomic_dir(out) as tmp:
        shapes.generate_classification(
            tmp,
            data.classes,
            counts,
            cfg.image_size,
            ctx.params.seed,
            data.workers,
            ctx.params.engine.progress,
        )


def prepare_detection(ctx: StageContext, out: Path) -> None:
    cfg, data = ctx.params.data.detection, ctx.params.data
    if cfg.source == "coco":
        # validate every split before writing any, so a bad test split does not leave a new train split
        for split in SPLITS:
            ingest.validate_coco(Path(cfg.coco[split].annotations), Path(cfg.coco[split].images))
        with atomic_dir(out) as tmp:
            for split in SPLITS:
                ingest.ingest_coco(
                    Path(cfg.coco[split].annotations), Path(cfg.coco[split].images), tmp / split
                )
        return
    s = cfg.shapes
    counts = {"train": s.train_images, "val": s.val_images, "test": s.test_images}
    with atomic_dir(out) as tmp:
        shapes.generate_detection(
            tmp,
            data.classes,
            counts,
            cfg.image_size,
            s.min_objects,
            s.max_objects,
            s.min_object_size,
            s.max_object_size,
            ctx.params.seed,
            data.workers,
            ctx.params.engine.progress,
        )


def prepare_unlabeled(ctx: StageContext, out: Path) -> None:
    cfg, data = ctx.params.data.unlabeled, ctx.params.data
    size = data.classification.image_size
    if cfg.source == "folder":
        ingest.ingest_image_dir(Path(cfg.path), out, size)
        return
    with atomic_dir(out) as tmp:
        shapes.generate_unlabeled(
            tmp,
            data.classes,
            cfg.shapes.images,
            size,
            ctx.params.seed,
            data.workers,
            ctx.params.engine.progress,
        )


def run(ctx: StageContext) -> dict[str, float]:
    data_root = ctx.path("data")
    # all three are built in temporary folders and swapped in together only when every one succeeded:
    # a bad detection json must not leave a new classification split beside the old detection data
    with (
        atomic_dir(data_root / "classification") as classification,
        atomic_dir(data_root / "detection") as detection,
        atomic_dir(data_root / "unlabeled") as unlabeled,
    ):
        prepare_classification(ctx, classification)
        prepare_detection(ctx, detection)
        prepare_unlabeled(ctx, unlabeled)

    card = build_dataset_card(data_root)
    card_path = ctx.path("reports/dataset_card.json")
    write_json(card_path, card)
    samples = ctx.path("plots/prepare/samples.png")
    plot_samples(data_root, samples)
    ctx.run.log_artifact(card_path)
    ctx.run.log_artifact(samples, "figures")
    return {
        "classification_train_images": card["classification"]["splits"]["train"]["images"],
        "detection_train_objects": card["detection"]["splits"]["train"]["objects"],
        "unlabeled_images": card["unlabeled"]["images"],
    }


if __name__ == "__main__":
    sys.exit(stage_main("prepare", __doc__, run))
