"""Model files are byte-deterministic; a broken checkpoint or model file is one error naming it."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tests.readonly import read_only
from tests.trainer_config import cpu_trainer_config
from vitkit.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_weights, save_weights
from vitkit.engine.distributed import DistInfo
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import Trainer
from vitkit.errors import CheckpointError, ConfigError, OutputError
from vitkit.models.detr.checkpoint import read_release_state


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


# ------------------------------------------------------------------ files that cannot be resumed from


class _Payload:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _corrupt(kind: str, path: Path) -> None:
    """Write ``path`` as a broken checkpoint of the given kind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    torch.save({"fingerprint": "x", "model": {"w": torch.zeros(64)}}, good)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    elif kind == "malicious":
        torch.save({"fingerprint": "x", "model": _Payload(str(path.parent / "PWNED"))}, path)
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps(_Payload(str(path.parent / "PWNED"))))
    elif kind == "not a checkpoint":
        torch.save([1, 2, 3], path)
    elif kind == "a folder":
        path.mkdir()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "it is empty"),
        ("truncated", "truncated or corrupt"),
        ("malicious", "it refers to posix.system, which is code, not weights"),
        ("plain pickle", "not a torch file of tensors"),
        ("not a checkpoint", "is not a vitkit training checkpoint"),
        ("a folder", "is a folder, not a file"),
    ],
)
def test_a_broken_checkpoint_names_the_file_to_delete_and_runs_nothing(tmp_path, kind, reason):
    path = tmp_path / CHECKPOINT_NAME
    _corrupt(kind, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert reason in message
    assert f"delete it (rm {path})" in message and "\n" not in message
    assert "weights_only" not in message and "safe_globals" not in message  # never the unsafe advice
    assert not (tmp_path / "PWNED").exists()


def test_a_missing_checkpoint_is_none_and_a_broken_model_file_says_how_to_restore_it(tmp_path):
    assert load_checkpoint(tmp_path) is None
    _corrupt("truncated", tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model file .*model\.pt cannot be read.*dvc checkout"):
        load_weights(tmp_path / "model.pt")


def test_a_release_checkpoint_that_is_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"DETR checkpoint {tmp_path} is a folder, not a file"):
        read_release_state(tmp_path, "DETR")
    _corrupt("malicious", tmp_path / "release.pth")
    with pytest.raises(ConfigError, match="which is code, not weights") as info:
        read_release_state(tmp_path / "release.pth", "DETR")
    assert "weights_only" not in str(info.value) and not (tmp_path / "PWNED").exists()


def _trainer(checkpoint_dir: Path) -> Trainer:
    dataset = TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long))

    class Task(TrainingTask):
        def __init__(self) -> None:
            self.model = nn.Linear(2, 1)
            self.steps = 0

        def step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
            self.steps += 1
            return {"loss": model(batch[0]).square().mean()}

    cfg = cpu_trainer_config(epochs=1, batch_size=4, lr=0.01)
    return Trainer(Task(), dataset, cfg, torch.device("cpu"), DistInfo(), checkpoint_dir)


def test_training_stops_before_its_first_step_on_a_broken_checkpoint_or_a_read_only_folder(tmp_path):
    broken = tmp_path / "broken"
    _corrupt("truncated", broken / CHECKPOINT_NAME)
    trainer = _trainer(broken)
    with pytest.raises(CheckpointError, match="delete it"):
        trainer.fit()
    assert trainer.task.steps == 0

    read_only_dir = tmp_path / "read-only"
    read_only_dir.mkdir()
    trainer = _trainer(read_only_dir)
    with read_only(read_only_dir), pytest.raises(OutputError, match=f"cannot write to {read_only_dir}"):
        trainer.fit()
    assert trainer.task.steps == 0
    _trainer(read_only_dir).fit()  # writable again: it trains and keeps its checkpoint (unfinished)
    assert load_checkpoint(read_only_dir)["epoch"] == 1
