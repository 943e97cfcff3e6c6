"""The one publish step of a training stage: its outputs written where stages/paths.py says, and logged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import nn

from stages.common import StageContext
from vitkit.engine.checkpoint import save_weights
from vitkit.evaluation.classification import plot_history
from vitkit.io import write_csv, write_json

# what the trainer measures in wall-clock time: it differs on every run, so it is kept out of the
# files DVC hashes for later stages (history, metrics, curves) and written to the timing file
TIMING_COLUMNS = ("epoch_time_s", "images_per_s")


def publish(
    ctx: StageContext,
    history: pd.DataFrame,
    metrics: dict[str, float],
    model: nn.Module,
    meta: dict[str, Any],
    curves: Sequence[str],
    title: str,
    train_images: int,
) -> dict[str, float]:
    """Write a training stage's outputs and log them: weights, history CSV, curves, metrics, timing.

    The paths are the stage's own (``stages/paths.py``); the figure shows ``curves``
    (history columns, those absent skipped) against the epoch. ``metrics`` gain the
    training summary every stage reports; returned as written. Every file but the timing
    file holds the same bytes for the same code, params and data, so a rerun changes no
    hash DVC compares; the timings go to ``metrics/<key>_timing.json``, which no stage reads.
    """
    out = ctx.out
    metrics = {**metrics, "train_images": train_images}
    timing = {
        "train_time_s": history["epoch_time_s"].sum(),
        "images_per_s": history["images_per_s"].median(),
    }
    history = history.drop(columns=list(TIMING_COLUMNS))
    save_weights(ctx.path(out.model), model.state_dict(), meta)
    write_csv(ctx.path(out.history), history)
    plot_history(history, [c for c in curves if c in history], title, ctx.path(out.curves))
    write_json(ctx.path(out.metrics), metrics)
    write_json(ctx.path(out.timing), timing)
    ctx.run.log_artifact(ctx.path(out.model), "weights")
    ctx.run.log_artifact(ctx.path(out.history))
    ctx.run.log_artifact(ctx.path(out.curves), "figures")
    ctx.run.log_metrics({k: v for k, v in (metrics | timing).items() if k not in history})  # not per epoch
    return metrics | timing
