"""Typed schema of ``params.yaml``.

``params.yaml`` is the only source of values: the schema has no defaults, so
every key is required. It states each key's type, range and meaning, and
``docs/params.md`` is generated from it.

Every stage validates the *whole* file before doing anything, so a typo in a
section another stage owns is caught at the first stage, not an hour later.
A missing or unknown key, a wrong type or an out-of-range value becomes one
``ConfigError`` naming the file, the dotted key path and what is allowed.

Run ``python -m vitkit.config check [params.yaml]`` to validate a file,
``python -m vitkit.config docs --out docs/params.md`` to regenerate the params
reference, or ``python -m vitkit.config profile smoke`` to print the
``dvc exp run -S`` arguments that switch to a profile (see ``profiles/``).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import io
import json
import shlex
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from vitkit.errors import ConfigError
from vitkit.io import non_regular_kind

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
DOCS_COMMAND = "python -m vitkit.config docs --out docs/params.md"


@dataclass(frozen=True)
class Shown:
    """``Annotated`` marker for the params reference only (pydantic ignores it).

    ``name`` replaces the type's name in the *allowed* column (``path`` for a str that
    names a file); ``note`` is appended to it (``unique``).
    """

    name: str | None = None
    note: str | None = None


def _unique(values: list[str]) -> list[str]:
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"duplicate name(s) {', '.join(map(repr, duplicates))}: each must appear once")
    return values


PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]

# Sanity bounds. Counts of processes and threads are also checked against the machine when a stage
# starts (vitkit/engine/device.py); the bounds here are what no machine or published model comes
# near, so a typo such as 1e9 is refused by `python -m vitkit.config check` before anything
# allocates, on any machine. What fits a given machine's memory is not checked.
MAX_SEED = 2**32 - 1  # numpy seeds only from [0, 2**32 - 1] (np.random.seed)
MAX_PROCESSES = 1024  # processes or threads of one kind
MAX_IMAGES = 1_000_000  # images generated per count: all written to disk, read per item (data.cache_mb)
MAX_BATCH = 65_536  # images in one batch (per process)
MAX_WIDTH = 4096  # transformer width (DETR-R50: 256, ViT-H: 1280)
MAX_FEEDFORWARD = 16_384  # hidden size of a feed-forward block or projection head (ViT-H: 5120)
MAX_LAYERS = 64  # blocks of one encoder or decoder (ViT-H: 32, DETR: 6)
MAX_HEADS = 64  # attention heads (ViT-H: 16)
MAX_QUERIES = 2048  # object queries (DETR: 100, Deformable: 300, DINO: 900)
MAX_POINTS = 32  # deformable sampling points per head and level (paper: 4)
MAX_QUEUE_VALUES = 2**28  # MoCo queue_size * proj_dim: 1 GiB of float32 keys (MoCo v2: 65536 * 128)
# COCO category ids are class indices (vitkit/data/ingest.py checks them): the class head has
# max id + 1 outputs (DETR: + 1 for "no object") and every query scores them all. 10 000 ids leave
# room for the largest public vocabularies (LVIS: 1203, Objects365: 365, COCO: 90) while the head
# stays small (10 MB at width 256) and one image's class logits over 300 queries take 12 MB; a
# stray id of 2e9 would ask for hundreds of GB.
MAX_CATEGORY_ID = 9_999
ProcessCount = Annotated[int, Field(gt=0, le=MAX_PROCESSES)]
ImageCount = Annotated[int, Field(gt=0, le=MAX_IMAGES)]
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH)]
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
FeedForward = Annotated[int, Field(gt=0, le=MAX_FEEDFORWARD)]
Layers = Annotated[int, Field(gt=0, le=MAX_LAYERS)]
Heads = Annotated[int, Field(gt=0, le=MAX_HEADS)]
Queries = Annotated[int, Field(gt=0, le=MAX_QUERIES)]
Points = Annotated[int, Field(gt=0, le=MAX_POINTS)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
OpenFraction = Annotated[float, Field(ge=0, lt=1)]
PathStr = Annotated[str, Shown(name="path")]
NameList = Annotated[
    list[Annotated[str, Field(min_length=1)]],
    Field(min_length=2),
    AfterValidator(_unique),
    Shown(note="unique"),
]


class Section(BaseModel):
    """Base of every section: every key is required and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineParams(Section):
    """How training runs, shared by every model stage."""

    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        description="Device to train on; `auto` takes cuda, then mps, then cpu."
    )
    nproc: ProcessCount = Field(
        description=(
            "Processes per model stage in all, over every node (the world size); > 1 runs it under "
            "torchrun (DDP: gloo on CPU, nccl on GPU). The nodes come from the environment (VITKIT_NNODES). "
            "A model stage refuses more processes per node than the node has GPUs (on cuda) or usable "
            "CPU cores (on cpu; one on mps): the world size shapes the results, so it is never lowered."
        )
    )
    amp: Literal["off", "cuda", "always"] = Field(
        description=(
            "bf16 autocast: `cuda` on CUDA only (a CPU without AMX runs bf16 slower than fp32), "
            "`always` on every device (CPUs with AMX; on any CPU it shows dtype mistakes without a GPU), "
            "`off` never."
        )
    )
    compile: bool = Field(
        description=(
            "torch.compile the model for training (the training forward and backward; validation stays "
            "eager). The first steps pay the compilation (a minute or two on a CPU), so it pays off only "
            "in long runs."
        )
    )
    tf32: bool = Field(
        description=(
            "On CUDA, float32 matmuls and convolutions in TF32 (10-bit mantissa; this includes the parts "
            "autocast leaves in fp32: losses, matching, contrastive similarities). Ignored on other devices."
        )
    )
    channels_last: bool = Field(
        description="channels_last memory format for the model and its image batches in training, on CUDA "
        "and CPU (cuDNN's and oneDNN's convolutions are faster in it: a ResNet-18 step ~1.18x on a CPU)."
    )
    threads: Annotated[int, Field(ge=0, le=MAX_PROCESSES)] = Field(
        description="torch intra-op threads per process; 0 keeps torch's default (split between DDP "
        "processes on CPU). More than this machine's usable cores per process are lowered to them, "
        "with a warning: the thread count changes the speed, not the results."
    )
    num_workers: Annotated[int, Field(ge=0, le=MAX_PROCESSES)] = Field(
        description="DataLoader worker processes per training process; 0 loads in the training process. "
        "More than this machine's usable CPU cores stop a model stage: each worker draws its own "
        "augmentations, so the count shapes the results and is never lowered."
    )
    checkpoint_every_steps: PositiveInt = Field(
        description="Optimiser steps between resumable checkpoints (one is also written at every epoch end)."
    )
    max_steps_per_epoch: NonNegInt = Field(
        description=(
            "At most this many optimiser steps per epoch (0: the whole training set). Each epoch still "
            "draws its order from the whole set; the lr schedule follows the shorter epochs. For quick "
            "checks and benchmarks on a large dataset."
        )
    )
    min_steps: NonNegInt = Field(
        description=(
            "Fewest optimiser steps a model stage trains for. Schedules are in epochs, sized for the default "
            "data; on a smaller dataset they would end after a handful of steps and learn nothing, so when "
            "epochs x steps per epoch falls short of this, the stage trains for more epochs (the warmup "
            "keeps its share of them) and logs a warning saying so. 0 keeps the epochs as given."
        )
    )
    check_every_steps: PositiveInt = Field(
        description=(
            "Optimiser steps between the loop's reads of the losses on the host: the non-finite-loss guard "
            "and the progress bar. Also read before every checkpoint and at every epoch end, so the error "
            "names the first bad step and no checkpoint holds a diverged model. Each read waits for the "
            "device to catch up, so a GPU should not do it every step."
        )
    )


