"""Teacher training throughput: the vitkit engine against a bare PyTorch loop.

Both train the same torchvision ResNet on the same images, transforms, batch
size and optimizer; they run alternately in the same process, several times,
and the medians are compared. The engine's time includes everything it adds
(progress bar, NaN check, grad clipping, LR schedule, a checkpoint at the end).

With ``--compile`` the engine also trains with ``engine.compile`` (the teacher's compiled
step): one run of ``1 + repeats`` epochs, whose first epoch pays the compilation (reported as
the warm-up: its time beyond a compiled epoch's) and whose later epochs are the measurements.

    python benchmarks/bench_engine.py --steps 20 --repeats 5 [--compile]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from vitkit.data.datasets import LabelledImageDataset, load_imagefolder
from vitkit.data.shapes import SHAPE_CLASSES, generate_classification
from vitkit.data.transforms import train_transform
from vitkit.engine.device import select_device, usable_cpus
from vitkit.engine.distributed import DistInfo
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import Trainer, TrainerConfig, to_device
from vitkit.models.resnet import build_resnet


def load_images(data_dir: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The default data's train split, or (without one) ``count`` generated 32 px shapes images."""
    if (data_dir / "train").is_dir():
        images, labels, *_ = load_imagefolder(data_dir / "train", cache_mb=math.inf)  # in memory
        return images[:], labels
    per_class = math.ceil(count / len(SHAPE_CLASSES))
    with tempfile.TemporaryDirectory() as tmp:
        generate_classification(
            Path(tmp), SHAPE_CLASSES, {"train": per_class}, 32, seed=0, workers=usable_cpus(), progress=False
        )
        images, labels, *_ = load_imagefolder(Path(tmp) / "train", cache_mb=math.inf)
        return images[:], labels


def bare_loop(dataset, args, device) -> float:
    model = build_resnet(args.arch, 6, stem=args.stem).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = to_device((images, labels), device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(loader) * args.batch_size / (time.perf_counter() - start)


class ClassifierTask(TrainingTask):
    """A plain classifier: cross-entropy on the batch, as the bare loop computes it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"loss": F.cross_entropy(model(images), labels)}


def engine_trainer(dataset, args, device, checkpoint_dir: Path, compile: bool, epochs: int) -> Trainer:
    task = ClassifierTask(build_resnet(args.arch, 6, stem=args.stem))
    # the former TrainerConfig defaults (today's teacher and engine params, the lr aside)
    cfg = TrainerConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        weight_decay=0.05,
        warmup_epochs=1.0,
        grad_clip=1.0,
        seed=0,
        amp="cuda",
        compile=compile,
        tf32=True,
        channels_last=True,
        num_workers=0,
        checkpoint_every_steps=50,
        check_every_steps=10,
        max_steps_per_epoch=0,
        min_steps=0,
        desc="engine",
        fingerprint="",
        progress=True,
    )
    return Trainer(task, dataset, cfg, device, DistInfo(), checkpoint_dir)


def engine_loop(dataset, args, device, checkpoint_dir: Path) -> float:
    trainer = engine_trainer(dataset, args, device, checkpoint_dir, compile=False, epochs=1)
    start = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return trainer.steps_per_epoch * args.batch_size / (time.perf_counter() - start)


def compiled_engine(dataset, args, device, checkpoint_dir: Path) -> tuple[list[float], float]:
    """Images/s of each compiled epoch after the first, and the first's extra time (the warm-up)."""
    trainer = engine_trainer(dataset, args, device, checkpoint_dir, compile=True, epochs=1 + args.repeats)
    history = trainer.fit()
    steady = [row["epoch_time_s"] for row in history[1:]]
    warmup = history[0]["epoch_time_s"] - statistics.median(steady)
    return [row["images_per_s"] for row in history[1:]], warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/classification"),
        help="classification ImageFolder root (default: %(default)s; generated if missing)",
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "small"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time the engine with engine.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    images, labels = load_images(args.data, args.steps * args.batch_size)
    count = min(len(images), args.steps * args.batch_size)
    dataset = Subset(
        LabelledImageDataset(images, labels, train_transform(images.shape[-1], 0.5)), range(count)
    )
    print(
        f"device {device}, threads {torch.get_num_threads()}, {args.arch}/{args.stem}, "
        f"batch {args.batch_size}, {count // args.batch_size} steps x {args.repeats} repeats"
    )

    bare, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bare_loop(dataset, args, device)  # warm-up
        for repeat in range(args.repeats):
            bare.append(bare_loop(dataset, args, device))
            engine.append(engine_loop(dataset, args, device, Path(tmp) / f"ckpt{repeat}"))
            print(f"  repeat {repeat + 1}: bare {bare[-1]:.1f} img/s, engine {engine[-1]:.1f} img/s")
        if args.compile:
            compiled, warmup = compiled_engine(dataset, args, device, Path(tmp) / "compiled")
            bare.append(bare_loop(dataset, args, device))  # bracket the compiled run
    b, e = statistics.median(bare), statistics.median(engine)
    print(f"median: bare loop {b:.1f} img/s, engine {e:.1f} img/s, ratio {e / b:.3f} (target >= 0.95)")
    if args.compile:
        c = statistics.median(compiled)
        saved_per_image = 1 / b - 1 / c  # seconds; negative: compiled is slower, never repaid
        repaid = f"{warmup / saved_per_image:.0f} images" if saved_per_image > 0 else "never"
        print(
            f"median: engine with engine.compile {c:.1f} img/s, ratio to the bare eager loop {c / b:.3f} "
            f"(target >= 1.05); compile warm-up {warmup:.1f} s, repaid after {repaid}"
        )


if __name__ == "__main__":
    main()
