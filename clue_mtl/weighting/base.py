"""The loss-weighting strategy interface.

A strategy receives the per-task losses of one step and performs the backward pass. Methods that
only reweight losses (equal, fixed, uncertainty, DWA, DTP) combine them and call
`context.backward(total)`; gradient-level methods (GradNorm, PCGrad, MGDA, FAMO) may take
per-task gradients over `context.shared_parameters` or `context.last_shared_parameters` first.

Learned weighting parameters are `nn.Parameter`s of the strategy; the trainer gives them their
own optimiser and learning rate. Running state (initial losses, loss windows) lives in registered
buffers so it is saved in checkpoints and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class StepContext:
    """What a strategy may use during one training step.

    backward: runs the backward pass of a scalar (through `accelerator.backward`, so gradient
        scaling and DDP synchronisation happen as usual).
    shared_parameters: the encoder's trainable parameters.
    last_shared_parameters: the parameters of the encoder's last layer, where gradient norms are
        cheap to take (GradNorm).
    features: each task's pooled shared representation for this step.
    step: the optimiser step, counted from 0.
    reduce_mean: averages a tensor over processes (identity on one process).
    """

    backward: Callable[[torch.Tensor], None]
    shared_parameters: Sequence[nn.Parameter]
    last_shared_parameters: Sequence[nn.Parameter]
    features: dict[str, torch.Tensor]
    step: int
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor


class LossWeighting(nn.Module):
    """Base class: subclasses set `name` and implement `backward`."""

    name: str = ""

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        """Run the backward pass for this step's losses; return the combined loss (for logging)."""
        raise NotImplementedError

    def task_weights(self) -> dict[str, float]:
        """The weight each task's loss carries now, for the metrics log."""
        raise NotImplementedError

    def stacked(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([losses[task] for task in self.tasks])