class ShapesClassification(Section):
    """Size of the generated classification splits."""

    train_per_class: ImageCount = Field(description="Training images generated per class.")
    val_per_class: ImageCount = Field(description="Validation images generated per class.")
    test_per_class: ImageCount = Field(description="Test images generated per class.")


class ClassificationData(Section):
    """The labelled classification data (teacher, DeiT, kNN monitor, linear probe)."""

    source: Literal["shapes", "imagefolder"] = Field(
        description="`shapes`: generate the synthetic shapes; `imagefolder`: ingest images from `path`."
    )
    path: PathStr | None = Field(
        description="ImageFolder root (train/ val/ test/<class>/<image>); needed when source is imagefolder."
    )
    image_size: Annotated[int, Field(ge=8, le=1024)] = Field(
        description="Side of the square images in pixels (also the unlabelled pool's size). Own images are "
        "resized with their aspect ratio kept, the shorter side to this, and centre-cropped to a square."
    )
    shapes: ShapesClassification = Field(description="Split sizes when source is shapes.")

    @model_validator(mode="after")
    def _path_given(self) -> ClassificationData:
        if self.source == "imagefolder" and not self.path:
            raise ValueError("source 'imagefolder' needs 'path': an ImageFolder root with train/ val/ test/")
        return self


class CocoSplit(Section):
    """One split of a COCO-format detection dataset."""

    annotations: PathStr = Field(description="the split's COCO annotations json")
    images: PathStr = Field(description="the folder holding its images")


class ShapesDetection(Section):
    """Size and content of the generated detection splits."""

    train_images: ImageCount = Field(description="Training images generated.")
    val_images: ImageCount = Field(description="Validation images generated.")
    test_images: ImageCount = Field(description="Test images generated.")
    min_objects: Annotated[int, Field(gt=0, le=MAX_QUERIES)] = Field(
        description="Fewest shapes in an image (<= max_objects)."
    )
    max_objects: Annotated[int, Field(gt=0, le=MAX_QUERIES)] = Field(description="Most shapes in an image.")
    min_object_size: Annotated[int, Field(ge=4)] = Field(
        description="Smallest shape, circumscribed diameter in pixels (<= max_object_size)."
    )
    max_object_size: Annotated[int, Field(ge=4)] = Field(
        description="Largest shape, circumscribed diameter in pixels (<= the image size)."
    )

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
    """The detection data (both train_detr variants)."""

    source: Literal["shapes", "coco"] = Field(
        description="`shapes`: generate the synthetic shapes; `coco`: ingest the splits listed in `coco`."
    )
    image_size: Annotated[int, Field(ge=32, le=2048)] = Field(
        description="Generated data: side of the square images in pixels. COCO data: the most pixels "
        "an image's longer side keeps; larger images are scaled down to it with their aspect ratio kept "
        "(boxes with them), smaller ones are kept as they are. Training then resizes to "
        "`detr_training.train_scales`."
    )
    coco: dict[Literal["train", "val", "test"], CocoSplit] | None = Field(
        description="The train, val and test splits to ingest; needed when source is coco."
    )
    shapes: ShapesDetection = Field(description="Split sizes and objects per image when source is shapes.")

    @model_validator(mode="after")
    def _coco_given(self) -> DetectionData:
        if self.source == "coco" and (self.coco is None or set(self.coco) != {"train", "val", "test"}):
            raise ValueError("source 'coco' needs 'coco' with train, val and test: {annotations, images}")
        return self


