"""DETR's training step with one trunk call per batch and one matcher transfer, against the former path.

The former path ran the CNN once per distinct image size in the batch (then padded the feature
maps) and copied each decoder layer's matching costs to the host separately. Today's runs the CNN
once on the padded batch, setting the padding back to zero after every BatchNorm and the max-pool
(``vitkit/models/detr/backbone.py``), and matches all layers with one copy. Both are built here from
the same model: the former by wrapping its backbone (one call per size group) and its matcher
(one ``match_sets`` per layer). DETR's own padded path (no zeroing, a nearest-neighbour mask, as
facebookresearch/detr) is measured for the output comparison too.

The batches come from the gpu profile's training transforms (multi-scale shorter side, IoU crops
half of the time) on random 128 px images, so their sizes vary as in a real run. Reported: trunk
calls per batch, the largest output difference to the former path (eval mode, same weights), and
the median step time (forward + set loss + backward + AdamW) of each, alternating step by step.

    python benchmarks/bench_detr_batching.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors

from vitkit.data.detection_transforms import train_transforms
from vitkit.models.detr import DETRConfig, HungarianMatcher, NestedTensor, build_criterion, build_detr
from vitkit.models.detr import nested_tensor_from_images as nest
from vitkit.models.detr.backbone import Backbone
from vitkit.models.resnet import backbone_state_dict, build_resnet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="the gpu profile's")
    parser.add_argument("--scales", type=int, nargs="+", default=[96, 112, 128, 144, 160])
    parser.add_argument("--no-crop", action="store_true", help="the default profile: no IoU crops")
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--enc-layers", type=int, default=6)
    parser.add_argument("--dec-layers", type=int, default=6)
    parser.add_argument("--dim-feedforward", type=int, default=2048)
    parser.add_argument("--num-queries", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


class PerSizeBackbone(nn.Module):
    """The former path: the trunk once per distinct image size, feature maps padded afterwards."""

    def __init__(self, inner: Backbone) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        heights = (~samples.mask[:, :, 0]).sum(1).tolist()
        widths = (~samples.mask[:, 0, :]).sum(1).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(zip(heights, widths, strict=True)):
            groups.setdefault(size, []).append(index)
        batch, device = samples.tensors.shape[0], samples.tensors.device
        per_group = []
        for (h, w), indices in groups.items():
            self.calls += 1
            images = samples.tensors[indices, :, :h, :w]
            full = torch.zeros(len(indices), h, w, dtype=torch.bool, device=device)
            per_group.append((indices, [f.tensors for f in self.inner(NestedTensor(images, full))]))
        outputs = []
        for level in range(len(self.inner.num_channels)):
            maps = [(indices, features[level]) for indices, features in per_group]
            height, width = max(f.shape[-2] for _, f in maps), max(f.shape[-1] for _, f in maps)
            padded = maps[0][1].new_zeros((batch, maps[0][1].shape[1], height, width))
            mask = torch.ones((batch, height, width), dtype=torch.bool, device=device)
            for indices, f in maps:
                padded[indices, :, : f.shape[-2], : f.shape[-1]] = f
                mask[indices, : f.shape[-2], : f.shape[-1]] = False
            outputs.append(NestedTensor(padded, mask))
        return outputs


class DetrPaddedBackbone(nn.Module):
    """facebookresearch/detr's path: the padded batch as it is, the mask resized to each map."""

    def __init__(self, inner: Backbone) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        features = self.inner.body(samples.tensors).values()  # no forward of ``inner``: no zeroing
        return [
            NestedTensor(f, F.interpolate(samples.mask[None].float(), size=f.shape[-2:]).bool()[0])
            for f in features
        ]


class PerLayerMatcher(HungarianMatcher):
    """The former matcher: one device-to-host copy per decoder layer."""

    def match_sets(self, sets: list[tuple[dict, list[dict]]]) -> list[list]:
        return [super(PerLayerMatcher, self).match_sets([one])[0] for one in sets]


def make_batches(args: argparse.Namespace, count: int) -> list[tuple[list[Tensor], list[dict]]]:
    """``count`` batches through the training transforms: random 128 px images, 1-6 boxes each."""
    transform = train_transforms(args.scales, 0.5, crop=not args.no_crop)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    batches = []
    for _ in range(count):
        images, targets = [], []
        for _ in range(args.batch_size):
            n = int(torch.randint(1, 7, (1,), generator=gen))
            corner = torch.rand(n, 2, generator=gen) * 80
            size = torch.rand(n, 2, generator=gen) * 40 + 8
            boxes = tv_tensors.BoundingBoxes(
                torch.cat([corner, corner + size], 1), format="XYXY", canvas_size=(128, 128)
            )
            image = tv_tensors.Image(torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=gen))
            image, target = transform(
                image, {"boxes": boxes, "labels": torch.randint(1, 7, (n,), generator=gen)}
            )
            images.append(image.as_subclass(Tensor))
            targets.append(target)
        batches.append((images, targets))
    return batches


def build(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    cfg = DETRConfig.paper(
        7,
        hidden_dim=args.hidden_dim,
        enc_layers=args.enc_layers,
        dec_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        num_queries=args.num_queries,
    )
    trunk = build_resnet("resnet18")
    for module in trunk.modules():  # trained-like statistics, so that BatchNorm shifts the padding
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.bias.data.uniform_(-0.1, 0.1)
    return build_detr(cfg, backbone_state_dict(trunk)), build_criterion(cfg)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, criterion = build(args)
    model, criterion = model.to(device), criterion.to(device)
    inner = model.backbone[0]
    batches = [
        ([image.to(device) for image in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
        for images, targets in make_batches(args, args.warmup + args.repeats)
    ]
    per_size = PerSizeBackbone(inner)
    paths = {"batched": (inner, criterion.matcher), "former": (per_size, PerLayerMatcher())}

    def use(path: str) -> None:
        model.backbone[0], criterion.matcher = paths[path]

    model.eval()
    differences: dict[str, float] = {}
    with torch.no_grad():
        for name in ("batched", "detr_padded"):
            worst = 0.0
            for images, _ in batches:
                use("former")
                reference = model(nest(images))
                if name == "batched":
                    use("batched")
                else:
                    model.backbone[0] = DetrPaddedBackbone(inner)
                out = model(nest(images))
                for key in ("pred_logits", "pred_boxes"):
                    worst = max(worst, (out[key] - reference[key]).abs().max().item())
            differences[name] = worst
    per_size.calls = 0
    use("former")
    with torch.no_grad():
        for images, _ in batches:
            model(nest(images))
    trunk_calls = per_size.calls / len(batches)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {"former": [], "batched": []}
    for index, (images, targets) in enumerate(batches):
        for path in times:
            use(path)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = criterion.weighted_sum(criterion(model(nest(images)), targets))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= args.warmup:
                times[path].append(time.perf_counter() - start)
    medians = {path: statistics.median(values) for path, values in times.items()}
    report = {
        "trunk_calls_per_batch_former": trunk_calls,
        "max_abs_output_difference_batched_vs_former": differences["batched"],
        "max_abs_output_difference_detr_padded_vs_former": differences["detr_padded"],
        "step_s_former": medians["former"],
        "step_s_batched": medians["batched"],
        "speedup": medians["former"] / medians["batched"],
    }
    for key, value in report.items():
        print(f"{key:50s} {value:.6g}")
    return report


if __name__ == "__main__":
    main()
