"""Own data, tried as a new user would: scikit-image's LFW subset as an ImageFolder, params changes only.

scikit-image ships (in its wheel, nothing downloaded) ``skimage.data.lfw_subset()``: 200 greyscale
25x25 crops from Labeled Faces in the Wild, the first 100 faces and the last 100 not. This script
writes them the way a user's data would arrive: an ImageFolder ``<out>/lfw/{train,val,test}/
{face,not_face}/*.png`` (50 / 25 / 25 per class, a seeded shuffle) and the train images again as the
unlabelled pool ``<out>/lfw_pool/`` (SSL sees no val or test image), then prints the params overrides
the experiment ran with (docs/results.md, "Own data"):

    pip install scikit-image
    python benchmarks/own_data.py --out /tmp/own        # then put the printed params in params.yaml
    dvc repro distill_deit                              # prepare, pretrain_ssl, train_teacher, DeiT
    python benchmarks/own_data.py --evaluate .          # their test top-1, as evaluate scores them

(``--evaluate`` scores the classification models with the evaluate stage's functions, without the
detectors the evaluate stage also needs.)

Everything else stays at params.yaml's defaults: ``engine.min_steps`` turns the default epochs
(sized for 6 000 images) into enough steps for 100.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SPLIT_PER_CLASS = {"train": 50, "val": 25, "test": 25}
CLASSES = ("face", "not_face")  # lfw_subset's first and second hundred


def write_imagefolder(out: Path, seed: int) -> tuple[Path, Path]:
    from skimage.data import lfw_subset  # an optional dependency of this experiment only

    images = (lfw_subset() * 255).round().astype(np.uint8)  # (200, 25, 25) floats in [0, 1]
    rng = np.random.default_rng(seed)
    root, pool = out / "lfw", out / "lfw_pool"
    pool.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(CLASSES):
        order = rng.permutation(100) + 100 * label
        start = 0
        for split, count in SPLIT_PER_CLASS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in order[start : start + count]:
                Image.fromarray(images[i], "L").save(folder / f"{i:03d}.png")
                if split == "train":
                    Image.fromarray(images[i], "L").save(pool / f"{i:03d}.png")
            start += count
    return root, pool


def overrides(root: Path, pool: Path) -> dict:
    """What the experiment changed in params.yaml: the data, and batches small enough for 100 images."""
    return {
        "data": {
            "classification": {"source": "imagefolder", "path": str(root), "image_size": 32},
            "unlabeled": {"source": "folder", "path": str(pool)},
        },
        "ssl": {"batch_size": 64, "knn": {"k": 20, "every_epochs": 50}},
        "teacher": {"batch_size": 32},
        "deit": {"batch_size": 32},
    }


def evaluate(repo: Path) -> dict[str, float]:
    """Test top-1 of the SSL trunk (kNN, linear probe, and random weights), the teacher and the
    three students, in a repository where ``dvc repro distill_deit`` ran."""
    import tempfile

    import torch

    from stages import paths
    from vitkit.config import load_params
    from vitkit.data.datasets import load_imagefolder
    from vitkit.engine.checkpoint import load_weights
    from vitkit.losses.distillation import DISTILLATION_TYPES
    from vitkit.tasks.classifier import evaluate_classifier, load_classifier
    from vitkit.tasks.contrastive import evaluate_backbone
    from vitkit.tasks.distillation import evaluate_student

    params, device = load_params(repo / "params.yaml"), torch.device("cpu")
    batch = params.evaluate.batch_size
    train, test = (
        load_imagefolder(repo / paths.CLASSIFICATION / s, params.data.cache_mb) for s in ("train", "test")
    )
    scores = {}
    ssl, _ = evaluate_backbone(
        *load_weights(repo / paths.SSL.model), train, test, params.ssl.knn, params.seed, device, batch
    )
    scores |= {f"{name}_{k}": v for name, row in ssl.items() for k, v in row.items()}
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "confusion.png", Path(tmp) / "per_class.csv"
        teacher = load_classifier(*load_weights(repo / paths.TEACHER.model))
        report, teacher_logits = evaluate_classifier(teacher, test, device, batch, *figures)
        scores["teacher_top1"] = report["top1"]
        for mode in DISTILLATION_TYPES:
            student = load_weights(repo / paths.stage_paths("distill_deit", mode).model)
            row, _ = evaluate_student(
                *student, test, teacher_logits, device, batch, torch.arange(2), Path(tmp) / f"{mode}.png"
            )
            scores[f"deit_{mode}_avg_top1"] = row["avg_top1"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="folder to write the data into")
    action.add_argument("--evaluate", type=Path, metavar="REPO", help="score the trained models in REPO")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args()
    if args.evaluate:
        for name, value in evaluate(args.evaluate.resolve()).items():
            print(f"{name}: {value:.3f}")
        return
    root, pool = write_imagefolder(args.out.resolve(), args.seed)
    print(yaml.safe_dump(overrides(root, pool), sort_keys=False))


if __name__ == "__main__":
    main()
