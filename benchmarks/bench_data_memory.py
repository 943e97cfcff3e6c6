"""Peak memory of the data path against the dataset size, and throughput on the default data.

Memory (the default mode): for each ``--sizes`` N, an ImageFolder of N training images of
``--image-size`` px (blocky random images, PNG, written in parallel; 10 val and 10 test images
per class) and an image folder of the same N images (hard links, no extra disk) are ingested by
``prepare`` in a temporary repository, then ``train_teacher`` (ImageFolder train split) and
``pretrain_ssl`` (unlabelled pool) run for one epoch of ``--steps`` steps on them. Each stage runs
as its own process; the process tree (the stage and its DataLoader workers) is sampled every
0.2 s with psutil: the peak of its summed RSS, the peak of its summed PSS (shared pages split
between the processes that map them: forked workers share the libraries and any cache), and the
largest single process's RSS (``os.wait4``'s ``ru_maxrss``). ``pretrain_ssl``'s kNN monitor
reads the classification *train* split as its memory bank; so that only the unlabelled pool
scales, its repository links both the kNN memory and queries to the small val split.

    python benchmarks/bench_data_memory.py --sizes 5000 100000 --cache-mb 0 --out mem.json

Throughput (``--throughput``): ``train_teacher`` and ``pretrain_ssl`` for one epoch of the
default profile on the default (generated) data, ``--repeats`` times per code tree, the trees
alternating (``--code`` names them, e.g. an export of the previous commit; default: this tree);
each run's images/s (the median over its epoch, from ``metrics/<key>_timing.json``), wall
time and metrics (equal across trees when they read the same pixels in the same order); the
medians are compared. The default data is small and is held in memory by
``data.cache_mb``.

    python benchmarks/bench_data_memory.py --throughput --code /tmp/before . --repeats 3

``--train-per-class`` and ``--unlabeled`` shorten the epochs with fewer images of the same kind
(a busy machine); images/s does not depend on the count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import psutil
import torch
import yaml
from torchvision.io import write_png

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 6
EVAL_PER_CLASS = 10
BLOCK = 16  # px per random block: the PNGs stay small on disk (~2 KB at 128 px)
STAGE_TIMEOUT_S = 3600


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def _write_images(job: tuple[Path, list[int], int]) -> None:
    folder, indices, size = job
    folder.mkdir(parents=True, exist_ok=True)
    for index in indices:
        generator = torch.Generator().manual_seed(index)
        blocks = torch.randint(
            0, 256, (3, size // BLOCK, size // BLOCK), dtype=torch.uint8, generator=generator
        )
        image = blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
        write_png(image, str(folder / f"{index:07d}.png"))


def build_raw_data(root: Path, train_images: int, size: int, workers: int) -> tuple[Path, Path]:
    """An ImageFolder (train/val/test) and a flat folder holding the train images again (hard links)."""
    imagefolder, pool = root / "imagefolder", root / "pool"
    jobs, start = [], 0
    counts = {"train": train_images, "val": EVAL_PER_CLASS * CLASSES, "test": EVAL_PER_CLASS * CLASSES}
    for split, count in counts.items():
        for label in range(CLASSES):
            share = count // CLASSES + (label < count % CLASSES)
            indices = list(range(start, start + share))
            start += share
            for chunk in range(0, share, 1000):
                jobs.append((imagefolder / split / f"c{label}", indices[chunk : chunk + 1000], size))
    with Pool(workers) as processes:
        processes.map(_write_images, jobs)
    pool.mkdir()
    for class_dir in sorted((imagefolder / "train").iterdir()):
        for image in class_dir.iterdir():
            os.link(image, pool / f"{class_dir.name}_{image.name}")
    return imagefolder, pool


def measure(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``; its wall time, the peaks of its process tree's summed RSS and PSS, in MB."""
    peak_rss = peak_pss = 0
    next_pss = 0.0
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    root = psutil.Process(process.pid)
    try:
        while not (reaped := os.wait4(process.pid, os.WNOHANG))[0]:
            rss, pss = 0, 0
            sample_pss = time.perf_counter() >= next_pss
            for member in _tree(root):
                try:
                    if sample_pss:
                        info = member.memory_full_info()
                        rss, pss = rss + info.rss, pss + info.pss
                    else:
                        rss += member.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            peak_rss = max(peak_rss, rss)
            if sample_pss:
                peak_pss, next_pss = max(peak_pss, pss), time.perf_counter() + 1.0
            if time.perf_counter() - start > STAGE_TIMEOUT_S:
                process.kill()
            time.sleep(0.2)
    except BaseException:
        process.kill()
        process.wait()
        raise
    _, status, usage = reaped
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({process.returncode}); see {log}:\n{tail}")
    return {
        "wall_s": time.perf_counter() - start,
        "tree_rss_mb": peak_rss / 2**20,
        "tree_pss_mb": peak_pss / 2**20,
        "largest_process_rss_mb": usage.ru_maxrss / 1024,
    }


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stage_env(code: Path, repo: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(code),
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "VITKIT_PROGRESS": "0",
    }