class ShapesUnlabeled(Section):
    """Size of the generated unlabelled pool."""

    images: ImageCount = Field(description="Unlabelled images generated.")


class UnlabeledData(Section):
    """The unlabelled pool SSL pretraining learns from (at the classification image size)."""

    source: Literal["shapes", "folder"] = Field(
        description="`shapes`: generate the synthetic shapes; `folder`: ingest the images in `path`."
    )
    path: PathStr | None = Field(description="A folder of images; needed when source is folder.")
    shapes: ShapesUnlabeled = Field(description="Pool size when source is shapes.")

    @model_validator(mode="after")
    def _path_given(self) -> UnlabeledData:
        if self.source == "folder" and not self.path:
            raise ValueError("source 'folder' needs 'path': a folder of images")
        return self


class DataParams(Section):
    """The three datasets the prepare stage writes under data/: classification, detection, unlabelled."""

    classes: NameList | None = Field(
        description=(
            "The classes of the classification data, in the order reports and served models list them "
            "(labels follow the sorted names). Generated data (`classification.source: shapes`): the "
            "shapes drawn in all three generated datasets, any of circle, square, triangle, star, "
            "hexagon, cross. An ImageFolder (`imagefolder`): the class folders to use, each in every "
            "split; other folders are left out, with a warning (generated detection or unlabelled data "
            "then draws every shape). null: every shape, or every class folder. COCO detection data "
            "takes its classes from its annotations' categories."
        )
    )
    hflip: Probability = Field(
        description=(
            "Probability of a horizontal flip in every training augmentation (the SSL views, the teacher, "
            "DeiT, DETR). 0.5 for data a mirror image does not change (photos, the shapes); 0 for data "
            "it does (text, digits, left/right labels)."
        )
    )
    workers: ProcessCount = Field(
        description="Processes generating the shapes data. More than this machine's usable CPU cores are "
        "lowered to them, with a warning: every image has its own seed, so the data does not depend on it."
    )
    cache_mb: NonNegInt = Field(
        description=(
            "Memory budget per split for decoded images, in MB: a split (train, val, test, the unlabelled "
            "pool) whose images decode to at most this is decoded once when a stage opens it and served "
            "from memory; a larger one is read from disk per item, by the DataLoader workers "
            "(`engine.num_workers`), so memory stays flat in the dataset size. Both give the same "
            "batches; this sets speed and memory only, which is why the training stages do not list it "
            "in their DVC params."
        )
    )
    classification: ClassificationData = Field(description="The labelled classification splits.")
    detection: DetectionData = Field(description="The detection splits (COCO format).")
    unlabeled: UnlabeledData = Field(description="The unlabelled image pool for SSL pretraining.")


class OptimParams(Section):
    """AdamW + linear warmup + cosine decay, the recipe every model stage shares."""

    epochs: PositiveInt = Field(description="Passes over the training set.")
    batch_size: BatchSize = Field(description="Training images per optimiser step (per process under DDP).")
    lr: PositiveFloat = Field(description="Peak AdamW learning rate, reached after the warmup.")
    weight_decay: NonNegFloat = Field(description="AdamW weight decay.")
    warmup_epochs: NonNegFloat = Field(
        description="Epochs of linear lr warmup (fractions allowed), then cosine decay to 0."
    )
    grad_clip: NonNegFloat = Field(description="Max global gradient norm; 0 turns clipping off.")


