"""Self-supervised contrastive pretraining of a ResNet trunk: SimCLR and MoCo v2.

Both methods learn by instance discrimination: two random augmentations of the
same image must map close together and away from other images. The trunk
(``.backbone``, a torchvision ResNet whose ``fc`` is ``nn.Identity``) is what
later stages keep; the projection head is thrown away after pretraining, as in
both papers, because the features before it transfer better.

- ``SimCLR`` (Chen et al. 2020): one encoder, both views in one batch, NT-Xent
  with the other 2N-2 views as negatives.
- ``MoCo`` (He et al. 2020; v2 = MLP head + stronger augmentation, Chen et al.
  2020): a query encoder trained by gradient, a key encoder that is its
  exponential moving average, and a queue of K past keys as negatives.

Read top to bottom: projection head, split batch norm (MoCo's single-device
answer to shuffle BN), cross-process gather, SimCLR, MoCo, config + build.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import models

from vitkit.config import SSLParams
from vitkit.losses.contrastive import info_nce, nt_xent
from vitkit.models.resnet import build_resnet, feature_dim


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear MLP mapping trunk features to the contrastive space.

    SimCLR showed a non-linear head in front of the loss improves the features
    *before* it by 10+ points; MoCo v2 adopted it. The hidden BN follows SimCLR
    (and MoCo v3); it makes the short, small-batch runs this project does
    noticeably more stable.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def _trunk_and_head(backbone: models.ResNet, proj_dim: int, hidden_dim: int) -> nn.Sequential:
    """Turn ``backbone`` into a pooled-feature trunk (``fc`` -> Identity) followed by a head.

    Replacing ``fc`` instead of keeping the classifier means ``backbone(x)`` yields
    the pooled features directly (what kNN / linear probes read) and
    ``backbone_state_dict(backbone)`` holds exactly the trunk.
    """
    in_dim = feature_dim(backbone)
    backbone.fc = nn.Identity()
    return nn.Sequential(OrderedDict(backbone=backbone, head=projection_head(in_dim, hidden_dim, proj_dim)))


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are computed over ``num_splits`` sub-batches.

    MoCo needs *shuffle BN*: if a query and its positive key are normalised with
    statistics of the same samples, the encoders can "cheat" by recognising the
    batch signature instead of the image, and the pretext task stops teaching
    anything. Multi-GPU MoCo gives each GPU its own BN statistics and shuffles
    the key batch across GPUs. On one device we emulate G virtual GPUs (as the
    official MoCo CIFAR demo does): each BN normalises G disjoint sub-batches
    separately, and the key batch is permuted before the key encoder, so the
    statistics behind a key are computed on a different random set of images
    than those behind its query.

    Running statistics: every sub-batch updates a copy of the running mean/var
    with the usual momentum, and the copies are averaged, so at eval time this
    is an ordinary BN with the same state-dict keys as ``nn.BatchNorm{1,2}d`` --
    backbone weights load into a plain ResNet unchanged.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"SplitBatchNorm expects (N, C) or (N, C, H, W) input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each sub-batch needs >= 2 samples (BN over a single 1D sample is undefined);
        # a small last batch simply uses fewer splits.
        splits = min(self.num_splits, x.shape[0] // 2)
        if not self.training or splits <= 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c = x.shape[:2]
        if n % splits == 0:
            # One fused call: view the G interleaved sub-batches (sample i -> split i % G)
            # as G groups of channels, each with its own batch statistics.
            rm, rv = self.running_mean.repeat(splits), self.running_var.repeat(splits)
            out = F.batch_norm(
                x.reshape(n // splits, splits * c, *x.shape[2:]),
                rm,
                rv,
                self.weight.repeat(splits),
                self.bias.repeat(splits),
                True,
                self.momentum,
                self.eps,
            ).view_as(x)
            rm, rv = rm.view(splits, c), rv.view(splits, c)
        else:
            chunks, stats = [], []
            for part in torch.tensor_split(x, splits):
                rm_part, rv_part = self.running_mean.clone(), self.running_var.clone()
                chunks.append(
                    F.batch_norm(
                        part, rm_part, rv_part, self.weight, self.bias, True, self.momentum, self.eps
                    )
                )
                stats.append((rm_part, rv_part))
            out = torch.cat(chunks)
            rm, rv = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
        with torch.no_grad():
            self.running_mean.copy_(rm.mean(dim=0))
            self.running_var.copy_(rv.mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by a ``SplitBatchNorm`` holding the same state."""
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if not (module.affine and module.track_running_stats and module.momentum is not None):
            raise ValueError(
                f"SplitBatchNorm needs an affine BN with running stats and a momentum, got {module}"
            )
        split = SplitBatchNorm(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        split.load_state_dict(module.state_dict())
        split.train(module.training)
        return split
    for name, child in module.named_children():
        module.add_module(name, convert_split_batchnorm(child, num_splits))
    return module


@torch.no_grad()
def gather_from_all_processes(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every DDP process in rank order (identity without DDP).

    Sizes may differ between processes (a last partial batch), so the sizes are
    gathered first and every piece is padded to the largest before
    ``all_gather``, which needs equal shapes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)])


