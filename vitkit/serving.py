"""The trained models as MLflow pyfunc models: image files or bytes in, labelled predictions out.

A user has images, not normalised NCHW arrays, and wants class names, not logits in an order only
the training code knows. So each model is logged as a ``mlflow.pyfunc`` model that carries
everything inference needs: the weights file (``model.pt``, read with ``weights_only=True``; its
meta holds the architecture, image size, classes or categories), the vitkit package as code (the
preprocessing ``evaluate`` uses) and, in its model config, the order in which to report classes.
A served model then needs nothing else.

Input, a DataFrame with one of two columns (``INPUT_SCHEMA``):

- ``image``: encoded image bytes (PNG, JPEG, ...); in the JSON ``mlflow models serve`` takes,
  base64 strings (``{"dataframe_split": {"columns": ["image"], "data": [["iVBOR..."]]}}``);
- ``path``: image files readable where the model runs.

Images must be 8-bit RGB; classifiers and the SSL backbone take the size they were trained at
(the prepare stage writes every image at it), detectors any size. Anything else is refused with
one message naming the image (an ``MlflowException``, which the scoring server answers with 400).

One wrapper per kind of model, each built around a *predictor factory* from the model's task
module, ``(state, meta, device, batch_size) -> predict``, where ``predict`` runs uint8 images
through the same preprocessing and model as ``evaluate``:

- ``ClassifierModel`` (teacher, DeiT students): ``label``, ``score`` and ``prob_<class>`` per class;
- ``EmbeddingModel`` (SSL backbone): ``embedding``, the L2-normalised pooled trunk features the
  kNN probe compares;
- ``DetectorModel`` (DETR, Deformable DETR): per image ``boxes`` (x1, y1, x2, y2 in pixels),
  ``labels`` (category names), ``scores``, ``category_ids``; the inference param
  ``score_threshold`` (default: the threshold ``evaluate`` scores with) drops weaker boxes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, encode_png

from vitkit.engine.checkpoint import load_weights
from vitkit.engine.device import select_device
from vitkit.errors import DataError

MODEL_NAME = "model"  # the logged model's name: ``runs:/<run id>/model`` finds it
ALIAS = "current"  # the registry alias moved to every newly logged version ("latest" is reserved by MLflow)
WEIGHTS = "weights"  # the artifact key of the model file
BATCH_SIZE = 256
INPUT_SCHEMA = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
CHANNELS = {1: "grayscale", 2: "grayscale with alpha", 3: "RGB", 4: "RGBA"}

# (state_dict, meta, device, batch_size) -> predict(uint8 images) -> model outputs
PredictorFactory = Callable[[dict[str, Tensor], dict, torch.device, int], Callable[..., Any]]


def decode(data: bytes, source: str, image_size: int | None) -> Tensor:
    """One encoded image as a (3, H, W) uint8 tensor; a ``DataError`` naming ``source`` if it is not
    an 8-bit RGB image (of ``image_size`` x ``image_size`` pixels, when given)."""
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError):
        raise DataError(f"{source} is not an image (PNG, JPEG, WebP or GIF expected)") from None
    if image.ndim != 3:
        raise DataError(f"{source} holds {image.shape[0]} frames; give one image")
    if image.dtype != torch.uint8 or image.shape[0] != 3:
        bits = image.element_size() * 8
        mode = f"{bits}-bit {CHANNELS.get(image.shape[0], f'{image.shape[0]}-channel')}"
        raise DataError(f"{source} is a {mode} image; the model takes 8-bit RGB images: convert it first")
    if image_size is not None and tuple(image.shape[1:]) != (image_size, image_size):
        raise DataError(
            f"{source} is {image.shape[2]}x{image.shape[1]} pixels; the model takes "
            f"{image_size}x{image_size} RGB images, the size it was trained at: resize it first"
        )
    return image


def read_images(frame: pd.DataFrame, image_size: int | None) -> list[Tensor]:
    """The images of a model input: its ``image`` column (bytes) or its ``path`` column (files)."""
    columns = [c for c in ("image", "path") if c in frame]
    if len(columns) != 1:
        given = "both" if columns else "neither"
        raise DataError(
            f"the input has {given} of the columns 'image' (encoded image bytes) and 'path'; give one"
        )
    if frame.empty:
        raise DataError("the input holds no image")
    images = []
    for row, value in enumerate(frame[columns[0]]):
        if columns[0] == "path":
            path = Path(str(value))
            if not path.is_file():
                raise DataError(f"image file {path} does not exist")
            images.append(decode(path.read_bytes(), str(path), image_size))
        elif isinstance(value, bytes | bytearray) and value:
            images.append(decode(value, f"image {row}", image_size))
        else:
            raise DataError(f"image {row} is {type(value).__name__}, not encoded image bytes")
    return images


def display_order(trained: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    """The order to report classes in: ``preferred`` (the params' ``data.classes``) when it names the
    same classes as the model was trained on (in sorted folder order), else the trained order."""
    return list(preferred) if preferred and sorted(preferred) == sorted(trained) else list(trained)


class ImageModel(PythonModel):
    """What every kind shares: the weights artifact, the predictor, the input checks."""

    takes_any_size = False

    def __init__(self, predictor: PredictorFactory) -> None:
        self.predictor = predictor

    def load_context(self, context: PythonModelContext) -> None:
        state, self.meta = load_weights(Path(context.artifacts[WEIGHTS]))
        self.config = context.model_config or {}
        device = select_device("auto")  # as evaluate: a GPU where there is one
        self.run = self.predictor(state, self.meta, device, BATCH_SIZE)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            images = read_images(model_input, None if self.takes_any_size else self.meta["image_size"])
        except DataError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        with torch.inference_mode():
            return self.outputs(images, params or {})

    def outputs(self, images: list[Tensor], params: dict[str, Any]) -> pd.DataFrame:
        """The labelled predictions for ``images``, one row per image (each kind says what)."""
        raise NotImplementedError

    def params_schema(self) -> ParamSchema | None:
        """Inference params ``predict`` takes (``params=`` in Python, ``"params"`` in the served JSON)."""
        return None


class ClassifierModel(ImageModel):
    """Class probabilities, reported in the model config's ``classes`` order (``data.classes``)."""

    def outputs(self, images: list[Tensor], params: dict[str, Any]) -> pd.DataFrame:
        trained = self.meta["classes"]
        order = self.config.get("classes", trained)
        probs = self.run(torch.stack(images)).float().softmax(1)
        score, best = probs.max(1)
        columns = probs[:, [trained.index(c) for c in order]]
        frame = pd.DataFrame({"label": [trained[i] for i in best.tolist()], "score": score.numpy()})
        return pd.concat([frame, pd.DataFrame(columns.numpy(), columns=[f"prob_{c}" for c in order])], axis=1)


class EmbeddingModel(ImageModel):
    """The backbone's features: one embedding per image."""

    def outputs(self, images: list[Tensor], params: dict[str, Any]) -> pd.DataFrame:
        return pd.DataFrame({"embedding": list(self.run(torch.stack(images)).numpy())})


class DetectorModel(ImageModel):
    """Boxes in the image's own pixels, with category names and scores."""

    takes_any_size = True

    def params_schema(self) -> ParamSchema:
        return ParamSchema([ParamSpec("score_threshold", "double", float(self.meta["score_threshold"]))])

    def outputs(self, images: list[Tensor], params: dict[str, Any]) -> pd.DataFrame:
        names = {c["id"]: c["name"] for c in self.meta["categories"]}
        threshold = float(params.get("score_threshold", self.meta["score_threshold"]))
        rows = []
        for detection in self.run(images):
            keep = detection["scores"] > threshold
            ids = detection["labels"][keep].tolist()
            rows.append(
                {
                    "boxes": detection["boxes"][keep].tolist(),
                    "labels": [names.get(i, str(i)) for i in ids],
                    "scores": detection["scores"][keep].tolist(),
                    "category_ids": ids,
                }
            )
        return pd.DataFrame(rows, columns=["boxes", "labels", "scores", "category_ids"])


def loaded(model: ImageModel, weights: Path, config: dict[str, Any]) -> ImageModel:
    """A copy of ``model`` loaded as MLflow would load it, for predictions before it is logged."""
    copy_ = copy.copy(model)
    copy_.load_context(PythonModelContext(artifacts={WEIGHTS: str(weights)}, model_config=config))
    return copy_


def png_frame(images: Sequence[Tensor]) -> pd.DataFrame:
    """uint8 (3, H, W) images as the model's input: one PNG per row of the ``image`` column."""
    return pd.DataFrame({"image": [encode_png(image).numpy().tobytes() for image in images]})


def requirements() -> list[str]:
    """Pinned requirements for an environment built from the model (``--env-manager virtualenv``)."""
    from importlib.metadata import version

    packages = ("torch", "torchvision", "pandas", "pillow", "pydantic", "pyyaml", "matplotlib", "pycocotools")
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


class _DeliberatePickle(logging.Filter):
    """MLflow warns on every pickled ``python_model``; here the pickle holds only a wrapper class and
    a predictor function, both by reference (the weights are the ``weights_only`` artifact)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Stage logs without the pickle warning and the progress bars of the input example's check."""
    logger, pickle_filter = logging.getLogger("mlflow.pyfunc"), _DeliberatePickle()
    bars = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get_raw()
    logger.addFilter(pickle_filter)
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    try:
        yield
    finally:
        logger.removeFilter(pickle_filter)
        if bars is None:
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.unset()
        else:
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(bars)


def log_model(
    model: ImageModel,
    weights: Path,
    examples: Sequence[Tensor],
    config: dict[str, Any],
    registered_name: str | None = None,
) -> ModelInfo:
    """Log ``model`` (around the model file ``weights``) to the active run as ``model``, with its
    signature and ``examples`` as PNGs for input example; register it as ``registered_name`` (when
    given) and point its ``ALIAS`` at the new version."""
    import vitkit

    example = png_frame(examples)
    probe = loaded(model, weights, config)
    params_schema = probe.params_schema()
    signature = ModelSignature(
        inputs=INPUT_SCHEMA,
        outputs=infer_signature(None, probe.predict(None, example)).outputs,
        params=params_schema,
    )
    with _quiet_logging():
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=model,
            artifacts={WEIGHTS: str(weights)},
            model_config=config,
            signature=signature,
            input_example=example,
            code_paths=[str(Path(vitkit.__file__).parent)],
            pip_requirements=requirements(),
            registered_model_name=registered_name,
        )
    if registered_name is not None:
        MlflowClient().set_registered_model_alias(registered_name, ALIAS, info.registered_model_version)
    return info
