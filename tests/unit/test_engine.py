"""Training engine: schedule, sampler, learning, resume after kill -9, NaN guard."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tests.trainer_config import cpu_trainer_config
from vitkit.data.samplers import RASampler
from vitkit.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vitkit.engine.distributed import DistInfo
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import Trainer, build_scheduler

JOB = Path(__file__).resolve().parent.parent / "engine_job.py"


def run_job(
    tmp: Path, name: str, *extra: str, kill_when_checkpointed: bool = False
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(JOB), str(tmp / f"ckpt-{name}"), str(tmp / f"{name}.json"), *extra]
    if not kill_when_checkpointed:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp / f"ckpt-{name}" / CHECKPOINT_NAME
    deadline = time.time() + 60
    # wait until training is well into its second epoch, past a mid-epoch checkpoint
    while time.time() < deadline:
        state = load_checkpoint(checkpoint.parent) if checkpoint.exists() else None
        if state is not None and state["epoch"] == 1 and state["step_in_epoch"] >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return subprocess.CompletedProcess(cmd, process.returncode, "", "")


def test_scheduler_warms_up_then_decays_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.01
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # rising during warmup
    assert abs(max(lrs) - 1.0) < 1e-6
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # cosine decay
    assert lrs[-1] < 0.01


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    reference = run_job(tmp_path, "reference")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    killed = run_job(tmp_path, "resumed", "--sleep", "0.03", kill_when_checkpointed=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed.json").exists()
    resumed = run_job(tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout

    ref = json.loads((tmp_path / "reference.json").read_text())
    res = json.loads((tmp_path / "resumed.json").read_text())
    assert res["steps_run"] < ref["steps_run"]  # it did not start over
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert torch.allclose(torch.tensor(res["weights"]), torch.tensor(ref["weights"]), atol=1e-5)
    assert abs(res["history"][-1]["acc"] - ref["history"][-1]["acc"]) < 1e-6
    assert ref["history"][-1]["acc"] > 0.9  # and the job does learn
    assert load_checkpoint(tmp_path / "ckpt-resumed")["finished"]  # kept, but never resumed from
    again = run_job(tmp_path, "resumed")
    assert again.returncode == 0 and "resuming" not in again.stdout


def test_a_job_dying_after_its_last_epoch_writes_its_outputs_again_without_training(tmp_path):
    """The checkpoint is finished only once the outputs are written: until then a rerun only publishes."""
    died = run_job(tmp_path, "late", "--fail-publishing")
    assert died.returncode == 3 and not (tmp_path / "late.json").exists()
    state = load_checkpoint(tmp_path / "ckpt-late")
    assert state["epoch"] == 4 and not state["finished"]
    rerun = run_job(tmp_path, "late")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "training already ended in" in rerun.stdout and "no epoch to train" in rerun.stdout
    result = json.loads((tmp_path / "late.json").read_text())
    assert result["steps_run"] == 0 and [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    reference = run_job(tmp_path, "reference")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert result["weights"] == json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert load_checkpoint(tmp_path / "ckpt-late")["finished"]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    result = run_job(tmp_path, "nan", "--nan-at", "23")
    assert result.returncode == 2
    assert "loss became nan at epoch 2, step 7" in result.stdout
    assert "last good checkpoint" in result.stdout
    state = load_checkpoint(tmp_path / "ckpt-nan")
    assert state is not None and state["global_step"] == 21  # the epoch-2 step-5 checkpoint, before the NaN
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_repeated_augmentation_and_a_step_hook_with_its_state_in_the_checkpoint(tmp_path):
    """The sampler DeiT asks for, a hook after every optimizer step, and the hook's state resumed."""
    torch.manual_seed(0)
    dataset = TensorDataset(torch.arange(20.0)[:, None], torch.zeros(20, dtype=torch.long))
    seen: list[float] = []
    state = {"steps": 0}

    class CountingTask(TrainingTask):
        def __init__(self) -> None:
            self.model = torch.nn.Linear(1, 1)

        def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
            seen.extend(batch[0].flatten().tolist())
            return {"loss": model(batch[0]).square().mean()}

        def after_step(self) -> None:
            state.update(steps=state["steps"] + 1)

        def state_dict(self) -> dict:
            return dict(state)

        def load_state_dict(self, saved: dict) -> None:
            state.update(saved)

    def build(epochs: int) -> Trainer:
        cfg = cpu_trainer_config(epochs=epochs, batch_size=4, lr=0.01, repeated_augmentations=2)
        return Trainer(CountingTask(), dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path)

    trainer = build(epochs=1)
    assert isinstance(trainer.sampler, RASampler)
    trainer.fit()
    assert state["steps"] == trainer.steps_per_epoch == 5  # 20 samples per epoch, in batches of 4
    assert len(set(seen)) == 10 and all(seen.count(v) == 2 for v in set(seen))  # 10 images, twice each
    # an unfinished run: its checkpoint carries the hook's state, which a resumed trainer gets back
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["extra"] == {"steps": 5}
    checkpoint["finished"] = False
    torch.save(checkpoint, tmp_path / CHECKPOINT_NAME)
    state["steps"] = 0
    assert build(epochs=1).try_resume()
    assert state["steps"] == 5