class BackboneParams(Section):
    """The CNN shared by SSL pretraining, the teacher and the DETR backbones (weights move between them)."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = Field(description="torchvision ResNet depth.")
    stem: Literal["imagenet", "small"] = Field(
        description="`imagenet`: 7x7/2 conv + max-pool (fast); `small`: CIFAR-style 3x3/1 (16x the compute)."
    )


class SSLAugmentation(Section):
    """Strengths of the two-view augmentation (see vitkit/data/ssl_transforms.py)."""

    crop_scale: tuple[Fraction, Fraction] = Field(
        description="[min, max] area fraction of RandomResizedCrop (min <= max)."
    )
    jitter: Probability = Field(description="Colour jitter strength of brightness, contrast and saturation.")
    hue: Annotated[float, Field(ge=0, le=0.5)] = Field(
        description="Colour jitter strength of hue (0.5: any hue)."
    )
    jitter_p: Probability = Field(description="Probability of applying the colour jitter.")
    grayscale_p: Probability = Field(description="Probability of converting a view to grayscale.")
    blur_p: Probability = Field(description="Probability of a 3x3 Gaussian blur.")

    @model_validator(mode="after")
    def _ordered(self) -> SSLAugmentation:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be [min, max] with min <= max, got {list(self.crop_scale)}")
        return self


class KnnMonitorParams(Section):
    """Weighted kNN on the labelled classification split, run every ``every_epochs`` epochs."""

    k: PositiveInt = Field(description="Neighbours voting (during pretraining and in evaluate).")
    temperature: PositiveFloat = Field(description="Temperature of the neighbours' similarity weights.")
    every_epochs: PositiveInt = Field(
        description="kNN top-1 on the val split every this many epochs (and after the last)."
    )


class SSLParams(OptimParams):
    """Contrastive pretraining of the backbone on the unlabelled pool (stage pretrain_ssl)."""

    method: Literal["mocov2", "simclr"] = Field(description="Contrastive method.")
    temperature: PositiveFloat = Field(description="Softmax temperature of the InfoNCE / NT-Xent loss.")
    proj_dim: FeedForward = Field(description="Output size of the projection head.")
    hidden_dim: FeedForward = Field(description="Hidden layer size of the projection head.")
    queue_size: Annotated[int, Field(gt=0, le=MAX_QUEUE_VALUES)] = Field(
        description="MoCo v2: negative keys kept from past batches (>= batch_size); unused by simclr."
    )
    momentum: OpenFraction = Field(description="MoCo v2: EMA momentum of the key encoder.")
    bn_splits: PositiveInt = Field(
        description="MoCo v2: groups of the split batch norm, the single-device stand-in for shuffle BN."
    )
    augmentation: SSLAugmentation = Field(description="The two-view augmentation.")
    knn: KnnMonitorParams = Field(description="The kNN classifier that monitors and scores the backbone.")

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> SSLParams:
        if self.method == "mocov2" and self.queue_size < self.batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be >= batch_size ({self.batch_size}): "
                "MoCo's queue keeps the negatives of at least one whole batch"
            )
        if self.method == "mocov2" and self.queue_size * self.proj_dim > MAX_QUEUE_VALUES:
            raise ValueError(
                f"queue_size * proj_dim ({self.queue_size} * {self.proj_dim}) must be <= {MAX_QUEUE_VALUES}: "
                "the queue holds that many float32 values (1 GiB at the bound; MoCo v2: 65536 * 128)"
            )
        return self


class TeacherParams(OptimParams):
    """The supervised ResNet teacher on the classification data (stage train_teacher)."""

    init: Literal["ssl", "scratch"] = Field(
        description="`ssl`: start from pretrain_ssl's backbone; `scratch`: random initialisation."
    )
    label_fraction: Fraction = Field(description="Stratified fraction of the training labels used.")
    label_smoothing: OpenFraction = Field(description="Label smoothing of the cross-entropy loss.")


ResNetStage = Literal["layer1", "layer2", "layer3", "layer4"]


class DetrTrainingParams(OptimParams):
    """Training shared by both ``train_detr`` variants (DETR's recipe), so they race on equal terms."""

    lr: PositiveFloat = Field(
        description="Peak AdamW learning rate of the transformer; detr.lr or deformable.lr replace it."
    )
    init: Literal["ssl", "teacher", "scratch"] = Field(
        description="Backbone weights: `ssl` (pretrain_ssl), `teacher` (train_teacher) or `scratch`."
    )
    release_checkpoint: PathStr | None = Field(
        description="An official DETR / Deformable DETR .pth to fine-tune from (its class head is "
        "re-initialised); null: build from `init`."
    )
    freeze_backbone: bool = Field(
        description="Train the transformer only (~2x faster on CPU); false: layers 2-4 learn at lr_backbone."
    )
    lr_backbone: NonNegFloat = Field(description="Learning rate of the backbone when it is not frozen.")
    train_scales: list[Annotated[int, Field(ge=32, le=2048)]] = Field(
        min_length=1,
        description="Shorter side of training images in pixels, one drawn per image (DETR: 480..800).",
    )
    crop: bool = Field(description="DETR's random IoU crop before the resize, on half of the images.")
    eval_size: Annotated[int, Field(ge=32, le=2048)] | None = Field(
        description="Shorter side of evaluation images in pixels; null: the images' own size."
    )
    eval_every: PositiveInt = Field(
        description="COCO AP on the val split every this many epochs (and after the last)."
    )
    score_threshold: OpenFraction = Field(
        description="Detections scoring below are dropped (COCO AP wants them all: 0)."
    )
    top_k: PositiveInt = Field(description="Detections kept per image (COCO AP counts 100).")


class DetrModelParams(Section):
    """DETR's model knobs (``vitkit.models.detr.DETRConfig``)."""

    lr: PositiveFloat | None = Field(description="This arch's learning rate; null: detr_training.lr.")
    return_layer: ResNetStage = Field(
        description="ResNet stage feeding the transformer (128 px: layer3 8x8 tokens, layer4 4x4)."
    )
    hidden_dim: Width = Field(description="Transformer width (even, a multiple of nheads).")
    nheads: Heads = Field(description="Attention heads.")
    enc_layers: Layers = Field(description="Transformer encoder layers.")
    dec_layers: Layers = Field(description="Transformer decoder layers.")
    dim_feedforward: FeedForward = Field(description="Hidden size of the transformer's feed-forward blocks.")
    dropout: OpenFraction = Field(description="Dropout in the transformer.")
    pre_norm: bool = Field(description="LayerNorm before (not after) each attention and feed-forward block.")
    num_queries: Queries = Field(
        description="Object queries: one detection each per image (>= the most objects in one). The "
        "decoder's self-attention holds num_queries^2 scores per head, layer and image (at the bound, "
        "2048 queries and 8 heads: 134 MB)."
    )
    aux_loss: bool = Field(description="Set loss on every decoder layer's output, not only the last.")
    eos_coef: Fraction = Field(description="Weight of the no-object class in the classification loss.")

    @model_validator(mode="after")
    def _heads_divide(self) -> DetrModelParams:
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be even and a multiple of nheads")
        return self


class DeformableModelParams(Section):
    """Deformable DETR's model knobs (``vitkit.models.deformable.DeformableDETRConfig``)."""

    lr: PositiveFloat | None = Field(description="This arch's learning rate; null: detr_training.lr.")
    return_layers: list[ResNetStage] = Field(
        min_length=1, description="ResNet stages feeding the multi-scale encoder."
    )
    num_feature_levels: Annotated[int, Field(gt=0, le=8)] = Field(
        description="Feature levels (>= len(return_layers)); extra levels are stride-2 convs on the last."
    )
    hidden_dim: Annotated[int, Field(gt=0, le=MAX_WIDTH, multiple_of=32)] = Field(
        description="Transformer width (a multiple of nheads; GroupNorm(32) on the inputs)."
    )
    nheads: Heads = Field(description="Attention heads.")
    enc_layers: Layers = Field(description="Transformer encoder layers.")
    dec_layers: Layers = Field(description="Transformer decoder layers.")
    dim_feedforward: FeedForward = Field(description="Hidden size of the transformer's feed-forward blocks.")
    dropout: OpenFraction = Field(description="Dropout in the transformer.")
    enc_n_points: Points = Field(description="Sampling points per head and level in the encoder.")
    dec_n_points: Points = Field(description="Sampling points per head and level in the decoder.")
    num_queries: Queries = Field(
        description="Object queries, the boxes predicted per image (>= the most objects in one). The "
        "decoder's self-attention holds num_queries^2 scores per head, layer and image."
    )
    aux_loss: bool = Field(description="Set loss on every decoder layer's output, not only the last.")
    with_box_refine: bool = Field(
        description="Iterative box refinement: a head per decoder layer refines the previous layer's boxes."
    )
    two_stage: bool = Field(
        description="Encoder proposals become the decoder's queries (needs with_box_refine)."
    )
    lr_linear_proj_mult: PositiveFloat = Field(
        description="Sampling offsets and reference points learn at the lr times this."
    )

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

    ``lr`` is DeiT's base rate per 512 images: the optimiser runs at ``lr * batch_size * nproc / 512``.
    The model is a ``vitkit.models.vit`` preset at the data's image size, with the fields below
    replacing the preset's where given. Augmentation knobs set to 0 turn that augmentation off.
    """

    lr: PositiveFloat = Field(
        description=(
            "Learning rate per 512 images (DeiT's rule): the optimiser runs at "
            "lr * batch_size * engine.nproc / 512 (batch_size is per process)."
        )
    )
    preset: Literal["cpu_tiny", "deit_tiny", "deit_small", "deit_base"] = Field(
        description="ViT size preset, built at the data's image size."
    )
    patch_size: Annotated[int, Field(gt=0, le=1024)] | None = Field(
        description="Patch side in pixels; null: the preset's."
    )
    embed_dim: Width | None = Field(description="Token width; null: the preset's.")
    depth: Layers | None = Field(description="Transformer blocks; null: the preset's.")
    num_heads: Heads | None = Field(description="Attention heads; null: the preset's.")
    drop_path: OpenFraction = Field(
        description="Stochastic depth of the last block (rising linearly from 0 at the first)."
    )
    alpha: Probability = Field(description="Weight of the distillation loss against the label loss.")
    tau: PositiveFloat = Field(description="Temperature of soft distillation.")
    crop_scale: Fraction = Field(
        description="Smallest area fraction of RandomResizedCrop (the largest is 1)."
    )
    randaug_ops: NonNegInt = Field(
        description="RandAugment ops per image (DeiT: 2); 0 turns RandAugment off."
    )
    randaug_magnitude: Annotated[int, Field(ge=0, le=30)] = Field(
        description="RandAugment magnitude (DeiT: 9)."
    )
    random_erasing: Probability = Field(description="Probability of random erasing (DeiT: 0.25).")
    mixup: NonNegFloat = Field(description="MixUp alpha (DeiT: 0.8); 0 turns MixUp off.")
    cutmix: NonNegFloat = Field(description="CutMix alpha (DeiT: 1.0); 0 turns CutMix off.")
    label_smoothing: OpenFraction = Field(description="Label smoothing of the (mixed) targets.")
    repeated_aug: PositiveInt = Field(
        description="Copies of each image per epoch (repeated augmentation, DeiT: 3); 1 turns it off."
    )
    ema_decay: OpenFraction = Field(
        description="Decay of a weights EMA that is validated and saved instead; 0 turns it off."
    )


class EvaluateParams(Section):
    """Inference and the evaluate stage's report."""

    batch_size: BatchSize = Field(
        description="Images per batch of every inference pass (validation, features, evaluation)."
    )
    attention_images: Annotated[int, Field(gt=0, le=64)] = Field(
        description="Test images in the DeiT attention-map figures (a row each)."
    )


MAX_REPORT_HISTORY = 1000  # earlier runs one report reads from MLflow: one bounded query
MAX_RESAMPLES = 100_000


class ReportParams(Section):
    """The report stage: this run beside earlier ones, and whether its method comparisons are real."""

    baseline: Annotated[
        str, Field(pattern=r"^(first|none|[0-9a-f]{32})$"), Shown(name="first, none or a 32-hex run id")
    ] = Field(
        description="The run every metric is also compared with: `first` (the experiment's first "
        "report), `none`, or an MLflow run id (a report run's, or the pipeline run it belongs to)."
    )
    history: Annotated[int, Field(gt=0, le=MAX_REPORT_HISTORY)] = Field(
        description="Earlier runs read from MLflow (the newest) for the table and the figure over runs."
    )
    resamples: Annotated[int, Field(ge=100, le=MAX_RESAMPLES)] = Field(
        description="Bootstrap resamples of the test images per comparison (each recomputes COCO AP "
        "for the detectors: 1 000 take ~1.5 s of CPU on 200 images)."
    )
    confidence_level: Annotated[float, Field(ge=0.5, lt=1)] = Field(
        description="Confidence level of the bootstrap intervals."
    )


class MlflowParams(Section):
    """Experiment tracking."""

    experiment: Annotated[str, Field(min_length=1)] = Field(
        description="MLflow experiment the runs are logged to."
    )


class Params(Section):
    """The whole ``params.yaml``."""

    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(
        description="Seeds data generation, sampling and initialisation. numpy takes seeds below 2^32 and "
        "DDP rank r seeds with seed + r, so seed + engine.nproc - 1 must stay below 2^32 too."
    )
    engine: EngineParams = Field(description="How training runs, shared by every model stage.")
    data: DataParams = Field(description="The datasets the prepare stage writes.")
    backbone: BackboneParams = Field(description="The shared CNN backbone.")
    ssl: SSLParams = Field(description="SSL pretraining (pretrain_ssl).")
    teacher: TeacherParams = Field(description="The supervised teacher (train_teacher).")
    detr_training: DetrTrainingParams = Field(description="Training shared by both train_detr variants.")
    detr: DetrModelParams = Field(description="The DETR model (train_detr@detr).")
    deformable: DeformableModelParams = Field(
        description="The Deformable DETR model (train_detr@deformable)."
    )
    deit: DeitParams = Field(description="The DeiT student (distill_deit).")
    evaluate: EvaluateParams = Field(description="Inference batch size and the evaluate stage's figures.")
    report: ReportParams = Field(description="The run report (report).")
    mlflow: MlflowParams = Field(description="Experiment tracking.")

    @model_validator(mode="after")
    def _every_rank_seed_in_range(self) -> Params:
        if self.seed + self.engine.nproc - 1 > MAX_SEED:
            raise ValueError(
                f"seed ({self.seed}) + engine.nproc ({self.engine.nproc}) - 1 must be <= {MAX_SEED}: "
                "DDP rank r seeds numpy with seed + r, and numpy takes seeds below 2^32"
            )
        return self


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
            "Fix them in the file (docs/params.md lists every key, its default and what is allowed)."
        ) from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML file holds one key twice."""


class UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader, refusing a key that appears twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, so a second ``teacher:`` section
    would silently replace the first. Keys merged in with ``<<:`` may be overridden, as YAML
    intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key (a list): the base class reports it
                continue
            if first is not None:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} on line {line} (first on line {first}); a key may appear "
                    "once in a mapping: merge the two into one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path | str, what: str = "params file") -> Any:
    """Parse a YAML file (params or a profile) into Python values; any problem is one ``ConfigError``.

    The path must be a regular file (a folder or a named pipe is refused before it is opened,
    which for a pipe would wait forever), UTF-8 text, valid YAML, and free of duplicate keys.
    """
    path = Path(path)
    kind = non_regular_kind(path)
    if kind == "missing":
        raise ConfigError(f"{path}: {what} not found (run from the repository root)")
    if kind is not None:
        raise ConfigError(f"{path}: is {kind}, not a {what}; give the path of a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save the {what} as UTF-8"
        ) from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML's messages name the file, not "<unicode string>"
    try:
        return yaml.load(stream, Loader=UniqueKeyLoader)  # a safe loader (CSafeLoader's subclass)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file."""
    return validate_params(read_yaml(path), str(path))


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
    return read_yaml(path, "profile") or {}


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"teacher.epochs=2"`` -> ``("teacher.epochs", 2)``, as ``dvc exp run -S`` takes them: a dotted
    key and a value read as YAML (``2`` a number, ``[96, 128]`` a list, ``null``, else a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. teacher.epochs=2")
    try:
        parsed = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        parsed = value  # not YAML (an unclosed bracket...): the text itself, which the schema then judges
    return key.strip(), parsed


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``tree[a][b] = value`` for ``key`` ``a.b``; a key ``tree`` does not have is a ``ConfigError``."""
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = list(flatten(tree)) + [k for k in _section_keys(tree)]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{source}: {key}: unknown key{hint} (docs/params.md lists every key)")
        if depth == len(parts) - 1:
            merge = isinstance(node[part], dict) and isinstance(value, dict)  # a section: its keys one by one
            node[part] = deep_merge(node[part], value) if merge else value
        else:
            node = node[part]


def _section_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the mappings in ``tree`` (``teacher``, ``data.classification``...)."""
    keys = []
    for name, value in tree.items():
        if isinstance(value, dict):
            keys += [f"{prefix}{name}", *_section_keys(value, f"{prefix}{name}.")]
    return keys


def _get_dotted(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def resolve_params(
    path: Path | str, profile: str | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], Params]:
    """``path``'s params with a profile and dotted-key overrides applied, validated before anything runs.

    Returns the overrides as they are written into a params file (each value as the schema read
    it: ``"2"`` for an int becomes ``2``; a profile's keys first, then ``overrides``, which win) and
    the validated params. The file itself is checked as every stage checks it (``load_params``); a
    bad profile or override is one ``ConfigError`` line naming the key: an unknown key (with the
    closest known one), a wrong type or a value out of range.
    """
    load_params(path)
    raw = read_yaml(path)
    wanted = flatten(profile_overrides(profile)) if profile else {}
    source = f"profile {profile}"
    for key, value in wanted.items():
        _set_dotted(raw, key, value, source)
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"overrides: {key!r}: a key is a dotted name such as teacher.epochs")
        source = "overrides"
        _set_dotted(raw, key, copy.deepcopy(value), source)
        wanted[key] = value
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        where = "overrides" if overrides else f"profile {profile}"
        raise ConfigError(f"{where}: {'; '.join(problems)}") from None
    validated = params.model_dump(mode="json")
    return {key: _get_dotted(validated, key) for key in wanted}, params


