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
    """Write a training stage's outputs and log them: weights, history CSV, curves, metrics.

    The paths are the stage's own (``stages/paths.py``); the figure shows ``curves``
    (history columns, those absent skipped) against the epoch. ``metrics`` gain the
    training summary every stage reports; returned as written.
    """
    out = ctx.out
    metrics = {
        **metrics,
        "train_images": train_images,
        "train_time_s": history["epoch_time_s"].sum(),
        "images_per_s": history["images_per_s"].median(),
    }
    save_weights(ctx.path(out.model), model.state_dict(), meta)
    write_csv(ctx.path(out.history), history)
    plot_history(history, [c for c in curves if c in history], title, ctx.path(out.curves))
    write_json(ctx.path(out.metrics), metrics)
    ctx.run.log_artifact(ctx.path(out.model), "weights")
    ctx.run.log_artifact(ctx.path(out.history))
    ctx.run.log_artifact(ctx.path(out.curves), "figures")
    ctx.run.log_metrics({k: v for k, v in metrics.items() if k not in history})  # not logged per epoch
    return metrics
