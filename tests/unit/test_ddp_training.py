"""DDP details of the engine with two gloo processes: per-rank augmentation, losses averaged, resume.

The processes are forked (no fresh interpreter, ~1 s each) and meet through a file store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.trainer_config import cpu_trainer_config
from vitkit.config import load_params
from vitkit.data.datasets import LabelledImageDataset
from vitkit.data.transforms import train_transform
from vitkit.engine.checkpoint import seed_everything
from vitkit.engine.distributed import DistInfo
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import Trainer, TrainerConfig
from vitkit.tasks.distillation import scaled_lr

ROOT = Path(__file__).resolve().parents[2]


class StopTraining(Exception):
    """Raised by a task to stand in for a kill at a given step."""


def _config(**fields) -> TrainerConfig:
    ddp = dict(epochs=1, batch_size=4, lr=0.05, weight_decay=0.0, warmup_epochs=0.0, grad_clip=0.0)
    cpu = dict(amp="off", channels_last=False, checkpoint_every_steps=3, desc="ddp", fingerprint="ddp-v1")
    return cpu_trainer_config(**{**ddp, **cpu, **fields})


def _in_two_processes(worker, tmp: Path, *args) -> list:
    """Run ``worker(dist_info, tmp, *args)`` on ranks 0 and 1; returns what each saved, by rank."""
    mp.start_processes(_bootstrap, args=(worker, str(tmp), args), nprocs=2, start_method="fork")
    return [torch.load(tmp / f"result.{rank}", weights_only=False) for rank in (0, 1)]


def _bootstrap(rank: int, worker, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        # local_rank 0 on both: two one-process nodes, each with its own disk (``tmp/node<rank>``)
        result = worker(DistInfo(rank=rank, world_size=2, local_rank=0), Path(tmp), *args)
        torch.save(result, Path(tmp) / f"result.{rank}")
    finally:
        dist.destroy_process_group()


SIZE = 32  # the training crop (padding 4) has 81 positions x 2 flips: chance repeats are rare


class RecordingTask(TrainingTask):
    """A linear classifier (batch norm on its logits) that keeps each batch and loss it sees."""

    def __init__(self, loss_offset: float = 0.0) -> None:
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2), nn.BatchNorm1d(2))
        self.loss_offset = loss_offset
        self.batches: list[torch.Tensor] = []
        self.losses: list[float] = []

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        self.batches.append(images.clone())
        loss = nn.functional.cross_entropy(model(images), labels) + self.loss_offset
        self.losses.append(loss.item())
        return {"loss": loss}


def _images(count: int = 16) -> LabelledImageDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    return LabelledImageDataset(images, torch.arange(count) % 2, train_transform(SIZE, 0.5))


def _first_batch_and_init(info: DistInfo, tmp: Path, same_seed_everywhere: bool) -> dict:
    if same_seed_everywhere:  # the control: every rank seeded alike, as before augmentation_seed
        DistInfo.augmentation_seed = lambda self, seed: seed  # type: ignore[method-assign]
    seed_everything(0)  # what stage_main does before the task builds its model
    task = RecordingTask()
    init = [p.detach().clone() for p in task.model.parameters()]
    cfg = _config(repeated_augmentations=2)
    Trainer(task, _images(), cfg, torch.device("cpu"), info, tmp / f"node{info.rank}").fit()
    return {"init": init, "first_batch": task.batches[0]}


@pytest.mark.parametrize("same_seed_everywhere", [False, True])
def test_each_rank_draws_its_own_augmentations_of_one_model_init(same_seed_everywhere):
    """With repeated augmentation both ranks see the same images at the same batch positions: each
    rank must crop and flip them its own way, while the model starts identical on both."""
    with tempfile.TemporaryDirectory() as tmp:
        ranks = _in_two_processes(_first_batch_and_init, Path(tmp), same_seed_everywhere)
    for a, b in zip(ranks[0]["init"], ranks[1]["init"], strict=True):
        assert torch.equal(a, b)
    first, second = ranks[0]["first_batch"], ranks[1]["first_batch"]
    identical = [i for i in range(len(first)) if torch.equal(first[i], second[i])]
    if same_seed_everywhere:
        assert identical, "the control should repeat augmentations across ranks"
    else:
        assert identical == []


def _history_and_own_losses(info: DistInfo, tmp: Path) -> dict:
    seed_everything(0)
    task = RecordingTask(loss_offset=10.0 * info.rank)  # rank 1's losses are 10 above its cross-entropy
    trainer = Trainer(task, _images(), _config(), torch.device("cpu"), info, tmp / f"node{info.rank}")
    return {"history": trainer.fit(), "own_mean": sum(task.losses) / len(task.losses)}


def test_logged_losses_are_the_mean_over_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        ranks = _in_two_processes(_history_and_own_losses, Path(tmp))
    assert ranks[0]["history"] == ranks[1]["history"]  # one history on every rank: the same files per node
    logged = ranks[0]["history"][0]["train_loss"]
    assert logged == pytest.approx((ranks[0]["own_mean"] + ranks[1]["own_mean"]) / 2, rel=1e-6)
    assert logged != pytest.approx(ranks[0]["own_mean"], abs=1.0)  # not rank 0's alone


def _train(info: DistInfo, tmp: Path, node: str, stop_at_step: int) -> dict:
    """Two epochs of 8 steps, checkpoints every 3 steps on this node's disk; stops at ``stop_at_step``.

    Returns the model's whole state: parameters and the batch-norm statistics, which each rank
    updates with its own batches."""
    seed_everything(0)
    task = RecordingTask()
    step = task.step

    def step_or_stop(model, batch):
        if len(task.batches) + 1 == stop_at_step:
            raise StopTraining
        return step(model, batch)

    task.step = step_or_stop  # type: ignore[method-assign]
    cfg = _config(epochs=2, batch_size=2)
    trainer = Trainer(task, _images(32), cfg, torch.device("cpu"), info, tmp / f"{node}{info.rank}")
    try:
        trainer.fit()
    except StopTraining:
        return {"stopped_at": trainer.state.global_step}
    return {
        "weights": torch.cat([t.detach().flatten().float() for t in trainer.model.state_dict().values()]),
        "steps_run": len(task.batches),
    }


def test_a_node_without_the_checkpoint_resumes_from_the_others(tmp_path, capfd):
    """Ranks 0 and 1 stand for two nodes with their own disks; node 1 lost its checkpoint (or its
    disk): both must go on from node 0's epoch-2 step-3 checkpoint and end with the weights and
    batch-norm statistics of an uninterrupted run, the same on both nodes."""
    reference = _in_two_processes(_train, tmp_path, "reference", -1)
    stopped = _in_two_processes(_train, tmp_path, "node", 13)  # epoch 2, step 5: past its step-3 checkpoint
    assert [r["stopped_at"] for r in stopped] == [12, 12]
    for path in (tmp_path / "node1").iterdir():
        path.unlink()
    capfd.readouterr()
    resumed = _in_two_processes(_train, tmp_path, "node", -1)
    out = capfd.readouterr().out
    assert f"resuming from {tmp_path / 'node0'} at epoch 2, step 3/8" in out
    assert "resuming from rank 0's checkpoint (none here that far) at epoch 2, step 3/8" in out
    assert [r["steps_run"] for r in resumed] == [5, 5]  # the 5 steps left of 16: it did not start over
    for rank in (0, 1):
        assert torch.allclose(resumed[rank]["weights"], reference[0]["weights"], atol=1e-5)
        assert torch.equal(resumed[rank]["weights"], resumed[0]["weights"])


def test_deit_lr_scales_with_the_global_batch():
    deit = load_params(ROOT / "params.yaml").deit
    one = scaled_lr(deit, world_size=1)
    assert one == pytest.approx(deit.lr * deit.batch_size / 512)
    assert scaled_lr(deit, world_size=4) == pytest.approx(4 * one)  # 4 processes x batch_size images
