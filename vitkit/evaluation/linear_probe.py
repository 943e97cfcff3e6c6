"""Linear probe: a linear classifier trained on frozen, precomputed features.

The standard SSL protocol (MoCo, SimCLR): the trunk is frozen and only a
linear layer is learned, so the accuracy measures how linearly separable the
representation already is. Features are standardised with the training set's
statistics first (the non-affine BN that MAE/DINO put in front of the linear
head does the same), which makes one learning rate work across backbones whose
feature scales differ by orders of magnitude.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **options: Any,
) -> float:
    """Test top-1 in [0, 1] of ``linear_probe_predict``, whose keyword ``options`` (and defaults) it takes."""
    preds = linear_probe_predict(train_feats, train_labels, test_feats, num_classes, **options)
    return (preds == test_labels).float().mean().item()


def linear_probe_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Train softmax regression with mini-batch AdamW + cosine decay; each test feature's predicted class.

    Deterministic for a given ``seed`` (initialisation and batch order use their
    own generator, so the global RNG is left alone).
    """
    generator = torch.Generator().manual_seed(seed)
    x_train, x_test = train_feats.float(), test_feats.float()
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    classifier = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-x_train.shape[0] // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x_train.shape[0], generator=generator).to(x_train.device)
            for idx in order.split(batch_size):
                loss = F.cross_entropy(classifier(x_train[idx]), train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()

    with torch.no_grad():
        return classifier(x_test).argmax(dim=1)
