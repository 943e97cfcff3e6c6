"""What a flow run takes from its user (profile, dotted-key overrides, stage names), checked before
anything runs; the deployment's form; the copy of the checkout an override runs in; the metrics
table; the MLflow links; progress bars in a task log."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import (
    _clean_key,
    _deployment,
    _metric_name,
    _metric_rows,
    _with_upstream,
    pipeline,
    read_dag,
)
from flows.workcopy import RUNS_DIR, make_copy
from vitkit import tracking
from vitkit.config import parse_assignment, resolve_params
from vitkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


class Lines:
    """A logger keeping what it is given."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args if args else message)

    warning = error = info


def test_assignments_read_values_as_yaml_as_dvc_set_does():
    assert parse_assignment("teacher.epochs=2") == ("teacher.epochs", 2)
    scales = ("detr_training.train_scales", [96, 128])
    assert parse_assignment("detr_training.train_scales=[96, 128]") == scales
    assert parse_assignment("data.classification.path=null") == ("data.classification.path", None)
    assert parse_assignment(" mlflow.experiment = other ") == ("mlflow.experiment", "other")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("teacher.epochs")


def test_an_override_is_validated_and_written_as_the_schema_reads_it():
    changes, params = resolve_params(PARAMS, None, {"teacher.epochs": "2", "deit.alpha": 1})
    assert changes == {"teacher.epochs": 2, "deit.alpha": 1.0}
    assert params.teacher.epochs == 2
    assert params.teacher.lr == yaml.safe_load(PARAMS.read_text())["teacher"]["lr"]  # the rest as in the file
    changes, params = resolve_params(PARAMS, "smoke", {"teacher.epochs": 3})
    assert changes["teacher.epochs"] == 3 and changes["ssl.epochs"] == 1  # the override wins over the profile
    assert resolve_params(PARAMS)[0] == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher.epoch": 2}, "overrides: teacher.epoch: unknown key; did you mean teacher.epochs?"),
        ({"teacher.epochs": "two"}, "overrides: teacher.epochs: Input should be a valid integer"),
        ({"teacher.epochs": 0}, "overrides: teacher.epochs: Input should be greater than 0 (got 0)"),
        ({"teacher.epochs.x": 1}, "overrides: teacher.epochs.x: unknown key"),
        ({"teachr": {"epochs": 1}}, "overrides: teachr: unknown key; did you mean teacher?"),
        ({"teacher": {"epochs": -1}}, "overrides: teacher.epochs: Input should be greater than 0"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        resolve_params(PARAMS, None, overrides)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_an_unknown_profile_or_stage_is_one_line_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown profile 'fast'; known profiles: \['gpu', 'smoke'\]"):
        resolve_params(PARAMS, "fast")
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) train_teachr; dvc.yaml has prepare, "):
        _with_upstream(read_dag(ROOT), ["train_teachr"])


def test_every_flow_parameter_is_described_and_the_form_offers_stages_and_profiles():
    from prefect.utilities.callables import parameter_schema

    properties = parameter_schema(pipeline).model_dump_for_openapi()["properties"]
    assert {"stages", "profile", "overrides", "max_parallel"} <= set(properties)
    for name, prop in properties.items():
        assert len(prop.get("description", "")) > 20, name
    assert "teacher.epochs" in properties["overrides"]["description"]

    form = _deployment(pipeline, ROOT, {"max_parallel": 1})._parameter_openapi_schema.properties
    stage_choices = form["stages"]["anyOf"][0]["items"]["enum"]
    assert stage_choices == list(read_dag(ROOT)) and "distill_deit@hard" in stage_choices
    assert form["profile"]["anyOf"][0]["enum"] == ["gpu", "smoke"]


def test_the_cli_refuses_a_bad_override_in_seconds_before_any_flow_run(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--set", "teacher.epoch=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: [pipeline] overrides: teacher.epoch: unknown key; did you mean teacher.epochs? "
        "(docs/params.md lists every key)"
    ]
    assert elapsed < 30, elapsed  # seconds: Python and the imports; no Prefect server is started


