"""SSL training throughput: MoCo v2 and SimCLR steps against a plain two-view step of the same backbone.

The reference is the least any two-view method must do: the ResNet trunk
forward + backward on both views (2N images) with a trivial loss, and an
AdamW step. SimCLR adds the projection head and NT-Xent; MoCo v2 runs
backward on one view only but adds the key encoder's forward, its momentum
update, the queue and split batch norm. All three train on the same
pre-augmented batches (augmentation is the same for all and excluded), alternate
in the same process, and the medians are compared. Peak memory: CUDA's
allocator peak on GPU; on CPU the peak resident memory of a fresh process that
builds the model and trains it on the same batches (max RSS never goes down within
a process, so each method gets its own).

    python benchmarks/bench_ssl.py --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitkit.config import SSLParams, load_params
from vitkit.data.datasets import load_image_dir
from vitkit.data.shapes import SHAPE_CLASSES, generate_unlabeled
from vitkit.data.ssl_transforms import TwoViews, build_ssl_transform
from vitkit.engine.device import select_device
from vitkit.models.resnet import build_resnet
from vitkit.models.ssl import build_ssl_model

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
# the values the README's numbers were measured with (the library defaults before params.yaml held them)
MODEL = dict(proj_dim=128, hidden_dim=512, temperature=0.2, queue_size=4096, momentum=0.99, bn_splits=8)
AUGMENTATION = dict(crop_scale=(0.2, 1.0), jitter=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.2)


def ssl_params(method: str = "mocov2") -> SSLParams:
    """params.yaml's ``ssl`` section set to the benchmark's model and augmentation."""
    ssl = load_params(PARAMS).ssl
    augmentation = ssl.augmentation.model_copy(update=AUGMENTATION)
    return ssl.model_copy(update={**MODEL, "method": method, "augmentation": augmentation})


def make_views(batch_size: int, steps: int, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of two augmented views of synthetic shapes images."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_unlabeled(Path(tmp), SHAPE_CLASSES, batch_size, image_size, seed=0)
        images = load_image_dir(Path(tmp) / "images", cache_mb=math.inf)[:]  # decoded before tmp goes
    hflip = load_params(PARAMS).data.hflip
    two_views = TwoViews(build_ssl_transform(ssl_params().augmentation, image_size, hflip))
    batches = []
    for _ in range(steps):
        pairs = [two_views(image) for image in images]
        batches.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    return batches


class PlainTwoView(torch.nn.Module):
    """The reference: the bare trunk on both views, mean of the features as the loss."""

    def __init__(self, arch: str, stem: str) -> None:
        super().__init__()
        self.trunk = build_resnet(arch, num_classes=1, stem=stem)
        self.trunk.fc = torch.nn.Identity()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.trunk(torch.cat([x1, x2])).square().mean()


def measure(model: torch.nn.Module, batches, device: torch.device) -> tuple[float, float]:
    """Images/s over ``batches`` (after one warm-up step) and peak memory in MiB."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    batches = [(x1.to(device), x2.to(device)) for x1, x2 in batches]

    def step(x1: torch.Tensor, x2: torch.Tensor) -> None:
        out = model(x1, x2)
        loss = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(*batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for x1, x2 in batches:
        step(x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - start), peak


def build(name: str, arch: str, stem: str) -> torch.nn.Module:
    if name == "plain two-view":
        return PlainTwoView(arch, stem)
    return build_ssl_model(ssl_params(name), arch, stem)


def _peak_memory_worker(name: str, args: argparse.Namespace, batches, queue) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    queue.put(measure(build(name, args.arch, args.stem), batches, select_device(args.device))[1])


def peak_memory_in_fresh_process(name: str, args: argparse.Namespace, batches) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_worker, args=(name, args, batches, queue))
    process.start()
    peak = queue.get()
    process.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "small"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    batches = make_views(args.batch_size, args.steps, args.image_size)
    print(
        f"device {device}, threads {torch.get_num_threads()}, {args.arch}/{args.stem}, "
        f"{args.image_size}px, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats"
    )
    names = ("plain two-view", "simclr", "mocov2")
    speed: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            torch.manual_seed(repeat)
            speed[name].append(measure(build(name, args.arch, args.stem), batches, device)[0])
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{n} {s[-1]:.1f} img/s" for n, s in speed.items()))
    reference = statistics.median(speed["plain two-view"])
    for name in names:
        median = statistics.median(speed[name])
        peak = peak_memory_in_fresh_process(name, args, batches)
        print(
            f"median {name:>14}: {median:7.1f} img/s ({median / reference:.3f}x plain two-view), "
            f"peak memory {peak:.0f} MiB ({'CUDA allocator' if device.type == 'cuda' else 'process RSS'})"
        )
    print("target: each method >= 0.9x the plain two-view step")


if __name__ == "__main__":
    main()
