"""Load checkpoints in fundamentalvision/Deformable-DETR's layout into our ``DeformableDETR``.

Its releases (and the ``checkpoint.pth`` its ``main.py`` writes) are
``{"model": state_dict, ...}`` with keys such as
``backbone.0.body.layer1.0.conv1.weight``, ``input_proj.0.0.weight`` (conv) /
``input_proj.0.1.weight`` (GroupNorm), ``transformer.level_embed``,
``transformer.encoder.layers.0.self_attn.sampling_offsets.weight``,
``transformer.decoder.layers.0.cross_attn.value_proj.weight``,
``transformer.reference_points.weight``, ``query_embed.weight``,
``class_embed.0.weight`` and ``bbox_embed.0.layers.0.weight`` (one entry per
decoder layer even when the heads are shared; with box refinement also under
``transformer.decoder.bbox_embed``, in two-stage ``transformer.decoder.class_embed``).
Our modules carry the same names, so the conversion is the identity. When the
class count differs (COCO's 91 against our data's), every class head is
dropped from the checkpoint and re-initialised with the focal prior, the usual
fine-tuning surgery. Any other mismatch is a configuration error naming the key.

To load a release, configure the model like it, e.g. for ``r50_deformable_detr``:
``arch="resnet50"`` and otherwise ``DeformableDETRConfig``'s defaults (ImageNet stem,
layer2..4 + one extra level, 256 wide, 8 heads, 6+6 layers, 4 points, 300 queries), plus
``with_box_refine`` / ``two_stage`` for those variants. Nothing is downloaded here: pass a local file.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from vitkit.models.deformable.deformable_detr import PRIOR_PROB, DeformableDETR
from vitkit.models.detr.checkpoint import load_matching_state, read_release_state


def _is_class_head(key: str) -> bool:
    return key.startswith(("class_embed.", "transformer.decoder.class_embed."))


def _reset_class_heads(model: DeformableDETR) -> None:
    """Fresh class heads as at construction: default Linear init, bias at the focal prior."""
    for head in model.class_embed:
        head.reset_parameters()
        nn.init.constant_(head.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))


def load_deformable_detr_checkpoint(model: DeformableDETR, path: str | Path) -> list[str]:
    """Load the ``"model"`` entry of a Deformable-DETR-layout checkpoint into ``model``.

    Returns the keys left at their fresh initialisation (the class heads when the number of
    classes differs, otherwise none). ``torch.load(weights_only=True)`` only unpickles tensors and
    plain containers; ``argparse.Namespace`` is allowed too because the official ``main.py``
    stores its arguments in every checkpoint.
    """
    path = Path(path)
    state = read_release_state(path, "Deformable DETR")
    own = model.state_dict()
    reinitialised: list[str] = []
    theirs = state.get("class_embed.0.weight")
    if theirs is not None and theirs.shape != own["class_embed.0.weight"].shape:
        reinitialised = sorted(key for key in own if _is_class_head(key))
        state = {key: value for key, value in state.items() if not _is_class_head(key)}
        _reset_class_heads(model)
    load_matching_state(
        model,
        state,
        reinitialised,
        f"Deformable DETR checkpoint {path}",
        shape_hint="arch, stem, return_layers, num_feature_levels, hidden_dim, nheads, enc/dec_n_points, "
        "dim_feedforward, num_queries",
        structure_hint="enc_layers, dec_layers, num_feature_levels, with_box_refine, two_stage",
    )
    return reinitialised
