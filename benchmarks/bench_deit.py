"""Throughput of vitkit's distilled ViT against timm's, same dims, same weights, same batch.

Both models are built from one ``ViTConfig`` preset; timm's
``VisionTransformerDistilled`` gets vitkit's weights, and the script checks
that both give the same logits before timing anything. Then, alternating the
two models (and their order) within each repeat:

* training: forward (both heads) + cross-entropy on each head + backward + AdamW step;
* inference: eval-mode forward under ``torch.inference_mode``.

Reported: median images/s over ``--repeats`` repeats after ``--warmup`` steps,
the ratio ours / timm (target >= 0.95), and the peak memory of one training
step: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak of the torch
CPU allocator during the step above its level at the step's start, from
``torch.profiler``'s memory events (``ru_maxrss`` would be the whole process's
high-water mark and cannot tell the two models apart).

``--compile`` adds a third model, ours as the engine trains it with ``engine.compile``: under
``torch.compile``, with fused AdamW (``--bf16``: and bf16 autocast, ``engine.amp: always``), to
the training and inference timings, and reports its warm-up (the first steps, compiling).

``--with-teacher`` also times a full DeiT hard-distillation step: the student
step above plus a frozen ResNet-18 (small-input stem) forward on the same batch.

    python benchmarks/bench_deit.py --device cpu --threads 2 --batch-size 128 --preset cpu_tiny [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.losses.distillation import DistillationLoss
from vitkit.models.resnet import build_resnet
from vitkit.models.vit import PRESETS, ViTConfig, build_vit


def build_timm_twin(config: ViTConfig) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=config.drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool = False, bf16: bool = False
) -> Callable[[], None]:
    """One training step; ``fused`` AdamW and ``bf16`` autocast as vitkit's engine can run it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)

    def step() -> None:
        model.train()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            cls_logits, dist_logits = model(x)
            loss = F.cross_entropy(cls_logits, y) + F.cross_entropy(dist_logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # at the end: a step's memory is allocated and freed within it

    return step


def make_distill_step(
    model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.5, tau=1.0)

    def step() -> None:
        model.train()
        criterion(x, model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return step


def time_alternating(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    iters: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per step of each callable, interleaved so load changes hit all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            start = clock()
            for _ in range(iters):
                steps[name]()
            sync(device)
            times[name].append((clock() - start) / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``step`` above the level at its start."""
    step()  # optimizer state exists before measuring
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--preset", default="cpu_tiny", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model (median reported)")
    parser.add_argument("--iters", type=int, default=2, help="steps per timed repeat")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default). cpu: this process's CPU time, for a machine shared with other "
        "jobs; exact with --threads 1, with more threads it also counts OpenMP spin-waiting",
    )
    parser.add_argument("--with-teacher", action="store_true", help="also time a hard-distillation step")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time ours as the engine runs it with engine.compile: compiled, fused AdamW",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="with --compile: under bf16 autocast (engine.amp)"
    )
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 for a meaningful median")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu only makes sense with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = PRESETS[args.preset]
    ours = build_vit(config).to(device)
    theirs = build_timm_twin(config).to(device)
    theirs.load_state_dict(ours.state_dict())
    theirs.set_distilled_training(True)
    x = torch.randn(args.batch_size, config.in_chans, config.img_size, config.img_size, device=device)
    y = torch.randint(0, config.num_classes, (args.batch_size,), device=device)
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        diff = (ours(x[:4]) - theirs(x[:4])).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"the two models disagree (max abs diff {diff:.2e}); the comparison is void")

    params = sum(p.numel() for p in ours.parameters())
    print(
        f"preset {args.preset}: {config}\n{params / 1e6:.2f} M params, batch {args.batch_size}, "
        f"device {device}, {args.threads} threads, {args.clock} clock, max |ours - timm| = {diff:.1e}"
    )
    train = {"ours": make_train_step(ours, x, y), "timm": make_train_step(theirs, x, y)}
    infer = {"ours": make_infer_step(ours, x), "timm": make_infer_step(theirs, x)}
    if args.compile:
        compiled = torch.compile(copy.deepcopy(ours))
        for label, step in (
            ("train", make_train_step(compiled, x, y, fused=True, bf16=args.bf16)),
            ("inference", make_infer_step(compiled, x)),
        ):
            start = time.perf_counter()
            step()  # compiles
            step()
            print(f"{'compile warm-up':>22}: {label} {time.perf_counter() - start:.1f} s (two steps)")
            (train if label == "train" else infer)["compiled"] = step
    for label, steps in (("train (fwd+bwd+AdamW)", train), ("inference", infer)):
        sec = time_alternating(steps, device, args.warmup, args.repeats, args.iters, clock)
        ips = {name: args.batch_size / s for name, s in sec.items()}
        compiled_ips = (
            f" | compiled {ips['compiled']:8.1f} img/s, ratio to timm {ips['compiled'] / ips['timm']:.3f}"
            if "compiled" in ips
            else ""
        )
        print(
            f"{label:>22}: ours {ips['ours']:8.1f} img/s | timm {ips['timm']:8.1f} img/s | "
            f"ratio {ips['ours'] / ips['timm']:.3f}{compiled_ips}"
        )
    mem = {name: peak_step_memory(train[name], device) / 2**20 for name in ("ours", "timm")}
    print(f"{'train step peak mem':>22}: ours {mem['ours']:8.1f} MiB  | timm {mem['timm']:8.1f} MiB")

    if args.with_teacher:
        teacher = build_resnet("resnet18", num_classes=config.num_classes).to(device)
        steps = {"ours+teacher": make_distill_step(ours, teacher, x, y), "ours": train["ours"]}
        sec = time_alternating(steps, device, args.warmup, args.repeats, args.iters, clock)
        print(
            f"{'hard distillation step':>22}: {args.batch_size / sec['ours+teacher']:8.1f} img/s "
            f"(student alone {args.batch_size / sec['ours']:.1f} img/s; the teacher forward "
            f"costs {1e3 * (sec['ours+teacher'] - sec['ours']) / args.batch_size:.2f} ms/img)"
        )


if __name__ == "__main__":
    main()