# ------------------------------------------------------------------ the params reference


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _bounds(constraints: list[Any]) -> list[str]:
    """``[0, 1)``-style range, ``> 0``-style bound and other constraints of a number or string."""
    low = high = None
    texts: list[str] = []
    for c in constraints:
        if isinstance(c, at.Gt):
            low = ("(", "> ", c.gt)
        elif isinstance(c, at.Ge):
            low = ("[", ">= ", c.ge)
        elif isinstance(c, at.Lt):
            high = (")", "< ", c.lt)
        elif isinstance(c, at.Le):
            high = ("]", "<= ", c.le)
        elif isinstance(c, at.MultipleOf):
            texts.append(f"multiple of {_number(c.multiple_of)}")
    if low and high:
        texts.insert(0, f"in {low[0]}{_number(low[2])}, {_number(high[2])}{high[0]}")
    elif low or high:
        bound = low or high
        texts.insert(0, f"{bound[1]}{_number(bound[2])}")
    return texts


def _flatten_annotated(tp: Any, constraints: list[Any]) -> tuple[Any, list[Any]]:
    """``Annotated[X, ...]`` -> ``X`` and its metadata (a nested ``Field``'s constraints included)."""
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        for item in extra:
            constraints = [*constraints, *(item.metadata if isinstance(item, FieldInfo) else [item])]
    return tp, constraints


