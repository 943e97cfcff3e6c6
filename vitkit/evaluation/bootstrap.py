"""Is a difference between two models on the same test images real? A paired bootstrap says.

A test split is one sample of images: two models scored on it differ partly by chance, by which
images happened to be drawn. Resampling the test images with replacement, the *same* resample for
both models (a paired bootstrap), shows how much their difference would move on another split of
that size. Its interval (BCa, ``scipy.stats.bootstrap``) either excludes 0, and the difference is
real at that confidence, or contains it, and the split cannot tell the two models apart.

- **Top-1** is a mean over images of per-image correctness: the statistic is the difference of
  the two means, bootstrapped with ``paired=True``.
- **COCO AP** is no mean over images, so every resample recomputes AP itself. Matching detections to
  ground truth happens within an image, so pycocotools' ``evaluate()`` runs once per model; a
  resample only changes how many times each image counts, and ``weighted_ap`` recomputes AP from the
  stored matches with those counts as weights (``COCOeval.accumulate``'s 101-point interpolated
  precision, vectorised over resamples). With every weight 1 it is pycocotools' AP, and with integer
  weights pycocotools' AP on a split holding each image that many times (both tested). Only the
  true positives are visited (``ThresholdMatches``), so a resample costs per category and IoU
  threshold a few products of (resamples x images x true positives). Measured on 200 images with
  100 detections each (the default data's detection test split), two detectors: 1 000 resamples in
  1.5 s of CPU, pycocotools' matching included, where one pycocotools run per resample takes
  ~0.6 s, 10 minutes in all.

No correction for testing several differences at once: with five comparisons at 95 %, one "real"
verdict in a run can be chance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO
from scipy.stats import bootstrap
from threadpoolctl import threadpool_limits

from vitkit.evaluation.coco import matched_evaluator

REAL = "difference real"
NOISE = "within noise"
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval.params.recThrs


@dataclass(frozen=True)
class PairedDifference:
    """``score_a - score_b`` of two models on the same test images, with its bootstrap interval."""

    score_a: float
    score_b: float
    low: float
    high: float
    confidence_level: float
    images: int
    distribution: np.ndarray = field(repr=False)  # the resampled differences, for figures

    @property
    def difference(self) -> float:
        return self.score_a - self.score_b

    @property
    def verdict(self) -> str:
        return REAL if self.low > 0 or self.high < 0 else NOISE


def _interval(data: tuple[np.ndarray, ...], statistic, paired: bool, resamples: int, level: float, seed: int):
    """BCa interval of ``statistic`` and the bootstrap distribution. A distribution with one value
    (identical predictions: every resample gives the same difference) is its own interval; BCa,
    which divides by its spread, would answer NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning: handled below
        result = bootstrap(
            data,
            statistic,
            n_resamples=resamples,
            batch=min(resamples, 100),
            vectorized=True,
            paired=paired,
            confidence_level=level,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    distribution = result.bootstrap_distribution
    low, high = result.confidence_interval
    if np.ptp(distribution) == 0 or not (np.isfinite(low) and np.isfinite(high)):
        low = high = float(np.median(distribution))
    return float(low), float(high), distribution


def accuracy_difference(
    correct_a: np.ndarray, correct_b: np.ndarray, resamples: int, confidence_level: float, seed: int
) -> PairedDifference:
    """Top-1 of model A minus top-1 of model B, from per-image correctness (0/1, same image order)."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(
            f"need two equal-length 1-D correctness arrays of 2+ images, got {a.shape}, {b.shape}"
        )

    def mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return x.mean(axis=axis) - y.mean(axis=axis)

    low, high, distribution = _interval((a, b), mean_difference, True, resamples, confidence_level, seed)
    return PairedDifference(a.mean(), b.mean(), low, high, confidence_level, a.size, distribution)


@dataclass(frozen=True)
class ThresholdMatches:
    """One category's true positives at one IoU threshold, detections by descending score.

    Interpolated precision at a recall level is the best precision at or beyond it, and precision
    only peaks at a true positive (a false positive lowers it, an ignored detection keeps it), so
    AP needs the cumulative counts at the true positives alone: a few per ground-truth box instead
    of one per detection. The false positives before each true positive are counted per image, so
    that any weighting of the images gives them by one matrix product.
    """

    image: np.ndarray  # (K,) the image of each true positive
    false_before: np.ndarray  # (K, I) false positives of image i ranked above true positive k


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections over the test images, matched as ``COCOeval.accumulate`` reads them."""

    thresholds: list[ThresholdMatches]  # per IoU threshold (COCOeval.params.iouThrs)
    ground_truth: np.ndarray  # (I,) not-ignored ground-truth boxes per image


def coco_matches(coco_gt: COCO, results: list[dict]) -> list[CategoryMatches]:
    """Every category's detections matched to ground truth (area "all", at most ``maxDets[-1]`` per
    image), in the images' order of ``coco_gt.getImgIds()``: ``weighted_ap``'s input."""
    evaluator = matched_evaluator(coco_gt, results)
    p = evaluator.params
    images, max_det, thresholds = len(p.imgIds), p.maxDets[-1], len(p.iouThrs)
    per_category = len(p.areaRng) * images  # evalImgs: category-major, then area range, then image
    matches = []
    for k in range(len(p.catIds)):
        found = [
            (i, e)
            for i, e in enumerate(evaluator.evalImgs[k * per_category : k * per_category + images])
            if e
        ]
        empty = [np.zeros((thresholds, 0))]
        scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for _, e in found] or [np.zeros(0)])
        image = np.concatenate(
            [np.full(min(len(e["dtScores"]), max_det), i) for i, e in found] or [np.zeros(0)]
        ).astype(int)
        matched = np.concatenate([e["dtMatches"][:, :max_det] for _, e in found] or empty, 1)
        ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in found] or empty, 1)
        order = np.argsort(-scores, kind="mergesort")  # as accumulate() sorts them
        image, matched, counted = image[order], matched[:, order] != 0, np.logical_not(ignored[:, order])
        ground_truth = np.zeros(images)
        for i, e in found:
            ground_truth[i] = np.count_nonzero(np.logical_not(e["gtIgnore"]))
        per_threshold = []
        for t in range(thresholds):
            true = np.flatnonzero(matched[t] & counted[t])
            false = np.flatnonzero(~matched[t] & counted[t])
            # a false positive at rank r counts for every true positive ranked below it
            before = np.zeros((len(true) + 1, images))
            np.add.at(before, (np.searchsorted(true, false), image[false]), 1.0)
            per_threshold.append(ThresholdMatches(image[true], np.cumsum(before, axis=0)[:-1]))
        matches.append(CategoryMatches(per_threshold, ground_truth))
    return matches