def test_every_term_the_step_returns_is_logged_as_its_epoch_mean(tmp_path):
    """A task's extra terms become ``train_<name>`` columns, averaged over the epoch's steps."""
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(24, 3), torch.zeros(24, dtype=torch.long))
    losses: list[list[float]] = [[], []]  # per epoch, every step's loss

    class HalfTask(TrainingTask):
        def __init__(self) -> None:
            self.model = torch.nn.Linear(3, 1)
            self.epoch = 0

        def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
            loss = (model(batch[0]) - 1.0).square().mean()
            losses[self.epoch].append(loss.item())
            return {"loss": loss, "half_loss": loss.detach() / 2}

        def validate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
            self.epoch = epoch  # 1-based: the next epoch's steps go to losses[epoch]
            return {}

    cfg = cpu_trainer_config(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0.0)
    history = Trainer(HalfTask(), dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path).fit()

    assert [row["epoch"] for row in history] == [1, 2]
    for row, epoch_losses in zip(history, losses, strict=True):
        assert len(epoch_losses) == 6  # 24 samples in batches of 4
        assert row["train_loss"] == pytest.approx(sum(epoch_losses) / 6, rel=1e-5)
        assert row["train_half_loss"] == pytest.approx(row["train_loss"] / 2, rel=1e-5)
    assert history[1]["train_loss"] < history[0]["train_loss"]  # the means are of different epochs


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_the_loop_reads_the_device_every_check_not_every_step(tmp_path, monkeypatch):
    """Every host read of a tensor (a GPU stall) counted through fit: a longer run adds one per
    ``check_every_steps`` steps, not one per step, while the losses are still all checked."""
    reads = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class SquareTask(TrainingTask):
        def __init__(self) -> None:
            self.model = torch.nn.Linear(3, 1)

        def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
            loss = model(batch[0]).square().mean()
            return {"loss": loss, "half": loss.detach() / 2}

    def reads_in_a_run(steps: int) -> int:
        dataset = TensorDataset(torch.randn(steps * 2, 3), torch.zeros(steps * 2, dtype=torch.long))
        cfg = cpu_trainer_config(
            epochs=1, batch_size=2, lr=0.01, checkpoint_every_steps=1000, check_every_steps=10
        )
        trainer = Trainer(SquareTask(), dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path / str(steps))
        reads["n"] = 0
        trainer.fit()
        return reads["n"]

    assert reads_in_a_run(80) - reads_in_a_run(40) == 40 // 10


