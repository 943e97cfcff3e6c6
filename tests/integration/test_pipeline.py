"""The whole DAG on the smoke profile, in temporary git + DVC repositories, through each door."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_pipeline_repo, run, smoke_params

pytestmark = pytest.mark.integration


def dag_stages(repo) -> list[str]:
    from flows.pipeline import read_dag

    return list(read_dag(repo))


@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory):
    return make_pipeline_repo(tmp_path_factory.mktemp("repro"))


def check_deit_outputs(repo, evaluate: dict) -> None:
    """The three students' table beside the teacher, per-epoch histories and attention maps."""
    table = evaluate["deit"]
    assert set(table) == {"teacher", "none", "soft", "hard"}
    assert table["none"]["dist_top1"] is None  # DeiT's baseline has no distillation token
    for mode in ("soft", "hard"):
        assert set(table[mode]) == {"cls_top1", "dist_top1", "avg_top1", "teacher_agreement"}
        assert all(0.0 <= v <= 1.0 for v in table[mode].values())
    for mode in ("none", "soft", "hard"):
        history = (repo / f"plots/deit/{mode}/history.csv").read_text().splitlines()
        assert "val_avg_top1" in history[0] and len(history) == 3  # header + 2 smoke epochs
        assert (repo / f"plots/evaluate/deit_{mode}_attention.png").stat().st_size > 0
    rows = (repo / "plots/evaluate/deit_heads.csv").read_text().splitlines()
    assert rows[0] == "model,cls_top1,dist_top1,avg_top1,teacher_agreement" and len(rows) == 5


def check_first_report(repo: Path, evaluate: dict) -> None:
    """The report of a first run: nothing to compare with yet, the comparisons with their intervals,
    logged to its own MLflow run (no flow, no parent); the per-image predictions it reads agree with
    evaluate's scores."""
    from vitkit.evaluation.bootstrap import NOISE, REAL

    text = (repo / "reports/report/report.md").read_text()
    assert "nothing to compare with yet" in text and "## Are the differences real?" in text
    assert (repo / "reports/report/comparisons.png").stat().st_size > 0
    summary = json.loads((repo / "metrics/report.json").read_text())
    assert len(summary) == 5  # SSL vs random (kNN, linear probe), DeiT soft / hard vs none, the detectors
    for row in summary.values():
        assert row["low"] <= row["high"]
        assert row["verdict"] == (REAL if row["low"] > 0 or row["high"] < 0 else NOISE)
    predictions = pd.read_csv(repo / "artifacts/evaluate/test_predictions.csv")
    right = {c: (predictions[c] == predictions["label"]).mean() for c in predictions.columns[2:]}
    assert right["teacher"] == pytest.approx(evaluate["teacher"]["top1"])
    assert right["ssl_knn"] == pytest.approx(evaluate["ssl"]["ssl"]["knn_top1"])
    assert right["deit_hard"] == pytest.approx(evaluate["deit"]["hard"]["avg_top1"])
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vitkit").experiment_id
    (report_run,) = client.search_runs([experiment], "tags.`vitkit.stage` = 'report'")
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= logged
    assert report_run.data.metrics["evaluate/teacher.top1"] == pytest.approx(evaluate["teacher"]["top1"])


def check_second_report(repo: Path, knn_before: float, knn_now: float) -> None:
    """Run again with one param changed: the report names the change and each metric's delta."""
    text = (repo / "reports/report/report.md").read_text()
    assert re.search(r"\| ssl\.method +\| mocov2 +\| simclr +\|", text), text
    table = pd.read_csv(repo / "reports/report/headlines.csv").set_index(["stage", "metric"])
    ssl = table.loc[("pretrain_ssl", "knn_top1")]
    assert (ssl["this run"], ssl["previous"]) == (pytest.approx(knn_now), pytest.approx(knn_before))
    assert ssl["Δ previous"] == pytest.approx(knn_now - knn_before)
    assert ssl["baseline"] == pytest.approx(knn_before)  # the first run is the default baseline
    assert (table["Δ previous"].drop(index=("pretrain_ssl", "knn_top1")) == 0).all()  # nothing else ran


def served_model(client: MlflowClient, name: str) -> mlflow.pyfunc.PyFuncModel:
    """The registered model's ``current`` version, loaded from its run as a user would."""
    version = client.get_model_version_by_alias(f"vitkit-{name}", "current")
    return mlflow.pyfunc.load_model(f"runs:/{version.run_id}/model")


