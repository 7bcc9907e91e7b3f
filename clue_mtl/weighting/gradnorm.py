"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import LossWeighting, StepContext, accumulate_grad


class GradNorm(LossWeighting):
    """Learned weights w_i that balance the tasks' gradient norms at the last shared layer.

    Each step, with W = `context.last_shared_parameters`:

    - G_i = ||grad_W (w_i L_i)|| = w_i ||grad_W L_i||;
    - relative inverse training rate r_i = (L_i(t) / L_i(0)) / mean_j (L_j(t) / L_j(0));
    - target_i = mean_j(G_j) * r_i^alpha, held constant: a task whose loss falls more slowly
      (larger r_i) gets a larger target norm, hence a larger weight;
    - the GradNorm loss sum_i |G_i - target_i| gives the gradient of w only; the model's gradient
      is that of sum_i w_i L_i with w held constant.

    The norms ||grad_W L_i|| come from one `autograd.grad` per task over W alone (head plus last
    layer: cheap), not over the whole encoder. Since G_i is w_i times a norm that does not depend
    on w, d G_i / d w_i is that norm: the gradient of the GradNorm loss w.r.t. w is the same as
    with `create_graph=True`, without building a second-order graph.

    Before each step w is clamped to >= 1e-4 and renormalised to sum to the number of tasks
    (this undoes the previous optimiser step's drift; `task_weights` reports the normalised
    values). L_i(0) is the mean loss of the first `initial_steps` optimiser steps (LibMTL averages
    the first epoch): one step's loss is that of a few rows of each task, and a 20% error in it
    would shift the task's target by about 1.3x for the whole run. Until those steps are seen,
    L_i(0) is the mean so far.

    DDP: losses and the last layer's per-task gradients are averaged over processes before use,
    so the norms are those of the global batch's gradient (not a mean of per-rank norms, which
    would depend on the number of processes), and targets and w's gradient (set by hand, float32,
    unscaled, averaged over micro-batches as the model's is) are identical on every rank; the
    model backward goes through `context.backward` as usual. The norms come from each micro-batch,
    a few rows per task: noisier than a full batch's, which the restoring force smooths over steps.
    The all-reduce carries tasks x last-layer parameters (about 21 MB in float32 for e5-small)
    per micro-batch: the price of the global batch's norm. A 20-step L(0) sits a little low for a
    task that learns fast from the start; under the usual warmup the first steps barely move it. Mixed precision: weights and norms are float32; the norms are
    taken without the fp16 loss scale, which is safe because they pass only through the head and
    the last layer (prefer bf16 if fp16 norms underflow to 0).

    Params: alpha (restoring force, default 1.5), initial_steps (steps averaged into L(0), default 20).
    """

    name = "gradnorm"

    def __init__(self, tasks: Sequence[str], *, alpha: float = 1.5, initial_steps: int = 20):
        super().__init__(tasks)
        if initial_steps < 1:
            raise ValueError(f"gradnorm initial_steps must be >= 1, got {initial_steps}")
        self.alpha, self.initial_steps = float(alpha), int(initial_steps)
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_sum", torch.zeros(len(self.tasks)))  # step mean losses, summed
        self.register_buffer("initial_count", torch.zeros((), dtype=torch.long))  # steps in the sum
        # the step's micro-batch losses so far; empty at every checkpoint (taken between steps)
        self.register_buffer("pending", torch.zeros(len(self.tasks)), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint from before L(0) was averaged holds `initial_losses` and `has_initial`:
        it resumes with its L(0), as a collection already complete."""
        if prefix + "initial_losses" in state_dict:
            losses = state_dict.pop(prefix + "initial_losses")
            seen = bool(state_dict.pop(prefix + "has_initial", torch.tensor(False)))
            state_dict[prefix + "initial_sum"] = losses * self.initial_steps if seen else torch.zeros_like(losses)
            state_dict[prefix + "initial_count"] = torch.tensor(self.initial_steps if seen else 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def renormalize(self) -> None:
        self.weights.clamp_(min=1e-4).mul_(len(self.tasks) / self.weights.sum())

    def gradient_norms(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        """||grad_W L_i|| per task over the last shared layer, float32, averaged over processes."""
        last = [p for p in context.last_shared_parameters if p.requires_grad]
        if not last:
            raise ValueError("gradnorm needs context.last_shared_parameters (the encoder's last layer)")
        rows = []
        for task in self.tasks:
            grads = torch.autograd.grad(losses[task], last, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                                   for g, p in zip(grads, last)]))
        return context.reduce_mean(torch.stack(rows)).norm(dim=1)  # the norm of the mean gradient

    def initial_losses(self, current: torch.Tensor, context: StepContext) -> torch.Tensor:
        """L(0): the mean of the first `initial_steps` steps' losses (this step's so far included)."""
        self.pending.add_(current / context.micro_batches)
        collecting = self.initial_count < self.initial_steps
        partial = self.pending * context.micro_batches / (context.micro_batch + 1)
        estimate = torch.where(collecting, (self.initial_sum + partial) / (self.initial_count + 1),
                               self.initial_sum / self.initial_count.clamp(min=1))
        if context.last_micro_batch:
            self.initial_sum.add_(torch.where(collecting, self.pending, torch.zeros_like(self.pending)))
            self.initial_count.add_(collecting.long())
            self.pending.zero_()
        return estimate

    def targets(self, norms: torch.Tensor, current: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """mean(G) * r^alpha, with G = w * norms (detached)."""
        rates = current / initial
        relative = rates / rates.mean()
        return (self.weights.detach() * norms).mean() * relative ** self.alpha

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        self.renormalize()
        current = self.reduced_losses(losses, context)
        with torch.no_grad():
            initial = self.initial_losses(current, context)
        norms = self.gradient_norms(losses, context).detach()
        targets = self.targets(norms, current, initial)
        with torch.enable_grad():
            balance = (self.weights * norms - targets).abs().sum()
            (grad,) = torch.autograd.grad(balance, self.weights)
        accumulate_grad(self.weights, grad / context.micro_batches)  # averaged, as the model's is
        total = (self.weights.detach() * self.stacked(losses)).sum()
        context.backward(total)
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        weights = self.weights.detach().clamp(min=1e-4)
        return dict(zip(self.tasks, (weights * len(self.tasks) / weights.sum()).tolist()))
