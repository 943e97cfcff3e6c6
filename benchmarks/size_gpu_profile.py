"""Size the gpu profile: each model stage's training FLOPs, its data pipeline's CPU throughput, and
what that makes its time on one H100/H200.

For each model stage (pretrain_ssl, train_teacher, distill_deit@{none,soft,hard},
train_detr@{detr,deformable}) at a profile's sizes (params.yaml + profiles/<name>.yaml, read with
vitkit.config; default: gpu):

- **training FLOPs per image**: one training step as the Trainer takes it (``gpu_check``'s task,
  batch and step builders), counted by ``torch.utils.flop_counter.FlopCounterMode`` on this CPU.
  Classifier steps are counted at two small batches and extrapolated to the profile's batch
  (per image = a + b x batch: SimCLR's similarity matrix grows with the batch); a detector's
  image costs what its batch's padded canvas costs (multi-scale, cropped images padded to the
  largest height and width), so its step is counted on a real image padded to ``--canvases``
  canvases spread over those of the batches the data-throughput runs drew at the profile's batch.
  The teacher's forward in distillation is included; the optimiser and element-wise work (norms,
  activations, softmax, losses) are not counted, nor is ``grid_sample`` (Deformable DETR's
  sampling): bounded separately;
- **images per epoch**: as the Trainer draws them (whole batches only; repeated augmentation
  keeps an epoch's length; SSL: an image is two views), times the epochs;
- **validation passes**: forward FLOPs of what each stage's ``validate`` runs (SSL: kNN features
  of the train and val splits before training and every ``ssl.knn.every_epochs``; teacher and
  DeiT: the val split every epoch; DETR: the val split every ``eval_every`` epochs and the last);
- **data throughput**: the stage's training dataset (its transforms, per item, and its collate)
  on generated shapes data, in one process at one torch thread, as a DataLoader worker runs it;
  images per second of the process's CPU time (one core's worth: the machine may be shared), the
  median of ``--repeats`` runs.

Then, on one H100/H200 (dense bf16 peak ``--peak-tflops``, 989): compute-bound time = training
FLOPs / (peak x MFU) at ``--mfu`` low and high; data-bound time = images / (``engine.num_workers``
x images/s/core); expected = the larger of the two, plus the validation passes at the same MFU.

    python benchmarks/size_gpu_profile.py                       # the gpu profile, ~4 min on 2 busy cores
    python benchmarks/size_gpu_profile.py --profile smoke --quick
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check

from vitkit.config import Params
from vitkit.data import shapes
from vitkit.data.datasets import CocoDetection, LabelledImages, collate_detection
from vitkit.data.detection_transforms import train_transforms
from vitkit.models.detr import nested_tensor_from_images
from vitkit.tasks import classifier, contrastive, distillation

PEAK_TFLOPS = gpu_check.PEAK_BF16_TFLOPS["H100"]  # H100 and H200 SXM: 989 dense bf16
MFU = (0.05, 0.25)  # low, high: see docs/results.md, "gpu profile, sized"
# (stage, gpu_check model, distillation mode)
STAGES = (
    ("pretrain_ssl", "ssl", None),
    ("train_teacher", "teacher", None),
    ("distill_deit@none", "deit", "none"),
    ("distill_deit@soft", "deit", "soft"),
    ("distill_deit@hard", "deit", "hard"),
    ("train_detr@detr", "detr", None),
    ("train_detr@deformable", "deformable", None),
)


def shape_classes(params: Params) -> list[str]:
    """The shapes the profile's generated data draws (``data.classes``; null: all of them)."""
    return list(params.data.classes or shapes.SHAPE_CLASSES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu", help="profiles/<name>.yaml applied to params.yaml")
    parser.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES])
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak of the GPU")
    parser.add_argument("--mfu", type=float, nargs=2, default=MFU, metavar=("LOW", "HIGH"))
    parser.add_argument("--items", type=int, default=256, help="items per data-throughput run")
    parser.add_argument("--repeats", type=int, default=3, help="data-throughput runs (the median is kept)")
    parser.add_argument(
        "--canvases", type=int, default=3, help="padded batch sizes a detector's FLOPs average"
    )
    parser.add_argument("--quick", action="store_true", help="few items and runs: a check, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeats, args.canvases = 16, 1, 1
    return args


# --------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs ``FlopCounterMode`` counts in one call of ``fn`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def with_batch(params: Params, model: str, batch_size: int) -> Params:
    """``params`` with ``model``'s training batch size replaced."""
    section = {"ssl": "ssl", "teacher": "teacher", "deit": "deit"}.get(model, "detr_training")
    updated = getattr(params, section).model_copy(update={"batch_size": batch_size})
    return params.model_copy(update={section: updated})


def eager_engine(params: Params):
    """The profile's engine without compile or autocast: FLOP counts do not depend on either."""
    return params.engine.model_copy(update={"compile": False, "amp": "off"})


def classifier_flops(
    model: str, mode: str | None, params: Params, batches: Sequence[int] = (8, 16)
) -> tuple[float, float]:
    """(training FLOPs per image at the profile's batch, forward FLOPs per image of what ``validate``
    runs) of a 32 px classifier-like stage (ssl, teacher, deit), counted on CPU.

    The step is counted at two small batches; per image = a + b x batch (linear for every model
    here but SimCLR, whose 2N x 2N similarity matrix adds the b term), taken at the profile's batch.
    """
    cpu = torch.device("cpu")
    per_image = []
    for size in batches:
        torch.manual_seed(0)
        task, batch, optim = gpu_check.build(model, with_batch(params, model, size), cpu, mode=mode or "soft")
        step = gpu_check.make_step(task, batch, optim, eager_engine(params), cpu)
        per_image.append(count_flops(step) / size)
    (n1, f1), (n2, f2) = zip(batches, per_image, strict=True)
    slope = (f2 - f1) / (n2 - n1)
    target = getattr(params, {"ssl": "ssl", "teacher": "teacher", "deit": "deit"}[model]).batch_size
    train = f1 + slope * (target - n1)
    # validate's forward: the SSL trunk (kNN features), the teacher, the student (EMA or raw)
    evaluated = task.final_model()
    evaluated.eval()
    side = params.data.classification.image_size
    images = torch.randn(batches[0], 3, side, side)
    with torch.no_grad():
        val = count_flops(lambda: evaluated(images)) / batches[0]
    return train, val


def detector_flops(
    model: str,
    params: Params,
    sample: tuple[list[torch.Tensor], list[dict]],
    canvases: Sequence[tuple[int, int]],
) -> tuple[float, float, float]:
    """(training FLOPs per image, averaged over ``canvases``; forward FLOPs per image at the data's
    own size, as validation runs; a bound on the uncounted ``grid_sample`` FLOPs per training image,
    0 for DETR) of a detector stage, counted on CPU.

    A detector's batch is padded to its largest height and width (its canvas), and the model runs on
    every padded pixel: a training image costs what its batch's canvas costs. Each canvas is
    counted on the ``sample``'s real images and targets, zero-padded to it as the model pads them
    (per image, the FLOPs do not depend on the batch: the matcher's cost matrices are not counted).
    """
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    small = with_batch(params, model, 1)  # gpu_check's own synthetic batch is not used
    task, _, optim = gpu_check.build(model, small, cpu)
    images, targets = sample
    plain = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]  # relative to the unpadded image
    train, uncounted = [], []
    for height, width in canvases:
        padded = [F.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2])) for i in images]
        step = gpu_check.make_step(task, (padded, plain), optim, eager_engine(params), cpu)
        train.append(count_flops(step) / len(images))
        uncounted.append(grid_sample_flops(model, params, (height, width)))
    task.model.eval()
    side = params.data.detection.image_size
    # with autograd on: under no_grad FlopCounterMode's module tracker trips on the parameters
    # Deformable DETR hands its submodules as inputs; a forward counts the same either way
    val = count_flops(lambda: task.model(nested_tensor_from_images([torch.randn(3, side, side)])))
    return statistics.fmean(train), float(val), statistics.fmean(uncounted)


