"""COCO box AP with pycocotools, the reference implementation every detection paper reports.

pycocotools prints progress and its summary table to stdout; here that is
captured so stages stay quiet, and the table is passed to ``logging`` (logger
``vitkit.evaluation.coco``, level INFO) for whoever wants to see it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vitkit.io import atomic_path

logger = logging.getLogger(__name__)

# The order of ``COCOeval.stats``. AP is averaged over IoU 0.50:0.95; s/m/l are areas < 32², < 96², larger;
# AR@k allows k detections per image. A value is -1 where no ground truth falls in that area range.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _empty_detections(coco_gt: COCO) -> COCO:
    """A results set with no detections (``COCO.loadRes`` cannot build one from an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": copy.deepcopy(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def matched_evaluator(coco_gt: COCO, results: list[dict]) -> COCOeval:
    """A bbox ``COCOeval`` of ``results`` against ``coco_gt`` after ``evaluate()``: every image's
    detections matched to its ground truth (``evalImgs``), nothing accumulated yet. Quiet."""
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds keys (area, id, segmentation) to the dicts it is given: hand it copies.
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_detections(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
    return evaluator


def evaluate_coco(coco_gt: COCO, results: list[dict]) -> dict[str, float]:
    """Box AP / AR of COCO-format ``results`` (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
    ``score``) against ``coco_gt``; keys are ``METRIC_NAMES``. No results score 0, not an error."""
    evaluator = matched_evaluator(coco_gt, results)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        evaluator.accumulate()
        evaluator.summarize()
    summary = printed.getvalue()
    logger.info("COCO bbox evaluation:\n%s", summary[summary.find(" Average Precision") :])
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats, strict=True)}


def write_results_json(results: list[dict], path: Path) -> None:
    """Write COCO results as the JSON list pycocotools' ``loadRes`` reads, atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(results))
