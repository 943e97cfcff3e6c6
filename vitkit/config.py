"""Typed schema of ``params.yaml``.

Every stage validates the *whole* file before doing anything, so a typo in a
section another stage owns is caught at the first stage, not an hour later.
An unknown key, a wrong type or an out-of-range value becomes one
``ConfigError`` naming the file, the dotted key path and what is allowed.

Run ``python -m vitkit.config check [params.yaml]`` to validate a file, or
``python -m vitkit.config profile smoke`` to print the ``dvc exp run -S``
arguments that switch to a profile (see ``profiles/``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitkit.data.shapes import SHAPE_CLASSES
from vitkit.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineParams(Section):
    """How training runs, shared by every model stage."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    nproc: PositiveInt = 1
    amp: bool = True
    channels_last: bool = True
    threads: NonNegInt = 0
    num_workers: NonNegInt = 0
    checkpoint_every_steps: PositiveInt = 50
    progress: bool = True


class ShapesClassification(Section):
    train_per_class: PositiveInt = 1000
    val_per_class: PositiveInt = 100
    test_per_class: PositiveInt = 200


class ClassificationData(Section):
    source: Literal["shapes", "imagefolder"] = "shapes"
    path: str | None = None
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    shapes: ShapesClassification = ShapesClassification()

    @model_validator(mode="after")
    def _path_given(self) -> ClassificationData:
        if self.source == "imagefolder" and not self.path:
            raise ValueError("source 'imagefolder' needs 'path': an ImageFolder root with train/ val/ test/")
        return self


class CocoSplit(Section):
    annotations: str
    images: str


class ShapesDetection(Section):
    train_images: PositiveInt = 1000
    val_images: PositiveInt = 100
    test_images: PositiveInt = 200
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 6
    min_object_size: Annotated[int, Field(ge=4)] = 8
    max_object_size: Annotated[int, Field(ge=4)] = 56

    @model_validator(mode="after")
    def _ranges(self) -> ShapesDetection:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        if self.min_object_size > self.max_object_size:
            raise ValueError(
                f"min_object_size ({self.min_object_size}) must be <= "
                f"max_object_size ({self.max_object_size})"
            )
        return self


class DetectionData(Section):
    source: Literal["shapes", "coco"] = "shapes"
    image_size: Annotated[int, Field(ge=32, le=2048)] = 128
    coco: dict[Literal["train", "val", "test"], CocoSplit] | None = None
    shapes: ShapesDetection = ShapesDetection()

    @model_validator(mode="after")
    def _coco_given(self) -> DetectionData:
        if self.source == "coco" and (self.coco is None or set(self.coco) != {"train", "val", "test"}):
            raise ValueError("source 'coco' needs 'coco' with train, val and test: {annotations, images}")
        return self


class ShapesUnlabeled(Section):
    images: PositiveInt = 10000


class UnlabeledData(Section):
    source: Literal["shapes", "folder"] = "shapes"
    path: str | None = None
    shapes: ShapesUnlabeled = ShapesUnlabeled()

    @model_validator(mode="after")
    def _path_given(self) -> UnlabeledData:
        if self.source == "folder" and not self.path:
            raise ValueError("source 'folder' needs 'path': a folder of images")
        return self


class DataParams(Section):
    classes: list[Literal[SHAPE_CLASSES]] = Field(default=list(SHAPE_CLASSES), min_length=2)  # type: ignore[valid-type]
    workers: PositiveInt = 2
    classification: ClassificationData = ClassificationData()
    detection: DetectionData = DetectionData()
    unlabeled: UnlabeledData = UnlabeledData()


class OptimParams(Section):
    """AdamW + linear warmup + cosine decay, the recipe every model stage shares."""

    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: NonNegFloat = 0.05
    warmup_epochs: NonNegFloat = 1.0
    grad_clip: NonNegFloat = 1.0