def run_stage(stage: str, repo: Path, code: Path, tag: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", f"stages.{stage}", "--params", str(repo / "params.yaml")]
    return measure(cmd, repo, stage_env(code, repo), repo / f"{tag}-{stage}.log")


def write_params(repo: Path, code: Path, overrides: dict) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    params = deep_merge(yaml.safe_load((code / "params.yaml").read_text()), overrides)
    if "min_steps" in params["engine"]:  # the epochs as given: every run times the same steps
        params["engine"]["min_steps"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def memory(args: argparse.Namespace, work: Path) -> dict:
    results = {}
    for size in args.sizes:
        raw, repo, ssl_repo = work / f"raw-{size}", work / f"repo-{size}", work / f"ssl-{size}"
        if args.reuse_data and (args.reuse_data / f"raw-{size}").is_dir():  # written by an earlier run
            raw = args.reuse_data / f"raw-{size}"
            imagefolder, pool = raw / "imagefolder", raw / "pool"
        else:
            started = time.perf_counter()
            imagefolder, pool = build_raw_data(raw, size, args.image_size, args.workers)
            print(
                f"{size} images of {args.image_size} px written in {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        overrides = {
            "engine": {"num_workers": args.workers, "max_steps_per_epoch": args.steps},
            "data": {
                "cache_mb": args.cache_mb,
                "classification": {
                    "source": "imagefolder",
                    "path": str(imagefolder),
                    "image_size": args.image_size,
                },
                "unlabeled": {"source": "folder", "path": str(pool)},
                "detection": {"shapes": {"train_images": 8, "val_images": 4, "test_images": 4}},
            },
            "teacher": {"init": "scratch", "epochs": 1, "batch_size": args.batch_size},
            "ssl": {"epochs": 1, "batch_size": args.batch_size},
        }
        write_params(repo, ROOT, overrides)
        if args.skip_prepare:  # the generated folders already have prepare's layout and image size
            (repo / "data" / "unlabeled").mkdir(parents=True)
            (repo / "data" / "classification").symlink_to(imagefolder)
            (repo / "data" / "unlabeled" / "images").symlink_to(pool)
            row = {}
        else:
            row = {"prepare": run_stage("prepare", repo, ROOT, str(size))}
            if not args.reuse_data:
                shutil.rmtree(raw)  # ingested: only the prepared copy is read from here on
        row["train_teacher"] = run_stage("train_teacher", repo, ROOT, str(size))
        write_params(ssl_repo, ROOT, overrides)
        (ssl_repo / "data" / "classification").mkdir(parents=True)
        (ssl_repo / "data" / "unlabeled").symlink_to(repo / "data" / "unlabeled")
        for split in ("train", "val"):  # the kNN monitor's memory and queries: the small val split
            (ssl_repo / "data" / "classification" / split).symlink_to(
                repo / "data" / "classification" / "val"
            )
        row["pretrain_ssl"] = run_stage("pretrain_ssl", ssl_repo, ROOT, str(size))
        results[size] = row
        for stage, numbers in row.items():
            print(
                f"{size:>7} {stage:<14} " + "  ".join(f"{k} {v:.0f}" for k, v in numbers.items()), flush=True
            )
        shutil.rmtree(repo)
        shutil.rmtree(ssl_repo)
    return results


def throughput(args: argparse.Namespace, work: Path) -> dict:
    codes = [Path(code).resolve() for code in args.code]
    repo = work / "default"
    overrides: dict = {"teacher": {"init": "scratch", "epochs": 1}, "ssl": {"epochs": 1}}
    if args.train_per_class:  # fewer images of the same kind (32 px shapes, held in memory): shorter epochs
        classification = {"shapes": {"train_per_class": args.train_per_class}}
        overrides["data"] = {
            "classification": classification,
            "unlabeled": {"shapes": {"images": args.unlabeled}},
            "detection": {"shapes": {"train_images": 16, "val_images": 8, "test_images": 8}},  # not read
        }
    write_params(repo, codes[-1], overrides)
    run_stage("prepare", repo, codes[-1], "default")
    runs: dict[str, dict[str, list[dict]]] = {
        str(c): {"train_teacher": [], "pretrain_ssl": []} for c in codes
    }
    for repeat in range(args.repeats):
        for code in codes:
            write_params(repo, code, overrides)
            for stage, key in (("train_teacher", "teacher"), ("pretrain_ssl", "ssl")):
                shutil.rmtree(repo / "checkpoints", ignore_errors=True)
                numbers = run_stage(stage, repo, code, f"{repeat}-{code.name}")
                timing = json.loads((repo / "metrics" / f"{key}_timing.json").read_text())
                numbers["images_per_s"] = timing["images_per_s"]
                # what the stage learnt: the same data and seed must give the same numbers in every tree
                numbers["metrics"] = json.loads((repo / "metrics" / f"{key}.json").read_text())
                runs[str(code)][stage].append(numbers)
                print(
                    f"{code} {stage}: {numbers['images_per_s']:.0f} images/s, {numbers['wall_s']:.0f}s, "
                    f"metrics {numbers['metrics']}",
                    flush=True,
                )
    summary = {
        code: {
            stage: {
                key: statistics.median(r[key] for r in rows)
                for key in ("images_per_s", "wall_s", "tree_rss_mb")
            }
            for stage, rows in stages.items()
        }
        for code, stages in runs.items()
    }
    return {"runs": runs, "median": summary}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 100_000])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps of each training (one epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-mb", type=int, default=0, help="data.cache_mb of the memory runs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers and image writers")
    parser.add_argument(
        "--skip-prepare",
        action="store_true",
        help="train on the generated folders as they are (prepare's layout and size): no ingest measured",
    )
    parser.add_argument(
        "--reuse-data", type=Path, default=None, help="take raw-<N>/ from here when it exists (kept)"
    )
    parser.add_argument("--throughput", action="store_true", help="default-data throughput instead")
    parser.add_argument("--code", nargs="+", default=[str(ROOT)], help="code trees to compare (--throughput)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=0, help="--throughput: fewer train images")
    parser.add_argument("--unlabeled", type=int, default=10_000, help="--throughput: with --train-per-class")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the data goes (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-data-") as tmp:
        results = throughput(args, Path(tmp)) if args.throughput else memory(args, Path(tmp))
    text = json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
