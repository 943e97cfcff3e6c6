"""Bad input tried from the command line: one clear message, exit code 2, nothing half-written or lost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import make_pipeline_repo, run, smoke_params

pytestmark = pytest.mark.integration


def snapshot(root: Path) -> dict[str, float]:
    """mtime of every file under the pipeline's output folders."""
    folders = ("data", "artifacts", "metrics", "plots", "reports")
    return {str(p): p.stat().st_mtime_ns for f in folders for p in (root / f).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built_repo(tmp_path_factory):
    """A smoke repo whose pipeline has run once, so there is good output to lose."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("errors"))
    result = run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return repo


def write_params(folder: Path, params: dict) -> Path:
    params_file = folder / "bad-params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return params_file


def stage_command(name: str, params_file: Path) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)]


def stage(repo: Path, name: str, params: dict, env: dict | None = None, tmp: Path | None = None):
    return run(stage_command(name, write_params(tmp or repo, params)), repo, env)


def assert_one_clear_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: [")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize(
    ("section", "override", "needle"),
    [
        ("teacher", {"epochs": "many"}, "teacher.epochs: Input should be a valid integer"),
        ("teacher", {"momentum": 0.9}, "teacher.momentum: unknown key"),
        ("teacher", {"lr": 0}, "teacher.lr: Input should be greater than 0"),
        ("ssl", {"method": "mocov2", "queue_size": 16}, "queue_size (16) must be >= batch_size (32)"),
        ("ssl", {"temperature": 0}, "ssl.temperature: Input should be greater than 0"),
        ("ssl", {"method": "byol"}, "ssl.method: Input should be 'mocov2' or 'simclr'"),
    ],
)
def test_bad_params_stop_every_stage_before_it_writes(built_repo, tmp_path, section, override, needle):
    before = snapshot(built_repo)
    params_file = write_params(tmp_path, smoke_params(**{section: override}))
    # side by side: each process spends its ~6 s importing torch and mlflow before it validates
    processes = [
        subprocess.Popen(
            stage_command(name, params_file),
            cwd=built_repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("prepare", "pretrain_ssl", "train_teacher", "evaluate", "report")
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert_one_clear_error(result, "bad-params.yaml", needle)
    assert snapshot(built_repo) == before


def test_a_report_baseline_that_is_no_run_is_one_clear_error_and_the_report_is_kept(built_repo, tmp_path):
    before = snapshot(built_repo)
    result = stage(built_repo, "report", smoke_params(report={"baseline": "0" * 32}), tmp=tmp_path)
    assert_one_clear_error(result, "report.baseline: no finished report run", "0" * 32)
    assert snapshot(built_repo) == before


def test_unreachable_tracking_server_fails_before_training(built_repo, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = snapshot(built_repo)
    result = stage(
        built_repo,
        "train_teacher",
        smoke_params(),
        {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        tmp=tmp_path,
    )
    assert_one_clear_error(result, f"http://127.0.0.1:{port} is unreachable")
    assert "teacher 1/" not in result.stderr + result.stdout  # no training step ran
    assert snapshot(built_repo) == before


def test_refusing_or_silent_tracking_server_stops_a_ddp_stage_before_it_launches(tmp_path):
    """A port nobody listens on, and one that accepts but never answers (where MLflow's own client
    would retry for minutes): one error line within 60 s, before torchrun starts any rank."""
    repo = make_pipeline_repo(tmp_path / "repo")
    params_file = write_params(tmp_path, smoke_params(engine={"nproc": 2}))
    with socket.socket() as refusing, socket.socket() as silent:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uris = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in (refusing, silent)]
        processes = [
            subprocess.Popen(
                stage_command("train_teacher", params_file),
                cwd=repo,
                env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for uri in uris
        ]
        try:
            for uri, process in zip(uris, processes, strict=True):
                stdout, stderr = process.communicate(timeout=60)
                result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
                assert_one_clear_error(result, f"[train_teacher] MLflow tracking server {uri} is unreachable")
                assert "MLFLOW_TRACKING_URI" in stderr
                assert "launching 2 processes" not in stdout
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert not (repo / "mlflow.db").exists() and not (repo / "checkpoints").exists()


def test_nan_loss_stops_training_and_keeps_the_previous_model(built_repo, tmp_path):
    before = snapshot(built_repo)
    result = stage(
        built_repo, "train_teacher", smoke_params(teacher={"lr": 1e30, "grad_clip": 0}), tmp=tmp_path
    )
    assert_one_clear_error(result, "loss became", "Lower the learning rate")
    assert snapshot(built_repo) == before


def test_corrupt_imagefolder_is_named_and_existing_data_kept(built_repo, tmp_path):
    root = tmp_path / "mydata"
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (root / "train" / "b" / "1.png").write_bytes(b"not a png")
    before = snapshot(built_repo)
    params = smoke_params(data={"classification": {"source": "imagefolder", "path": str(root)}})
    result = stage(built_repo, "prepare", params, tmp=tmp_path)
    assert_one_clear_error(result, "train/b/1.png")
    assert snapshot(built_repo) == before


def test_malformed_coco_entries_are_listed(built_repo, tmp_path):
    images = tmp_path / "coco_images"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.png")
    good = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    bad = json.loads(json.dumps(good))
    bad["annotations"][0]["category_id"] = 7
    bad["images"].append({"id": 2, "file_name": "../../etc/passwd", "width": 10, "height": 10})
    for name, content in (("good.json", good), ("bad.json", bad)):
        (tmp_path / name).write_text(json.dumps(content))
    splits = {"train": "bad.json", "val": "good.json", "test": "good.json"}
    coco = {s: {"annotations": str(tmp_path / f), "images": str(images)} for s, f in splits.items()}
    before = snapshot(built_repo)
    result = stage(
        built_repo,
        "prepare",
        smoke_params(data={"detection": {"source": "coco", "coco": coco}}),
        tmp=tmp_path,
    )
    assert_one_clear_error(result, "bad.json", "category_id 7", "../../etc/passwd")
    assert snapshot(built_repo) == before


def test_bad_detection_params_and_variant_stop_train_detr_with_one_message(tmp_path):
    repo = make_pipeline_repo(tmp_path / "detr")
    params_file = tmp_path / "bad-params.yaml"
    params_file.write_text(yaml.safe_dump(smoke_params(deformable={"hidden_dim": 48})))
    result = run(
        [sys.executable, "-m", "stages.train_detr", "deformable", "--params", str(params_file)], repo
    )
    assert_one_clear_error(
        result, "bad-params.yaml", "deformable.hidden_dim: Input should be a multiple of 32"
    )
    assert "error: [train_detr@deformable]" in result.stderr
    assert not (repo / "checkpoints").exists() and not (repo / "artifacts").exists()

    unknown = run([sys.executable, "-m", "stages.train_detr", "yolo"], repo)
    assert unknown.returncode == 2
    assert "invalid choice: 'yolo'" in unknown.stderr


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"tau": 0}, "deit.tau: Input should be greater than 0"),
        ({"alpha": 2}, "deit.alpha: Input should be less than or equal to 1"),
        ({"depth": 3, "num_heads": 5}, "embed_dim 96 is not divisible by num_heads 5"),
    ],
)
def test_bad_deit_params_stop_the_student_with_one_message(tmp_path, override, needle):
    """Schema errors and a model shape the preset cannot take, before any data is read."""
    repo = make_pipeline_repo(tmp_path / "repo")
    params_file = tmp_path / "bad-params.yaml"
    params_file.write_text(yaml.safe_dump(smoke_params(deit=override)))
    result = run([sys.executable, "-m", "stages.distill_deit", "hard", "--params", str(params_file)], repo)
    assert_one_clear_error(result, "[distill_deit@hard]", needle)
    assert not (repo / "artifacts").exists()
