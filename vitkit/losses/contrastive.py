"""Contrastive losses: SimCLR's NT-Xent and MoCo's InfoNCE against a queue.

Both are a softmax cross-entropy that asks each embedding to pick its positive
(the other view of the same image) out of a set of negatives; they differ only
in where the negatives come from. SimCLR uses the other 2N-2 views of the
batch, so it needs large batches; MoCo keeps a queue of keys from past batches,
so the number of negatives K is decoupled from the batch size.

Both compute their similarities in float32 even under autocast: a bf16 matmul rounds
cosine / T (up to 1 / T = 5 or 10) to steps of about 0.02-0.03, which blurs exactly the
differences between near-positives that the softmax is meant to resolve. The N x N (or
N x K) product is a small part of a step, so fp32 costs little.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _full_precision(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor in float32 at least (float64 stays float64, as the formula tests use)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy (SimCLR, Chen et al. 2020, eq. 1).

    ``z1[i]`` and ``z2[i]`` are projections of two views of image ``i``. Over the
    2N views, view ``a`` scores every other view ``b`` by cosine similarity / T;
    its own similarity (always 1, the largest) is masked out so that a view never
    counts itself as a candidate. The loss is the mean over all 2N anchors of
    -log softmax at the other view of the same image.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of equal shape, got {z1.shape} and {z2.shape}")
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat(_full_precision(z1, z2)), dim=1)
        logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    # anchor i (first view) has its positive at n + i, anchor n + i at i
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE loss (He et al. 2020, eq. 1).

    ``q`` (N, D) are queries, ``k`` (N, D) their positive keys, ``queue`` (K, D)
    negative keys from earlier batches; all are expected L2-normalised, so dot
    products are cosine similarities. Logits are ``[q·k, q·queue^T] / T`` with the
    positive in column 0, hence the labels are all zero. Returns ``(loss, logits,
    labels)`` so callers can also report the instance-discrimination accuracy.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = _full_precision(q, k, queue)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.T
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits, labels
