"""Equal and fixed loss weights."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import LossWeighting, StepContext


class EqualWeighting(LossWeighting):
    """The plain sum of the task losses (MT-DNN)."""

    name = "equal"

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        total = self.stacked(losses).sum()
        context.backward(total)
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        return {task: 1.0 for task in self.tasks}


class FixedWeighting(LossWeighting):
    """Constant per-task weights from the config: `weighting.params: {weights: {ocnli: 2.0}}`.

    Tasks left out keep weight 1.
    """

    name = "fixed"

    def __init__(self, tasks: Sequence[str], weights: dict[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"fixed weighting names unknown tasks: {unknown}")
        self.register_buffer("weights", torch.tensor([float(weights.get(t, 1.0)) for t in self.tasks]))

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        total = (self.weights.to(losses[self.tasks[0]].dtype) * self.stacked(losses)).sum()
        context.backward(total)
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))
