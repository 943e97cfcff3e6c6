"""Every path the pipeline reads or writes, derived once from the stage name (and variant).

dvc.yaml writes the same paths in its own syntax; ``tests/unit/test_paths.py``
checks that the two agree. Paths are relative to the repository root.

A training stage's outputs sit under its key (``ssl``, ``teacher``,
``deit/<mode>``, ``detr/<arch>``): ``artifacts/<key>/model.pt``,
``checkpoints/<key>/``, ``metrics/<key>.json``, ``metrics/<key>_timing.json`` and
``plots/<key>/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
CLASSIFICATION = DATA / "classification"
DETECTION = DATA / "detection"
UNLABELED = DATA / "unlabeled"
UNLABELED_IMAGES = UNLABELED / "images"
DATASET_CARD = Path("reports/dataset_card.json")

STAGE_KEYS = {
    "prepare": "prepare",
    "pretrain_ssl": "ssl",
    "train_teacher": "teacher",
    "distill_deit": "deit",
    "train_detr": "detr",
    "evaluate": "evaluate",
    "report": "report",
}


@dataclass(frozen=True)
class StagePaths:
    """The outputs of one stage (or one variant of a foreach stage)."""

    key: str

    @property
    def model(self) -> Path:
        return Path("artifacts") / self.key / "model.pt"

    @property
    def checkpoints(self) -> Path:
        return Path("checkpoints") / self.key

    @property
    def metrics(self) -> Path:
        return Path("metrics") / f"{self.key}.json"

    @property
    def timing(self) -> Path:
        """Wall-clock measurements: apart from the metrics, as they differ on every run."""
        return Path("metrics") / f"{self.key}_timing.json"

    @property
    def plots(self) -> Path:
        return Path("plots") / self.key

    def plot(self, name: str) -> Path:
        return self.plots / name

    @property
    def history(self) -> Path:
        return self.plot("history.csv")

    @property
    def curves(self) -> Path:
        return self.plot("curves.png")

    def artifact(self, name: str) -> Path:
        return Path("artifacts") / self.key / name


def stage_paths(stage: str, variant: str | None = None) -> StagePaths:
    key = STAGE_KEYS[stage]
    return StagePaths(f"{key}/{variant}" if variant else key)


SSL = stage_paths("pretrain_ssl")
TEACHER = stage_paths("train_teacher")
EVALUATE = stage_paths("evaluate")
TEST_PREDICTIONS = EVALUATE.artifact("test_predictions.csv")  # each classifier's class per test image
REPORT = stage_paths("report")
REPORT_DIR = Path("reports/report")  # report.md, report.html and their figures: one DVC output


def detector_results(arch: str) -> Path:
    """The COCO results json of a detector on the test split, written by evaluate."""
    return EVALUATE.artifact(f"{arch}_test_results.json")
