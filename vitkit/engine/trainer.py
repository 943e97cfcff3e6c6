"""The training loop every method shares.

A method supplies a ``TrainingTask`` (the model and its recipe, see
``vitkit/engine/task.py``) and a dataset; the engine owns the rest: device
placement, bf16 autocast (on CUDA, or everywhere), torch.compile, TF32, channels_last, AdamW + linear warmup +
cosine decay per step, gradient clipping, a progress bar with loss and
images/s, every term the task's step returns averaged per epoch, the task's
validation after each epoch, checkpoints every N steps (atomic) with the
task's own state, resume after a kill, a guard against non-finite losses (the losses
stay on the device and are read back every few steps, not every step), and
DDP when launched by torchrun. Repeated augmentation (DeiT's sampler) is
``TrainerConfig.repeated_augmentations``.

Under DDP every rank draws its own augmentations (``DistInfo.augmentation_seed``)
from a model built identically on all of them; the first process of every node
keeps a checkpoint on that node's disk, and a resumed run starts every rank from
the most advanced checkpoint any node holds, sent over the process group, so
nodes need not share a disk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from vitkit.data.samplers import EpochSampler, RASampler
from vitkit.engine.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from vitkit.engine.device import autocast, set_tf32, warn
from vitkit.engine.distributed import DistInfo, all_gather_object, all_reduce_mean, broadcast_object
from vitkit.engine.task import TrainingTask
from vitkit.errors import TrainingError, VitkitError
from vitkit.io import check_writable
from vitkit.progress import progress_bar, progress_enabled

EpochHook = Callable[[dict[str, float]], None]


@dataclass
class TrainerConfig:
    """How to train; the values come from params.yaml (``vitkit.tasks.trainer_config``), so no defaults."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    grad_clip: float  # 0: no clipping
    seed: int
    amp: str  # bf16 autocast: "cuda" (there only), "always" or "off" (vitkit.engine.device.autocast)
    compile: bool  # torch.compile the training model
    tf32: bool  # TF32 float32 matmuls and convolutions on CUDA
    channels_last: bool  # on CUDA and CPU
    num_workers: int
    checkpoint_every_steps: int
    check_every_steps: int  # steps between host reads of the losses (NaN guard, progress bar)
    max_steps_per_epoch: int  # 0: whole epochs; otherwise each epoch stops after this many steps
    min_steps: int  # fewer steps in all than this: more epochs (0: the epochs as given)
    desc: str  # names the run in the progress bar and messages
    fingerprint: str  # a checkpoint resumes only a run with the same fingerprint
    repeated_augmentations: int = 1  # > 1: each image this many times per epoch (RASampler); 1 is off
    progress: bool = field(default_factory=progress_enabled)


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a (nested) batch to ``device``; 4-d float/uint8 image tensors optionally go channels_last."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | list[dict[str, Any]], cfg: TrainerConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; the fused kernel where torch has one (on CPU it makes the step ~4x cheaper)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def epochs_for(cfg: TrainerConfig, steps_per_epoch: int, report: bool) -> int:
    """The epochs to train: ``cfg.epochs``, raised until the run has ``cfg.min_steps`` optimiser steps.

    Schedules are written in epochs of the default data; a dataset a hundred times smaller would
    otherwise end after a few steps, still at chance, with nothing saying why. ``report``: print the
    warning (one process per run).
    """
    planned = steps_per_epoch * cfg.epochs
    if not cfg.min_steps or planned >= cfg.min_steps:
        return cfg.epochs
    epochs = math.ceil(cfg.min_steps / steps_per_epoch)
    if report:
        warn(
            f"[{cfg.desc}] {cfg.epochs} epochs of {steps_per_epoch} optimiser steps are {planned} steps, "
            f"fewer than engine.min_steps ({cfg.min_steps}): training {epochs} epochs "
            f"({epochs * steps_per_epoch} steps). Set the epochs yourself, or engine.min_steps: 0 to keep "
            "them."
        )
    return epochs


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from ~0 to the base lr, then cosine decay to 0, stepped per batch."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def _tensors(state: Any) -> list[torch.Tensor]:
    """The tensors in a nested dict/list state, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, list | tuple):
        return [t for item in state for t in _tensors(item)]
    return []


class Trainer:
    def __init__(
        self,
        task: TrainingTask,
        dataset: Dataset,
        cfg: TrainerConfig,
        device: torch.device,
        dist: DistInfo,
        checkpoint_dir: Path,
        collate_fn: Callable | None = None,
        on_epoch_end: EpochHook | None = None,
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.device = device
        self.dist = dist
        self.checkpoint_dir = Path(checkpoint_dir)
        self.on_epoch_end = on_epoch_end
        self.use_channels_last = cfg.channels_last and device.type in ("cuda", "cpu")

        if device.type == "cuda":
            set_tf32(cfg.tf32)
        self.model = task.model = task.model.to(device)
        if self.use_channels_last:
            self.model = task.model = self.model.to(memory_format=torch.channels_last)
        self.train_model: nn.Module = self.model
        if dist.enabled:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile:  # of the DDP wrapper, as torch recommends; checkpoints and validation use self.model
            self.train_model = torch.compile(self.train_model)
        if dist.enabled:
            # the model is built (identically on every rank); from here on each rank draws its own
            # augmentations. One process keeps its stream: single-process results stay as they were.
            seed_everything(dist.augmentation_seed(cfg.seed))

        if cfg.repeated_augmentations > 1:
            self.sampler: EpochSampler | RASampler = RASampler(
                dataset, dist.world_size, dist.rank, cfg.seed, num_repeats=cfg.repeated_augmentations
            )
        else:
            self.sampler = EpochSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, seed=cfg.seed)
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            collate_fn=collate_fn,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            # its own generator: drawing worker seeds must not advance the global RNG, whose state a
            # mid-epoch checkpoint restores (otherwise a resumed run's augmentations would drift)
            generator=torch.Generator().manual_seed(dist.augmentation_seed(cfg.seed)),
        )
        self.steps_per_epoch = self.sampler.num_samples // cfg.batch_size
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{cfg.desc}: batch_size {cfg.batch_size} is larger than the "
                f"{self.sampler.num_samples} training "
                "samples per process; lower the batch size"
            )
        self.epochs = epochs_for(cfg, self.steps_per_epoch, dist.is_main)
        task.epochs = self.epochs
        self.total_steps = self.steps_per_epoch * self.epochs
        self.optimizer = build_optimizer(task.param_groups() or self.model.parameters(), cfg, device)
        # the warmup keeps its share of the epochs when min_steps raised them
        warmup_epochs = cfg.warmup_epochs * self.epochs / cfg.epochs
        warmup_steps = min(self.total_steps // 2, round(warmup_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, warmup_steps, self.total_steps)
        self.state = TrainState()
        self._pending_losses: list[torch.Tensor] = []  # losses of the steps not yet read back (on the device)
        self._pending_from = 0  # step_in_epoch of the first of them

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        ckpt = {
            "fingerprint": self.cfg.fingerprint,
            "finished": False,  # only the caller knows when its outputs are all written: mark_finished
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch,
            "step_in_epoch": self.state.step_in_epoch,
            "global_step": self.state.global_step,
            "steps_per_epoch": self.steps_per_epoch,  # engine.max_steps_per_epoch may have shortened it
            "history": self.state.history,
            "world_size": self.dist.world_size,
            "rng": all_gather_object(rng_state()),  # one per rank, indexed by rank
        }
        extra = self.task.state_dict()
        if extra:
            ckpt["extra"] = extra
        return ckpt

    def _adopt_rank0_buffers(self) -> None:
        """Give every rank rank 0's buffers and task state (collective; nothing to do alone).

        DDP keeps the parameters equal, but each rank's forward updates its batch-norm running
        statistics with its own batch (DDP copies rank 0's back only at the next forward), and an
        EMA of buffers inherits the difference. Taken before every checkpoint, so each node
        writes rank 0's state, and a run resumed from any node's checkpoint continues rank 0's.
        """
        if not self.dist.enabled:
            return
        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
        extra = self.task.state_dict()
        if extra:
            for tensor in _tensors(extra):
                torch.distributed.broadcast(tensor, src=0)
            self.task.load_state_dict(extra)

    def save(self) -> None:
        """Every rank takes part (rank 0's state, every rank's RNG); each node's first process writes."""
        self._adopt_rank0_buffers()
        ckpt = self._checkpoint()
        if self.dist.writes_files:
            save_checkpoint(self.checkpoint_dir, ckpt)

    def _resumable(self, ckpt: dict[str, Any] | None) -> bool:
        """Whether this node's checkpoint continues this very run (same params, same world size).

        A checkpoint is ``finished`` once its stage's outputs were all written (the caller says so
        with ``vitkit.engine.checkpoint.mark_finished``), and is then kept only for inspection: a
        run after a code change starts fresh. One at the end of the last epoch but not finished
        resumes with no epoch left, so the caller only writes its outputs again.
        """
        if ckpt is None or ckpt.get("finished"):
            return False
        if (
            ckpt.get("fingerprint") != self.cfg.fingerprint
            or ckpt.get("world_size") != self.dist.world_size
            or ckpt.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch
        ):
            if self.dist.writes_files:
                print(
                    f"[{self.cfg.desc}] checkpoint in {self.checkpoint_dir} is from other params, another "
                    f"number of processes (this run has {self.dist.world_size}) or other epochs (this "
                    f"run has {self.steps_per_epoch} steps each); starting fresh"
                )
            return False
        return True

    def _load_local_checkpoint(self) -> dict[str, Any] | None:
        """This node's checkpoint (None if there is none), once its folder is known to be writable.

        A read-only checkpoint folder is reported now, not at the first checkpoint after minutes of
        training; an unreadable checkpoint names the file to delete. Every rank takes part: if any
        cannot go on, all raise its error, as the others would otherwise wait for it forever.
        """
        problem: VitkitError | None = None
        local = None
        try:
            if self.dist.writes_files:
                check_writable(self.checkpoint_dir)
            local = load_checkpoint(self.checkpoint_dir)
        except VitkitError as exc:
            problem = exc
        problems = all_gather_object(None if problem is None else (type(problem), str(problem)))
        first = next((p for p in problems if p is not None), None)
        if problem is not None:
            raise problem
        if first is not None:
            raise first[0](first[1])
        return local

    def try_resume(self) -> bool:
        """Continue from the most advanced checkpoint of this run that any node holds.

        Each node looks at its own disk; the rank holding the furthest checkpoint sends it to all
        the others, so a node that lost its disk (or never had one in common with the others)
        starts from the same state. Every rank takes part.
        """
        local = self._load_local_checkpoint()
        local = local if self._resumable(local) else None
        steps = all_gather_object(local["global_step"] if local is not None else -1)
        source = max(range(len(steps)), key=lambda rank: (steps[rank], -rank))
        if steps[source] < 0:
            return False
        holds_it = local is not None and local["global_step"] == steps[source]
        ckpt = broadcast_object(local if self.dist.rank == source else None, source)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(
            ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], list(ckpt["history"])
        )
        set_rng_state(ckpt["rng"][self.dist.rank])
        if "extra" in ckpt:
            self.task.load_state_dict(ckpt["extra"])
        if self.dist.writes_files:
            origin = self.checkpoint_dir if holds_it else f"rank {source}'s checkpoint (none here that far)"
            if self.state.epoch >= self.epochs:
                where = f"training already ended in {origin} ({self.state.epoch} epochs); no epoch to train"
            else:
                where = (
                    f"resuming from {origin} at epoch {self.state.epoch + 1}, "
                    f"step {self.state.step_in_epoch}/{self.steps_per_epoch}"
                )
            print(f"[{self.cfg.desc}] {where}", flush=True)
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def _read_losses(self, across_processes: bool = True) -> float:
        """Read the losses of the steps since the last read back in one transfer; stop on a non-finite one.

        Losses stay on the device step by step (a read per step would stall a GPU's queue of
        kernels every step, plus an all-reduce under DDP): the loop calls this every
        ``check_every_steps`` steps, before every checkpoint and at the end of every epoch, so
        the message still names the first bad step and no checkpoint is ever written from a
        diverged state: the last one on disk is from before it. Returns the window's last loss
        (for the progress bar), NaN when there was nothing to read. ``across_processes=False``
        reads this process's alone (when it failed by itself, the others would not join a collective).
        """
        if not self._pending_losses:
            return math.nan
        losses = torch.stack(self._pending_losses).float()
        self._pending_losses = []
        count = len(losses)
        positions = torch.arange(count, device=losses.device)
        first_bad = torch.where(torch.isfinite(losses), count, positions).min()
        if self.dist.enabled and across_processes:  # the earliest bad step of any process: all stop there
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        index, *values = torch.cat([first_bad[None].to(losses.dtype), losses]).tolist()
        index = int(index)
        if index < count:
            kept = self.checkpoint_dir / "last.pt"
            where = (
                f"the last good checkpoint {kept} is kept"
                if kept.exists()
                else "no checkpoint was written yet"
            )
            value = values[index] if not math.isfinite(values[index]) else "non-finite on another process"
            step = self._pending_from + index  # 0-based within the epoch: a read never spans two epochs
            global_step = self.state.global_step - count + index
            raise TrainingError(
                f"{self.cfg.desc}: loss became {value} at epoch {self.state.epoch + 1}, step "
                f"{step + 1} (global step {global_step + 1}); {where}. "
                "Lower the learning rate or enable grad_clip in params.yaml, then run the stage again."
            )
        return values[-1]

    def _train_epoch(self) -> dict[str, float]:
        cfg, state = self.cfg, self.state
        self.train_model.train()
        self.sampler.set_epoch(state.epoch, start_index=state.step_in_epoch * cfg.batch_size)
        bar = progress_bar(
            self.steps_per_epoch,
            f"{cfg.desc} {state.epoch + 1}/{self.epochs}",
            cfg.progress and self.dist.is_main,
            initial=state.step_in_epoch,
        )
        # every term the task returns, summed on the device: read back once, at the end of the epoch
        term_sums: dict[str, torch.Tensor] = {}
        self._pending_losses, self._pending_from = [], state.step_in_epoch
        steps, images, start = 0, 0, time.perf_counter()
        for batch in self.loader:
            batch = to_device(batch, self.device, self.use_channels_last)
            try:
                with autocast(self.device, cfg.amp):
                    terms = self.task.step(self.train_model, batch)
            except TrainingError:
                # a diverged model can fail inside the task (DETR's matcher): name the step it began at
                self._read_losses(across_processes=False)
                raise
            loss = terms["loss"]
            self._pending_losses.append(loss.detach())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.task.after_step()

            for name, value in terms.items():
                value = torch.as_tensor(value).detach().to(self.device, torch.float32)
                term_sums[name] = term_sums[name] + value if name in term_sums else value
            steps += 1
            images += cfg.batch_size * self.dist.world_size
            state.step_in_epoch += 1
            state.global_step += 1
            bar.update(1)
            checkpoint_due = (
                state.step_in_epoch % cfg.checkpoint_every_steps == 0
                and state.step_in_epoch < self.steps_per_epoch
            )
            if (
                checkpoint_due
                or len(self._pending_losses) >= cfg.check_every_steps
                or state.step_in_epoch == self.steps_per_epoch
            ):
                last_loss = self._read_losses()
                self._pending_from = state.step_in_epoch
                speed = f"{images / (time.perf_counter() - start):.0f}"
                # shown at the bar's next redraw: a redraw of its own would be a log line in a pipe
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=speed, refresh=False)
            if checkpoint_due:
                self.save()
            if state.step_in_epoch == self.steps_per_epoch:  # the loader may hold more (max_steps_per_epoch)
                break
        bar.close()
        elapsed = time.perf_counter() - start
        means = {f"train_{name}": total / max(steps, 1) for name, total in term_sums.items()}
        if means:  # averaged over the processes too, not rank 0's alone
            averaged = all_reduce_mean(torch.stack(list(means.values()))).tolist()
            means = dict(zip(means, averaged, strict=True))
        return {
            **means,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": images / elapsed if elapsed > 0 else math.nan,
            "epoch_time_s": elapsed,
        }

    def fit(self) -> list[dict[str, float]]:
        """Train to the end (resuming if a checkpoint exists); returns the per-epoch history.

        The last checkpoint is left unfinished: the caller marks it finished (``mark_finished``)
        once it has written everything it trained for.
        """
        if self.try_resume() and self.on_epoch_end is not None and self.dist.is_main:
            for row in self.state.history:  # a resumed run reports the epochs it inherited
                self.on_epoch_end(row)
        while self.state.epoch < self.epochs:
            row: dict[str, float] = {"epoch": self.state.epoch + 1, **self._train_epoch()}
            if self.dist.is_main:
                row.update(self.task.validate(self.model, self.state.epoch + 1))
            # rank 0's row (its timings, its validation) on every rank: one history in every node's files
            row = broadcast_object(row, src=0)
            self.state.history.append(row)
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self.save()
            if self.on_epoch_end is not None and self.dist.is_main:
                self.on_epoch_end(row)
        return self.state.history
