"""A quick check of a GPU machine: each model stage's training step with bf16, torch.compile and TF32.

For every model stage (SimCLR, the teacher, the DeiT student with soft distillation, DETR,
Deformable DETR) the task is built from params.yaml with a profile applied (default: gpu, the
sizes a real GPU run trains at), fed one synthetic batch of that profile's shape, and stepped as
the Trainer steps it: autocast, the task's step, backward, fused AdamW, the task's after-step
hook. Printed per model: the batch, the warm-up time (the first steps: compilation), steps/s and
images/s after it, the peak device memory, the FLOPs of one step (counted on an eager step by
``torch.utils.flop_counter``) and the model FLOPs utilisation against the GPU's dense bf16 peak
(``--peak-tflops``; known for H100/H200/A100, else left blank).

    make gpu-check                                          # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --profile smoke --amp always --no-compile --steps 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from vitkit.config import EngineParams, OptimParams, Params, deep_merge, profile_overrides, validate_params
from vitkit.data.datasets import LabelledImages
from vitkit.data.shapes import SHAPE_CLASSES
from vitkit.engine.device import AMP_MODES, autocast, set_tf32
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import build_optimizer
from vitkit.tasks.base import trainer_config
from vitkit.tasks.classifier import ClassifierTask
from vitkit.tasks.contrastive import ContrastiveTask
from vitkit.tasks.detection import DetectionTask
from vitkit.tasks.distillation import DistillationTask

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("ssl", "teacher", "deit", "detr", "deformable")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per GPU, from NVIDIA's sheets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu", help="profiles/<name>.yaml applied to params.yaml")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", choices=AMP_MODES, default="always")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-tf32", action="store_true")
    parser.add_argument(
        "--warmup", type=int, default=3, help="steps before timing (compilation happens here)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    return parser.parse_args(argv)


def load_profile(name: str) -> Params:
    """params.yaml with ``profiles/<name>.yaml`` applied, validated."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return validate_params(deep_merge(raw, profile_overrides(name)), f"params.yaml + profiles/{name}.yaml")


def _images(count: int, side: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=generator).to(device)


def build(
    model: str, params: Params, device: torch.device, mode: str = "soft"
) -> tuple[TrainingTask, Any, OptimParams]:
    """``model``'s task on ``device``, one synthetic batch of its params' shape, its optimiser params
    (``mode``: the DeiT student's distillation, none, soft or hard)."""
    gen = torch.Generator().manual_seed(0)
    side = params.data.classification.image_size
    classes = [f"c{i}" for i in range(len(params.data.classes or SHAPE_CLASSES))]
    small = LabelledImages(
        torch.randint(0, 256, (8, 3, side, side), dtype=torch.uint8, generator=gen),
        torch.arange(8) % 2,
        classes,
    )
    labels = torch.randint(0, len(classes), (512,), generator=gen)
    if model == "ssl":
        p = params.ssl
        task: TrainingTask = ContrastiveTask(p, params.backbone, small, small, 8)
        batch: Any = (_images(p.batch_size, side, device, gen), _images(p.batch_size, side, device, gen))
        optim: OptimParams = p
    elif model == "teacher":
        p = params.teacher.model_copy(update={"init": "scratch"})
        task = ClassifierTask(p, params.backbone, small, 8, device)
        batch, optim = (_images(p.batch_size, side, device, gen), labels[: p.batch_size].to(device)), p
    elif model == "deit":
        p = params.deit
        teacher = ClassifierTask(params.teacher, params.backbone, small, 8, device).model
        meta = {"arch": params.backbone.arch, "stem": params.backbone.stem, "classes": classes}
        teacher_file = (teacher.state_dict(), meta) if mode != "none" else None
        task = DistillationTask(p, mode, small, 8, device, teacher_file)
        batch, optim = (_images(p.batch_size, side, device, gen), labels[: p.batch_size].to(device)), p
    else:
        train = params.detr_training
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
        section = getattr(params, model)
        task = DetectionTask(model, train, section, params.backbone, categories, None, 8, device)
        scales = train.train_scales
        images, targets = [], []
        for i in range(train.batch_size):  # the multi-scale sizes of a real batch, in turn
            height, width = scales[i % len(scales)], scales[(i * 3 + 1) % len(scales)]
            images.append(torch.randn(3, height, width, generator=gen).to(device))
            n = 1 + i % 6
            centres, sides = (
                torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                torch.rand(n, 2, generator=gen) * 0.2 + 0.05,
            )
            targets.append(
                {
                    "labels": (torch.arange(n) % len(classes) + 1).to(device),
                    "boxes": torch.cat([centres, sides], 1).to(device),
                }
            )
        batch, optim = (images, targets), train
    task.model.to(device)
    return task, batch, optim


