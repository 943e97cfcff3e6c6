"""Teacher training throughput: the vitkit engine against a bare PyTorch loop.

Both train the same torchvision ResNet on the same images, transforms, batch
size and optimizer; they run alternately in the same process, several times,
and the medians are compared. The engine's time includes everything it adds
(progress bar, NaN check, grad clipping, LR schedule, a checkpoint at the end).

    python benchmarks/bench_engine.py --steps 20 --repeats 5
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
from vitkit.data.shapes import generate_classification
from vitkit.data.transforms import train_transform
from vitkit.engine.device import select_device
from vitkit.engine.distributed import DistInfo
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import Trainer, TrainerConfig, to_device
from vitkit.models.resnet import build_resnet


def load_images(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if (data_dir / "train").is_dir():
        images, labels, *_ = load_imagefolder(data_dir / "train", cache_mb=math.inf)  # in memory
        return images[:], labels
    with tempfile.TemporaryDirectory() as tmp:
        generate_classification(Path(tmp), ["circle", "square", "triangle"], {"train": 200}, 32, seed=0)
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


def engine_loop(dataset, args, device, checkpoint_dir: Path) -> float:
    task = ClassifierTask(build_resnet(args.arch, 6, stem=args.stem))
    # the former TrainerConfig defaults (today's teacher and engine params, the lr aside)
    cfg = TrainerConfig(
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-3,
        weight_decay=0.05,
        warmup_epochs=1.0,
        grad_clip=1.0,
        seed=0,
        amp="cuda",
        compile=False,
        tf32=True,
        channels_last=True,
        num_workers=0,
        checkpoint_every_steps=50,
        check_every_steps=10,
        max_steps_per_epoch=0,
        desc="engine",
        fingerprint="",
        progress=True,
    )
    trainer = Trainer(task, dataset, cfg, device, DistInfo(), checkpoint_dir)
    start = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return trainer.steps_per_epoch * args.batch_size / (time.perf_counter() - start)


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    images, labels = load_images(args.data)
    count = min(len(images), args.steps * args.batch_size)
    dataset = Subset(LabelledImageDataset(images, labels, train_transform(images.shape[-1])), range(count))
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
    b, e = statistics.median(bare), statistics.median(engine)
    print(f"median: bare loop {b:.1f} img/s, engine {e:.1f} img/s, ratio {e / b:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
