"""Vision Transformer with a distillation token (DeiT), readable top to bottom.

Touvron et al., "Training data-efficient image transformers & distillation
through attention" (2021). The student is a plain pre-norm ViT with one extra
learned token: the *distillation token* travels through the blocks beside the
class token, and its output feeds a second head trained to match the teacher.

Module names are chosen so that ``state_dict()`` has exactly the key layout of
timm's ``deit_*_distilled_patch16_224`` (and ``deit_*_patch16_224`` when
``distilled=False``): official DeiT checkpoints load without renaming, and the
tests check outputs against timm itself.

Order of the file: config and presets, the three building blocks (patch
embedding, attention, MLP), the block, the model, then checkpoint helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from vitkit.engine.checkpoint import read_torch_file
from vitkit.errors import ConfigError

# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a (distilled) ViT. Defaults are the CPU-tiny preset for 32x32 images."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 6
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 2.0
    drop_path_rate: float = 0.1
    distilled: bool = True

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"ViT img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; "
                "pick sizes so the patches tile the image"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"ViT embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                "change one of them"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"ViT drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Class token, plus the distillation token when distilled."""
        return 2 if self.distilled else 1


# CPU-tiny: 64 patch tokens (an 8x8 grid, fine enough for attention maps) of a 32x32
# image; width 96, depth 4 and MLP ratio 2 were picked by measured training speed on
# 2 CPU cores (benchmarks/bench_deit.py): about 0.3 M parameters. The deit_* presets are
# the paper's models at ImageNet resolution; their drop_path_rate is DeiT's training value.
PRESETS: dict[str, ViTConfig] = {
    "cpu_tiny": ViTConfig(),
    "deit_tiny": ViTConfig(
        img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0
    ),
    "deit_small": ViTConfig(
        img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0
    ),
    "deit_base": ViTConfig(
        img_size=224, patch_size=16, num_classes=1000, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0
    ),
}


def preset(name: str, **overrides: object) -> ViTConfig:
    """A named preset with some fields replaced, e.g. ``preset("deit_tiny", num_classes=6)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown ViT preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown ViTConfig field(s) {sorted(unknown)} for preset {name!r}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------- layers


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, H*W, D)


class Attention(nn.Module):
    """Multi-head self-attention.

    The training path is one fused ``scaled_dot_product_attention`` call. The
    attention matrix itself is only materialised when asked for (attention
    maps / rollout), so visualisation never slows training down.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if return_weights:
            weights = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out), weights


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; stochastic depth drops whole residual branches per sample."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), return_weights)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


