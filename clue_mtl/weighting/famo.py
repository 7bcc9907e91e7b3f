"""FAMO: fast adaptive multitask optimisation (Liu, Liu, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import LossWeighting, StepContext, accumulate_grad


class FAMO(LossWeighting):
    """Logits xi, task weights z = softmax(xi); the model follows sum_i z_i log L_i, normalised.

    Model update: the gradient of sum_i z_i log L_i is sum_i (z_i / L_i) grad L_i; FAMO divides it
    by c = sum_j z_j / L_j, so the model's backward is that of sum_i w_i L_i with
    w_i = (z_i / L_i) / sum_j (z_j / L_j) (w detached). The w_i are computed from the losses
    averaged over processes, so they are identical on every rank and DDP averages as usual.

    Logit update, from the change of log losses delta_i = log L_i(before) - log L_i(after):
    grad xi = J_softmax(xi)^T delta + gamma xi, i.e. z * (delta - <z, delta>) + gamma xi (the
    official code's Adam weight decay gamma, folded into the gradient: the same thing for
    torch's Adam). Tasks whose losses fell most lose weight. The official code measures
    "after" with a second forward pass of the same batch after the model step; to keep one
    forward per step, "before" is the previous step's losses and "after" this step's (a different
    batch, so noisier; the logits lag the model by one step). The first step has no previous
    losses and gives the logits a zero gradient. The previous losses are kept in a buffer. Under
    gradient accumulation each micro-batch is weighted by its own losses, and the logits get
    one gradient per optimiser step, from the mean of its micro-batches' losses.
    The logits' gradient is set by hand (float32, unscaled, identical on every rank); the
    trainer's weighting optimiser (Adam, lr 0.025 as in the paper) steps them.

    Losses are shifted by `min_losses` (0 for cross-entropy) and 1e-8 before the logarithm, as in
    the official code. FAMO scales whole losses, so the heads' gradients are scaled by w_i too
    (as in the paper); with Adam this only rescales each head's own updates.

    Params: gamma (logit weight decay, default 0.01).
    """

    name = "famo"
    epsilon = 1e-8

    def __init__(self, tasks: Sequence[str], *, gamma: float = 0.01):
        super().__init__(tasks)
        if gamma < 0:
            raise ValueError(f"famo gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.logits = nn.Parameter(torch.zeros(len(self.tasks)))
        self.register_buffer("min_losses", torch.zeros(len(self.tasks)))
        self.register_buffer("previous_losses", torch.ones(len(self.tasks)))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self.register_buffer("weights", torch.full((len(self.tasks),), 1.0 / len(self.tasks)))
        # the step's micro-batch losses so far; empty at every checkpoint (taken between steps)
        self.register_buffer("pending", torch.zeros(len(self.tasks)), persistent=False)

    def shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return losses - self.min_losses + self.epsilon

    def logit_gradient(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """J_softmax^T (log previous - log current) + gamma * logits."""
        delta = torch.log(self.shifted(previous)) - torch.log(self.shifted(current))
        logits = self.logits.detach()
        z = torch.softmax(logits, dim=0)
        return z * (delta - (z * delta).sum()) + self.gamma * logits

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        current = self.reduced_losses(losses, context)
        with torch.no_grad():
            z = torch.softmax(self.logits.detach(), dim=0)
            scaled = z / self.shifted(current)
            self.weights.copy_(scaled / scaled.sum())
            self.pending.add_(current / context.micro_batches)
            if context.last_micro_batch:
                grad = self.logit_gradient(self.previous_losses, self.pending)
                accumulate_grad(self.logits, torch.where(self.has_previous, grad, torch.zeros_like(grad)))
                self.previous_losses.copy_(self.pending)
                self.has_previous.fill_(True)
                self.pending.zero_()
        total = (self.weights * self.stacked(losses)).sum()
        context.backward(total)
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))
