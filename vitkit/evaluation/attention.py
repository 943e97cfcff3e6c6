"""Where the class and distillation tokens look: attention rollout and a figure.

Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
Transformers", 2020): each layer's head-averaged attention ``A`` is mixed with
the identity for the residual path, ``0.5 * A + 0.5 * I`` (rows still sum to
1), and the layers are multiplied from the first to the last. Row ``t`` of the
product is how much every input token flows into output token ``t``; the rows
of the class and distillation tokens, restricted to the patches, are the maps
DeiT's paper compares.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from vitkit.io import atomic_path
from vitkit.models.vit import VisionTransformer


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Rollout of per-layer attentions (B, heads, T, T) -> (B, T, T), rows summing to 1."""
    rollout = None
    for attn in attentions:
        a = attn.mean(dim=1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = 0.5 * a + 0.5 * eye  # still row-stochastic, so the product is too
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs at least one layer's attention")
    return rollout


@torch.no_grad()
def token_attention_maps(model: VisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rollout maps of the class token (``"cls"``) and, if present, the distillation token (``"dist"``).

    Each map is (B, grid_h, grid_w) over the patches, rescaled to [0, 1] per
    image for display (the prefix tokens' own share is left out).
    """
    was_training = model.training
    model.eval()
    try:
        rollout = attention_rollout(model.attention_maps(images))
    finally:
        model.train(was_training)
    p = model.config.patch_size
    gh, gw = images.shape[-2] // p, images.shape[-1] // p
    prefix = model.config.num_prefix_tokens
    names = ["cls", "dist"][:prefix]
    maps = {}
    for row, name in enumerate(names):
        m = rollout[:, row, prefix:].reshape(-1, gh, gw)
        lo = m.amin(dim=(1, 2), keepdim=True)
        hi = m.amax(dim=(1, 2), keepdim=True)
        maps[name] = (m - lo) / (hi - lo).clamp_min(1e-12)
    return maps


def save_attention_figure(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    path: str | Path,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    titles: list[str] | None = None,
) -> Path:
    """One row per image: the image, then each token's map overlaid. Written atomically (temp + rename).

    ``images`` are the normalised model inputs (B, 3, H, W); ``mean``/``std``
    undo the normalisation for display; ``titles`` label the rows (e.g. true
    and predicted class).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().cpu().float()
    pixels = (images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    H, W = images.shape[-2:]
    n, cols = images.shape[0], 1 + len(maps)
    fig = Figure(figsize=(2.2 * cols, 2.2 * n))  # no pyplot: no global backend state, Agg canvas
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        img = pixels[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(titles[i] if titles else "image", fontsize=8)
        for j, (name, m) in enumerate(maps.items(), start=1):
            heat = F.interpolate(m[i][None, None].cpu().float(), size=(H, W), mode="bilinear")[0, 0]
            axes[i, j].imshow(img)
            axes[i, j].imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            axes[i, j].set_title(f"{name} token", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    return path