def served_scores(repo: Path) -> dict[str, float]:
    """Each of the seven pyfunc models on the test PNG files, scored as ``evaluate`` scores the model
    files: top-1 of the teacher and the students, kNN top-1 of the SSL embeddings, COCO AP."""
    from vitkit.data.datasets import CocoDetection
    from vitkit.evaluation.coco import evaluate_coco
    from vitkit.evaluation.knn import knn_accuracy

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    mlflow.set_tracking_uri(client.tracking_uri)
    split = {s: sorted((repo / "data/classification" / s).glob("*/*.png")) for s in ("train", "test")}
    frames = {s: pd.DataFrame({"path": [str(p) for p in files]}) for s, files in split.items()}
    names = {s: [p.parent.name for p in files] for s, files in split.items()}
    scores = {}
    for name in ("teacher", "deit-none", "deit-soft", "deit-hard"):
        scores[name] = float(
            (served_model(client, name).predict(frames["test"])["label"] == names["test"]).mean()
        )
    ssl, knn = served_model(client, "ssl"), yaml.safe_load((repo / "params.yaml").read_text())["ssl"]["knn"]
    classes = sorted(set(names["train"]))
    features = {s: torch.from_numpy(np.stack(ssl.predict(frame)["embedding"])) for s, frame in frames.items()}
    labels = {s: torch.tensor([classes.index(c) for c in names[s]]) for s in names}
    scores["ssl_knn"] = knn_accuracy(
        features["train"],
        labels["train"],
        features["test"],
        labels["test"],
        len(classes),
        knn["k"],
        knn["temperature"],
    )
    test = CocoDetection(repo / "data/detection/test")
    files = {info["id"]: test.images_dir / info["file_name"] for info in test.coco.imgs.values()}
    frame = pd.DataFrame({"path": [str(f) for f in files.values()]})
    for name in ("detr", "deformable-detr"):
        results = [
            {"image_id": image_id, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            for image_id, row in zip(
                files, served_model(client, name).predict(frame).itertuples(), strict=True
            )
            for (x1, y1, x2, y2), c, s in zip(row.boxes, row.category_ids, row.scores, strict=True)
        ]
        scores[name] = evaluate_coco(test.coco, results)["AP"]
    return scores


def check_served_models_agree_with_evaluate(repo: Path, evaluate: dict) -> None:
    """A user's answers are what evaluate measured: equal top-1 (one image is 1/60), AP within 1e-3."""
    try:
        served = served_scores(repo)
    finally:  # set_tracking_uri also sets MLFLOW_TRACKING_URI: leave this store to no later test
        mlflow.set_tracking_uri(None)
    one_image = 0.5 / len(list((repo / "data/classification/test").glob("*/*.png")))
    assert served["teacher"] == pytest.approx(evaluate["teacher"]["top1"], abs=one_image)
    for mode in ("none", "soft", "hard"):
        assert served[f"deit-{mode}"] == pytest.approx(evaluate["deit"][mode]["avg_top1"], abs=one_image)
    assert served["ssl_knn"] == pytest.approx(evaluate["ssl"]["ssl"]["knn_top1"], abs=one_image)
    assert served["detr"] == pytest.approx(evaluate["detection"]["detr"]["AP"], abs=1e-3)
    assert served["deformable-detr"] == pytest.approx(evaluate["detection"]["deformable"]["AP"], abs=1e-3)


def test_dvc_repro_runs_every_stage_then_nothing(repro_repo):
    first = run(["dvc", "repro"], repro_repo, timeout=1800)  # 10 min was not enough at load 10 on 2 cores
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in dag_stages(repro_repo):
        assert f"Running stage '{stage}'" in first.stdout
    evaluate = json.loads((repro_repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluate["teacher"]["top1"] <= 1.0
    assert (repro_repo / "plots/evaluate/teacher_confusion.png").stat().st_size > 0
    assert (repro_repo / "plots/prepare/samples.png").stat().st_size > 0
    for backbone in ("ssl", "random_init"):
        assert set(evaluate["ssl"][backbone]) == {"knn_top1", "linear_probe_top1"}
    ssl = json.loads((repro_repo / "metrics/ssl.json").read_text())
    assert ssl["train_images"] == 64 and 0.0 <= ssl["knn_top1"] <= 1.0
    assert (repro_repo / "plots/ssl/view_pairs.png").stat().st_size > 0
    for arch in ("detr", "deformable"):
        assert 0.0 <= evaluate["detection"][arch]["AP"] <= 1.0
        assert (repro_repo / f"plots/detr/{arch}/history.csv").read_text().startswith("epoch,train_loss,")
        assert json.loads((repro_repo / f"metrics/detr/{arch}_timing.json").read_text())["train_time_s"] > 0
        results = json.loads((repro_repo / f"artifacts/evaluate/{arch}_test_results.json").read_text())
        assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert (repro_repo / "plots/evaluate/detection_comparison.png").stat().st_size > 0
    check_deit_outputs(repro_repo, evaluate)
    check_served_models_agree_with_evaluate(repro_repo, evaluate)
    check_first_report(repro_repo, evaluate)

    for arch in ("detr", "deformable"):  # every loss term of DETR's set loss, per epoch
        header = (repro_repo / f"plots/detr/{arch}/history.csv").read_text().splitlines()[0].split(",")
        assert {"train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_class_error"} <= set(header)

    # progress bars are a display setting, not a param: turning them on re-runs nothing
    second = run(["dvc", "repro"], repro_repo, env={"VITKIT_PROGRESS": "1"})
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    status = run(["dvc", "status"], repro_repo)
    assert "Data and pipelines are up to date" in status.stdout

    # deps cover the code each stage imports: new post-processing re-scores the detectors
    postprocess = repro_repo / "vitkit/models/detr/postprocess.py"
    original = postprocess.read_text()
    postprocess.write_text(original + "\n# changed\n")
    changed = run(["dvc", "status"], repro_repo).stdout
    postprocess.write_text(original)
    assert "evaluate:" in changed and "train_detr@detr:" in changed and "train_teacher:" not in changed

    # the other SSL method by a param change; MoCo also reports its pretext (instance) accuracy
    knn_before = json.loads((repro_repo / "metrics/ssl.json").read_text())["knn_top1"]
    (repro_repo / "mocov2.yaml").write_text(yaml.safe_dump(smoke_params(ssl={"method": "mocov2"})))
    moco = run([sys.executable, "-m", "stages.pretrain_ssl", "--params", "mocov2.yaml"], repro_repo)
    assert moco.returncode == 0, moco.stdout + moco.stderr
    ssl = json.loads((repro_repo / "metrics/ssl.json").read_text())
    assert 0.0 <= ssl["pretext_top1"] <= 1.0 and 0.0 <= ssl["knn_top1"] <= 1.0
    assert "pretext_top1" in (repro_repo / "plots/ssl/history.csv").read_text().splitlines()[0]

    # and a second report, on this run with one param changed
    report = run([sys.executable, "-m", "stages.report", "--params", "mocov2.yaml"], repro_repo)
    assert report.returncode == 0, report.stdout + report.stderr
    check_second_report(repro_repo, knn_before, ssl["knn_top1"])


# every model stage compiles (minutes each on 2 cores); the default run keeps CPU bf16 through
# tests/unit/test_tasks.py
@pytest.mark.slow
def test_the_smoke_dag_runs_compiled_under_cpu_bf16_autocast(tmp_path):
    """``engine.amp: always`` and ``engine.compile: true`` on a CPU: every stage runs to the end."""
    repo = make_pipeline_repo(tmp_path / "fast", smoke_params(engine={"amp": "always", "compile": True}))
    result = run(["dvc", "repro"], repo, timeout=7200)
    assert result.returncode == 0, result.stdout + result.stderr
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluate["teacher"]["top1"] <= 1.0
    for arch in ("detr", "deformable"):
        assert 0.0 <= evaluate["detection"][arch]["AP"] <= 1.0
    check_deit_outputs(repo, evaluate)


# 3.5 min on 2 cores; tests/unit/test_ddp_training.py keeps two gloo ranks in the default run
@pytest.mark.slow
def test_ddp_teacher_with_two_cpu_processes_matches_one(tmp_path):
    """train_teacher under torchrun (2 processes, gloo) learns as well as one process.

    The 2-process run comes first, on a checkout with no MLflow store yet (its ranks once raced to
    create the database). From scratch this ResNet needs ~150-300 steps on the shapes data before its
    accuracy leaves chance level, so the run (~225 steps) compares losses and accuracies loosely.
    """
    repo = make_pipeline_repo(tmp_path / "ddp")
    data = {"classification": {"shapes": {"train_per_class": 300, "val_per_class": 30}}}
    results, outputs = {}, {}
    for nproc in (2, 1):
        # the same global batch: 1 process x 64 or 2 processes x 32
        teacher = {"epochs": 8, "lr": 0.003, "batch_size": 64 // nproc, "init": "scratch"}
        params = smoke_params(data=data, engine={"nproc": nproc, "threads": 1}, teacher=teacher)
        params_file = tmp_path / f"params-{nproc}.yaml"
        params_file.write_text(yaml.safe_dump(params))
        if nproc == 2:  # prepare logs to another store, so the checkout has none before the DDP run
            prepare_store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/prepare.db"}
            prepare = [sys.executable, "-m", "stages.prepare", "--params", str(params_file)]
            prepared = run(prepare, repo, prepare_store)
            assert prepared.returncode == 0, prepared.stderr
            assert not (repo / "mlflow.db").exists()
        result = run([sys.executable, "-m", "stages.train_teacher", "--params", str(params_file)], repo)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[nproc] = result.stdout
        results[nproc] = json.loads((repo / "metrics/teacher.json").read_text())
        history = (repo / "plots/teacher/history.csv").read_text().splitlines()
        results[nproc]["first_train_loss"] = float(history[1].split(",")[1])
        results[nproc]["final_train_loss"] = float(history[-1].split(",")[1])
    assert "launching 2 processes" in outputs[2]
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vitkit").experiment_id])
    assert sorted(r.data.tags["vitkit.world_size"] for r in runs) == ["1", "2"]  # rank 0 alone logs
    assert all(r.info.status == "FINISHED" for r in runs)
    assert results[1]["train_images"] == results[2]["train_images"] == 1800
    for metrics in results.values():  # both learn: the loss falls well below its first epoch
        assert metrics["final_train_loss"] < metrics["first_train_loss"] - 0.15, results
    # and land in the same range (in this short run when learning takes off varies by a few epochs)
    assert abs(results[1]["final_train_loss"] - results[2]["final_train_loss"]) < 0.5, results
    assert abs(results[1]["val_top1"] - results[2]["val_top1"]) <= 0.25, results


@pytest.mark.slow  # a second whole smoke DAG (~2.7 min); the default run measured 18.5 min with it
def test_prefect_flow_runs_each_stage_as_a_task_and_nests_mlflow_runs(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    repo = make_pipeline_repo(tmp_path / "flow")
    state = pipeline(repo_root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    stages = dag_stages(repo)
    assert [row["status"] for row in state.result()] == ["ran"] * len(stages)

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert sorted(t.name for t in task_runs) == sorted(stages)
    assert all(t.state.is_completed() for t in task_runs)

    status = run(["dvc", "status"], repo)
    assert "Data and pipelines are up to date" in status.stdout

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vitkit").experiment_id])
    parents = [r for r in runs if r.data.tags["vitkit.stage"] == "pipeline"]
    assert len(parents) == 1
    flow_run_name = parents[0].data.tags["vitkit.flow_run.name"]
    assert parents[0].info.run_name == f"pipeline · {flow_run_name}"
    assert parents[0].data.tags["vitkit.skipped"] == "none"
    summary = set(parents[0].data.metrics)  # every stage's final metrics, on the parent
    assert {"teacher/val_top1", "deit/hard/val_avg_top1", "detr/deformable/val_AP"} <= summary
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["vitkit.stage"] for r in children) == sorted(stages)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.info.run_name == f"{child.data.tags['vitkit.stage']} · {flow_run_name}"
        assert "stage_time_s" in child.data.metrics
        assert len(child.data.tags["vitkit.dvc_stage_hash"]) == 64
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/report.md" in logged  # the report goes to the flow's parent run
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    report = next(a for a in artifacts if a.key == "vitkit-report")
    assert report.type == "markdown" and "## Are the differences real?" in report.data
    teacher = next(r for r in children if r.data.tags["vitkit.stage"] == "train_teacher")
    assert "val_top1" in teacher.data.metrics
    assert len(client.get_metric_history(teacher.info.run_id, "train_loss")) == 2  # one point per epoch

    again = pipeline(repo_root=str(repo), return_state=True)
    assert [row["status"] for row in again.result()] == ["skipped (up to date)"] * len(stages)
