"""Model files are byte-deterministic: DVC hashes them, so equal weights must give equal bytes."""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from vitkit.engine.checkpoint import load_weights, save_weights


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer and the BatchNorm buffers
    meta = {"arch": "toy", "classes": ["a", "b", "c", "d"], "init_sha256": "0" * 64}
    # the atomic write's temporary file name is random each time, and the two files are named apart
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "weights.pt"
    save_weights(first, model.state_dict(), meta)
    save_weights(second, copy.deepcopy(model).state_dict(), copy.deepcopy(meta))  # equal, not the same
    assert md5(first) == md5(second)

    state, loaded_meta = load_weights(second)
    assert loaded_meta == meta
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    model[0].weight.data[0, 0, 0, 0] += 1e-6  # and one changed weight gives other bytes
    save_weights(second, model.state_dict(), meta)
    assert md5(first) != md5(second)