def _allowed(tp: Any, constraints: Sequence[Any] = ()) -> str:
    """What a value of type ``tp`` under ``constraints`` may be, in words (the reference's *allowed*)."""
    tp, constraints = _flatten_annotated(tp, list(constraints))
    shown = next((c for c in constraints if isinstance(c, Shown)), Shown())
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        inner = _allowed(Union[tuple(options)] if len(options) > 1 else options[0], constraints)  # noqa: UP007
        return f"null or {inner}" if len(options) < len(get_args(tp)) else inner
    if origin is Literal:
        return "one of: " + ", ".join(str(v) for v in get_args(tp))
    if origin is list:
        notes = [f"at least {c.min_length}" for c in constraints if isinstance(c, at.MinLen)]
        notes += [shown.note] if shown.note else []
        item = _allowed(get_args(tp)[0]).replace("one of: ", "any of: ", 1)
        return f"list of {item}" + (f" ({', '.join(notes)})" if notes else "")
    if origin is tuple:
        items = get_args(tp)
        if len(set(items)) == 1:
            return f"[{', '.join('abcdefgh'[: len(items)])}], each {_allowed(items[0])}"
        return "[" + ", ".join(_allowed(i) for i in items) + "]"
    if origin is dict:
        key, value = get_args(tp)
        entries = ", ".join(
            f"{name}: {_allowed(f.annotation, f.metadata)}" for name, f in value.model_fields.items()
        )
        return f"mapping of {_allowed(key).removeprefix('one of: ')} to {{{entries}}}"
    if tp is bool:
        return "bool"
    name = shown.name or getattr(tp, "__name__", str(tp))
    if tp is str and any(isinstance(c, at.MinLen) and c.min_length == 1 for c in constraints):
        name = f"non-empty {name}"
    bounds = _bounds(constraints) if tp is not str else []
    return ", ".join([f"{name} {bounds[0]}", *bounds[1:]]) if bounds else name