def test_metric_rows_list_every_metrics_file_with_clean_keys(tmp_path):
    metrics = tmp_path / "metrics"
    (metrics / "deit").mkdir(parents=True)
    (metrics / "teacher.json").write_text(json.dumps({"val_top1": 0.5, "train_images": 10}))
    (metrics / "deit" / "none.json").write_text('{"val_cls_top1": 0.25, "val_dist_top1": NaN}')
    (metrics / "deit" / "hard.json").write_text(json.dumps({"val_dist_top1": 0.75}))
    evaluate = {"ssl": {"ssl": {"knn_top1": 0.3}, "random_init": {"knn_top1": 0.2}, "method": "simclr"}}
    evaluate["deit"] = {"none": {"dist_top1": None, "avg_top1": 0.25}}
    (metrics / "evaluate.json").write_text(json.dumps(evaluate))
    rows = {(r["file"], r["metric"]): r["value"] for r in _metric_rows(tmp_path)}
    assert rows == {
        ("deit/hard", "val_dist_top1"): 0.75,
        ("deit/none", "val_cls_top1"): 0.25,
        ("evaluate", "ssl.knn_top1"): 0.3,
        ("evaluate", "ssl.random_init.knn_top1"): 0.2,
        ("evaluate", "deit.none.avg_top1"): 0.25,
        ("teacher", "val_top1"): 0.5,
        ("teacher", "train_images"): 10,
    }
    assert _clean_key("detection.detr.AP") == "detection.detr.AP"
    # a metric name MLflow takes, for every key (evaluate.json has keys such as val_AP@2)
    assert _metric_name("evaluate/detection.detr.val_AP@2") == "evaluate/detection.detr.val_AP_2"
    from mlflow.utils.validation import _validate_metric_name

    _validate_metric_name(_metric_name("deit/hard/x@1 (best)"))


def test_mlflow_links_point_at_the_ui_that_shows_the_store(monkeypatch):
    monkeypatch.delenv(tracking.MLFLOW_UI_ENV, raising=False)
    server = "http://mlflow-host:5000/"
    assert tracking.run_url(server, "3", "abc") == "http://mlflow-host:5000/#/experiments/3/runs/abc"
    local = "sqlite:////work/vitkit/mlflow.db"
    assert tracking.runs_page_url(local, "1") == "http://127.0.0.1:5000/#/experiments/1/runs"
    monkeypatch.setenv(tracking.MLFLOW_UI_ENV, "http://box:8080/")
    assert tracking.run_url(local, "1", "r") == "http://box:8080/#/experiments/1/runs/r"


def test_a_stage_reads_its_flow_run_from_the_environment(monkeypatch):
    monkeypatch.setenv(tracking.FLOW_RUN_ENV, json.dumps({"id": "f1", "name": "brave-owl", "other": "x"}))
    assert tracking.flow_run_from_env() == {"id": "f1", "name": "brave-owl"}
    monkeypatch.setenv(tracking.FLOW_RUN_ENV, "not json")
    assert tracking.flow_run_from_env() == {}
    monkeypatch.delenv(tracking.FLOW_RUN_ENV)
    assert tracking.flow_run_from_env() == {}


def _tiny_repo(path: Path) -> Path:
    """git + DVC: one stage copying a param into its output, run and committed."""
    path.mkdir()
    (path / "params.yaml").write_text("# the value\nvalue: 1\nother: 5\n")
    (path / ".gitignore").write_text("/.vitkit/\n")
    (path / "gone.txt").write_text("committed, then deleted\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@t"],
        ["git", "config", "user.name", "t"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "stage", "add", "-q", "-n", "copy", "-p", "value", "-o", "out.txt", "cp params.yaml out.txt"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny"],
    ):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


