"""Deformable DETR speed against Hugging Face transformers' implementation, on the same inputs.

Two measurements, each alternating the two implementations repeat by repeat (so
a load change on a shared machine hits both alike) and reporting the median of
``--repeats`` after ``--warmup`` untimed runs:

* ``core``: multi-scale deformable attention after the linear layers, forward +
  backward: ``vitkit``'s ``ms_deform_attn_core`` against transformers'
  pure-PyTorch ``MultiScaleDeformableAttention`` (the path it takes without the
  optional hub kernel), with the encoder's shapes: every pixel of every level
  is a query. Both must agree (printed) before they are timed.
* ``model``: one training step (forward, set loss, backward, AdamW) of
  ``DeformableDETR`` against ``DeformableDetrForObjectDetection`` built from a
  config of the same size (random init, transformers' own ResNet as backbone,
  nothing downloaded), on the same batch. Both backbones train layer2..4 only,
  as the official recipe. Peak memory of a step: CUDA's allocator peak on GPU;
  on CPU the growth of the process's peak resident set during the step, each
  implementation measured in a fresh subprocess. Losses differ in their weights
  only (transformers weighs the class loss 1, the paper and vitkit 2).

    python benchmarks/bench_deformable.py --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def parse_levels(text: str) -> list[tuple[int, int]]:
    """ "16x16,8x8" -> [(16, 16), (8, 8)] as (height, width)."""
    return [tuple(int(n) for n in level.split("x")) for level in text.split(",")]  # type: ignore[misc]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device) -> dict:
    """Median seconds per call of each function, interleaved (A B, B A, A B...) to share drift."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# --- core -------------------------------------------------------------------------------------------


def core_inputs(args: argparse.Namespace, device: torch.device) -> tuple:
    """Encoder-like inputs: each pixel queries points scattered (a few pixels) around its own centre."""
    gen = torch.Generator().manual_seed(0)
    shapes = parse_levels(args.levels)
    levels, heads, points = len(shapes), args.heads, args.points
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(args.batch, tokens, heads, args.hidden // heads, generator=gen)
    centres = torch.cat(
        [
            torch.stack(
                torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")[::-1],
                -1,
            ).view(-1, 2)
            for h, w in shapes
        ]
    )
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    offsets = torch.randn(args.batch, tokens, heads, levels, points, 2, generator=gen) * 2 / size[:, None]
    locations = centres[None, :, None, None, None, :] + offsets
    weights = torch.randn(args.batch, tokens, heads, levels * points, generator=gen).softmax(-1)
    weights = weights.view(args.batch, tokens, heads, levels, points)
    return shapes, *(t.to(device).requires_grad_() for t in (value, locations, weights))


def bench_core(args: argparse.Namespace, device: torch.device) -> None:
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    from vitkit.models.deformable.ms_deform_attn import ms_deform_attn_core

    shapes, value, locations, weights = core_inputs(args, device)
    shapes_tensor = torch.tensor(shapes, device=device)
    starts = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])
    hf_attn = MultiScaleDeformableAttention()
    impls = {
        "vitkit": lambda: ms_deform_attn_core(value, shapes, locations, weights),
        "transformers": lambda: hf_attn(value, shapes_tensor, shapes, starts, locations, weights, 64),
    }
    grad = torch.randn_like(impls["vitkit"]())
    results = {}
    for name, fn in impls.items():
        out = fn()
        grads = torch.autograd.grad(out, (value, locations, weights), grad)
        results[name] = (out, grads)
    out_diff = (results["vitkit"][0] - results["transformers"][0]).abs().max().item()
    grad_diff = [
        ((a - b).abs().max() / b.abs().max()).item()
        for a, b in zip(results["vitkit"][1], results["transformers"][1], strict=True)
    ]
    print(
        f"core: levels {shapes}, batch {args.batch}, {args.heads} heads x {args.hidden // args.heads} ch, "
        f"{args.points} points, {value.shape[1]} queries"
    )
    print(
        f"  agreement: max |out diff| {out_diff:.2e}; max relative grad diff (value, locations, weights) "
        + ", ".join(f"{d:.1e}" for d in grad_diff)
    )

    def step(fn: Callable) -> Callable[[], None]:
        return lambda: torch.autograd.grad(fn(), (value, locations, weights), grad)

    timed = alternate({name: step(fn) for name, fn in impls.items()}, args.warmup, args.repeats, device)
    for name, seconds in timed.items():
        print(f"  {name:12s} fwd+bwd {seconds * 1e3:8.2f} ms")
    print(f"  speedup vitkit / transformers: {timed['transformers'] / timed['vitkit']:.2f}x")


# --- whole model --------------------------------------------------------------------------------------


def model_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    targets = []
    for _ in range(args.batch):
        count = int(torch.randint(1, 5, (1,), generator=gen))
        centres = torch.rand(count, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=gen) * 0.2 + 0.05
        labels = torch.randint(1, args.num_classes, (count,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], 1).to(device)})
    return images.to(device), targets


