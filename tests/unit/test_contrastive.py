"""NT-Xent and InfoNCE against the papers' formulas written out as plain loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.losses.contrastive import info_nce, nt_xent


def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR eq. 1: views 2k and 2k+1 of image k; L = 1/2N sum_k [l(2k, 2k+1) + l(2k+1, 2k)]."""
    views = []
    for a, b in zip(z1, z2, strict=True):
        views += [a, b]

    def sim(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    def pair_loss(i: int, j: int) -> float:
        denominator = sum(math.exp(sim(views[i], views[k]) / tau) for k in range(len(views)) if k != i)
        return -math.log(math.exp(sim(views[i], views[j]) / tau) / denominator)

    n = len(z1)
    return sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_paper_formula(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    z2 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(_nt_xent_loop(z1, z2, tau), abs=1e-6)


def test_nt_xent_is_scale_invariant_and_low_for_aligned_views() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    noise = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    # cosine similarity: rescaling a projection changes nothing
    assert nt_xent(z, 3.0 * z + noise, 0.2).item() == pytest.approx(nt_xent(z, z + noise / 3.0, 0.2).item())
    # identical views score lower than unrelated ones
    assert nt_xent(z, z, 0.2) < nt_xent(z, noise, 0.2)


def test_nt_xent_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8), 0.1)


def test_info_nce_logits_labels_and_loss() -> None:
    gen = torch.Generator().manual_seed(2)
    n, d, k_size, tau = 5, 8, 7, 0.2
    q = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k_size, d, generator=gen, dtype=torch.float64), dim=1)
    loss, logits, labels = info_nce(q, k, queue, tau)

    assert logits.shape == (n, 1 + k_size)
    assert labels.dtype == torch.long and labels.tolist() == [0] * n
    for i in range(n):
        assert logits[i, 0].item() == pytest.approx(float(q[i] @ k[i]) / tau, abs=1e-12)
        for j in range(k_size):
            assert logits[i, 1 + j].item() == pytest.approx(float(q[i] @ queue[j]) / tau, abs=1e-12)
    # MoCo eq. 1: -log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.k_j/T)), averaged over queries
    expected = 0.0
    for i in range(n):
        positive = math.exp(float(q[i] @ k[i]) / tau)
        negatives = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(k_size))
        expected -= math.log(positive / (positive + negatives)) / n
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_similarities_are_float32_under_bf16_autocast() -> None:
    """Autocast would run the similarity matmuls in bf16 (cosine / T in steps of ~0.02); the losses
    keep them in float32, so under CPU bf16 autocast they give the fp32 values."""
    gen = torch.Generator().manual_seed(3)
    z1, z2, queue = (
        torch.randn(16, 32, generator=gen),
        torch.randn(16, 32, generator=gen),
        torch.randn(64, 32),
    )
    q, k, queue = F.normalize(z1, dim=1), F.normalize(z2, dim=1), F.normalize(queue, dim=1)
    expected_loss, expected_logits, _ = info_nce(q, k, queue, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (q @ queue.T).dtype == torch.bfloat16  # what the losses would get without their guard
        loss, logits, _ = info_nce(q, k, queue, 0.2)
        simclr = nt_xent(z1, z2, 0.2)
    assert logits.dtype == torch.float32 and torch.equal(logits, expected_logits)
    assert torch.equal(loss, expected_loss)
    assert torch.equal(simclr, nt_xent(z1, z2, 0.2))