class BackboneParams(Section):
    """The CNN shared by SSL pretraining, the teacher and the DETR backbones (weights move between them)."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    stem: Literal["imagenet", "small"] = "imagenet"


class SSLAugmentation(Section):
    """Strengths of the two-view augmentation (see vitkit/data/ssl_transforms.py)."""

    crop_scale: tuple[Fraction, Fraction] = (0.2, 1.0)
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.4
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    jitter_p: Annotated[float, Field(ge=0, le=1)] = 0.8
    grayscale_p: Annotated[float, Field(ge=0, le=1)] = 0.2
    blur_p: Annotated[float, Field(ge=0, le=1)] = 0.2

    @model_validator(mode="after")
    def _ordered(self) -> SSLAugmentation:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be [min, max] with min <= max, got {list(self.crop_scale)}")
        return self


class KnnMonitorParams(Section):
    """Weighted kNN on the labelled classification split, run every ``every_epochs`` epochs."""

    k: PositiveInt = 200
    temperature: PositiveFloat = 0.1
    every_epochs: PositiveInt = 1


class SSLParams(OptimParams):
    """Contrastive pretraining of the backbone on the unlabelled pool (stage pretrain_ssl)."""

    method: Literal["mocov2", "simclr"] = "mocov2"
    temperature: PositiveFloat = 0.2
    proj_dim: PositiveInt = 128
    hidden_dim: PositiveInt = 512
    queue_size: PositiveInt = 4096  # MoCo v2: negatives kept from past batches
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99  # MoCo v2: key encoder EMA
    bn_splits: PositiveInt = 8  # MoCo v2: split batch norm, the single-device shuffle BN
    augmentation: SSLAugmentation = SSLAugmentation()
    knn: KnnMonitorParams = KnnMonitorParams()

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> SSLParams:
        if self.method == "mocov2" and self.queue_size < self.batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be >= batch_size ({self.batch_size}): "
                "MoCo's queue keeps the negatives of at least one whole batch"
            )
        return self


class TeacherParams(OptimParams):
    init: Literal["ssl", "scratch"] = "ssl"  # ssl: start from pretrain_ssl's backbone
    label_fraction: Fraction = 1.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0


ResNetStage = Literal["layer1", "layer2", "layer3", "layer4"]


class DetrTrainingParams(OptimParams):
    """Training shared by both ``train_detr`` variants (DETR's recipe), so they race on equal terms."""

    init: Literal["ssl", "teacher", "scratch"] = "teacher"  # backbone weights: pretrain_ssl, train_teacher
    # a whole-model checkpoint in the official release layout (facebookresearch/detr or
    # fundamentalvision/Deformable-DETR) to fine-tune from; the class head is re-initialised
    release_checkpoint: str | None = None
    freeze_backbone: bool = True  # train the transformer only (~2x faster on CPU)
    lr_backbone: NonNegFloat = 1e-5  # DETR: lr / 10; unused when the backbone is frozen
    train_scales: list[Annotated[int, Field(ge=32, le=2048)]] = Field(default=[128], min_length=1)
    crop: bool = False  # DETR's random crop (half of the batches) before the resize
    eval_size: Annotated[int, Field(ge=32, le=2048)] | None = None  # shorter side at eval; None: as is
    eval_every: PositiveInt = 1  # COCO AP on the val split every k epochs (and after the last)
    score_threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0  # post-processing: COCO AP wants all
    top_k: PositiveInt = 100  # detections kept per image (COCO AP counts 100)


class DetrModelParams(Section):
    """DETR's model knobs (``vitkit.models.detr.DETRConfig``)."""

    lr: PositiveFloat | None = None  # this arch's lr, else detr_training.lr (official recipe: 1e-4)
    return_layer: ResNetStage = "layer4"
    hidden_dim: PositiveInt = 256
    nheads: PositiveInt = 8
    enc_layers: PositiveInt = 6
    dec_layers: PositiveInt = 6
    dim_feedforward: PositiveInt = 2048
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    pre_norm: bool = False
    num_queries: PositiveInt = 100
    aux_loss: bool = True
    eos_coef: Annotated[float, Field(gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _heads_divide(self) -> DetrModelParams:
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be even and a multiple of nheads")
        return self


class DeformableModelParams(Section):
    """Deformable DETR's model knobs (``vitkit.models.deformable.DeformableDETRConfig``)."""

    lr: PositiveFloat | None = None  # this arch's lr, else detr_training.lr (official recipe: 2e-4)
    return_layers: list[ResNetStage] = Field(default=["layer2", "layer3", "layer4"], min_length=1)
    num_feature_levels: PositiveInt = 4  # levels beyond return_layers: stride-2 convs on the last
    hidden_dim: Annotated[int, Field(gt=0, multiple_of=32)] = 256  # GroupNorm(32) on the inputs
    nheads: PositiveInt = 8
    enc_layers: PositiveInt = 6
    dec_layers: PositiveInt = 6
    dim_feedforward: PositiveInt = 1024
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    enc_n_points: PositiveInt = 4
    dec_n_points: PositiveInt = 4
    num_queries: PositiveInt = 300
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    lr_linear_proj_mult: PositiveFloat = 0.1  # sampling offsets / reference points learn at lr x this

    @model_validator(mode="after")
    def _consistent(self) -> DeformableModelParams:
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be a multiple of nheads ({self.nheads})")
        if self.num_feature_levels < len(self.return_layers):
            raise ValueError(
                f"num_feature_levels ({self.num_feature_levels}) must be >= the number of return_layers "
                f"({len(self.return_layers)})"
            )
        if self.two_stage and not self.with_box_refine:
            raise ValueError("two_stage needs with_box_refine: true (as in the paper)")
        return self


class DeitParams(OptimParams):
    """DeiT student (``distill_deit@{none,soft,hard}``): model size, distillation and DeiT's recipe.

    ``lr`` is DeiT's base rate per 512 images: the optimiser runs at ``lr * batch_size / 512``.
    The model is a ``vitkit.models.vit`` preset at the data's image size, with the fields below
    replacing the preset's where given. Augmentation knobs set to 0 turn that augmentation off.
    """

    preset: Literal["cpu_tiny", "deit_tiny", "deit_small", "deit_base"] = "cpu_tiny"
    patch_size: PositiveInt | None = None
    embed_dim: PositiveInt | None = None
    depth: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.1
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    tau: PositiveFloat = 1.0
    crop_scale: Annotated[float, Field(gt=0, le=1)] = 0.35
    randaug_ops: NonNegInt = 2
    randaug_magnitude: Annotated[int, Field(ge=0, le=30)] = 9
    random_erasing: Annotated[float, Field(ge=0, le=1)] = 0.25
    mixup: NonNegFloat = 0.8
    cutmix: NonNegFloat = 1.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    repeated_aug: PositiveInt = 3
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0


class EvaluateParams(Section):
    batch_size: PositiveInt = 256
    attention_images: PositiveInt = 6  # test images in the DeiT attention-map figures


class MlflowParams(Section):
    experiment: Annotated[str, Field(min_length=1)] = "vitkit"


class Params(Section):
    seed: NonNegInt = 0
    engine: EngineParams = EngineParams()
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    ssl: SSLParams
    teacher: TeacherParams
    detr_training: DetrTrainingParams
    detr: DetrModelParams = DetrModelParams()
    deformable: DeformableModelParams = DeformableModelParams()
    deit: DeitParams
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against the documented keys)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        listed = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(
            f"{source}: {len(problems)} invalid param(s):\n  {listed}{more}\n"
            "Fix them in the file (README.md lists every key, default and allowed range)."
        ) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(raw, str(path))


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied key by key (nested mappings merged, not replaced)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def profile_overrides(name: str) -> dict[str, Any]:
    """The overrides of a named profile (``profiles/<name>.yaml``)."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}; known profiles: {known}")
    return yaml.safe_load(path.read_text()) or {}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkit.config", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a params file; exit 2 with one message if it is wrong")
    check.add_argument("path", nargs="?", default="params.yaml")
    prof = sub.add_parser("profile", help="print `dvc exp run -S` arguments that apply a profile")
    prof.add_argument("name", help="profile name: a file profiles/<name>.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.path)
            print(f"{args.path}: ok")
        else:
            flat = flatten(profile_overrides(args.name))
            print(" ".join(f"-S {shlex.quote(f'{key}={json.dumps(value)}')}" for key, value in flat.items()))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
