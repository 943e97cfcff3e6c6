"""Classification metrics and figures: top-k, per-class accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from vitkit.data.datasets import Images
from vitkit.io import atomic_path


@torch.no_grad()
def predict_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: Images,
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """Logits for uint8 images (N,3,H,W), in eval mode, batched (read one batch at a time)."""
    if isinstance(model, nn.Module):
        model.eval()
    outputs = [
        model(transform(images[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs)


def prediction_table(
    names: Sequence[str], labels: torch.Tensor, classes: Sequence[str], predictions: dict[str, torch.Tensor]
) -> pd.DataFrame:
    """One row per test image (``image``: its path in the split, ``label``: its class) and one column
    per model holding the class it predicted: what a paired comparison of two models reads."""
    table = pd.DataFrame({"image": list(names), "label": [classes[i] for i in labels.tolist()]})
    for model, predicted in predictions.items():
        table[model] = [classes[i] for i in predicted.tolist()]
    return table


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """top-1, top-5, per-class accuracy and the confusion matrix as plain python values."""
    matrix = confusion_matrix(logits.argmax(1), labels, len(classes))
    per_class = (matrix.diag() / matrix.sum(1).clamp(min=1)).tolist()
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "per_class": dict(zip(classes, per_class, strict=True)),
        "confusion": matrix.tolist(),
    }


def per_class_table(report: dict) -> pd.DataFrame:
    return pd.DataFrame({"class": list(report["per_class"]), "accuracy": list(report["per_class"].values())})


def plot_confusion(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str, out_png: Path
) -> None:
    """Row-normalised confusion matrix with counts in the cells."""
    counts = torch.tensor(matrix, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = 1.0 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                int(counts[i, j]),
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_history(history: pd.DataFrame, columns: Sequence[str], title: str, out_png: Path) -> None:
    """Training curves against epoch, one panel per column."""
    columns = [c for c in columns if c in history]
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        measured = history[["epoch", column]].dropna()  # e.g. a monitor that runs every k epochs
        ax.plot(measured["epoch"], measured[column], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(column)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