def spread(canvases: Sequence[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """``count`` canvases at evenly spaced quantiles of their area (all of them if fewer)."""
    ordered = sorted(canvases, key=lambda c: c[0] * c[1])
    if len(ordered) <= count:
        return ordered
    return [ordered[round((i + 0.5) * len(ordered) / count - 0.5)] for i in range(count)]


def grid_sample_flops(model: str, params: Params, canvas: tuple[int, int]) -> float:
    """An upper bound on one training image's multi-scale deformable sampling FLOPs, which
    FlopCounterMode does not count: every sampling point reads 4 corners of ``head_dim`` channels
    (a multiply-add each: 8 x head_dim) and adds its weighted value (2 x head_dim); over the heads,
    10 x hidden per point and level. Encoder: every token of every level is a query; decoder: the
    object queries. Backward at most twice the forward (gradients to values and to locations)."""
    if model != "deformable":
        return 0.0
    section = params.deformable
    strides = (8, 16, 32, 64)[: section.num_feature_levels]  # C3-C5 and one more, stride 2 each
    tokens = sum(math.ceil(canvas[0] / s) * math.ceil(canvas[1] / s) for s in strides)
    per_query = 10 * section.hidden_dim * section.num_feature_levels
    forward = per_query * (
        tokens * section.enc_n_points * section.enc_layers
        + section.num_queries * section.dec_n_points * section.dec_layers
    )
    return 3.0 * forward


# --------------------------------------------------------------------------- data


def generated_classification(n: int, params: Params, seed: int = 0) -> LabelledImages:
    """``n`` classification images of the shapes data at the profile's size, in memory as the
    stages hold a split that fits ``data.cache_mb``."""
    classes = shape_classes(params)
    side = params.data.classification.image_size
    pictures, labels = [], []
    for i in range(n):
        _, image = shapes.classification_image(seed, "train", i % len(classes), i, classes, side)
        pictures.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        labels.append(i % len(classes))
    return LabelledImages(torch.stack(pictures), torch.tensor(labels), classes)


def stage_dataset(stage: str, params: Params, images: LabelledImages, detection_dir: Path) -> Dataset:
    """The training dataset a stage builds (its transforms), over generated images."""
    hflip = params.data.hflip
    if stage == "pretrain_ssl":
        return contrastive.two_view_dataset(images.images, params.ssl, hflip)
    if stage == "train_teacher":
        return classifier.train_dataset(images, params.teacher, params.seed, hflip)
    if stage.startswith("distill_deit"):
        return distillation.train_dataset(images, params.deit, hflip)
    p = params.detr_training
    return CocoDetection(detection_dir / "train", train_transforms(p.train_scales, hflip, crop=p.crop))


def data_rate(
    dataset: Dataset, collate: Callable, items: int, batch_size: int, repeats: int
) -> tuple[float, list]:
    """Median images per CPU second of one process at one torch thread drawing ``items`` random
    items of ``dataset`` and collating them in batches of ``batch_size`` (a DataLoader worker's
    work), and the collated batches of the last run. CPU time, not wall time: on a shared machine
    the process waits for a core, and a worker on a core of its own would not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rates, batches = [], []
    try:
        for _ in range(repeats):
            order = torch.randint(len(dataset), (items,), generator=generator).tolist()
            batches = []
            start = time.process_time()
            for first in range(0, items, batch_size):
                batches.append(collate([dataset[i] for i in order[first : first + batch_size]]))
            rates.append(items / (time.process_time() - start))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(rates), batches


def canvas(images: Sequence[torch.Tensor]) -> tuple[int, int]:
    """The padded size of a detection batch: its largest height and width."""
    return max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)


# --------------------------------------------------------------------------- the schedule


@dataclass
class Schedule:
    """How much a stage trains and validates at a profile's sizes."""

    epochs: int
    batch_size: int
    images_per_epoch: int  # drawn by the Trainer: whole batches of the sampler's pass
    val_images: int  # forward passes of all validation runs together

    @property
    def images(self) -> int:
        return self.epochs * self.images_per_epoch


def validation_epochs(epochs: int, every: int) -> int:
    """Epochs whose end runs validation: every ``every``-th and the last."""
    return sum(1 for e in range(1, epochs + 1) if e % every == 0 or e == epochs)


def schedule(stage: str, params: Params) -> Schedule:
    """The stage's epochs, batch, images per epoch and validation images, from the params alone."""
    data = params.data
    if "shapes" not in (data.classification.source, data.detection.source, data.unlabeled.source):
        raise SystemExit("sizing reads the shapes data's counts: set data.*.source to shapes")
    classes = len(shape_classes(params))
    cls = data.classification.shapes
    n_train, n_val = cls.train_per_class * classes, cls.val_per_class * classes
    if stage == "pretrain_ssl":
        p = params.ssl
        n, val = (
            data.unlabeled.shapes.images,
            (n_train + n_val) * (1 + validation_epochs(p.epochs, p.knn.every_epochs)),
        )  # the random-weights kNN before training, then the monitor
    elif stage == "train_teacher":
        p = params.teacher
        labels = torch.arange(n_train) % classes
        n, val = len(classifier.stratified_subset(labels, p.label_fraction, params.seed)), n_val * p.epochs
    elif stage.startswith("distill_deit"):
        p = params.deit
        n, val = n_train, n_val * p.epochs  # RASampler: an epoch is still len(dataset) draws
    else:
        p = params.detr_training
        det = data.detection.shapes
        n, val = det.train_images, det.val_images * validation_epochs(p.epochs, p.eval_every)
    steps = n // p.batch_size  # one process: the sampler's pass is the dataset, drop_last
    if params.engine.max_steps_per_epoch:
        steps = min(steps, params.engine.max_steps_per_epoch)
    return Schedule(p.epochs, p.batch_size, steps * p.batch_size, val)


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    stage: str
    gflop_per_image: float  # training, forward + backward (+ the teacher's forward)
    images: int  # all epochs
    val_gflop: float  # all validation passes together
    images_per_s_core: float  # the data pipeline, one core
    uncounted_gflop_per_image: float  # grid_sample bound (Deformable DETR)
    workers: int
    peak_tflops: float
    mfu: tuple[float, float]

    @property
    def train_tflop(self) -> float:
        return self.gflop_per_image * self.images / 1e3

    def compute_min(self, mfu: float) -> float:
        return self.train_tflop * 1e12 / (self.peak_tflops * 1e12 * mfu) / 60

    def validation_min(self, mfu: float) -> float:
        return self.val_gflop * 1e9 / (self.peak_tflops * 1e12 * mfu) / 60

    @property
    def data_min(self) -> float:
        """The CPU-side bound: every image through ``workers`` processes at the measured rate."""
        return self.images / (max(self.workers, 1) * self.images_per_s_core) / 60

    def expected_min(self, mfu: float) -> float:
        return max(self.compute_min(mfu), self.data_min) + self.validation_min(mfu)


def size_stages(args: argparse.Namespace) -> tuple[Params, list[Row]]:
    params = gpu_check.load_profile(args.profile)
    torch.manual_seed(0)
    n_images = max(64, params.detr_training.batch_size * 2) if not args.quick else 32
    images = generated_classification(n_images, params)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        det = params.data.detection
        spec = det.shapes
        shapes.generate_detection(
            Path(tmp), shape_classes(params), {"train": n_images}, det.image_size, spec.min_objects,
            spec.max_objects, spec.min_object_size, spec.max_object_size, params.seed, 1, False,
        )  # fmt: skip
        for stage, model, mode in STAGES:
            if stage not in args.stages:
                continue
            began, plan = time.perf_counter(), schedule(stage, params)
            torch.manual_seed(params.seed)  # the transforms draw from it: the same crops for every stage
            dataset = stage_dataset(stage, params, images, Path(tmp))
            detector, sizes = model in ("detr", "deformable"), []

            def collate(items: list, detector: bool = detector, sizes: list = sizes) -> Any:
                if not detector:
                    return default_collate(items)
                batch = collate_detection(items)
                sizes.append(canvas(batch[0]))  # every batch's padded size, for the FLOPs
                return batch

            batch_size = min(plan.batch_size, args.items)
            rate, drawn = data_rate(dataset, collate, args.items, batch_size, args.repeats)
            note = ""
            if detector:
                counted = spread(sizes, args.canvases)
                sample = (drawn[0][0][:1], drawn[0][1][:1])  # a real image and its targets
                train, val, uncounted = detector_flops(model, params, sample, counted)
                areas = sorted(h * w for h, w in sizes)
                note = (
                    f", {len(sizes)} batches padded to a median {statistics.median(areas) ** 0.5:.0f}^2 px "
                    f"({areas[0] ** 0.5:.0f}^2-{areas[-1] ** 0.5:.0f}^2), FLOPs at {len(counted)} of them"
                )
            else:
                (train, val), uncounted = classifier_flops(model, mode, params), 0.0
            rows.append(
                Row(
                    stage,
                    train / 1e9,
                    plan.images,
                    val * plan.val_images / 1e9,
                    rate,
                    uncounted / 1e9,
                    params.engine.num_workers,
                    args.peak_tflops,
                    tuple(args.mfu),
                )
            )
            print(
                f"{stage}: {train / 1e9:.3f} GFLOP/img, {rate:.0f} img/s/core{note} "
                f"({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    return params, rows


def format_table(rows: Sequence[Row]) -> str:
    """One line per stage and their sum; times in minutes, at the low and the high MFU."""
    low, high = rows[0].mfu
    header = (
        f"{'stage':<22}{'GFLOP/img':>10}{'images':>11}{'TFLOP':>9}{'img/s/core':>11}"
        f"{'compute min':>14}{'data min':>10}{'val min':>11}{'expected min':>15}"
    )
    lines = [
        f"MFU {low:.0%} (slow) - {high:.0%} (fast) of {rows[0].peak_tflops:.0f} TFLOP/s dense bf16; "
        f"data: {rows[0].workers} workers",
        header,
        "-" * len(header),
    ]

    def span(a: float, b: float) -> str:
        return f"{a:.1f}-{b:.1f}" if round(a, 1) != round(b, 1) else f"{a:.1f}"

    for r in rows:
        lines.append(
            f"{r.stage:<22}{r.gflop_per_image:>10.3f}{r.images:>11,}{r.train_tflop:>9.0f}"
            f"{r.images_per_s_core:>11.0f}{span(r.compute_min(high), r.compute_min(low)):>14}"
            f"{r.data_min:>10.1f}{span(r.validation_min(high), r.validation_min(low)):>11}"
            f"{span(r.expected_min(high), r.expected_min(low)):>15}"
        )
    total_low = sum(r.expected_min(low) for r in rows)
    total_high = sum(r.expected_min(high) for r in rows)
    lines.append("-" * len(header))
    total_tflop = sum(r.train_tflop for r in rows)
    lines.append(f"{'sum':<43}{total_tflop:>9.0f}{span(total_high, total_low):>61}")
    for r in rows:
        if r.uncounted_gflop_per_image:
            share = r.uncounted_gflop_per_image / r.gflop_per_image
            lines.append(
                f"{r.stage}: grid_sample, not counted, at most {r.uncounted_gflop_per_image:.3f} GFLOP/img "
                f"({share:.1%} of the counted)"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- test-set resolution


def proportion_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` (a top-1) measured on ``n`` test images."""
    return math.sqrt(p * (1 - p) / n)


def paired_difference_se(discordant: float, n: int) -> float:
    """Standard error of the difference of two top-1s on the same ``n`` images when a fraction
    ``discordant`` of them is right for one model only (the paired bootstrap's case; at zero mean
    difference): sqrt(discordant / n)."""
    return math.sqrt(discordant / n)


def resolution_lines(params: Params) -> list[str]:
    """How large a top-1 difference the report's 95 % intervals resolve on the profile's test splits."""
    n = params.data.classification.shapes.test_per_class * len(shape_classes(params))
    lines = [f"classification test split: {n} images"]
    for p in (0.5, 0.9):
        se = proportion_se(p, n)
        lines.append(f"  one top-1 at {p:.0%}: SE {se:.2%}, 95% half-width {1.96 * se:.2%}")
    for d in (0.05, 0.1, 0.2):
        se = paired_difference_se(d, n)
        lines.append(
            f"  paired difference, {d:.0%} of images discordant: SE {se:.2%}, 95% half-width {1.96 * se:.2%}"
        )
    n_det = params.data.detection.shapes.test_images
    se = proportion_se(0.5, n_det)
    lines.append(
        f"detection test split: {n_det} images; a proportion at 50% would have SE {se:.2%} "
        f"(95% half-width {1.96 * se:.2%}); COCO AP's bootstrap interval is wider"
    )
    return lines


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    start = time.perf_counter()
    params, rows = size_stages(args)
    load = os.getloadavg()[0]
    print(
        f"\nprofile {args.profile}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load {load:.1f}, {time.perf_counter() - start:.0f} s"
    )
    print(format_table(rows))
    print("\n".join(resolution_lines(params)))
    return rows


if __name__ == "__main__":
    main()
