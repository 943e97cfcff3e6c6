"""report: this pipeline run beside earlier ones, and whether its method comparisons are real.

Reads each stage's metrics file, evaluate's per-image test predictions and the detectors' test
results, and the experiment's earlier report runs from MLflow (``vitkit.report``). Writes
``reports/report/`` (``report.md``, a self-contained ``report.html``, figures, tables) and
``metrics/report.json`` (each comparison's difference, interval and verdict). Logs the headline
metrics to its own MLflow run, which the next report reads as history, and the report folder to
the flow's parent run (under the Prefect flow), else to its own run.

Unlike the other outputs, the report also depends on what MLflow holds: run again later, it may
list more runs. DVC reruns it whenever a metric, a prediction or a ``report`` param changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stages import paths
from stages.common import StageContext, stage_main
from vitkit import tracking
from vitkit.io import write_json
from vitkit.losses.distillation import DISTILLATION_TYPES
from vitkit.report import (
    DETECTOR_PAIR,
    RunInfo,
    changed_params,
    comparison_metrics,
    find_baseline,
    headline_metrics,
    method_comparisons,
    search_history,
    write_report,
)

DETECTORS = (DETECTOR_PAIR.b, DETECTOR_PAIR.a)


def metric_files() -> dict[str, Path]:
    """{DVC stage name: its metrics file}, in DAG order."""
    files = {"pretrain_ssl": paths.SSL.metrics, "train_teacher": paths.TEACHER.metrics}
    files |= {f"distill_deit@{m}": paths.stage_paths("distill_deit", m).metrics for m in DISTILLATION_TYPES}
    files |= {f"train_detr@{a}": paths.stage_paths("train_detr", a).metrics for a in DETECTORS}
    return files | {"evaluate": paths.EVALUATE.metrics}


def run(ctx: StageContext) -> dict[str, float]:
    p, experiment = ctx.params.report, ctx.params.mlflow.experiment
    headlines = headline_metrics({stage: ctx.path(f) for stage, f in metric_files().items()})
    comparisons = method_comparisons(
        ctx.path(paths.TEST_PREDICTIONS),
        ctx.path(paths.DETECTION / "test" / "annotations.json"),
        {arch: ctx.path(paths.detector_results(arch)) for arch in DETECTORS},
        p.resamples,
        p.confidence_level,
        ctx.params.seed,
    )
    history = search_history(experiment, p.history)
    baseline = find_baseline(experiment, p.baseline)
    this_run = ctx.run.client.get_run(ctx.run.run_id)  # its params as MLflow keeps them, to compare
    params_changed = changed_params(this_run.data.params, history.iloc[0] if len(history) else None)
    parent = os.environ.get(tracking.PARENT_RUN_ENV) or None
    commit = this_run.data.tags.get("mlflow.source.git.commit", "unknown")
    folder = ctx.path(paths.REPORT_DIR)
    write_report(
        folder,
        RunInfo(ctx.run.run_id, parent, experiment, commit),
        headlines,
        params_changed,
        history,
        baseline,
        comparisons,
        p.resamples,
    )
    summary = comparison_metrics(comparisons)
    write_json(ctx.path(ctx.out.metrics), summary)
    numbers = {
        f"compare/{name}/{k}": v for name, row in summary.items() for k, v in row.items() if k != "verdict"
    }
    ctx.run.log_metrics(dict(zip(headlines["key"], headlines["value"], strict=True)) | numbers)
    ctx.run.publish(
        "the report", lambda: ctx.run.client.log_artifacts(parent or ctx.run.run_id, str(folder), "report")
    )
    return {f"{name} difference": row["difference"] for name, row in summary.items()}


if __name__ == "__main__":
    sys.exit(stage_main("report", __doc__, run))