# ---------------------------------------------------------------------------- model


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Bicubic resize of the patch-grid part of a position embedding, as timm does.

    The prefix tokens (class, distillation) have no spatial position and are kept
    as they are; antialias matters when shrinking the grid and matches timm's
    ``resample_abs_pos_embed`` so checkpoints behave identically in both.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    """DeiT student: ViT with a class token and (if ``config.distilled``) a distillation token.

    ``forward`` follows DeiT: in train mode a distilled model returns
    ``(cls_logits, dist_logits)`` for ``DistillationLoss``; in eval mode it returns
    their average, which is DeiT's prediction. ``forward_heads`` returns both
    heads in either mode, to evaluate each head on its own.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + config.num_prefix_tokens, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if config.distilled else None
        drop_rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()  # deeper drops more
        self.blocks = nn.ModuleList(
            [Block(D, config.num_heads, config.mlp_ratio, rate) for rate in drop_rates]
        )
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, config.num_classes)
        self.head_dist = nn.Linear(D, config.num_classes) if config.distilled else None
        self.init_weights()

    def init_weights(self) -> None:
        """DeiT's init: truncated normal (std .02) tokens and Linear weights, zero biases, unit LayerNorms."""
        for token in (self.pos_embed, self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_heads(self, num_classes: int) -> None:
        """Fresh class (and distillation) heads for another label set, e.g. after loading ImageNet weights."""
        self.config = replace(self.config, num_classes=num_classes)
        device, dtype = self.head.weight.device, self.head.weight.dtype
        heads = [nn.Linear(self.config.embed_dim, num_classes, device=device, dtype=dtype)]
        if self.config.distilled:
            heads.append(nn.Linear(self.config.embed_dim, num_classes, device=device, dtype=dtype))
        for head in heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.head = heads[0]
        self.head_dist = heads[1] if self.config.distilled else None

    def no_weight_decay(self) -> set[str]:
        """Parameters DeiT keeps out of weight decay (besides biases and norms)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens, prefix tokens, position embedding (resized when the input is not img_size)."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(x)
        g = self.config.grid_size
        pos = resample_pos_embed(self.pos_embed, (H // p, W // p), (g, g), self.config.num_prefix_tokens)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        return torch.cat([*prefix, x], dim=1) + pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, prefix + patches, D)."""
        x = self._embed(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention weights (B, heads, T, T), computed explicitly; for visualisation."""
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            maps.append(weights)
        return maps

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-head logits, distillation-head logits), whatever the mode."""
        if self.head_dist is None:
            raise ValueError("forward_heads needs a distilled ViT (config.distilled=True)")
        x = self.forward_features(x)
        return self.head(x[:, 0]), self.head_dist(x[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.head_dist is None:
            return self.head(self.forward_features(x)[:, 0])
        cls_logits, dist_logits = self.forward_heads(x)
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def build_vit(config: ViTConfig) -> VisionTransformer:
    return VisionTransformer(config)


def optimizer_param_groups(model: VisionTransformer, weight_decay: float) -> list[dict]:
    """AdamW groups as DeiT/timm make them: no decay on biases, norms, tokens and position embedding."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------- checkpoints


def load_deit_checkpoint(
    model: VisionTransformer,
    path_or_state: str | Path | Mapping[str, torch.Tensor],
    num_classes: int | None = None,
) -> VisionTransformer:
    """Load an official DeiT / timm checkpoint (or one of ours) into ``model``, in place.

    * accepts DeiT's release format ``{"model": state_dict}``, a bare state dict,
      and DDP's ``module.`` prefix; files are read with ``weights_only=True``;
    * resizes the position embedding when the checkpoint was trained at another
      image size (same patch size);
    * ``num_classes`` (if given) first gives ``model`` fresh heads of that size;
      checkpoint heads whose shape does not fit the model's are skipped, so the
      heads stay freshly initialised (fine-tuning on another label set).

    Every other key must match: a checkpoint of another width, depth or patch
    size, or a distilled/non-distilled mismatch, raises ``ConfigError``.
    """
    source = str(path_or_state) if isinstance(path_or_state, str | Path) else "the given state dict"
    if isinstance(path_or_state, str | Path):
        state = read_torch_file(
            Path(path_or_state), "DeiT checkpoint", "point the config at a .pth file", error=ConfigError
        )
    else:
        state = path_or_state
    if not isinstance(state, Mapping):
        raise ConfigError(f"DeiT checkpoint {source} holds a {type(state).__name__}, not a state dict")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}

    if num_classes is not None and num_classes != model.config.num_classes:
        model.reset_heads(num_classes)
    own = model.state_dict()
    for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            state[key] = own[key]  # keep the model's fresh head

    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = model.config.num_prefix_tokens
        old = math.isqrt(state["pos_embed"].shape[1] - prefix)
        if old * old != state["pos_embed"].shape[1] - prefix:
            raise ConfigError(
                f"{source}: pos_embed has {state['pos_embed'].shape[1]} tokens, which is not "
                f"{prefix} prefix tokens plus a square grid; was it saved with distilled="
                f"{not model.config.distilled}?"
            )
        g = model.config.grid_size
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (g, g), (old, old), prefix)

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ConfigError(
            f"{source} does not fit this ViT ({model.config}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}; pick the preset the checkpoint was "
            "trained with"
        )
    model.load_state_dict(state)
    return model
