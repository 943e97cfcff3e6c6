"""Training checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint holds everything needed to continue a killed run exactly where
it stopped: model, optimizer and scheduler states, the position in the epoch,
the per-epoch history so far and every process's RNG states (so the
augmentations after a resume are the ones the uninterrupted run would have
drawn). A fingerprint of
the training params guards against resuming a run whose params changed.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.io import atomic_path

CHECKPOINT_NAME = "last.pt"


def seed_everything(seed: int) -> None:
    """Seed the global RNGs augmentation and model init draw from (python, numpy, torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically, the same object always giving the same bytes.

    ``torch.save`` to a file path names the records inside its zip after that file
    (``<name>/data.pkl``), and the atomic write's temporary name is random: saved straight
    to it, identical weights would hash differently on every save, and DVC would see a new
    model. Serialised in memory first, the records are always named ``archive/``.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically; the previous one survives a crash."""
    path = Path(directory) / CHECKPOINT_NAME
    save_torch(path, state)
    return path


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None when there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def mark_finished(directory: Path) -> bool:
    """Mark the checkpoint in ``directory`` finished, never to be resumed; False when there is none.

    Called once everything the training was for has been written (not when the last epoch
    ends): until then, a run killed on the way resumes at the end of training and skips
    straight to writing its outputs.
    """
    state = load_checkpoint(directory)
    if state is None or state.get("finished"):
        return False
    save_checkpoint(directory, {**state, "finished": True})
    return True


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A model file a later stage can rebuild the model from: weights plus what shaped them."""
    save_torch(path, {"meta": meta, "state_dict": state_dict})


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    return blob["state_dict"], blob["meta"]
