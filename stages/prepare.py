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

from stages import paths
from stages.common import StageContext, stage_main
from vitkit.data import ingest, shapes
from vitkit.data.card import build_dataset_card, plot_samples
from vitkit.engine.device import at_most_cores
from vitkit.errors import ConfigError
from vitkit.io import atomic_dir, write_json
from vitkit.progress import progress_enabled

SPLITS = ("train", "val", "test")


def shape_classes(ctx: StageContext) -> list[str]:
    """The shapes generated data draws: ``data.classes`` when the classification data is generated
    too, else (own classification data, whose classes those are) every shape."""
    data = ctx.params.data
    if data.classification.source == "shapes" and data.classes is not None:
        return list(data.classes)
    return list(shapes.SHAPE_CLASSES)


def prepare_classification(ctx: StageContext, out: Path, workers: int) -> None:
    cfg, data = ctx.params.data.classification, ctx.params.data
    if cfg.source == "imagefolder":
        ingest.ingest_imagefolder(Path(cfg.path), out, SPLITS, cfg.image_size, data.classes)
        return
    counts = {
        "train": cfg.shapes.train_per_class,
        "val": cfg.shapes.val_per_class,
        "test": cfg.shapes.test_per_class,
    }
    shapes.generate_classification(
        out, shape_classes(ctx), counts, cfg.image_size, ctx.params.seed, workers, progress_enabled()
    )


def prepare_detection(ctx: StageContext, out: Path, workers: int) -> None:
    cfg = ctx.params.data.detection
    if cfg.source == "coco":
        # validate every split, and their categories against train's, before writing any, so a bad
        # test split does not leave a new train split
        validated = {
            split: ingest.validate_coco(Path(cfg.coco[split].annotations), Path(cfg.coco[split].images))
            for split in SPLITS
        }
        ingest.check_coco_splits(validated)
        for split in SPLITS:
            coco = cfg.coco[split]
            ingest.ingest_coco(
                Path(coco.annotations), Path(coco.images), out / split, max_size=cfg.image_size
            )
        return
    s = cfg.shapes
    counts = {"train": s.train_images, "val": s.val_images, "test": s.test_images}
    shapes.generate_detection(
        out, shape_classes(ctx), counts, cfg.image_size, s.min_objects, s.max_objects, s.min_object_size,
        s.max_object_size, ctx.params.seed, workers, progress_enabled(),
    )  # fmt: skip


def prepare_unlabeled(ctx: StageContext, out: Path, workers: int) -> None:
    cfg, data = ctx.params.data.unlabeled, ctx.params.data
    size = data.classification.image_size
    if cfg.source == "folder":
        ingest.ingest_image_dir(Path(cfg.path), out, size)
        return
    shapes.generate_unlabeled(
        out, shape_classes(ctx), cfg.shapes.images, size, ctx.params.seed, workers, progress_enabled()
    )


def check_shape_classes(ctx: StageContext) -> None:
    """Generated classification data can only draw the shapes the generator knows."""
    data = ctx.params.data
    unknown = [c for c in data.classes or () if c not in shapes.SHAPE_CLASSES]
    if data.classification.source == "shapes" and unknown:
        raise ConfigError(
            f"data.classes: {unknown} are not shapes the generator draws; choose from "
            f"{list(shapes.SHAPE_CLASSES)}, or null for all of them (for own data, set "
            "data.classification.source: imagefolder: data.classes then names its class folders)"
        )


def run(ctx: StageContext) -> dict[str, float]:
    check_shape_classes(ctx)
    # processes generating the shapes data: the data does not depend on how many, so at most one per core
    workers = at_most_cores(ctx.params.data.workers, "data.workers", ctx.name)
    data_root = ctx.path(paths.DATA)
    # all three are built in temporary folders and swapped in together only when every one succeeded:
    # a bad detection json must not leave a new classification split beside the old detection data
    with (
        atomic_dir(ctx.path(paths.CLASSIFICATION)) as classification,
        atomic_dir(ctx.path(paths.DETECTION)) as detection,
        atomic_dir(ctx.path(paths.UNLABELED)) as unlabeled,
    ):
        prepare_classification(ctx, classification, workers)
        prepare_detection(ctx, detection, workers)
        prepare_unlabeled(ctx, unlabeled, workers)

    card = build_dataset_card(data_root)
    card_path = ctx.path(paths.DATASET_CARD)
    write_json(card_path, card)
    samples = ctx.path(ctx.out.plot("samples.png"))
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
