"""Training throughput of vitkit's DETR against Hugging Face's ``DetrForObjectDetection``.

Both models get the same architecture and the same batch: a ResNet-18 trunk
with frozen BatchNorm (HF: a ``ResNetConfig`` with basic blocks), the same
transformer sizes, dropout, number of queries and auxiliary losses, AdamW.
HF's ResNet has only the ImageNet stem, so by default (``--stem small``) its
stem is swapped after construction for ours (3x3 stride-1 conv, no max-pool),
which makes the two networks identical; ``--stem imagenet`` compares both with
the ImageNet stem instead. HF's freeze rule looks for "stage.1" in parameter
names its ResNet calls "stages.1", so it would freeze the whole CNN; here both
train DETR's set (layers 2-4), or none with ``--frozen-backbone``.

A step is forward + set loss + backward + AdamW step. The two models alternate
step by step on the same batch (so machine load hits both alike); the report is
the median of ``--repeats`` timed steps after ``--warmup``. Peak memory is the
growth of resident memory during one step on CPU (Linux/glibc: free heap
trimmed, then ``VmHWM`` reset and read back), or ``max_memory_allocated`` on CUDA. The matcher alone is timed
on ``--matcher-batch`` images of ``--matcher-queries`` x ``--matcher-targets``.
Nothing is downloaded: HF models are built from config objects.

    python benchmarks/bench_detr.py --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitkit.models.detr import DETRConfig, HungarianMatcher, build_criterion, build_detr, param_groups
from vitkit.models.resnet import backbone_state_dict, build_resnet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--enc-layers", type=int, default=2)
    parser.add_argument("--dec-layers", type=int, default=2)
    parser.add_argument("--dim-feedforward", type=int, default=512)
    parser.add_argument("--num-queries", type=int, default=50)
    parser.add_argument("--num-classes", type=int, default=7, help="largest category id + 1")
    parser.add_argument("--stem", choices=("small", "imagenet"), default="small")
    parser.add_argument("--frozen-backbone", action="store_true", help="train neither CNN")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matcher-batch", type=int, default=32)
    parser.add_argument("--matcher-queries", type=int, default=100)
    parser.add_argument("--matcher-targets", type=int, default=20)
    parser.add_argument("--skip-hf", action="store_true", help="time vitkit only (no transformers needed)")
    return parser.parse_args()


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    """Random images and 1-8 random boxes per image with labels 1..num_classes-1 (category ids)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
    targets = []
    for _ in range(args.batch_size):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        centers = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        labels = torch.randint(1, args.num_classes, (n,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centers, sizes], 1).to(device)})
    return images.to(device), targets


@dataclass
class Trainer:
    step: Callable[[], None]  # one forward + loss + backward + optimizer step on the fixed batch
    trained_params: int


