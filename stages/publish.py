"""The one publish step of a training stage: its outputs written where stages/paths.py says, and logged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import Tensor, nn

from stages.common import StageContext
from vitkit.engine.checkpoint import save_weights
from vitkit.evaluation.classification import plot_history
from vitkit.io import write_csv, write_json
from vitkit.serving import ImageModel, display_order, log_model

# what the trainer measures in wall-clock time: it differs on every run, so it is kept out of the
# files DVC hashes for later stages (history, metrics, curves) and written to the timing file
TIMING_COLUMNS = ("epoch_time_s", "images_per_s")
# registry names, after the experiment's: ``vitkit-teacher``, ``vitkit-deit-hard``, ``vitkit-detr``...
REGISTERED_NAMES = {"detr/detr": "detr", "detr/deformable": "deformable-detr"}


def publish(
    ctx: StageContext,
    history: pd.DataFrame,
    metrics: dict[str, float],
    model: nn.Module,
    meta: dict[str, Any],
    curves: Sequence[str],
    title: str,
    train_images: int,
    served: ImageModel,
    examples: Sequence[Tensor],
) -> dict[str, float]:
    """Write a training stage's outputs and log them: weights, history CSV, curves, metrics, timing.

    The paths are the stage's own (``stages/paths.py``); the figure shows ``curves``
    (history columns, those absent skipped) against the epoch. ``metrics`` gain the
    training summary every stage reports; returned as written. The model is also logged as an MLflow
    pyfunc model, ``served`` around the model file, with ``examples`` (uint8 images) for input
    example, and registered (``log_served_model``). Every file but the timing
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
    if ctx.dist.is_main:  # the process that holds the stage's MLflow run
        log_served_model(ctx, served, meta, examples)
    return metrics | timing


def log_served_model(
    ctx: StageContext, served: ImageModel, meta: dict[str, Any], examples: Sequence[Tensor]
) -> None:
    """Log the stage's model file as ``runs:/<run id>/model``, registered as ``<experiment>-<model>``
    with the alias ``current`` on the new version; classes are reported in ``data.classes`` order."""
    config = {"classes": display_order(meta["classes"], ctx.params.data.classes)} if "classes" in meta else {}
    key = ctx.out.key
    name = f"{ctx.params.mlflow.experiment}-{REGISTERED_NAMES.get(key, key.replace('/', '-'))}"
    ctx.run.publish(
        f"the model {name}", lambda: log_model(served, ctx.path(ctx.out.model), examples, config, name)
    )
