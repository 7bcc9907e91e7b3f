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
    values). L_i(0), the first step's losses, is kept in a buffer.

    DDP: losses and norms are averaged over processes before use, so targets and w's gradient (set
    by hand, float32, unscaled) are identical on every rank; the model backward goes through
    `context.backward` as usual. Mixed precision: weights and norms are float32; the norms are
    taken without the fp16 loss scale, which is safe because they pass only through the head and
    the last layer (prefer bf16 if fp16 norms underflow to 0).

    Params: alpha (restoring force, default 1.5).
    """

    name = "gradnorm"

    def __init__(self, tasks: Sequence[str], *, alpha: float = 1.5):
        super().__init__(tasks)
        self.alpha = float(alpha)
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.ones(len(self.tasks)))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def renormalize(self) -> None:
        self.weights.clamp_(min=1e-4).mul_(len(self.tasks) / self.weights.sum())

    def gradient_norms(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        """||grad_W L_i|| per task over the last shared layer, float32, averaged over processes."""
        last = [p for p in context.last_shared_parameters if p.requires_grad]
        if not last:
            raise ValueError("gradnorm needs context.last_shared_parameters (the encoder's last layer)")
        norms = []
        for task in self.tasks:
            grads = torch.autograd.grad(losses[task], last, retain_graph=True, allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else losses[task].new_zeros((), dtype=torch.float32))
        return context.reduce_mean(torch.stack(norms))

    def targets(self, norms: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """mean(G) * r^alpha, with G = w * norms (detached)."""
        rates = current / self.initial_losses
        relative = rates / rates.mean()
        return (self.weights.detach() * norms).mean() * relative ** self.alpha

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        self.renormalize()
        current = self.reduced_losses(losses, context)
        with torch.no_grad():
            self.initial_losses.copy_(torch.where(self.has_initial, self.initial_losses, current))
            self.has_initial.fill_(True)
        norms = self.gradient_norms(losses, context).detach()
        targets = self.targets(norms, current)
        with torch.enable_grad():
            balance = (self.weights * norms - targets).abs().sum()
            (grad,) = torch.autograd.grad(balance, self.weights)
        accumulate_grad(self.weights, grad)
        total = (self.weights.detach() * self.stacked(losses)).sum()
        context.backward(total)
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        weights = self.weights.detach().clamp(min=1e-4)
        return dict(zip(self.tasks, (weights * len(self.tasks) / weights.sum()).tolist()))