def build_ours(args: argparse.Namespace, device: torch.device) -> Trainer:
    cfg = DETRConfig.paper(
        args.num_classes,
        stem=args.stem,
        train_backbone=not args.frozen_backbone,
        hidden_dim=args.hidden_dim,
        nheads=args.nheads,
        enc_layers=args.enc_layers,
        dec_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        num_queries=args.num_queries,
    )
    # An init state, so the pretrained freeze rule (stem and layer1 frozen) applies, as in HF.
    init = backbone_state_dict(build_resnet("resnet18", stem=args.stem))
    model, criterion = build_detr(cfg, init).to(device).train(), build_criterion(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4, 1e-5, 1e-4))
    images, targets = make_batch(args, device)

    def step() -> None:
        loss = criterion.weighted_sum(criterion(model(images), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return Trainer(step, sum(p.numel() for p in model.parameters() if p.requires_grad))


def build_hf(args: argparse.Namespace, device: torch.device) -> Trainer:
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone_config = ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"
    )
    config = DetrConfig(
        backbone_config=backbone_config,
        d_model=args.hidden_dim,
        encoder_layers=args.enc_layers,
        decoder_layers=args.dec_layers,
        encoder_ffn_dim=args.dim_feedforward,
        decoder_ffn_dim=args.dim_feedforward,
        encoder_attention_heads=args.nheads,
        decoder_attention_heads=args.nheads,
        num_queries=args.num_queries,
        num_labels=args.num_classes,
        auxiliary_loss=True,
        dropout=0.1,
        attention_dropout=0.1,  # DETR drops attention weights and FFN activations too
        activation_dropout=0.1,
    )
    model = DetrForObjectDetection(config)
    resnet = model.model.backbone.model
    if args.stem == "small":
        resnet.embedder.embedder.convolution = nn.Conv2d(
            3, 64, kernel_size=3, stride=1, padding=1, bias=False
        )
        resnet.embedder.pooler = nn.Identity()
    for name, parameter in resnet.named_parameters():
        parameter.requires_grad_(
            not args.frozen_backbone
            and name.startswith(("encoder.stages.1", "encoder.stages.2", "encoder.stages.3"))
        )
    model = model.to(device).train()
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": 1e-4}] + ([{"params": backbone, "lr": 1e-5}] if backbone else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    images, targets = make_batch(args, device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long, device=device)

    def step() -> None:
        loss = model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return Trainer(step, sum(p.numel() for p in model.parameters() if p.requires_grad))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_memory_mib(step: Callable[[], None], device: torch.device) -> float:
    """Extra memory one step needs at its peak, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    status = Path("/proc/self/status")
    # Hand freed heap pages back to the OS first, so memory the step re-uses counts when it is touched again.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS

    def read_kib(field: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    before = read_kib("VmRSS:")
    step()
    return (read_kib("VmHWM:") - before) / 1024


def time_alternating(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> dict:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_matchers(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    shape = (args.matcher_batch, args.matcher_queries)
    outputs = {
        "pred_logits": torch.randn(*shape, args.num_classes + 1, generator=gen).to(device),
        "pred_boxes": (torch.rand(*shape, 4, generator=gen) * 0.5 + 0.2).to(device),
    }
    targets = [
        {
            "labels": torch.randint(1, args.num_classes, (args.matcher_targets,), generator=gen).to(device),
            "boxes": (torch.rand(args.matcher_targets, 4, generator=gen) * 0.5 + 0.2).to(device),
        }
        for _ in range(args.matcher_batch)
    ]
    matchers: dict[str, Callable[[], object]] = {
        "vitkit": lambda: HungarianMatcher(1, 5, 2)(outputs, targets)
    }
    if not args.skip_hf:
        from transformers.loss.loss_for_object_detection import HungarianMatcher as HFMatcher

        hf_outputs = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        matchers["hf"] = lambda: HFMatcher(1, 5, 2)(hf_outputs, hf_targets)
    return time_alternating(matchers, warmup=2, repeats=max(args.repeats, 9), device=device)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    trainers = {"vitkit": build_ours(args, device)}
    if not args.skip_hf:
        trainers["hf"] = build_hf(args, device)

    print(
        f"device {device}, {args.threads} threads, batch {args.batch_size} x {args.image_size}px, "
        f"stem {args.stem}, "
        f"d {args.hidden_dim}, {args.enc_layers}+{args.dec_layers} layers, ffn {args.dim_feedforward}, "
        f"{args.num_queries} queries, backbone {'frozen' if args.frozen_backbone else 'layers 2-4 trained'}"
    )
    medians = time_alternating(
        {name: t.step for name, t in trainers.items()}, args.warmup, args.repeats, device
    )
    for name, trainer in trainers.items():
        memory = peak_step_memory_mib(trainer.step, device)
        print(
            f"{name:>7}: {args.batch_size / medians[name]:7.1f} img/s  ({medians[name] * 1000:7.1f} ms/step, "
            f"{trainer.trained_params / 1e6:.2f}M trained params, peak +{memory:.0f} MiB)"
        )
    if "hf" in medians:
        print(f"vitkit / hf throughput: {medians['hf'] / medians['vitkit']:.2f}x")

    matcher = time_matchers(args, device)
    print(
        f"matcher, {args.matcher_batch} images x {args.matcher_queries} queries x "
        f"{args.matcher_targets} targets: "
        + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in matcher.items())
    )


if __name__ == "__main__":
    main()
