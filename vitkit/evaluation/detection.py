"""Detectors on a COCO split, and the side-by-side of several detectors' training runs.

``predict_coco`` runs a DETR-style model over a dataset and returns both its
detections (for figures) and COCO result entries (for ``evaluate_coco``).
``compare_runs`` and ``plot_comparison`` put detectors' convergence next to
each other: AP against epochs (from the per-epoch histories the training stage
writes) and COCO AP by object size at the end. Training seconds stay out: they
differ on every run, and these outputs must not (the stages' timing files and
MLflow hold them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitkit.data.datasets import collate_detection
from vitkit.io import atomic_path
from vitkit.models.detr.backbone import nested_tensor_from_images
from vitkit.models.detr.postprocess import Detection, to_coco_results

PostProcessFn = Callable[[dict, Tensor], list[Detection]]
FINAL_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


@torch.no_grad()
def predict_coco(
    model: nn.Module, dataset: Dataset, post: PostProcessFn, device: torch.device, batch_size: int
) -> tuple[list[Detection], list[dict]]:
    """Detections of every image of ``dataset`` (items as ``CocoDetection``'s: a target with
    ``image_id`` and ``orig_size``), in original-image pixels on the CPU, and the same as COCO results."""
    model.eval()
    detections: list[Detection] = []
    results: list[dict] = []
    for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection):
        outputs = model(nested_tensor_from_images([image.to(device) for image in images]))
        sizes = torch.tensor([t["orig_size"] for t in targets], device=device)
        batch = [{k: v.cpu() for k, v in d.items()} for d in post(outputs, sizes)]
        detections += batch
        results += to_coco_results(batch, [t["image_id"] for t in targets])
    return detections, results


def compare_runs(
    histories: Mapping[str, pd.DataFrame], finals: Mapping[str, Mapping[str, float]]
) -> pd.DataFrame:
    """One row per detector: final test COCO metrics, epochs, and its val AP at every epoch both
    were evaluated at (``val_AP@<epoch>``), so the race reads across a row.

    ``histories``: per-epoch tables with ``epoch`` and ``val_AP`` (NaN where not evaluated);
    ``finals``: test metrics (``FINAL_COLUMNS``) of the final model.
    """
    rows = []
    evaluated = [set(h.dropna(subset=["val_AP"])["epoch"].astype(int)) for h in histories.values()]
    shared = set.intersection(*evaluated)
    for name, history in histories.items():
        row = {"arch": name, **{k: float(finals[name][k]) for k in FINAL_COLUMNS}}
        row["epochs"] = int(history["epoch"].max())
        by_epoch = history.set_index(history["epoch"].astype(int))["val_AP"]
        row |= {f"val_AP@{epoch}": float(by_epoch[epoch]) for epoch in sorted(shared)}
        rows.append(row)
    return pd.DataFrame(rows)


def plot_comparison(
    histories: Mapping[str, pd.DataFrame], table: pd.DataFrame, out_png: Path, title: str = ""
) -> None:
    """Two panels: val AP against epoch, final test AP by object size."""
    fig = Figure(figsize=(10, 3.8))
    by_epoch, by_size = fig.subplots(1, 2)
    for name, history in histories.items():
        evaluated = history.dropna(subset=["val_AP"])
        by_epoch.plot(evaluated["epoch"], evaluated["val_AP"], marker="o", label=name)
    by_epoch.set(xlabel="epoch", ylabel="val AP", title="AP per epoch")
    metrics = ["AP", "AP50", "APs", "APm", "APl"]
    width = 0.8 / len(table)
    for i, row in enumerate(table.itertuples(index=False)):
        values = [max(getattr(row, m), 0.0) for m in metrics]  # -1: no ground truth of that size
        by_size.bar([x + i * width for x in range(len(metrics))], values, width, label=row.arch)
    by_size.set_xticks([x + width * (len(table) - 1) / 2 for x in range(len(metrics))], metrics)
    by_size.set(ylabel="test", title="final epoch, test split")
    for ax in (by_epoch, by_size):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
