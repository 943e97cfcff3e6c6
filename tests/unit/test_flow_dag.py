"""The Prefect flow's view of dvc.yaml and its retry policy (no server needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from prefect.states import Failed

from flows.dvc_run import StageFailed, StageInputError, is_transient
from flows.pipeline import _with_upstream, read_dag, stages_to_run
from vitkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_dag_comes_from_dvc_yaml():
    dag = read_dag(ROOT)
    assert dag["prepare"] == []
    assert dag["pretrain_ssl"] == ["prepare"]
    assert sorted(dag["train_teacher"]) == ["prepare", "pretrain_ssl"]
    for mode in ("none", "soft", "hard"):  # foreach items are stages of their own
        assert sorted(dag[f"distill_deit@{mode}"]) == ["prepare", "train_teacher"]
    for arch in ("detr", "deformable"):
        assert sorted(dag[f"train_detr@{arch}"]) == ["prepare", "pretrain_ssl", "train_teacher"]
    assert set(dag["evaluate"]) >= {
        "pretrain_ssl",
        "train_teacher",
        "distill_deit@hard",
        "train_detr@deformable",
    }
    assert "evaluate" in dag["report"]  # the report comes last: it reads what evaluate wrote


def test_the_report_artifact_names_the_figures_prefect_cannot_show():
    from flows.report_artifact import artifact_markdown

    report = "# r\n\n![the comparisons](comparisons.png)\n\n| a |\n|---|\n| 1 |\n"
    published = artifact_markdown(report)
    assert "![" not in published and "`reports/report/comparisons.png`" in published
    assert published.startswith("# r\n") and published.endswith("| 1 |\n")


def test_the_flow_publishes_the_report_it_finds_as_a_markdown_artifact(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.report_artifact import ARTIFACT_KEY, publish_report
    from stages.paths import REPORT_DIR
    from vitkit.report import MARKDOWN_NAME

    (tmp_path / REPORT_DIR).mkdir(parents=True)
    (tmp_path / REPORT_DIR / MARKDOWN_NAME).write_text(
        "# run report\n\n![the comparisons](comparisons.png)\n"
    )

    @flow
    def publishing() -> tuple[str | None, str | None]:
        return publish_report(tmp_path), publish_report(tmp_path / "no-report-here")

    state = publishing(return_state=True)
    published, absent = state.result()
    assert published is not None and absent is None
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (artifact,) = artifacts
    assert (artifact.key, artifact.type) == (ARTIFACT_KEY, "markdown")
    assert artifact.data.startswith("# run report") and "reports/report/comparisons.png" in artifact.data


def test_selecting_a_stage_brings_what_it_needs_in_order():
    dag = {"a": [], "b": ["a"], "c": ["a"], "d": ["b"]}
    assert _with_upstream(dag, ["d"]) == ["a", "b", "d"]
    with pytest.raises(ConfigError, match="unknown stage"):
        _with_upstream(dag, ["x"])


def test_bad_input_is_not_retried_but_other_failures_are():
    """Prefect calls the retry condition with the failed state of a task."""
    assert not is_transient(None, None, Failed(data=StageInputError("error: [prepare] bad params")))
    assert is_transient(None, None, Failed(data=StageFailed("killed")))


def test_only_changed_stages_and_what_is_downstream_of_them_are_run(tmp_path):
    """One ``dvc status`` decides; a stage downstream of a changed one runs though its own inputs
    have not changed yet."""
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "c.txt").write_text("c\n")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "stage", "add", "-q", "-n", "first", "-d", "a.txt", "-o", "b.txt", "cp a.txt b.txt"],
        ["dvc", "stage", "add", "-q", "-n", "second", "-d", "b.txt", "-o", "d.txt", "cp b.txt d.txt"],
        ["dvc", "stage", "add", "-q", "-n", "apart", "-d", "c.txt", "-o", "e.txt", "cp c.txt e.txt"],
        ["dvc", "repro", "-q"],
    ):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    dag = read_dag(tmp_path)
    order = ["first", "second", "apart"]
    assert stages_to_run(tmp_path, order, dag) == set()
    (tmp_path / "a.txt").write_text("changed\n")
    assert stages_to_run(tmp_path, order, dag) == {"first", "second"}
    (tmp_path / "e.txt").unlink()  # a missing output is a change too (DVC restores it)
    assert stages_to_run(tmp_path, order, dag) == {"first", "second", "apart"}
