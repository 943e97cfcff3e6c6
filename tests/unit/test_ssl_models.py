"""MoCo / SimCLR models: queue bookkeeping, momentum encoder, split BN, DDP gather, one-step learning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from vitkit.config import SSLParams, load_params
from vitkit.models.resnet import backbone_state_dict, build_resnet, load_backbone
from vitkit.models.ssl import (
    MoCo,
    SplitBatchNorm,
    build_ssl_model,
    convert_split_batchnorm,
    gather_from_all_processes,
)

torch.set_num_threads(1)

PROJ_DIM = 8
SSL = load_params(Path(__file__).resolve().parents[2] / "params.yaml").ssl


def _ssl_params(**fields) -> SSLParams:
    """The ``ssl`` section with ``fields``; temperature and momentum at the old library defaults."""
    return SSL.model_copy(update={"temperature": 0.2, "momentum": 0.99, **fields})


def _moco(queue_size: int = 10, momentum: float = 0.9, bn_splits: int = 2) -> MoCo:
    torch.manual_seed(0)
    return MoCo(
        lambda: build_resnet("resnet18", num_classes=1), PROJ_DIM, 16, queue_size, momentum, 0.2, bn_splits
    )


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- queue ---------------------------------------------------------------------------------------------


def _sequential_queue(queue: list, ptr: int, keys: torch.Tensor) -> int:
    """Reference: write keys one at a time at the pointer, wrapping at the end."""
    for key in keys:
        queue[ptr] = key.clone()
        ptr = (ptr + 1) % len(queue)
    return ptr


def test_enqueue_wraps_around_for_any_queue_and_batch_size() -> None:
    model = _moco(queue_size=10)
    reference = list(model.queue.clone())
    ptr = 0
    gen = torch.Generator().manual_seed(3)
    # 4 + 4 fills slots 0..7; the third batch of 4 wraps (slots 8, 9, 0, 1); then a partial batch of 3;
    # then a batch larger than the queue, of which only the last 10 keys survive
    for batch, expected_ptr in [(4, 4), (4, 8), (4, 2), (3, 5), (13, 8)]:
        keys = F.normalize(torch.randn(batch, PROJ_DIM, generator=gen), dim=1)
        model.enqueue(keys)
        ptr = _sequential_queue(reference, ptr, keys)
        assert int(model.queue_ptr) == ptr == expected_ptr
        assert torch.equal(model.queue, torch.stack(reference))


def test_wrapped_batch_lands_in_the_right_slots() -> None:
    model = _moco(queue_size=10)
    model.queue_ptr.fill_(8)
    keys = torch.arange(4 * PROJ_DIM, dtype=torch.float32).view(4, PROJ_DIM)
    untouched = model.queue[2:8].clone()
    model.enqueue(keys)
    assert torch.equal(model.queue[8], keys[0]) and torch.equal(model.queue[9], keys[1])
    assert torch.equal(model.queue[0], keys[2]) and torch.equal(model.queue[1], keys[3])
    assert torch.equal(model.queue[2:8], untouched)
    assert int(model.queue_ptr) == 2


# ---- forward: logits, labels, keys ---------------------------------------------------------------------


@pytest.mark.parametrize("bn_splits", [1, 2])
def test_moco_forward_logits_are_query_key_and_query_queue_products(bn_splits: int) -> None:
    model = _moco(queue_size=10, bn_splits=bn_splits)
    model.queue_ptr.fill_(7)  # the batch of 6 wraps around: slots 7, 8, 9, 0, 1, 2
    x1, x2 = _images(6, 1), _images(6, 2)
    before = copy.deepcopy(model)

    torch.manual_seed(5)
    loss, logits, labels = model(x1, x2)

    # recompute by hand on the untouched copy, with the same key-batch permutation
    torch.manual_seed(5)
    perm = torch.randperm(6)
    with torch.no_grad():
        q = F.normalize(before.encoder_q(x1), dim=1)
        before.momentum_update_key_encoder()
        k = F.normalize(before.encoder_k(x2[perm]), dim=1)[perm.argsort()]
    tau = model.temperature
    assert logits.shape == (6, 1 + 10)
    assert labels.tolist() == [0] * 6
    torch.testing.assert_close(logits[:, 0], (q * k).sum(dim=1) / tau, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 1:], q @ before.queue.T / tau, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    # the batch's keys were enqueued at the pointer, wrapping around
    slots = torch.tensor([7, 8, 9, 0, 1, 2])
    torch.testing.assert_close(model.queue[slots], k, atol=1e-5, rtol=1e-5)
    assert int(model.queue_ptr) == 3


def test_eval_forward_leaves_queue_and_key_encoder_alone() -> None:
    model = _moco().eval()
    queue, key_state = model.queue.clone(), copy.deepcopy(model.encoder_k.state_dict())
    model(_images(4, 1), _images(4, 2))
    assert torch.equal(model.queue, queue) and int(model.queue_ptr) == 0
    for name, value in model.encoder_k.state_dict().items():
        assert torch.equal(value, key_state[name]), name


# ---- momentum encoder ----------------------------------------------------------------------------------


def test_key_encoder_starts_as_copy_and_follows_by_ema() -> None:
    model = _moco(momentum=0.9)
    key_state = model.encoder_k.state_dict()
    for name, value in model.encoder_q.state_dict().items():
        assert torch.equal(value, key_state[name]), name
    with torch.no_grad():  # move the query encoder away from the key encoder
        for param in model.encoder_q.parameters():
            param.add_(torch.randn_like(param))
    q_params = [p.clone() for p in model.encoder_q.parameters()]
    k_params = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update_key_encoder()
    for q, k, new_k in zip(q_params, k_params, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(new_k, 0.9 * k + 0.1 * q)
    # the query encoder itself is untouched
    for q, param in zip(q_params, model.encoder_q.parameters(), strict=True):
        assert torch.equal(q, param)


def test_key_encoder_gets_no_gradients() -> None:
    model = _moco()
    loss, _, _ = model(_images(4, 1), _images(4, 2))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert not model.queue.requires_grad


# ---- split batch norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        # divisible: one fused call, sample i in split i % 3
        ((6, 4, 5, 5), [[0, 3], [1, 4], [2, 5]]),
        # not divisible: contiguous sub-batches from tensor_split
        ((7, 4, 5, 5), [[0, 1, 2], [3, 4], [5, 6]]),
        ((8, 4), [[0, 1, 2], [3, 4, 5], [6, 7]]),
    ],
)
def test_split_batchnorm_normalises_each_sub_batch_on_its_own(shape: tuple, groups: list) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4) if len(shape) == 4 else nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
    reference = copy.deepcopy(bn)
    split = convert_split_batchnorm(bn, num_splits=3)
    assert isinstance(split, SplitBatchNorm)
    x = torch.randn(shape) * 3 + 1

    out = split(x)

    expected_out = torch.empty_like(x)
    means, variances = [], []
    for group in groups:
        rm, rv = reference.running_mean.clone(), reference.running_var.clone()
        expected_out[group] = F.batch_norm(
            x[group], rm, rv, reference.weight, reference.bias, True, reference.momentum, reference.eps
        )
        means.append(rm)
        variances.append(rv)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    # at eval time it is an ordinary BN with the same state
    split.eval()
    reference.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), reference.eval()(x))


def test_split_batchnorm_uses_fewer_splits_for_a_tiny_batch() -> None:
    split = convert_split_batchnorm(nn.BatchNorm1d(4), num_splits=8)
    x = torch.randn(5, 4)
    # 5 samples allow 2 splits of >= 2 samples: (3, 2)
    expected = torch.cat([F.batch_norm(part, None, None, training=True) for part in (x[:3], x[3:])])
    torch.testing.assert_close(split(x), expected)


# ---- backbone export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mocov2", "simclr"])
def test_backbone_gives_pooled_features_and_loads_into_a_plain_resnet(method: str) -> None:
    model = build_ssl_model(
        _ssl_params(method=method, queue_size=16, hidden_dim=32, proj_dim=8, bn_splits=2),
        "resnet18",
        "imagenet",
    )
    model.train()
    model(_images(4, 1), _images(4, 2))  # move BN running stats away from their init
    model.eval()
    x = _images(3, 3)
    features = model.backbone(x)
    assert features.shape == (3, 512)

    plain = build_resnet("resnet18", num_classes=6)
    load_backbone(plain, backbone_state_dict(model.backbone))
    plain.fc = nn.Identity()
    torch.testing.assert_close(plain.eval()(x), features)


# ---- one optimisation step learns ----------------------------------------------------------------------


def _loss_on_fixed_batch(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> float:
    """Loss on a copy with a fixed key-batch permutation, so measuring changes nothing."""
    probe = copy.deepcopy(model)
    torch.manual_seed(123)
    with torch.no_grad():
        out = probe(x1, x2)
    return float(out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("method", ["mocov2", "simclr"])
def test_sgd_steps_on_a_fixed_batch_lower_the_loss(method: str) -> None:
    torch.manual_seed(0)
    model = build_ssl_model(
        _ssl_params(method=method, queue_size=32, hidden_dim=64, proj_dim=16, bn_splits=2),
        "resnet18",
        "imagenet",
    )
    model.train()
    base = _images(4, 7)
    # a batch of 4 images repeated twice, with two fixed "views" each (flip + noise)
    x1 = torch.cat([base, base]) + 0.1 * _images(8, 8)
    x2 = torch.cat([base, base]).flip(-1) + 0.1 * _images(8, 9)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    queue = model.queue.clone() if isinstance(model, MoCo) else None

    before = _loss_on_fixed_batch(model, x1, x2)
    for _ in range(3):
        out = model(x1, x2)
        loss = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if queue is not None:
            # otherwise the batch's own keys become its negatives and the fixed-batch loss is not comparable
            model.queue.copy_(queue)
            model.queue_ptr.zero_()
    after = _loss_on_fixed_batch(model, x1, x2)
    assert after < before - 0.05, (before, after)


# ---- DDP: the queue sees every process's keys ----------------------------------------------------------


def _gather_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # rank r holds r + 2 keys (unequal sizes, as with a last partial batch) filled with the value r
        gathered = gather_from_all_processes(torch.full((rank + 2, 3), float(rank)))
        expected = torch.cat([torch.zeros(2, 3), torch.ones(3, 3)])
        assert torch.equal(gathered, expected), gathered  # a failure here fails mp.start_processes
    finally:
        dist.destroy_process_group()


def test_gather_from_all_processes_concatenates_in_rank_order(tmp_path) -> None:
    assert torch.equal(gather_from_all_processes(torch.ones(2, 3)), torch.ones(2, 3))  # no DDP: identity
    # fork: the workers inherit the imported modules instead of importing torch again (seconds)
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init")), nprocs=2, start_method="fork")
