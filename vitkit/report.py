"""The run report: this pipeline run beside earlier ones, and whether its comparisons are real.

A reader of a run wants three answers: what changed since the last run (params) and what it did
to each stage's headline metrics (against the previous run and a baseline run); whether the
method comparisons of this run (SSL vs random init, DeiT distillation vs none, Deformable DETR
vs DETR) are real or within the noise of the test split (``vitkit.evaluation.bootstrap``); and
how the metrics moved over the runs. The report answers them in Markdown (and a self-contained
HTML copy) with figures.

The history is MLflow's: every report run logs the headline metrics of its pipeline state, with
the whole params file as params (as every stage run does), so the earlier report runs of the
experiment *are* the earlier pipeline runs, found with ``mlflow.search_runs`` (one query, at
most ``report.history`` runs, newest first) into a pandas frame. Runs from before the report
existed are not in it; a first run compares with nothing and says so.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import markdown
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pycocotools.coco import COCO

from vitkit.config import flatten
from vitkit.errors import ConfigError, DataError
from vitkit.evaluation.bootstrap import REAL, PairedDifference, accuracy_difference, ap_difference
from vitkit.io import atomic_dir, atomic_path, non_regular_kind, write_csv
from vitkit.tracking import STAGE_TAG

REPORT_STAGE = "report"
MARKDOWN_NAME = "report.md"
FIGURES = {"comparisons": "comparisons.png", "over_runs": "over_runs.png"}
HISTORY_FILTER = f"tags.`{STAGE_TAG}` = '{REPORT_STAGE}' and attributes.status = 'FINISHED'"

# The numbers a reader looks at first in each stage's metrics file (flattened keys, * a variant).
HEADLINE_KEYS = {
    "pretrain_ssl": ("knn_top1",),
    "train_teacher": ("val_top1",),
    "distill_deit": ("val_avg_top1",),
    "train_detr": ("val_AP",),
    "evaluate": (
        "ssl.ssl.knn_top1",
        "ssl.random_init.knn_top1",
        "ssl.ssl.linear_probe_top1",
        "teacher.top1",
        "deit.*.avg_top1",
        "detection.*.AP",
    ),
}
REPEATED_KEYS = ("deit.teacher.*",)  # the teacher's row of evaluate's DeiT table repeats teacher.top1


@dataclass(frozen=True)
class PairSpec:
    """A comparison of two models of one run: ``a`` against ``b`` (a - b is reported)."""

    title: str
    metric: str
    a: str  # a column of evaluate's test predictions, or a detector
    b: str


# the seed's three comparisons; the classifier columns are those evaluate writes per test image
CLASSIFIER_PAIRS = (
    PairSpec("SSL vs random init (kNN)", "test top-1", "ssl_knn", "random_init_knn"),
    PairSpec(
        "SSL vs random init (linear probe)", "test top-1", "ssl_linear_probe", "random_init_linear_probe"
    ),
    PairSpec("DeiT soft vs none", "test top-1", "deit_soft", "deit_none"),
    PairSpec("DeiT hard vs none", "test top-1", "deit_hard", "deit_none"),
)
DETECTOR_PAIR = PairSpec("Deformable DETR vs DETR", "test AP", "deformable", "detr")


@dataclass(frozen=True)
class Comparison:
    spec: PairSpec
    result: PairedDifference
    only_a: int | None = None  # images only A gets right (classifiers): what the difference is made of
    only_b: int | None = None


def metric_key(stage: str, key: str) -> str:
    """The MLflow metric name of a stage's headline metric (MLflow names take no ``@``)."""
    return f"{stage.replace('@', '/')}/{key}"


def read_json(path: Path, what: str) -> dict:
    kind = non_regular_kind(path)
    if kind is not None:
        raise DataError(f"{path} ({what}) is {kind}: run the stage that writes it (dvc repro)")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path} ({what}) is not valid JSON ({exc}): run the stage that writes it again"
        ) from None


def headline_metrics(metric_files: Mapping[str, Path]) -> pd.DataFrame:
    """One row per headline metric (``stage``, ``metric``, ``key`` for MLflow, ``value``) of the
    stages' metrics files (``{DVC stage name: path}``), in the order given."""
    rows = []
    for stage, path in metric_files.items():
        flat = flatten(read_json(path, f"the metrics of {stage}"))
        for pattern in HEADLINE_KEYS[stage.split("@")[0]]:
            matching = (k for k in flat if fnmatch.fnmatchcase(k, pattern))
            for key in (k for k in matching if not any(fnmatch.fnmatchcase(k, r) for r in REPEATED_KEYS)):
                if isinstance(flat[key], int | float):
                    rows.append(
                        {"stage": stage, "metric": key, "key": metric_key(stage, key), "value": flat[key]}
                    )
    return pd.DataFrame(rows, columns=["stage", "metric", "key", "value"])