def test_an_override_runs_in_a_copy_and_leaves_the_checkout_true(tmp_path):
    checkout = _tiny_repo(tmp_path / "checkout")
    (checkout / "notes.txt").write_text("uncommitted\n")  # the checkout's own state comes along
    (checkout / "staged.txt").write_text("staged\n")
    (checkout / "gone.txt").unlink()
    subprocess.run(["git", "add", "staged.txt"], cwd=checkout, check=True)
    (checkout / "params.yaml").write_text("# the value\nvalue: 1\nother: 6\n")
    copy = make_copy(checkout, "brave-owl", {"value": 2}, Lines())
    assert copy == checkout.resolve() / RUNS_DIR / "brave-owl"
    assert (copy / "params.yaml").read_text() == "# the value\nvalue: 2\nother: 6\n"  # comments kept
    assert (copy / "notes.txt").read_text() == "uncommitted\n"
    assert (copy / "staged.txt").read_text() == "staged\n"
    assert not (copy / "gone.txt").exists()
    assert (copy / "out.txt").exists()  # restored from the checkout's cache
    heads = [
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True)
        for d in (copy, checkout)
    ]
    assert heads[0].stdout == heads[1].stdout  # the stage runs' git commit is the checkout's
    status = subprocess.run(["dvc", "status", "--json"], cwd=copy, capture_output=True, text=True)
    assert "value" in status.stdout  # the copy's stage changed by the override: it would run
    subprocess.run(["dvc", "repro", "-q"], cwd=copy, check=True, capture_output=True)
    assert (checkout / "params.yaml").read_text().endswith("value: 1\nother: 6\n")
    clean = subprocess.run(["dvc", "status", "--json"], cwd=checkout, capture_output=True, text=True)
    assert json.loads(clean.stdout) == {}  # the checkout's dvc.lock still describes its outputs
    assert make_copy(checkout, "brave-owl", {"value": 3}, Lines()) == copy  # a retry replaces it
    assert (copy / "params.yaml").read_text() == "# the value\nvalue: 3\nother: 6\n"


def test_a_progress_bar_into_a_task_log_is_a_few_lines_not_one_per_refresh(monkeypatch):
    """A 2000-step bar forced on into a pipe, streamed as the flow streams a stage (flows/dvc_run.py)."""
    from flows.dvc_run import run_dvc
    from vitkit.progress import LINES_PER_BAR

    script = (
        "import time\nfrom vitkit.progress import progress_bar\n"
        "bar = progress_bar(2000, 'epoch 1/1', True)\n"
        "for _ in range(2000):\n    time.sleep(0.0005)\n    bar.update()\nbar.close()\n"
    )
    logger = Lines()
    monkeypatch.setenv("VITKIT_PROGRESS", "1")
    output = run_dvc([sys.executable, "-c", script], ROOT, logger, {"PYTHONPATH": str(ROOT)})
    assert output.code == 0
    bars = [line for line in logger.lines[1:] if "epoch 1/1" in line]
    assert 3 <= len(bars) <= LINES_PER_BAR + 2, bars  # first line, a quarter each, the closing line
    assert "2000/2000" in bars[-1]


def test_progress_on_a_terminal_keeps_refreshing_every_second():
    from vitkit.progress import progress_bar

    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            pass

        def flush(self) -> None:
            pass

    bar = progress_bar(100, "x", True, file=Terminal())
    assert bar.mininterval == 1.0 and not math.isinf(bar.maxinterval)
    bar.close()


def test_make_mlflow_ui_prints_the_runs_page_of_the_experiment(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.MLFLOW_UI_ENV, raising=False)
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking._main(["url"]) == 0
    assert "http://127.0.0.1:5000 (no run of experiment 'vitkit' yet)" in capsys.readouterr().out
    experiment_id = mlflow.MlflowClient(uri).create_experiment("vitkit")
    assert tracking._main(["url"]) == 0
    assert (
        capsys.readouterr().out.strip().endswith(f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")
    )


def test_a_refused_run_leaves_no_engine_traceback_in_its_log():
    """Prefect's engine logs a deployment run's Failed final state with a traceback; for the one
    line this flow already logged about the user's input, that record is dropped."""
    import logging

    from prefect.exceptions import FailedRun

    logger = logging.getLogger("prefect.flow_runs")

    def record(exc: BaseException) -> logging.LogRecord:
        info = (type(exc), exc, None)
        return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Engine execution exited", (), info)

    assert not logger.filter(record(FailedRun("error: [pipeline] overrides: teacher.epoch: unknown key")))
    assert logger.filter(record(FailedRun("stage train_teacher failed (dvc exit code 1)")))
    assert logger.filter(record(RuntimeError("error: [pipeline] not a failed run")))
