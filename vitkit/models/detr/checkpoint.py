"""Load checkpoints in facebookresearch/detr's layout into our ``DETR``.

DETR's releases (and the ``checkpoint.pth`` its ``main.py`` writes) are
``{"model": state_dict, ...}`` with keys such as ``backbone.0.body.layer1.0.conv1.weight``,
``transformer.encoder.layers.0.self_attn.in_proj_weight``, ``class_embed.weight``,
``bbox_embed.layers.0.weight``, ``query_embed.weight`` and ``input_proj.weight``.
Our modules carry the same names, so the conversion is the identity; what
remains is fine-tuning surgery: when the checkpoint's class count differs from
the model's (COCO's 91 + 1 against our data's), the class head is dropped from
the checkpoint and freshly initialised, as DETR's fine-tuning recipes do. Any
other mismatch is a configuration error, reported with the key at fault.

To load a DETR release, configure the model like it: ``arch="resnet50"``,
``stem="imagenet"``, ``hidden_dim=256``, ``nheads=8``,
``enc_layers=dec_layers=6``, ``dim_feedforward=2048``, ``num_queries=100``,
``pre_norm=False``. Nothing is downloaded here: pass a local file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vitkit.engine.checkpoint import read_torch_file
from vitkit.errors import ConfigError
from vitkit.models.detr.detr import DETR

CLASS_HEAD_KEYS = ("class_embed.weight", "class_embed.bias")


def load_detr_checkpoint(model: DETR, path: str | Path) -> list[str]:
    """Load the ``"model"`` entry of a DETR-layout checkpoint into ``model``.

    Returns the keys left at their fresh initialisation (the class head when the
    number of classes differs, otherwise none). ``torch.load(weights_only=True)``
    only unpickles tensors and plain containers; ``argparse.Namespace`` is allowed
    too because DETR's ``main.py`` stores its arguments in every checkpoint.
    """
    path = Path(path)
    state = read_release_state(path, "DETR")
    own = model.state_dict()
    reinitialised: list[str] = []
    if (
        state.get("class_embed.weight") is not None
        and state["class_embed.weight"].shape != own["class_embed.weight"].shape
    ):
        for key in CLASS_HEAD_KEYS:
            state.pop(key, None)
        model.class_embed.reset_parameters()
        reinitialised = list(CLASS_HEAD_KEYS)
    load_matching_state(
        model,
        state,
        reinitialised,
        f"DETR checkpoint {path}",
        shape_hint="arch, stem, hidden_dim, dim_feedforward, num_queries",
        structure_hint="arch, enc_layers, dec_layers, pre_norm",
    )
    return reinitialised


def read_release_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a release checkpoint, read with ``weights_only=True``.

    ``argparse.Namespace`` is allowed because the official ``main.py`` of DETR and of
    Deformable DETR stores its arguments in every checkpoint. A path that is no file (missing,
    a folder) or a file that is no torch checkpoint of tensors is one error naming the path.
    """
    checkpoint = read_torch_file(
        path,
        f"{name} checkpoint",
        "set detr_training.release_checkpoint to the release's .pth file, or null to build the model "
        "from detr_training.init",
        allowed=[argparse.Namespace],
        error=ConfigError,
    )
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ConfigError(
            f"{name} checkpoint {path} has no 'model' state dict; expected {{'model': state_dict}}"
        )
    return dict(checkpoint["model"])


def load_matching_state(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    reinitialised: list[str],
    what: str,
    shape_hint: str,
    structure_hint: str,
) -> None:
    """Load ``state`` into ``model``; any key of another shape, or missing beyond ``reinitialised``,
    or unexpected, is a ``ConfigError`` naming the key and the config fields to check."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise ConfigError(
                f"{what}: {key} has shape {tuple(value.shape)} but the model's is "
                f"{tuple(own[key].shape)}; configure the model like the checkpoint ({shape_hint})"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in reinitialised]
    if missing or unexpected:
        raise ConfigError(
            f"{what} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; configure the model like the checkpoint ({structure_hint})"
        )
