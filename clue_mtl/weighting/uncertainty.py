"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import LossWeighting, StepContext, accumulate_grad


class UncertaintyWeighting(LossWeighting):
    """Learned log-variances s_i; the combined loss is sum_i exp(-s_i) L_i + s_i.

    Constant factors. With s = log sigma^2 the paper's Gaussian (regression) term is
    exp(-s) L / 2 + s / 2 and its softmax-with-temperature (classification) term is about
    exp(-s) L + s / 2. All three CLUE tasks are classification; we use exp(-s) L + s (the common
    simplified form, as in LibMTL). The regulariser's factor only sets the overall scale of the
    weights: at the optimum exp(-s_i) = c / L_i, with c = 1 here and 1/2 in the paper's form, so
    the weights relative to each other are the same. With c = 1 a task whose loss is about 1 keeps
    weight about 1, as under equal weighting, so the learning rate and the clipping threshold
    tuned there still mean the same.

    The model's gradient is exp(-s_i) grad L_i (weights detached, through `context.backward`). The
    gradient of s_i, 1 - exp(-s_i) L_i, is set by hand from the losses averaged over processes, in
    float32 and without the fp16 loss scale, so every rank takes the same step. Under gradient
    accumulation it is averaged over the step's micro-batches, as the model's gradient is (so an
    optimiser other than Adam sees the same scale with and without accumulation).

    The weights are not bounded, as in the paper: exp(-s_i) settles near 1 / L_i, so a task whose
    loss falls to 0.05 is weighted about 20. Gradient clipping bounds the step such a weight can
    cause; a competitor who wants a cap can start from `initial_log_variance` or use `fixed`.

    Params: initial_log_variance (s_i at the start, 0: weights 1).
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], *, initial_log_variance: float = 0.0):
        super().__init__(tasks)
        self.log_variances = nn.Parameter(torch.full((len(self.tasks),), float(initial_log_variance)))

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        s = self.log_variances
        weights = torch.exp(-s.detach())
        context.backward((weights * self.stacked(losses)).sum())
        with torch.enable_grad():
            objective = (torch.exp(-s) * self.reduced_losses(losses, context) + s).sum()
            (grad,) = torch.autograd.grad(objective, s)
        accumulate_grad(s, grad / context.micro_batches)  # averaged over micro-batches, as the model's is
        return objective.detach()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, torch.exp(-self.log_variances.detach()).tolist()))