@dataclass
class Row:
    model: str
    batch: int
    warmup_s: float
    steps_per_s: float
    images_per_s: float
    peak_mib: float | None  # CUDA only
    gflop_per_step: float
    mfu: float | None  # needs the device's peak


def make_step(
    task: TrainingTask, batch: Any, optim: OptimParams, engine: EngineParams, device: torch.device
) -> Callable[[], None]:
    """One training step as the Trainer takes it (its optimizer, autocast, compile) with ``engine``."""
    cfg = trainer_config(optim, engine, 0, "gpu-check", "")
    optimizer = build_optimizer(task.param_groups() or task.model.parameters(), cfg, device)
    amp, compiled = engine.amp, engine.compile
    model = torch.compile(task.model) if compiled else task.model
    task.model.train()

    def step() -> None:
        with autocast(device, amp):
            loss = task.step(model, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_step()

    return step


def measure(
    model: str,
    built: tuple[TrainingTask, Any, OptimParams],
    engine: EngineParams,
    device: torch.device,
    args: argparse.Namespace,
) -> Row:
    task, batch, optim = built
    step = make_step(task, batch, optim, engine, device)
    eager = make_step(task, batch, optim, engine.model_copy(update={"compile": False}), device)
    with FlopCounterMode(display=False) as counter:  # on an eager step: compiled graphs are not counted
        eager()
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    rate = args.steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    mfu = utilisation(flops, rate, args.peak_tflops)
    return Row(model, optim.batch_size, warmup, rate, rate * optim.batch_size, peak, flops / 1e9, mfu)


def utilisation(flops_per_step: float, steps_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: the share of the device's peak the step's counted FLOPs reach."""
    return flops_per_step * steps_per_s / (peak_tflops * 1e12) if peak_tflops else None


def format_table(rows: list[Row]) -> str:
    """A fixed-width table, one line per model; blank where a number does not apply."""
    header = (
        f"{'model':<11}{'batch':>6}{'warmup s':>10}{'steps/s':>9}{'img/s':>9}"
        f"{'peak MiB':>10}{'GFLOP':>9}{'MFU':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = f"{r.peak_mib:10.0f}" if r.peak_mib is not None else " " * 10
        mfu = f"{r.mfu:7.1%}" if r.mfu is not None else " " * 7
        lines.append(
            f"{r.model:<11}{r.batch:>6}{r.warmup_s:>10.1f}{r.steps_per_s:>9.2f}{r.images_per_s:>9.0f}"
            f"{peak}{r.gflop_per_step:>9.1f}{mfu}"
        )
    return "\n".join(lines)


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, from its name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        set_tf32(not args.no_tf32)
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    args.peak_tflops = args.peak_tflops or peak_tflops(device)
    params = load_profile(args.profile)
    engine = params.engine.model_copy(
        update={"amp": args.amp, "compile": not args.no_compile, "tf32": not args.no_tf32}
    )
    rows = []
    for model in args.models:
        torch.manual_seed(0)
        rows.append(measure(model, build(model, params, device), engine, device, args))
        print(f"{model}: {rows[-1].steps_per_s:.2f} steps/s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        f"\nprofile {args.profile}, amp {args.amp}, compile {not args.no_compile}, tf32 {not args.no_tf32}, "
        f"{args.warmup} warm-up + {args.steps} timed steps"
    )
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
