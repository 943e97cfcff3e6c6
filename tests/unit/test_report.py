"""The run report against synthetic MLflow histories (a temporary sqlite store): none, one, a hundred."""

from __future__ import annotations

import json
import re
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from vitkit.errors import ConfigError, DataError
from vitkit.evaluation.bootstrap import accuracy_difference
from vitkit.report import (
    CLASSIFIER_PAIRS,
    FIGURES,
    Comparison,
    RunInfo,
    changed_params,
    compare_with,
    find_baseline,
    headline_metrics,
    method_comparisons,
    metric_key,
    search_history,
    write_report,
)
from vitkit.tracking import STAGE_TAG

TEACHER_KEY = metric_key("evaluate", "teacher.top1")


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test has its own experiment.

    Without an fsync per commit (six per synthetic run), a hundred runs take seconds, not half a minute.
    """

    def unsynchronised(connection, _record) -> None:
        connection.execute("PRAGMA synchronous = OFF")

    event.listen(Engine, "connect", unsynchronised)
    folder = tmp_path_factory.mktemp("mlflow")
    try:
        yield f"sqlite:///{folder / 'mlflow.db'}", folder
    finally:
        event.remove(Engine, "connect", unsynchronised)


@pytest.fixture
def store(database, request):
    """The store as tracking URI, with an empty experiment ``EXPERIMENT`` (named after the test); the
    URI is reset afterwards so no later test logs into it."""
    global EXPERIMENT
    uri, folder = database
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    EXPERIMENT = request.node.name
    client.create_experiment(EXPERIMENT, artifact_location=(folder / EXPERIMENT).as_uri())
    yield client
    mlflow.set_tracking_uri(None)


def log_run(
    client: MlflowClient,
    start_ms: int,
    teacher_top1: float,
    epochs: int,
    stage: str = "report",
    parent: str | None = None,
    status: str = "FINISHED",
) -> str:
    """A finished run of ``stage`` as the report stage logs one: params, headline metrics, tags."""
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    tags = {STAGE_TAG: stage} | ({"mlflow.parentRunId": parent} if parent else {})
    run = client.create_run(experiment, start_time=start_ms, tags=tags, run_name=stage)
    params = [Param("teacher.epochs", str(epochs)), Param("seed", "0")]
    client.log_batch(run.info.run_id, metrics=[Metric(TEACHER_KEY, teacher_top1, start_ms, 0)], params=params)
    client.set_terminated(run.info.run_id, status, end_time=start_ms + 1000)
    return run.info.run_id


def comparisons() -> list[Comparison]:
    """The classifier comparisons on synthetic correctness: half of them identical, half far apart."""
    rng = np.random.default_rng(0)
    found = []
    for i, spec in enumerate(CLASSIFIER_PAIRS):
        a = rng.random(200) < 0.9
        b = rng.random(200) < 0.6 if i % 2 else a
        result = accuracy_difference(a, b, 200, 0.95, 0)
        found.append(Comparison(spec, result, int((a & ~b).sum()), int((b & ~a).sum())))
    return found


def current_headlines(teacher_top1: float) -> pd.DataFrame:
    return pd.DataFrame(
        [{"stage": "evaluate", "metric": "teacher.top1", "key": TEACHER_KEY, "value": teacher_top1}]
    )


def test_headline_metrics_pick_each_stage_s_numbers(tmp_path):
    files = {"train_teacher": tmp_path / "teacher.json", "evaluate": tmp_path / "evaluate.json"}
    files["train_teacher"].write_text(json.dumps({"val_top1": 0.9, "train_images": 240}))
    evaluate = {
        "teacher": {"top1": 0.8, "top5": 1.0},
        "deit": {"none": {"avg_top1": 0.5, "dist_top1": None}, "hard": {"avg_top1": 0.6}},
        "detection": {"detr": {"AP": 0.1, "AP50": 0.2}},
    }
    files["evaluate"].write_text(json.dumps(evaluate))
    table = headline_metrics(files)
    assert table["key"].tolist() == [
        "train_teacher/val_top1",
        "evaluate/teacher.top1",
        "evaluate/deit.none.avg_top1",
        "evaluate/deit.hard.avg_top1",
        "evaluate/detection.detr.AP",
    ]
    assert table["value"].tolist() == [0.9, 0.8, 0.5, 0.6, 0.1]
    files["evaluate"].write_text("{not json")
    with pytest.raises(DataError, match=r"evaluate\.json"):
        headline_metrics(files)


def test_first_run_compares_with_nothing_and_says_so(store, tmp_path):
    this = log_run(store, 1_000, 0.8, 2, status="RUNNING")  # the report's own run, still open
    history = search_history(EXPERIMENT, 100)
    assert history.empty and find_baseline(EXPERIMENT, "first") is None
    folder = tmp_path / "report"
    write_report(
        folder,
        RunInfo(this, None, EXPERIMENT, "abc"),
        current_headlines(0.8),
        changed_params({"teacher.epochs": "2"}, None),
        history,
        None,
        comparisons(),
        200,
    )
    text = (folder / "report.md").read_text()
    assert "nothing to compare with yet" in text and "One run so far" in text
    assert "| previous" not in text and (folder / FIGURES["comparisons"]).stat().st_size > 0
    assert not (folder / FIGURES["over_runs"]).exists()
    assert "data:image/png;base64," in (folder / "report.html").read_text()


def test_a_second_run_with_one_changed_param_shows_the_change_and_the_delta(store, tmp_path):
    first = log_run(store, 1_000, 0.80, 2)
    this = log_run(store, 2_000, 0.86, 3, status="RUNNING")
    history = search_history(EXPERIMENT, 100)
    previous = history.iloc[0]
    assert history["run_id"].tolist() == [first]
    changed = changed_params({"teacher.epochs": "3", "seed": "0"}, previous)
    assert changed.to_dict("records") == [{"param": "teacher.epochs", "this run": "3", "then": "2"}]
    baseline = find_baseline(EXPERIMENT, "first")
    table = compare_with(current_headlines(0.86), previous, baseline)
    assert table.loc[0, "Δ previous"] == pytest.approx(0.06) and table.loc[0, "Δ baseline"] == pytest.approx(
        0.06
    )
    folder = tmp_path / "report"
    write_report(
        folder,
        RunInfo(this, "p" * 32, EXPERIMENT, "abc"),
        current_headlines(0.86),
        changed,
        history,
        baseline,
        comparisons(),
        200,
    )
    text = (folder / "report.md").read_text()
    assert re.search(r"\| teacher\.epochs +\| 3 +\| 2 +\|", text) and "0.0600" in text and first in text
    assert (folder / FIGURES["over_runs"]).stat().st_size > 0
    assert pd.read_csv(folder / "headlines.csv")["Δ previous"].iloc[0] == pytest.approx(0.06)


def test_a_hundred_runs_are_read_in_one_bounded_query(store, tmp_path):
    ids = [log_run(store, 1_000 * (i + 1), 0.5 + i / 300, 2 + i % 3) for i in range(105)]
    log_run(store, 500, 0.1, 1, stage="evaluate")  # another stage's run is no pipeline run of the history
    log_run(store, 200_000, 0.1, 1, status="FAILED")  # nor is a report that failed
    this = log_run(store, 300_000, 0.9, 4, status="RUNNING")
    started = time.perf_counter()
    history = search_history(EXPERIMENT, 100)
    elapsed = time.perf_counter() - started
    assert history["run_id"].tolist() == ids[::-1][:100]  # the newest hundred, newest first
    assert elapsed < 5, elapsed
    assert find_baseline(EXPERIMENT, "first")["run_id"] == ids[0]  # outside the window, found anyway
    assert find_baseline(EXPERIMENT, ids[7])["run_id"] == ids[7]
    assert find_baseline(EXPERIMENT, "none") is None
    folder = tmp_path / "report"
    started = time.perf_counter()
    write_report(
        folder,
        RunInfo(this, None, EXPERIMENT, "abc"),
        current_headlines(0.9),
        changed_params({"teacher.epochs": "4"}, history.iloc[0]),
        history,
        find_baseline(EXPERIMENT, "first"),
        comparisons(),
        200,
    )
    assert time.perf_counter() - started < 20
    text = (folder / "report.md").read_text()
    assert "the 100 before it" in text
    assert text.count(ids[-1]) >= 2  # the previous run, named and in the table of recent runs
    assert ids[-20] not in text  # the table shows the newest ten; the figure shows all


def test_a_baseline_is_found_by_its_pipeline_run_and_an_unknown_one_is_one_clear_error(store):
    parent = log_run(store, 1_000, 0.0, 1, stage="pipeline")
    child = log_run(store, 2_000, 0.7, 2, parent=parent)
    assert find_baseline(EXPERIMENT, parent)["run_id"] == child
    with pytest.raises(ConfigError, match=r"report\.baseline: .* 0{32}"):
        find_baseline(EXPERIMENT, "0" * 32)


def test_predictions_without_a_compared_column_are_one_clear_error(tmp_path):
    csv = tmp_path / "test_predictions.csv"
    pd.DataFrame({"image": ["a/1.png"], "label": ["a"], "teacher": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="ssl_knn"):
        method_comparisons(csv, tmp_path / "annotations.json", {}, 100, 0.95, 0)
    with pytest.raises(DataError, match="missing"):
        method_comparisons(tmp_path / "absent.csv", tmp_path / "annotations.json", {}, 100, 0.95, 0)
    csv.write_text('image,label\n"a/1.png,a\n')  # a quote never closed
    with pytest.raises(DataError, match="no CSV table"):
        method_comparisons(csv, tmp_path / "annotations.json", {}, 100, 0.95, 0)


def test_a_param_one_run_has_and_the_other_lacks_is_a_change():
    then = pd.Series(
        {"run_id": "x", "params.seed": "0", "params.ssl.method": "simclr", "params.report.history": None}
    )
    changed = changed_params({"seed": "0", "report.history": "100"}, then)
    assert changed.to_dict("records") == [
        {"param": "report.history", "this run": "100", "then": "(absent)"},
        {"param": "ssl.method", "this run": "(absent)", "then": "simclr"},
    ]