class SimCLR(nn.Module):
    """SimCLR: one encoder on both views, NT-Xent over the 2N views of the batch.

    Both views go through the encoder as one batch of 2N, so BN statistics are
    shared by all views -- which is fine here: the negatives are in the same
    batch, so batch statistics carry no information that singles out the
    positive (SimCLR uses global BN across devices for the same reason).
    Under DDP each process contrasts within its own batch: negatives are not
    gathered across processes, so the effective number of negatives is 2 x
    the per-process batch - 2.
    """

    def __init__(self, backbone: models.ResNet, proj_dim: int, hidden_dim: int, temperature: float) -> None:
        super().__init__()
        self.encoder = _trunk_and_head(backbone, proj_dim, hidden_dim)
        self.temperature = temperature

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.encoder(torch.cat([x1, x2])).chunk(2)
        return nt_xent(z1, z2, self.temperature)


class MoCo(nn.Module):
    """MoCo v2: query encoder + momentum key encoder + a queue of K negative keys.

    - The key encoder starts as an exact copy of the query encoder, never gets
      gradients, and follows it by EMA on its *parameters*: ``k <- m k + (1-m) q``.
      Its *buffers* (BN running statistics) are not averaged: as in the official
      implementation the key encoder runs in train mode, so its outputs use batch
      statistics and its running statistics simply track the key batches it sees.
      They are never used for the loss, and only the query trunk is exported.
    - The queue is a registered buffer (moves with ``.to()``, saved in
      ``state_dict`` so a resumed run keeps its negatives) with a write pointer.
      Enqueueing writes a batch at ``ptr, ptr+1, ... (mod K)``, so any K and any
      batch size work, wrapping around the end when K is not a multiple of the
      batch; a batch larger than K keeps its last K keys.
    - Under DDP, keys are gathered from all processes before enqueueing, so every
      process holds the same queue.
    - Shuffle BN: see ``SplitBatchNorm``; ``bn_splits`` virtual devices per process
      (1 disables it, e.g. when BN is made per-GPU by other means).

    The momentum update and the enqueue happen only in training mode, so an
    eval-mode forward (a validation loss) leaves the model state untouched.
    """

    def __init__(
        self,
        backbone_factory: Callable[[], models.ResNet],
        proj_dim: int,
        hidden_dim: int,
        queue_size: int,
        momentum: float,
        temperature: float,
        bn_splits: int,
    ) -> None:
        super().__init__()
        if queue_size < 1 or not 0.0 <= momentum <= 1.0 or bn_splits < 1:
            raise ValueError(
                f"MoCo needs queue_size >= 1, 0 <= momentum <= 1 and bn_splits >= 1; "
                f"got {queue_size}, {momentum}, {bn_splits}"
            )
        self.momentum = momentum
        self.temperature = temperature
        self.encoder_q = _trunk_and_head(backbone_factory(), proj_dim, hidden_dim)
        if bn_splits > 1:
            convert_split_batchnorm(self.encoder_q, bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)

        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` over the oldest entries of the queue and advance the pointer mod K."""
        size = self.queue.shape[0]
        ptr = int(self.queue_ptr)
        if keys.shape[0] > size:
            # Only the last K keys would survive a sequential write; start where they would land.
            ptr = (ptr + keys.shape[0] - size) % size
            keys = keys[-size:]
        slots = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key embeddings of ``x``, computed on a shuffled batch and returned in the original order."""
        perm = torch.randperm(x.shape[0], device=x.device)
        keys_shuffled = F.normalize(self.encoder_k(x[perm]).float(), dim=1)  # fp32: see info_nce
        keys = torch.empty_like(keys_shuffled)
        keys[perm] = keys_shuffled
        return keys

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(x1).float(), dim=1)
        if self.training:
            self.momentum_update_key_encoder()
        k = self._keys(x2)
        # clone: the queue is updated in place below, after the loss has captured it
        loss, logits, labels = info_nce(q, k, self.queue.clone(), self.temperature)
        if self.training:
            self.enqueue(gather_from_all_processes(k))
        return loss, logits, labels


def build_ssl_model(cfg: SSLParams, arch: str, stem: str) -> SimCLR | MoCo:
    """The SSL model named by ``cfg.method`` around a ``build_resnet(arch, stem=stem)`` trunk.

    ``cfg`` is the ``ssl`` params section (its model fields: method, proj_dim, hidden_dim,
    temperature and, for MoCo, queue_size, momentum, bn_splits).
    """

    def backbone() -> models.ResNet:
        return build_resnet(arch, num_classes=1, stem=stem)

    if cfg.method == "simclr":
        return SimCLR(backbone(), cfg.proj_dim, cfg.hidden_dim, cfg.temperature)
    if cfg.method == "mocov2":
        return MoCo(
            backbone,
            cfg.proj_dim,
            cfg.hidden_dim,
            cfg.queue_size,
            cfg.momentum,
            cfg.temperature,
            cfg.bn_splits,
        )
    raise ValueError(f"unknown SSL method {cfg.method!r}; choose 'mocov2' or 'simclr'")