def weighted_ap(matches: list[CategoryMatches], weights: np.ndarray) -> np.ndarray:
    """COCO AP (IoU .50:.95, area all) of each row of ``weights`` (B, I): image i counted
    ``weights[b, i]`` times. Shape (B,).

    A category without ground truth in a weighting is left out of its mean, as pycocotools leaves
    it out; a weighting with no ground truth at all scores 0.
    """
    weights = np.atleast_2d(weights)
    per_category = []
    for m in matches:
        positives = weights @ m.ground_truth  # (B,)
        ap = np.zeros(weights.shape[0])
        for t in m.thresholds:
            tp = np.cumsum(weights[:, t.image], axis=1)  # (B, K)
            fp = weights @ t.false_before.T
            recall = tp / np.maximum(positives, 1e-12)[:, None]
            precision = tp / (tp + fp + np.spacing(1))
            precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # interpolated
            at = np.stack([np.searchsorted(r, RECALL_THRESHOLDS, side="left") for r in recall])
            at = at.reshape(len(recall), len(RECALL_THRESHOLDS))
            # a recall level never reached scores 0 (the padded column)
            ap += np.take_along_axis(np.pad(precision, ((0, 0), (0, 1))), at, axis=1).mean(axis=1)
        per_category.append(np.where(positives > 0, ap / len(m.thresholds), np.nan))
    stacked = np.stack(per_category) if per_category else np.full((1, weights.shape[0]), np.nan)
    counted = np.isfinite(stacked)
    total = np.where(counted, stacked, 0.0).sum(axis=0)
    return np.where(counted.any(axis=0), total / np.maximum(counted.sum(axis=0), 1), 0.0)


def ap_difference(
    coco_gt: COCO,
    results_a: list[dict],
    results_b: list[dict],
    resamples: int,
    confidence_level: float,
    seed: int,
) -> PairedDifference:
    """COCO AP of detector A minus that of detector B on the images of ``coco_gt``, resampled together."""
    a, b = coco_matches(coco_gt, results_a), coco_matches(coco_gt, results_b)
    images = len(coco_gt.getImgIds())
    if images < 2:
        raise ValueError(f"need 2+ test images for a bootstrap, the detection split has {images}")

    def ap_gap(drawn: np.ndarray, axis: int) -> np.ndarray | float:
        """AP(A) - AP(B) on resampled image indices: (n,) or a batch (m, n); ``axis`` is the last."""
        rows = np.atleast_2d(drawn)
        weights = np.zeros((rows.shape[0], images))
        np.add.at(weights, (np.arange(rows.shape[0])[:, None], rows), 1.0)
        gap = weighted_ap(a, weights) - weighted_ap(b, weights)
        return gap if drawn.ndim > 1 else float(gap[0])

    everyone = np.ones((1, images))
    # the products are small (a batch of resamples x images x true positives): BLAS threads only
    # add their overhead, and on a loaded CPU they made the bootstrap 5x slower
    with threadpool_limits(1, user_api="blas"):
        score_a, score_b = float(weighted_ap(a, everyone)[0]), float(weighted_ap(b, everyone)[0])
        low, high, distribution = _interval(
            (np.arange(images),), ap_gap, False, resamples, confidence_level, seed
        )
    return PairedDifference(score_a, score_b, low, high, confidence_level, images, distribution)