def build_vitkit(
    args: argparse.Namespace, device: torch.device
) -> Callable[[torch.Tensor, list[dict]], None]:
    from vitkit.models.deformable import (
        DeformableDETRConfig,
        build_deformable_criterion,
        build_deformable_detr,
        deformable_param_groups,
    )

    cfg = DeformableDETRConfig.paper(
        args.num_classes,
        hidden_dim=args.hidden,
        nheads=args.heads,
        enc_layers=args.layers,
        dec_layers=args.layers,
        dim_feedforward=args.ffn,
        enc_n_points=args.points,
        dec_n_points=args.points,
        num_queries=args.queries,
        num_feature_levels=args.model_levels,
    )
    model = build_deformable_detr(cfg).to(device).train()
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad_(name.startswith(("0.body.layer2", "0.body.layer3", "0.body.layer4")))
    criterion = build_deformable_criterion(cfg)
    optimizer = torch.optim.AdamW(deformable_param_groups(model, 2e-4, 2e-5, 1e-4))

    def train_step(images: torch.Tensor, targets: list[dict]) -> None:
        loss = criterion.weighted_sum(criterion(model(images), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def build_transformers(
    args: argparse.Namespace, device: torch.device
) -> Callable[[torch.Tensor, list[dict]], None]:
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=args.num_classes,
        d_model=args.hidden,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_ffn_dim=args.ffn,
        decoder_ffn_dim=args.ffn,
        encoder_n_points=args.points,
        decoder_n_points=args.points,
        num_queries=args.queries,
        num_feature_levels=args.model_levels,
        auxiliary_loss=True,
        class_cost=2,
        # The official code (and vitkit) drops out attention weights and the FFN hidden layer too.
        attention_dropout=0.1,
        activation_dropout=0.1,
    )
    model = DeformableDetrForObjectDetection(config).to(device).train()
    # transformers freezes its own ResNet entirely (its stage names do not match the filter); train
    # stages 1..3 (= layer2..4) like the official recipe and the vitkit side.
    for name, parameter in model.model.backbone.model.named_parameters():
        parameter.requires_grad_(
            name.startswith(("encoder.stages.1", "encoder.stages.2", "encoder.stages.3"))
        )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=1e-4
    )

    def train_step(images: torch.Tensor, targets: list[dict]) -> None:
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long, device=images.device)
        loss = model(pixel_values=images, pixel_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


BUILDERS = {"vitkit": build_vitkit, "transformers": build_transformers}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_step_memory(name: str, args: argparse.Namespace) -> float:
    """MiB by which one training step raises the process's peak resident set (run in a subprocess)."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    step = BUILDERS[name](args, device)
    images, targets = model_batch(args, device)
    step(images, targets)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _proc_status_kib("VmRSS")
    step(images, targets)
    return (_proc_status_kib("VmHWM") - before) / 1024


def bench_model(args: argparse.Namespace, device: torch.device) -> None:
    images, targets = model_batch(args, device)
    steps = {name: build(args, device) for name, build in BUILDERS.items()}
    print(
        f"model: batch {args.batch} x {args.image_size}², hidden {args.hidden}, {args.heads} heads, "
        f"{args.layers}+{args.layers} layers, ffn {args.ffn}, {args.points} points, "
        f"{args.model_levels} levels, "
        f"{args.queries} queries, {args.num_classes} classes, resnet18 (layer2..4 trained)"
    )
    timed = alternate(
        {name: (lambda s=step: s(images, targets)) for name, step in steps.items()},
        args.warmup,
        args.repeats,
        device,
    )
    peaks = {}
    if device.type == "cuda":
        for name, step in steps.items():
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(images, targets)
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        # A fresh process per implementation, with every allocation above 64 KiB served by mmap and
        # returned on free, so the resident set follows the live tensors rather than malloc's heap.
        context = multiprocessing.get_context("spawn")
        previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        try:
            for name in steps:
                with context.Pool(1) as pool:
                    peaks[name] = pool.apply(cpu_peak_step_memory, (name, args))
        finally:
            if previous is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    for name, seconds in timed.items():
        print(
            f"  {name:12s} train step {seconds * 1e3:8.1f} ms  {args.batch / seconds:7.2f} img/s  "
            f"peak step memory {peaks[name]:7.1f} MiB"
        )
    print(f"  speedup vitkit / transformers: {timed['transformers'] / timed['vitkit']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--only", choices=("core", "model"), help="run one of the two measurements")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation (default: 2)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per implementation, >= 5 (default: 7)"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--hidden", type=int, default=128, help="model width d_model (default: 128)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument(
        "--points", type=int, default=4, help="sampling points per head and level (default: 4)"
    )
    parser.add_argument(
        "--levels",
        default="16x16,8x8,4x4,2x2",
        help="core: feature levels as HxW,... (default: 16x16,8x8,4x4,2x2, the default model at 128²)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="model: image side (default: 128)")
    parser.add_argument("--layers", type=int, default=2, help="model: encoder = decoder layers (default: 2)")
    parser.add_argument("--ffn", type=int, default=512, help="model: feed-forward width (default: 512)")
    parser.add_argument("--queries", type=int, default=50, help="model: object queries (default: 50)")
    parser.add_argument(
        "--model-levels", type=int, default=4, help="model: feature levels, layer2..4 + extras (default: 4)"
    )
    parser.add_argument("--num-classes", type=int, default=7, help="model: classes (default: 7)")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    if args.only in (None, "core"):
        bench_core(args, device)
    if args.only in (None, "model"):
        bench_model(args, device)


if __name__ == "__main__":
    main()
