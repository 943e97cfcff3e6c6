"""A tiny training job run in a subprocess by the engine tests (resume after kill -9, NaN guard).

usage: python tests/engine_job.py CHECKPOINT_DIR RESULT_JSON [--sleep S] [--nan-at STEP] [--fail-publishing]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vitkit.engine.checkpoint import mark_finished
from vitkit.engine.distributed import DistInfo
from vitkit.engine.task import TrainingTask
from vitkit.engine.trainer import Trainer, TrainerConfig
from vitkit.errors import TrainingError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("result")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument(
        "--fail-publishing", action="store_true", help="die after training, before the output"
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs = torch.randn(256, 8)
    labels = (inputs[:, 0] + 0.5 * inputs[:, 1] > 0).long()
    dataset = TensorDataset(inputs, labels)
    calls = {"n": 0}

    class TinyTask(TrainingTask):
        def __init__(self) -> None:
            self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))

        def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            x, y = batch
            calls["n"] += 1
            time.sleep(args.sleep)
            loss = F.cross_entropy(
                model(x + 0.05 * torch.randn_like(x)), y
            )  # uses the RNG, as augmentation does
            return {"loss": loss * float("nan") if calls["n"] == args.nan_at else loss}

        def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
            model.eval()
            with torch.no_grad():
                return {"acc": (model(inputs).argmax(1) == labels).float().mean().item()}

    cfg = TrainerConfig(
        epochs=4,
        batch_size=16,
        lr=0.01,
        weight_decay=0.05,
        warmup_epochs=0.5,
        grad_clip=1.0,
        seed=0,
        amp="cuda",
        compile=False,
        tf32=True,
        channels_last=True,
        num_workers=0,
        checkpoint_every_steps=5,
        check_every_steps=4,
        max_steps_per_epoch=0,
        min_steps=0,
        desc="tiny",
        fingerprint="tiny-v1",
        progress=False,
    )
    trainer = Trainer(TinyTask(), dataset, cfg, torch.device("cpu"), DistInfo(), args.checkpoint_dir)
    try:
        history = trainer.fit()
    except TrainingError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if args.fail_publishing:
        raise SystemExit(3)  # as a kill while the outputs are written: the checkpoint stays unfinished
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    with open(args.result, "w") as fh:
        json.dump({"history": history, "weights": weights.tolist(), "steps_run": calls["n"]}, fh)
    mark_finished(args.checkpoint_dir)  # its outputs are written: never resumed again
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
