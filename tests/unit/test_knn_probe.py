"""kNN monitor and linear probe: reference behaviour, separable vs. random labels, feature extraction."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.evaluation.knn import extract_features, knn_accuracy, weighted_knn_predict
from vitkit.evaluation.linear_probe import linear_probe

torch.set_num_threads(1)

NUM_CLASSES = 6


def _clusters(n_per_class: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features around one random centre per class."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return F.normalize(feats, dim=1), labels


def test_knn_vote_is_weighted_by_exp_similarity_over_temperature() -> None:
    # test point e0; neighbours: class 0 at cos 1.0 (one), class 1 at cos 0.8 (two)
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.0]])
    # T = 0.1: exp(10) = 22026 > 2 exp(8) = 5962 -> class 0; T = 1: e = 2.72 < 2 e^0.8 = 4.45 -> class 1
    assert weighted_knn_predict(train, labels, test, 3, k=3, temperature=0.1).tolist() == [0]
    assert weighted_knn_predict(train, labels, test, 3, k=3, temperature=1.0).tolist() == [1]
    # k = 1 is plain nearest neighbour; k above the train size is capped (all four vote)
    assert weighted_knn_predict(train, labels, test, 3, k=1, temperature=1.0).tolist() == [0]
    assert weighted_knn_predict(train, labels, test, 3, k=200, temperature=1.0).tolist() == [1]


def test_knn_matches_a_loop_over_neighbours() -> None:
    train, train_labels = _clusters(30, 16, spread=1.5, seed=0)
    test, _ = _clusters(10, 16, spread=1.5, seed=1)
    k, tau = 15, 0.3
    preds = weighted_knn_predict(train, train_labels, test, NUM_CLASSES, k=k, temperature=tau, chunk_size=7)
    for i, feat in enumerate(test):
        sims = train @ feat
        scores = [0.0] * NUM_CLASSES
        for j in sims.argsort(descending=True)[:k].tolist():
            scores[int(train_labels[j])] += float(torch.exp(sims[j] / tau))
        assert int(preds[i]) == max(range(NUM_CLASSES), key=scores.__getitem__)


def test_knn_separable_features_near_perfect_random_labels_near_chance() -> None:
    train, train_labels = _clusters(200, 32, spread=0.3, seed=0)
    test, test_labels = _clusters(100, 32, spread=0.3, seed=1)
    assert knn_accuracy(train, train_labels, test, test_labels, NUM_CLASSES, k=200, temperature=0.1) >= 0.99
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))]
    chance = knn_accuracy(train, shuffled, test, test_labels, NUM_CLASSES, k=200, temperature=0.1)
    assert abs(chance - 1 / NUM_CLASSES) < 0.08


def test_linear_probe_separable_near_perfect_random_labels_near_chance() -> None:
    # noisier, higher-dimensional clusters than the kNN test
    train, train_labels = _clusters(200, 64, spread=1.0, seed=0)
    test, test_labels = _clusters(100, 64, spread=1.0, seed=1)
    assert linear_probe(train, train_labels, test, test_labels, NUM_CLASSES, epochs=30, lr=1e-2) >= 0.97
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))]
    chance = linear_probe(train, shuffled, test, test_labels, NUM_CLASSES, epochs=30, lr=1e-2)
    assert abs(chance - 1 / NUM_CLASSES) < 0.08


def test_linear_probe_is_deterministic_and_fast() -> None:
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(5000, 512, generator=gen), torch.randn(500, 512, generator=gen)
    # labels from a random linear map of the features: learnable by a linear probe
    weights = torch.randn(512, NUM_CLASSES, generator=gen)
    labels, test_labels = (train @ weights).argmax(1), (test @ weights).argmax(1)
    first = linear_probe(train, labels, test, test_labels, NUM_CLASSES, epochs=50, lr=1e-2, weight_decay=1e-4)
    # timed on the second call: the first pays torch.optim's one-off lazy imports (~2 s)
    start = time.perf_counter()
    again = linear_probe(train, labels, test, test_labels, NUM_CLASSES, epochs=50, lr=1e-2, weight_decay=1e-4)
    elapsed = time.perf_counter() - start
    assert first == again
    assert first >= 0.75
    assert elapsed < 5.0, elapsed


class _PoolNet(nn.Module):
    """A conv + BN trunk returning feature maps, to check pooling, eval mode and mode restore."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_extract_features_pools_normalises_and_runs_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = _PoolNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)

    def normalize_fn(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    net.train()
    feats = extract_features(net, images, batch_size=4, normalize_fn=normalize_fn)
    assert net.training  # mode restored
    assert feats.shape == (10, 8)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        expected = F.normalize(net.eval()(normalize_fn(images)).mean(dim=(2, 3)), dim=1)
    # batch-size independent because BN uses running stats (eval mode), not batch stats
    torch.testing.assert_close(feats, expected)


def test_knn_at_k1_on_its_own_training_features_is_perfect() -> None:
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))
    images = torch.randint(
        0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    feats = extract_features(trunk, images, batch_size=5, normalize_fn=lambda x: x.float() / 255)
    labels = torch.arange(12) % 3
    assert knn_accuracy(feats, labels, feats, labels, 3, k=1, temperature=0.1) == 1.0
