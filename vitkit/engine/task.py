"""What the training loop trains: a model plus the method's recipe around it.

A method (SimCLR, a supervised classifier, DeiT distillation, DETR) is a
``TrainingTask``: it owns the model and whatever else its loss needs (a frozen
teacher, a weights EMA, a set criterion), and says what one step computes.
The ``Trainer`` owns the loop and never branches on the method: it calls
``step`` on every batch, logs every term ``step`` returns (averaged over the
epoch), calls ``validate`` after each epoch, and saves ``state_dict`` in the
checkpoint beside the model and optimizer (timm's ``TrainingTask``, DETR's
``engine.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainingTask:
    """Base of every method recipe; subclasses set ``model`` and implement ``step``."""

    model: nn.Module
    # the run's epochs, set by the Trainer once it has sized the schedule (``engine.min_steps`` may
    # raise the params' count): the last epoch is ``epochs``, not the params' value
    epochs: int

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups (per-group lr / weight decay); None: every parameter, one group."""
        return None

    def step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Forward one batch through ``model`` (``self.model``, maybe wrapped in DDP).

        Returns ``{"loss": <the objective>, **terms}``; every term is logged as
        ``train_<name>``, averaged over the epoch. Terms are detached tensors or
        numbers; keep them on the device (no ``.item()``): the loop reads them once an epoch.
        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to update a weights EMA)."""

    def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Metrics after epoch ``epoch`` (1-based), on the main process only; {} to skip."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Training state beyond the model and optimizer (EMA weights...), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, when a killed run resumes."""

    def final_model(self) -> nn.Module:
        """The weights to publish once training ends (the EMA when there is one)."""
        return self.model
