"""The one gradient loop behind every gradient-based fit: Adam, an optional cosine schedule, a progress bar.

Each fit supplies a closure that draws its batch and returns the loss to minimize plus the
figures to show on the bar; the loop owns the optimizers, the schedule and the bar, so every fit
steps the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

from .progress import progress_bar

__all__ = ["StepFn", "adam_steps"]

#: () -> (loss to backpropagate, figures for the progress bar such as {"mse": loss}).
StepFn = Callable[[], "tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]"]


def adam_steps(step: StepFn, params: Iterable[Any], *, steps: int, lr: float,
               sparse_params: Iterable[torch.Tensor] = (),
               schedule: Literal["cosine", "constant"] = "cosine", desc: str = "",
               progress: bool | None = None) -> None:
    """Run ``steps`` optimizer steps on ``step()``'s loss.

    ``params`` (tensors or Adam parameter groups) get Adam, ``sparse_params`` (tables with sparse
    gradients) SparseAdam, both at ``lr`` unless a group sets its own; ``"cosine"`` anneals every
    rate to 0 over the steps (``CosineAnnealingLR``).
    """
    dense, sparse = list(params), list(sparse_params)
    optimizers: list[torch.optim.Optimizer] = []
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=lr))
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
    schedules = ([torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in optimizers]
                 if schedule == "cosine" else [])
    bar = progress_bar(range(steps), desc=desc, enabled=progress)
    for _ in bar:
        with torch.enable_grad():  # fits often run under no_grad
            loss, shown = step()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for lr_schedule in schedules:
            lr_schedule.step()
        if shown and hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{float(v):.4g}" for k, v in shown.items()}, refresh=False)
