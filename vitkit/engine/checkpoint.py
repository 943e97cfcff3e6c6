"""Training checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint holds everything needed to continue a killed run exactly where
it stopped: model, optimizer and scheduler states, the position in the epoch,
the per-epoch history so far and every process's RNG states (so the
augmentations after a resume are the ones the uninterrupted run would have
drawn). A fingerprint of
the training params guards against resuming a run whose params changed.

A file that cannot be read (truncated, empty, not a torch file, or holding
objects other than tensors and plain containers, which ``weights_only`` refuses
to unpickle because that could run code) is a ``CheckpointError``: one line that
names the file and what to do with it, never torch's advice to load it with
``weights_only=False``.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.errors import CheckpointError, VitkitError
from vitkit.io import atomic_path, non_regular_kind

CHECKPOINT_NAME = "last.pt"
# what every checkpoint the trainer writes holds; a file without them is not one of ours
CHECKPOINT_KEYS = ("fingerprint", "model")


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


def _why_unreadable(exc: BaseException, path: Path) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in a few words.

    torch's own messages run to several lines and suggest ``weights_only=False`` or
    allow-listing the offending global, either of which would run what the file carries.
    """
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"it refers to {refused.group(1)}, which is code, not weights: refused, since loading "
            "it could run that code"
        )
    if isinstance(exc, EOFError):
        return "it is empty" if path.stat().st_size == 0 else "it ends too early (truncated)"
    if "central directory" in text or "zip archive" in text:
        return "it is truncated or corrupt (not a complete torch zip archive)"
    if "WeightsUnpickler" in text or "Weights only load failed" in text:
        return "it is not a torch file of tensors (corrupt, or written by something else)"
    first = " ".join(text.split())[:160]
    if "weights_only" in first or "safe_globals" in first:
        return "it is not a torch file of tensors"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_torch_file(
    path: Path,
    what: str,
    advice: str,
    allowed: Iterable[type] = (),
    error: type[VitkitError] = CheckpointError,
) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, or one ``error`` naming the file.

    ``what`` names the file in the message (``checkpoint``, ``DETR checkpoint``); ``advice``
    says what to do about it; ``allowed`` are classes besides tensors and plain containers the
    file may hold (DETR's releases keep an ``argparse.Namespace``). A path that is not a
    regular file (a folder, a named pipe) is refused before anything opens it.
    """
    path = Path(path)
    kind = non_regular_kind(path)
    if kind == "missing":
        raise error(f"{what} {path} does not exist; {advice}")
    if kind is not None:
        raise error(f"{what} {path} is {kind}, not a file; {advice}")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")  # torch warns (with a traceback line) on refused globals
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:
        raise error(f"{what} {path} cannot be read: {_why_unreadable(exc, path)}; {advice}") from None


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None when there is none.

    One that cannot be read, or that is not a training checkpoint, is a ``CheckpointError``
    saying to delete it: a resume is impossible, and deleting it means starting over.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists() and not path.is_symlink():
        return None
    advice = (
        f"delete it (rm {path}) and run the stage again, which then trains from the start "
        "(nothing else is lost: the stage's outputs are untouched)"
    )
    ckpt = read_torch_file(path, "checkpoint", advice)
    if not isinstance(ckpt, dict) or not all(key in ckpt for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a vitkit training checkpoint; {advice}")
    return ckpt


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
    """A model file a later stage can rebuild the model from: weights plus what shaped them.

    Stored contiguous: a model trained channels_last (``engine.channels_last``) gives the same
    file as one trained in the default layout, whatever reads it."""
    contiguous = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    save_torch(path, {"meta": meta, "state_dict": contiguous})


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and meta of a model file ``save_weights`` wrote (a stage's output)."""
    advice = f"restore it (dvc checkout {path}) or run the stage that writes it again"
    blob = read_torch_file(Path(path), "model file", advice)
    if not isinstance(blob, dict) or not {"state_dict", "meta"} <= set(blob):
        raise CheckpointError(f"model file {path} holds no vitkit model (state_dict and meta); {advice}")
    return blob["state_dict"], blob["meta"]
