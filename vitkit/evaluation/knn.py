"""Frozen-feature extraction and the weighted kNN classifier used to monitor SSL.

A kNN classifier on L2-normalised features needs no training, so it measures
the representation itself (not an optimiser's luck) and is cheap enough to run
every few epochs during pretraining. ``weighted_knn_predict`` is the monitor of
the MoCo CIFAR demo (after Wu et al. 2018): each of the k nearest training
features votes for its class with weight exp(cosine / T).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data.datasets import Images


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images_uint8: Images,
    batch_size: int,
    normalize_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """L2-normalised pooled features (N, D) of uint8 images (N, 3, H, W), on the CPU.

    ``images_uint8`` is read one batch at a time (a tensor or ``ImageFiles``).

    ``backbone`` maps a normalised float batch to features: (N, D), or feature
    maps (N, C, H, W) which are global-average-pooled (e.g. a ResNet whose ``fc``
    is ``nn.Identity``, as the SSL models' ``.backbone``). ``normalize_fn`` turns a
    uint8 batch into the model's input (see ``normalize_transform``). The
    backbone runs in eval mode (BN running statistics) and is put back in the
    mode it was in.
    """
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        feats = []
        for start in range(0, len(images_uint8), batch_size):
            out = backbone(normalize_fn(images_uint8[start : start + batch_size].to(device)))
            if out.ndim == 4:
                out = out.mean(dim=(2, 3))
            feats.append(F.normalize(out.float(), dim=1).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def weighted_knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of each test feature by similarity-weighted kNN vote (features L2-normalised).

    For each test feature: cosine similarity to every training feature, keep the
    top k, weight each by exp(sim / T), add the weights per class (one-hot
    scatter + sum) and predict the class with the largest score. ``k`` is capped
    at the number of training features; test features are processed in chunks
    to bound the (chunk, N_train) similarity matrix.
    """
    k = min(k, train_feats.shape[0])
    preds = []
    for feats in test_feats.split(chunk_size):
        sim_weight, sim_indices = (feats @ train_feats.T).topk(k, dim=1)
        sim_labels = train_labels[sim_indices]  # (B, k)
        sim_weight = (sim_weight / temperature).exp()
        one_hot = torch.zeros(feats.shape[0] * k, num_classes, device=feats.device)
        one_hot.scatter_(1, sim_labels.reshape(-1, 1), 1.0)
        scores = (one_hot.view(feats.shape[0], k, num_classes) * sim_weight.unsqueeze(-1)).sum(dim=1)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``weighted_knn_predict`` on labelled test features."""
    preds = weighted_knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return (preds == test_labels).float().mean().item()
