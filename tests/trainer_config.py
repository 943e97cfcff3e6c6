"""One TrainerConfig for CPU tests: every field spelled out once, a test overrides what it studies.

The library has no defaults (params.yaml is their one source), so tests share these instead of
each writing the dozen fields out.
"""

from __future__ import annotations

from vitkit.engine.trainer import TrainerConfig


def cpu_trainer_config(**fields) -> TrainerConfig:
    """A small CPU run: ``fields`` override these values."""
    defaults = dict(
        weight_decay=0.05,
        warmup_epochs=1.0,
        grad_clip=1.0,
        seed=0,
        amp="cuda",
        compile=False,
        tf32=True,
        channels_last=True,
        num_workers=0,
        checkpoint_every_steps=50,
        check_every_steps=10,
        max_steps_per_epoch=0,
        min_steps=0,
        desc="train",
        fingerprint="",
        progress=False,
    )
    return TrainerConfig(**{**defaults, **fields})
