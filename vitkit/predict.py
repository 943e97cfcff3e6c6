"""Run a trained model on image files: ``python -m vitkit.predict MODEL IMAGE... [--out DIR]``.

MODEL is anything ``mlflow.pyfunc.load_model`` takes: ``models:/vitkit-teacher@current`` (the
registry), ``runs:/<run id>/model`` (a stage's run) or a downloaded model folder. Runs and
registered models are looked up in ``$MLFLOW_TRACKING_URI``, else in ``mlflow.db`` of the current
folder (the pipeline's store, as the stages name it).

Writes under ``--out``:

- classifiers (teacher, DeiT students): ``predictions.csv``, one row per image: the image, the
  predicted class, its probability and every class's probability (``prob_<class>``);
- the SSL backbone: ``predictions.csv`` with the image and its embedding (``embedding_<i>``);
- detectors (DETR, Deformable DETR): ``detections.json``, COCO results (``image_id`` is the
  image's position on the command line, ``file_name`` its path; boxes ``[x, y, w, h]`` in
  pixels) and ``<image name>.boxes.png``, each image with its boxes drawn.

A model that cannot be loaded, a file that is not an image, an image of another size or mode
than the model takes: one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file written, no bars

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from torchvision.io import write_png
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from vitkit import serving, tracking
from vitkit.errors import USER_ERROR_EXIT_CODE, DataError, VitkitError
from vitkit.io import atomic_path, write_csv

DRAW_THRESHOLD = 0.3  # boxes drawn without --score-threshold: fewer than the results json keeps


def one_line(message: str) -> str:
    return " ".join(message.split())


def detections_json(frame: pd.DataFrame, images: list[Path]) -> list[dict]:
    """COCO result entries of the detector's output, with each image's file name beside its id."""
    results = []
    for image_id, (row, path) in enumerate(zip(frame.itertuples(), images, strict=True)):
        boxes = box_convert(torch.tensor(row.boxes).reshape(-1, 4), "xyxy", "xywh").tolist()
        for box, category, score in zip(boxes, row.category_ids, row.scores, strict=True):
            entry = {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            results.append(entry | {"file_name": str(path)})
    return results


def draw(frame: pd.DataFrame, images: list[Path], out: Path, threshold: float) -> None:
    """Each image with its boxes scoring at least ``threshold``, labelled ``name score``."""
    for row, path in zip(frame.itertuples(), images, strict=True):
        image = serving.decode(path.read_bytes(), str(path), None)
        keep = [i for i, score in enumerate(row.scores) if score >= threshold]
        boxes = torch.tensor([row.boxes[i] for i in keep]).reshape(-1, 4)
        labels = [f"{row.labels[i]} {row.scores[i]:.2f}" for i in keep]
        drawn = draw_bounding_boxes(image, boxes, labels, colors="red", width=1) if keep else image
        with atomic_path(out / f"{path.stem}.boxes.png") as tmp:
            write_png(drawn, str(tmp))


def predict(model_uri: str, images: list[Path], out: Path, score_threshold: float | None) -> list[Path]:
    """Run the model on ``images`` and write its outputs under ``out``; the files written."""
    mlflow.set_tracking_uri(tracking.tracking_uri(Path.cwd()))
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise DataError(f"cannot load model {model_uri}: {one_line(exc.message)}") from None
    except OSError as exc:
        raise DataError(f"cannot load model {model_uri}: {exc}") from None
    params = None if score_threshold is None else {"score_threshold": score_threshold}
    if params and not model.metadata.get_params_schema():
        raise DataError(f"{model_uri} is not a detector: --score-threshold applies to detectors only")
    try:
        frame = model.predict(pd.DataFrame({"path": [str(p) for p in images]}), params=params)
    except MlflowException as exc:
        raise DataError(one_line(exc.message)) from None
    out.mkdir(parents=True, exist_ok=True)
    if "boxes" in frame:
        target = out / "detections.json"
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(detections_json(frame, images), indent=1))
        draw(frame, images, out, DRAW_THRESHOLD if score_threshold is None else score_threshold)
        return [target, *(out / f"{p.stem}.boxes.png" for p in images)]
    if "embedding" in frame:
        vectors = pd.DataFrame(list(frame.pop("embedding"))).add_prefix("embedding_")
        frame = pd.concat([frame, vectors], axis=1)
    target = out / "predictions.csv"
    write_csv(target, pd.concat([pd.DataFrame({"image": [str(p) for p in images]}), frame], axis=1))
    return [target]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitkit.predict",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", help="model URI (models:/vitkit-teacher@current, runs:/<run id>/model) or model folder"
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG...)")
    parser.add_argument(
        "--out", type=Path, default=Path("predictions"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detectors: keep and draw boxes scoring above this (default: the model's threshold, as "
        f"evaluate scores it, in the json; boxes from {DRAW_THRESHOLD} drawn)",
    )
    args = parser.parse_args(argv)
    try:
        written = predict(args.model, args.images, args.out, args.score_threshold)
    except VitkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
