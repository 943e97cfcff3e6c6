"""What every task module shares: the engine's config from params, and run fingerprints."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vitkit.config import EngineParams, OptimParams
from vitkit.engine.trainer import TrainerConfig


def fingerprint(*parts: Any) -> str:
    """A short hash of params sections and values: a checkpoint resumes only the run it belongs to."""
    blob = json.dumps([p.model_dump() if hasattr(p, "model_dump") else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trainer_config(
    optim: OptimParams, engine: EngineParams, seed: int, desc: str, fingerprint: str, **overrides: Any
) -> TrainerConfig:
    """The engine's config: a method's optimiser section, the shared ``engine`` section and the seed.

    ``overrides`` replace derived fields (e.g. DeiT's batch-scaled ``lr``).
    """
    fields: dict[str, Any] = {
        "epochs": optim.epochs,
        "batch_size": optim.batch_size,
        "lr": optim.lr,
        "weight_decay": optim.weight_decay,
        "warmup_epochs": optim.warmup_epochs,
        "grad_clip": optim.grad_clip,
        "seed": seed,
        "amp": engine.amp,
        "compile": engine.compile,
        "tf32": engine.tf32,
        "channels_last": engine.channels_last,
        "num_workers": engine.num_workers,
        "checkpoint_every_steps": engine.checkpoint_every_steps,
        "check_every_steps": engine.check_every_steps,
        "max_steps_per_epoch": engine.max_steps_per_epoch,
        "min_steps": engine.min_steps,
        "desc": desc,
        "fingerprint": fingerprint,
    }
    return TrainerConfig(**{**fields, **overrides})