def _value(value: Any) -> str:
    """A params.yaml value as it reads in YAML's flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and "e" in repr(value):
        return f"{Decimal(repr(value)):f}"  # 0.00002, as written, not 2e-05
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _is_section(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, Section)


def _row(key: str, field: FieldInfo, value: Any) -> str:
    meaning = field.description or ""
    mapped = [a for a in get_args(field.annotation) if get_origin(a) is dict]
    if mapped:  # a mapping of sub-sections (data.detection.coco): say what each entry holds
        entry = get_args(mapped[0])[1]
        subkeys = "; ".join(f"`{n}`: {f.description}" for n, f in entry.model_fields.items())
        meaning = f"{meaning} Each entry: {subkeys}."
    allowed = _allowed(field.annotation, field.metadata)
    return f"| `{key}` | `{_cell(_value(value))}` | {_cell(allowed)} | {_cell(meaning)} |"


def _leaf_rows(model: type[Section], values: dict[str, Any], prefix: str) -> list[str]:
    """One row per leaf key under ``model`` (nested sections are walked, not listed)."""
    rows = []
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            rows += _leaf_rows(field.annotation, values[name], f"{prefix}{name}.")
        else:
            rows.append(_row(f"{prefix}{name}", field, values[name]))
    return rows


def _subsection_items(model: type[Section], prefix: str) -> list[str]:
    """A bullet per nested section under ``model`` (at any depth), with its description."""
    items = []
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            items.append(f"- `{prefix}{name}`: {field.description}")
            items += _subsection_items(field.annotation, f"{prefix}{name}.")
    return items


def _section_text(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "").replace("``", "`")


def params_reference(params_path: Path | str = "params.yaml") -> str:
    """Markdown reference of every params key, generated from the schema; defaults from ``params_path``."""
    load_params(params_path)  # a reference of an invalid file would document wrong defaults
    raw = read_yaml(params_path)
    lines = [
        "# Params reference",
        "",
        f"<!-- Generated from vitkit/config.py by `{DOCS_COMMAND}`: do not edit by hand. -->",
        "",
        "Every key of `params.yaml`, the only source of default values. Every key is required: "
        "`python -m vitkit.config check` (and every stage, before it starts) rejects a missing or "
        "unknown key, a wrong type or a value outside *allowed*, and a key written twice in one "
        "mapping (with both line numbers). Profiles in `profiles/` override some of the defaults below.",
        "",
        "The upper bounds are sanity bounds, far above any machine or published model, so that a typo "
        "such as `1e9` is refused before anything allocates; whether a size fits a machine's memory is "
        "not checked. Counts are also checked against the machine a stage runs on, when it starts "
        "(`vitkit/engine/device.py`): a model stage refuses more processes per node than the node has "
        "GPUs (cuda) or usable CPU cores (cpu) in `engine.nproc`, and more `engine.num_workers` than "
        "usable cores, as both shape the results and are never lowered; `engine.threads` and "
        "`data.workers` only change the speed and are lowered to the cores, with a warning. Usable "
        "cores are those the process may run on (its CPU affinity, a container's CPU quota).",
    ]
    table_head = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    top_level = [(n, f) for n, f in Params.model_fields.items() if not _is_section(f.annotation)]
    lines += ["", "## Top level", "", *table_head, *(_row(n, f, raw[n]) for n, f in top_level)]
    for name, field in Params.model_fields.items():
        if not _is_section(field.annotation):
            continue
        section: type[Section] = field.annotation
        lines += ["", f"## `{name}`", "", _section_text(section)]
        subsections = _subsection_items(section, f"{name}.")
        if subsections:
            lines += ["", *subsections]
        lines += ["", *table_head, *_leaf_rows(section, raw[name], f"{name}.")]
    return "\n".join(lines) + "\n"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkit.config", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a params file; exit 2 with one message if it is wrong")
    check.add_argument("path", nargs="?", default="params.yaml")
    prof = sub.add_parser("profile", help="print `dvc exp run -S` arguments that apply a profile")
    prof.add_argument("name", help="profile name: a file profiles/<name>.yaml")
    docs = sub.add_parser("docs", help="write the Markdown reference of every key (docs/params.md)")
    docs.add_argument("--params", default="params.yaml", help="file the defaults are read from (%(default)s)")
    docs.add_argument("--out", type=Path, help="write here instead of printing to stdout")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.path)
            print(f"{args.path}: ok")
        elif args.command == "docs":
            text = params_reference(args.params)
            if args.out is None:
                sys.stdout.write(text)
            else:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text)
                print(f"wrote {args.out}")
        else:
            flat = flatten(profile_overrides(args.name))
            print(" ".join(f"-S {shlex.quote(f'{key}={json.dumps(value)}')}" for key, value in flat.items()))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