def test_max_steps_per_epoch_cuts_every_epoch_and_the_schedule_with_it(tmp_path):
    class CountingTask(TrainingTask):
        def __init__(self) -> None:
            self.model = torch.nn.Linear(3, 1)
            self.seen: list[int] = []

        def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
            self.seen += batch[1].tolist()
            return {"loss": model(batch[0]).square().mean()}

    dataset = TensorDataset(torch.randn(40, 3), torch.arange(40))
    cfg = cpu_trainer_config(epochs=2, batch_size=4, lr=0.01, warmup_epochs=0.0, max_steps_per_epoch=3)
    task = CountingTask()
    trainer = Trainer(task, dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path)
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6
    history = trainer.fit()
    assert trainer.state.global_step == 6 and [row["epoch"] for row in history] == [1, 2]
    first, second = task.seen[:12], task.seen[12:]
    assert len(second) == 12 and first != second  # each epoch draws its own order from all 40
    assert history[-1]["lr"] < 1e-9  # the cosine schedule ends with the shortened epochs

    def resumes(max_steps: int) -> bool:
        cfg_again = cpu_trainer_config(
            epochs=2, batch_size=4, lr=0.01, warmup_epochs=0.0, max_steps_per_epoch=max_steps
        )
        again = Trainer(CountingTask(), dataset, cfg_again, torch.device("cpu"), DistInfo(), tmp_path)
        return again.try_resume()

    assert resumes(3) and not resumes(4)  # other epochs, another schedule: not the same run


def test_min_steps_raises_the_epochs_of_a_small_dataset_and_says_so(tmp_path, capsys):
    """40 samples in batches of 4 are 10 steps an epoch: 2 epochs (20 steps) fall short of
    min_steps 45, so the run trains 5 epochs, its warmup keeps its half of them, and the task's last
    validation is the fifth epoch's."""

    class LastEpochTask(TrainingTask):
        def __init__(self) -> None:
            self.model = torch.nn.Linear(3, 1)
            self.last_seen: list[bool] = []

        def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
            return {"loss": model(batch[0]).square().mean()}

        def validate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
            self.last_seen.append(epoch == self.epochs)
            return {}

    dataset = TensorDataset(torch.randn(40, 3), torch.zeros(40))

    def trainer(min_steps: int, name: str) -> Trainer:
        cfg = cpu_trainer_config(epochs=2, batch_size=4, lr=0.01, warmup_epochs=1.0, min_steps=min_steps)
        return Trainer(LastEpochTask(), dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path / name)

    as_given = trainer(20, "given")
    assert (as_given.epochs, as_given.total_steps) == (2, 20)
    assert capsys.readouterr().err == ""

    raised = trainer(45, "raised")
    assert (raised.epochs, raised.total_steps, raised.task.epochs) == (5, 50, 5)
    assert (
        "2 epochs of 10 optimiser steps are 20 steps, fewer than engine.min_steps (45): training 5 epochs"
        in (capsys.readouterr().err)
    )
    probe, lrs = trainer(45, "lr-probe"), []
    for _ in range(probe.total_steps):
        lrs.append(probe.optimizer.param_groups[0]["lr"])
        probe.optimizer.step()
        probe.scheduler.step()
    assert max(range(len(lrs)), key=lrs.__getitem__) == 25  # warmup: half the epochs, as with 2 epochs
    history = raised.fit()
    assert len(history) == 5 and raised.task.last_seen == [False] * 4 + [True]


def test_progress_into_a_pipe_is_a_few_lines_per_epoch(tmp_path, capsys):
    """With bars on and stderr not a terminal (a Prefect task log), an epoch of 40 steps with a
    loss check every 2 steps and a checkpoint every 5 draws its bar 6 times, not at every check."""
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(160, 3), torch.zeros(160, dtype=torch.long))

    class LineTask(TrainingTask):
        def __init__(self) -> None:
            self.model = torch.nn.Linear(3, 1)

        def step(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
            return {"loss": (model(batch[0]) - 1.0).square().mean()}

        def validate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
            return {}

    cfg = cpu_trainer_config(
        epochs=2, batch_size=4, lr=0.05, progress=True, check_every_steps=2, checkpoint_every_steps=5
    )
    Trainer(LineTask(), dataset, cfg, torch.device("cpu"), DistInfo(), tmp_path).fit()
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    for epoch in (1, 2):
        drawn = [line for line in lines if line.startswith(f"train {epoch}/2")]
        assert len(drawn) == 6, drawn  # 0, 10, 20, 30, 40 steps and the closing line
        assert "loss=" in drawn[-1]  # the postfix still shows, at the bar's own redraws
