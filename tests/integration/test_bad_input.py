"""Bad input from the command line, as a user gives it: every case ends in one ``error: [stage] …``
line and exit code 2, quickly and in little memory, with nothing half-written.

Each attempt is measured: its CPU time must stay within ``CPU_LIMIT_S`` (the wall time follows it
on an idle machine; a shared one only stretches it, so a hang is caught by ``WALL_TIMEOUT_S``) and
the peak memory of its whole process tree within ``MEMORY_LIMIT``. Independent attempts run side by
side, a few at a time: each spends most of its seconds importing torch and MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import make_pipeline_repo, smoke_params
from tests.readonly import read_only
from vitkit.engine.device import usable_cpus

pytestmark = pytest.mark.integration

CPU_LIMIT_S = 30.0
WALL_TIMEOUT_S = 300.0
MEMORY_LIMIT = 2 * 2**30
SIDE_BY_SIDE = 4


@dataclass
class Attempt:
    """What one command did: its exit code and output, and what it cost."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    peak_rss: int  # bytes, the most the whole process tree held at once (sampled), or the largest process

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: [")]


def attempt(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> Attempt:
    """Run ``command`` in its own session; measure wall and CPU time and the tree's peak memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        peak, done = 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(process.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
                except psutil.Error:
                    pass
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.monotonic() + WALL_TIMEOUT_S
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(process.pid, 9)
                os.wait4(process.pid, 0)
                pytest.fail(f"{' '.join(command)} still ran after {WALL_TIMEOUT_S:.0f} s (a hang?)")
            time.sleep(0.05)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Attempt(
            command,
            process.returncode,
            out.read(),
            err.read(),
            wall,
            usage.ru_utime + usage.ru_stime,
            max(peak, usage.ru_maxrss * 1024),
        )


def side_by_side(jobs: dict[str, tuple[list[str], Path]]) -> dict[str, Attempt]:
    """Run the named commands, ``SIDE_BY_SIDE`` at a time; their attempts by name."""
    with ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        futures = {name: pool.submit(attempt, command, cwd) for name, (command, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_refused(result: Attempt, *needles: str) -> None:
    """Exit 2 with one ``error: [stage]`` line holding every needle; no traceback; cheap enough."""
    shown = f"{' '.join(result.command)}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 2, shown
    assert len(result.errors) == 1, shown
    assert "Traceback" not in result.stderr, shown
    for needle in needles:
        assert needle in result.stderr, shown
    assert result.cpu_s <= CPU_LIMIT_S, f"{result.cpu_s:.1f} s of CPU\n{shown}"
    assert result.peak_rss < MEMORY_LIMIT, f"{result.peak_rss / 2**30:.2f} GiB at the peak\n{shown}"


def stage(name: str, params: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}", *args, "--params", str(params)]


def write(folder: Path, name: str, params: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def outputs(repo: Path) -> dict[str, int]:
    """mtime of every file under the pipeline's output and state folders."""
    folders = ("data", "artifacts", "metrics", "plots", "reports", "checkpoints")
    return {str(p): p.stat().st_mtime_ns for f in folders for p in (repo / f).rglob("*") if p.is_file()}


# ---------------------------------------------------------------------- params: before anything starts


def test_bad_params_and_counts_beyond_the_machine(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo")
    too_many = 64 if usable_cpus() < 64 else 1024  # more processes than this machine has cores
    if torch.cuda.is_available() and torch.cuda.device_count() >= too_many:
        pytest.skip("this machine has as many GPUs as the test asks processes for")
    dup = (repo / "params.yaml").read_text() + "teacher: {epochs: 1}\n"  # a second teacher section
    (tmp_path / "dup.yaml").write_text(dup)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(
        (repo / "params.yaml").read_bytes().replace(b"experiment: vitkit", b"experiment: caf\xe9")
    )
    files = {
        "nproc": write(tmp_path, "nproc.yaml", smoke_params(engine={"nproc": too_many})),
        "num_workers": write(tmp_path, "num_workers.yaml", smoke_params(engine={"num_workers": 1000})),
        "workers": write(tmp_path, "workers.yaml", smoke_params(data={"workers": 100_000})),
        "num_queries": write(tmp_path, "queries.yaml", smoke_params(detr={"num_queries": 1e9})),
        "seed": write(tmp_path, "seed.yaml", smoke_params(seed=2**32)),
    }
    jobs = {
        "nproc": stage("train_teacher", files["nproc"]),
        "num_workers": stage("train_teacher", files["num_workers"]),
        "workers": stage("prepare", files["workers"]),
        "num_queries": stage("train_detr", files["num_queries"], "detr"),
        "seed": stage("prepare", files["seed"]),
        "duplicate keys": stage("train_teacher", tmp_path / "dup.yaml"),
        "not UTF-8": stage("prepare", latin1),
        "a folder": stage("prepare", tmp_path),
    }
    results = side_by_side({name: (command, repo) for name, command in jobs.items()})
    assert_refused(results["nproc"], f"engine.nproc is {too_many}: {too_many} processes on this machine")
    assert "launching" not in results["nproc"].stdout  # refused before torchrun starts anything
    assert_refused(results["num_workers"], "engine.num_workers is 1000 but this machine has")
    assert_refused(results["workers"], "data.workers: Input should be less than or equal to 1024")
    assert_refused(results["num_queries"], "detr.num_queries: Input should be less than or equal to 2048")
    assert_refused(results["seed"], "seed: Input should be less than or equal to 4294967295")
    lines = dup.splitlines()
    first = 1 + next(i for i, line in enumerate(lines) if line.startswith("teacher:"))
    assert_refused(
        results["duplicate keys"], f"duplicate key 'teacher' on line {len(lines)} (first on line {first})"
    )
    assert_refused(results["not UTF-8"], "not UTF-8 text (byte 0xe9 on line")
    assert_refused(results["a folder"], f"{tmp_path}: is a folder, not a params file")
    assert not any((repo / f).exists() for f in ("data", "artifacts", "checkpoints", "mlflow.db"))


# ---------------------------------------------------------------------- data: validated before writing


def _image(path: Path, size: tuple[int, int] = (48, 40), value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _imagefolder(root: Path) -> Path:
    for split in ("train", "val", "test"):
        for k, name in enumerate(("a", "b")):
            for i in range(2):
                _image(root / split / name / f"{i}.png", value=40 * k + 10 * i)
    return root


def _coco(folder: Path, categories: list[tuple[int, str]], annotated: list[object]) -> dict[str, str]:
    """A COCO split in ``folder``: one image per annotation, the annotation's category as given."""
    images = folder / "images"
    data: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    for i, category in enumerate(annotated, start=1):
        _image(images / f"{i}.png", (64, 48))
        data["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
        data["annotations"].append(
            {
                "id": i,
                "image_id": i,
                "category_id": category,
                "bbox": [4, 4, 20, 16],
                "area": 320,
                "iscrowd": 0,
            }
        )
    data["categories"] = [{"id": c, "name": n} for c, n in categories]
    (folder / "annotations.json").write_text(json.dumps(data))
    return {"annotations": str(folder / "annotations.json"), "images": str(images)}


def test_bad_data_is_refused_before_prepare_writes_anything(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo")
    # the stages below run side by side and open MLflow before they read data: create the store
    # once, as one stage would, so they do not race to create it
    create = (
        "from pathlib import Path; from vitkit import tracking as t; "
        "t.open_experiment(t.tracking_uri(Path()), 'vitkit', Path())"
    )
    subprocess.run([sys.executable, "-c", create], cwd=repo, check=True, capture_output=True)
    shapes = [(1, "ring"), (2, "box")]
    good = {s: _coco(tmp_path / f"good-{s}", shapes, [1, 2]) for s in ("train", "val", "test")}
    huge = dict(
        good, train=_coco(tmp_path / "huge", [(1, "ring"), (2_000_000_000, "box")], [1, 2_000_000_000])
    )
    boolean = dict(good, train=_coco(tmp_path / "bool", shapes, [1, True]))
    unseen = dict(good, val=_coco(tmp_path / "unseen", [*shapes, (3, "star")], [1, 3]))

    fifo_root = _imagefolder(tmp_path / "fifo")
    os.mkfifo(fifo_root / "train" / "a" / "2.png")  # a named pipe among the images: opening it would hang
    escaping_root = _imagefolder(tmp_path / "escaping")
    _image(tmp_path / "secret.png")
    (escaping_root / "val" / "b" / "2.png").symlink_to(tmp_path / "secret.png")

    def detection(coco: dict) -> dict:
        return smoke_params(data={"detection": {"source": "coco", "coco": coco}})

    def classification(root: Path) -> dict:
        return smoke_params(data={"classification": {"source": "imagefolder", "path": str(root)}})

    cases = {
        "category_id 2e9": detection(huge),
        "category_id true": detection(boolean),
        "val category missing from train": detection(unseen),
        "named pipe": classification(fifo_root),
        "symlink escaping": classification(escaping_root),
    }
    jobs = {
        name: (stage("prepare", write(tmp_path, f"{i}.yaml", p)), repo)
        for i, (name, p) in enumerate(cases.items())
    }
    results = side_by_side(jobs)
    assert_refused(
        results["category_id 2e9"], "categories[1] (id 2000000000): ids must be in [0, 9999]", "class indices"
    )
    assert_refused(results["category_id true"], "category_id must be an integer, got True")
    assert_refused(
        results["val category missing from train"],
        "val categories[2] (id 3, 'star'): not a category of the train split",
    )
    assert_refused(
        results["named pipe"], f"{fifo_root}/train/a/2.png: a named pipe (FIFO), not an image file"
    )
    assert_refused(
        results["symlink escaping"],
        f"{escaping_root}/val/b/2.png: symbolic link to {tmp_path / 'secret.png'}, outside the root",
    )
    assert outputs(repo) == {}


# ---------------------------------------------------------------------- checkpoints and read-only state


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A smoke repo with its data prepared (and an MLflow store), the teacher set to train from scratch."""
    repo = make_pipeline_repo(
        tmp_path_factory.mktemp("prepared") / "repo", smoke_params(teacher={"init": "scratch"})
    )
    result = attempt([sys.executable, "-m", "stages.prepare"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return repo


def _copy(repo: Path, to: Path) -> Path:
    shutil.copytree(repo, to, symlinks=True)
    return to


def _checkpoint(repo: Path, kind: str) -> Path:
    path = repo / "checkpoints" / "teacher" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    good = repo / "good.pt"
    torch.save({"fingerprint": "x", "model": {"w": torch.zeros(1000)}}, good)
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:1000])
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # unpickling it would run a shell command that leaves a marker
        path.write_bytes(_malicious_checkpoint(repo / "PWNED"))
    good.unlink()
    return path


def _malicious_checkpoint(marker: Path) -> bytes:
    code = (
        "import io, os, torch\n"
        "class P:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        "buffer = io.BytesIO(); torch.save({'fingerprint': 'x', 'model': P()}, buffer)\n"
        "import sys; sys.stdout.buffer.write(buffer.getvalue())\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout


def test_broken_checkpoints_and_read_only_state_stop_the_stage_with_one_line(prepared, tmp_path):
    repos = {name: _copy(prepared, tmp_path / name.replace(" ", "-")) for name in (
        "truncated", "empty", "malicious", "read-only checkpoints", "read-only mlflow.db", "release folder"
    )}  # fmt: skip
    checkpoints = {kind: _checkpoint(repos[kind], kind) for kind in ("truncated", "empty", "malicious")}
    (repos["read-only checkpoints"] / "checkpoints" / "teacher").mkdir(parents=True)
    release = write(
        tmp_path,
        "release.yaml",
        smoke_params(detr_training={"init": "scratch", "release_checkpoint": str(tmp_path)}),
    )
    jobs = {name: ([sys.executable, "-m", "stages.train_teacher"], repo) for name, repo in repos.items()}
    jobs["release folder"] = (stage("train_detr", release, "detr"), repos["release folder"])
    before = {name: outputs(repo) for name, repo in repos.items()}
    with (
        read_only(repos["read-only checkpoints"] / "checkpoints" / "teacher"),
        read_only(repos["read-only mlflow.db"] / "mlflow.db"),
    ):
        results = side_by_side(jobs)
    for kind, path in checkpoints.items():
        reason = {
            "truncated": "it is truncated or corrupt",
            "empty": "it is empty",
            "malicious": "it refers to posix.system, which is code, not weights: refused",
        }[kind]
        assert_refused(
            results[kind], f"[train_teacher] checkpoint {path} cannot be read: {reason}", f"(rm {path})"
        )
        assert "weights_only" not in results[kind].stderr + results[kind].stdout
        assert "teacher 1/" not in results[kind].stderr + results[kind].stdout  # no training step
    assert not (repos["malicious"] / "PWNED").exists()
    checkpoint_dir = repos["read-only checkpoints"] / "checkpoints" / "teacher"
    assert_refused(results["read-only checkpoints"], f"cannot write to {checkpoint_dir}")
    db = repos["read-only mlflow.db"] / "mlflow.db"
    assert_refused(results["read-only mlflow.db"], f"MLflow database {db} is not writable")
    assert_refused(
        results["release folder"],
        f"[train_detr@detr] DETR checkpoint {tmp_path} is a folder, not a file",
        "detr_training.release_checkpoint",
    )
    assert {name: outputs(repo) for name, repo in repos.items()} == before  # nothing written, nothing lost