def search_history(experiment: str, limit: int) -> pd.DataFrame:
    """The newest ``limit`` finished report runs of ``experiment``, newest first, as
    ``mlflow.search_runs`` gives them (``run_id``, ``start_time``, ``metrics.*``, ``params.*``...).
    The report run asking is still running: it is not among them."""
    return mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=HISTORY_FILTER,
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )


def find_baseline(experiment: str, baseline: str) -> pd.Series | None:
    """The baseline report run: ``first`` of the experiment, ``none``, or the run with that id (a
    report run, or the pipeline run whose child it is). An id matching neither is a ``ConfigError``."""
    if baseline == "none":
        return None
    if baseline == "first":
        first = mlflow.search_runs(
            experiment_names=[experiment],
            filter_string=HISTORY_FILTER,
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return None if first.empty else first.iloc[0]
    for condition in (f"attributes.run_id = '{baseline}'", f"tags.`mlflow.parentRunId` = '{baseline}'"):
        found = mlflow.search_runs(
            experiment_names=[experiment], filter_string=f"{HISTORY_FILTER} and {condition}", max_results=1
        )
        if not found.empty:
            return found.iloc[0]
    raise ConfigError(
        f"report.baseline: no finished report run of experiment '{experiment}' is, or belongs to, run "
        f"{baseline}; set it to first, none or a run id from the report's list of runs"
    )


def compare_with(
    current: pd.DataFrame, previous: pd.Series | None, baseline: pd.Series | None
) -> pd.DataFrame:
    """The headline table: this run's value, the previous and the baseline run's, and the changes."""
    table = current[["stage", "metric", "value"]].rename(columns={"value": "this run"})
    for name, run in (("previous", previous), ("baseline", baseline)):
        if run is None:
            continue
        table[name] = [run.get(f"metrics.{key}", np.nan) for key in current["key"]]
        table[f"Δ {name}"] = table["this run"] - table[name]
    return table


def changed_params(current: Mapping[str, str], run: pd.Series | None) -> pd.DataFrame:
    """Params whose value differs between this run and ``run`` (all params as MLflow keeps them: strings)."""
    columns = ["param", "this run", "then"]
    if run is None:
        return pd.DataFrame(columns=columns)
    # search_runs has a column for every param of any run it found: a run without that param has None
    then = {
        k.removeprefix("params."): v for k, v in run.items() if k.startswith("params.") and isinstance(v, str)
    }
    rows = [
        {"param": key, "this run": current.get(key, "(absent)"), "then": then.get(key, "(absent)")}
        for key in sorted(set(current) | set(then))
        if current.get(key) != then.get(key)
    ]
    return pd.DataFrame(rows, columns=columns)


def _read_predictions(path: Path) -> pd.DataFrame:
    kind = non_regular_kind(path)
    if kind is not None:
        raise DataError(f"{path} (evaluate's test predictions) is {kind}: run the evaluate stage (dvc repro)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path} (evaluate's test predictions) is no CSV table ({exc}): run evaluate again"
        ) from None
    needed = {"image", "label"} | {c for p in CLASSIFIER_PAIRS for c in (p.a, p.b)}
    missing = sorted(needed - set(table.columns))
    if missing or table.empty:
        raise DataError(
            f"{path} misses the column(s) {missing or 'and rows'} the report compares: run the evaluate "
            "stage of this version again (dvc repro evaluate)"
        )
    return table


def method_comparisons(
    predictions_csv: Path,
    detection_annotations: Path,
    detector_results: Mapping[str, Path],
    resamples: int,
    confidence_level: float,
    seed: int,
) -> list[Comparison]:
    """The seed's comparisons on this run's test images, each with its paired-bootstrap interval."""
    table = _read_predictions(predictions_csv)
    comparisons = []
    for spec in CLASSIFIER_PAIRS:
        right_a, right_b = (
            (table[spec.a] == table["label"]).to_numpy(),
            (table[spec.b] == table["label"]).to_numpy(),
        )
        result = accuracy_difference(right_a, right_b, resamples, confidence_level, seed)
        only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
        comparisons.append(Comparison(spec, result, only_a, only_b))
    coco_gt = _read_coco(detection_annotations)
    results = {arch: read_json(path, f"{arch}'s test detections") for arch, path in detector_results.items()}
    spec = DETECTOR_PAIR
    result = ap_difference(coco_gt, results[spec.a], results[spec.b], resamples, confidence_level, seed)
    comparisons.append(Comparison(spec, result))
    return comparisons


def _read_coco(path: Path) -> COCO:
    coco = COCO()
    coco.dataset = read_json(path, "the detection test annotations")
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def comparison_table(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    rows = []
    for c in comparisons:
        r = c.result
        rows.append(
            {
                "comparison": c.spec.title,
                "metric": c.spec.metric,
                "A": r.score_a,
                "B": r.score_b,
                "A − B": r.difference,
                f"{r.confidence_level:.0%} interval": f"[{r.low:+.4f}, {r.high:+.4f}]",
                "verdict": r.verdict,
                "images (only A right / only B right)": f"{r.images}"
                + (f" ({c.only_a} / {c.only_b})" if c.only_a is not None else ""),
            }
        )
    return pd.DataFrame(rows)


def comparison_metrics(comparisons: Sequence[Comparison]) -> dict[str, dict[str, float | str]]:
    """The comparisons as plain values (metrics/report.json, MLflow), keyed by a slug of the title."""
    return {
        re.sub(r"[^a-z0-9]+", "_", c.spec.title.lower()).strip("_"): {
            "difference": c.result.difference,
            "low": c.result.low,
            "high": c.result.high,
            "verdict": c.result.verdict,
        }
        for c in comparisons
    }


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_over_runs(
    current: pd.DataFrame, history: pd.DataFrame, baseline_run: str | None, path: Path
) -> None:
    """The headline metrics over the runs, oldest to this one, the baseline run marked: evaluate's
    test top-1 and AP, and the training stages' validation metrics."""
    now = current.set_index("key")["value"]
    runs = history.iloc[::-1]  # oldest first
    order = [*runs["run_id"], "this run"]
    fig = Figure(figsize=(15, 4))
    top1, ap, val = fig.subplots(1, 3)
    for key in now.index:
        earlier = runs[f"metrics.{key}"].tolist() if f"metrics.{key}" in runs else [np.nan] * len(runs)
        ax = val if not key.startswith("evaluate/") else ap if key.endswith(".AP") else top1
        label = key.removeprefix("evaluate/")
        ax.plot(range(len(order)), [*earlier, now[key]], marker="o", markersize=3, label=label)
    for ax, title in ((top1, "test top-1"), (ap, "test COCO AP"), (val, "validation, per training stage")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if baseline_run in order:
            ax.axvline(order.index(baseline_run), color="grey", linestyle=":", label="baseline")
        ax.set(xlabel="run (oldest → this run)", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_comparisons(comparisons: Sequence[Comparison], path: Path) -> None:
    """Left: each difference with its interval against 0. Right: the classifier comparisons image by
    image, how many test images only A or only B gets right (what the difference is made of)."""
    fig = Figure(figsize=(11, 0.6 * len(comparisons) + 1.8))
    forest, pairs = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(comparisons))[::-1]
    for row, c in zip(y, comparisons, strict=True):
        r = c.result
        color = "tab:green" if r.verdict == REAL else "tab:grey"
        forest.errorbar(
            r.difference,
            row,
            xerr=[[r.difference - r.low], [r.high - r.difference]],
            fmt="o",
            color=color,
            capsize=4,
        )
    forest.axvline(0, color="black", linewidth=0.8)
    forest.set_yticks(y, [f"{c.spec.title}\n({c.spec.metric}, A − B)" for c in comparisons], fontsize=8)
    level = comparisons[0].result.confidence_level
    forest.set(title=f"difference with its {level:.0%} bootstrap interval (green: real)")
    forest.grid(alpha=0.3, axis="x")
    counted = [c for c in comparisons if c.only_a is not None]
    rows = np.arange(len(counted))[::-1]
    pairs.barh(rows + 0.2, [c.only_a for c in counted], 0.4, label="only A right")
    pairs.barh(rows - 0.2, [c.only_b for c in counted], 0.4, label="only B right")
    pairs.set_yticks(rows, [c.spec.title for c in counted], fontsize=8)
    pairs.set(xlabel="test images", title="per-image paired outcomes")
    pairs.legend(fontsize=8)
    pairs.grid(alpha=0.3, axis="x")
    _save(fig, path)


def write_report(
    folder: Path,
    run: RunInfo,
    headlines: pd.DataFrame,
    params_changed: pd.DataFrame,
    history: pd.DataFrame,
    baseline: pd.Series | None,
    comparisons: Sequence[Comparison],
    resamples: int,
) -> None:
    """The report folder, replaced whole or not at all: ``report.md``, ``report.html`` (figures
    inlined), the figures, and the tables as CSV (``headlines.csv``, ``comparisons.csv``)."""
    previous = history.iloc[0] if not history.empty else None
    table = compare_with(headlines, previous, baseline)
    with atomic_dir(folder) as tmp:
        plot_comparisons(comparisons, tmp / FIGURES["comparisons"])
        if previous is not None:
            plot_over_runs(
                headlines,
                history,
                None if baseline is None else baseline["run_id"],
                tmp / FIGURES["over_runs"],
            )
        text = render_markdown(run, table, params_changed, baseline, comparisons, history, resamples)
        (tmp / MARKDOWN_NAME).write_text(text)
        (tmp / "report.html").write_text(to_html(text, tmp))
        write_csv(tmp / "headlines.csv", table)
        write_csv(tmp / "comparisons.csv", comparison_table(comparisons))


def _markdown_table(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".4f", missingval="–")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    parent_run_id: str | None
    experiment: str
    commit: str


def render_markdown(
    run: RunInfo,
    headlines: pd.DataFrame,
    params_changed: pd.DataFrame,
    baseline: pd.Series | None,
    comparisons: Sequence[Comparison],
    history: pd.DataFrame,
    resamples: int,
) -> str:
    """The report as Markdown, its figures (``FIGURES``) beside it; ``headlines`` from ``compare_with``
    (the previous run is the first of ``history``)."""
    previous = history.iloc[0] if not history.empty else None
    where = f"pipeline run `{run.parent_run_id}`, " if run.parent_run_id else ""
    lines = [
        "# vitkit run report",
        "",
        f"Report run `{run.run_id}` ({where}experiment `{run.experiment}`, commit `{run.commit[:12]}`).",
        "",
        "## What changed",
        "",
    ]
    if previous is None:
        lines.append("The first run of this experiment with a report: nothing to compare with yet.")
    else:
        lines.append(f"Against the previous run, `{previous['run_id']}` ({_when(previous)}):")
        lines.append("")
        if params_changed.empty:
            lines.append("no param changed (the code or the data did, or only the report ran again).")
        else:
            lines.append(params_changed.to_markdown(index=False, disable_numparse=True))
    if baseline is not None:
        lines += ["", f"Baseline: `{baseline['run_id']}` ({_when(baseline)})."]
    lines += ["", "## Headline metrics", "", _markdown_table(headlines), ""]
    images = {c.result.images for c in comparisons}
    lines += [
        "## Are the differences real?",
        "",
        f"Each model pair on the same test images ({', '.join(map(str, sorted(images)))} images); "
        "the interval is a "
        f"paired bootstrap over those images ({resamples} resamples, BCa): A − B is *real* when the "
        "interval excludes 0, *within noise* when it contains it.",
        "",
        _markdown_table(comparison_table(comparisons)),
        "",
        f"![the comparisons]({FIGURES['comparisons']})",
        "",
        "## Over runs",
        "",
    ]
    if history.empty:
        lines.append("One run so far: the figure over runs comes with the next one.")
    else:
        lines += [
            f"This run and the {len(history)} before it (newest first, at most `report.history`):",
            "",
            f"![the test metrics over runs]({FIGURES['over_runs']})",
            "",
            _markdown_table(_recent_runs(history, headlines)),
        ]
    return "\n".join(lines) + "\n"


def _when(run: pd.Series) -> str:
    return pd.Timestamp(run["start_time"]).strftime("%Y-%m-%d %H:%M UTC")


def _recent_runs(history: pd.DataFrame, headlines: pd.DataFrame, shown: int = 10) -> pd.DataFrame:
    """The newest ``shown`` earlier runs, one row each, with this run's headline metrics of evaluate."""
    recent = history.head(shown)
    table = pd.DataFrame({"run": recent["run_id"], "started": [_when(r) for _, r in recent.iterrows()]})
    for metric in headlines.loc[headlines["stage"] == "evaluate", "metric"]:
        column = f"metrics.{metric_key('evaluate', metric)}"
        table[metric] = recent[column].to_numpy() if column in recent else np.nan
    return table


def to_html(markdown_text: str, folder: Path) -> str:
    """A self-contained HTML page of the report (figures inlined), for MLflow's artifact viewer."""
    body = markdown.markdown(markdown_text, extensions=["tables"])

    def inline(match: re.Match) -> str:
        data = base64.b64encode((folder / match.group(1)).read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"/]+\.png)"', inline, body)
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>vitkit run report</title>"
        f"<style>{style}</style></head><body>{body}</body></html>\n"
    )
