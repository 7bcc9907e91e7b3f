"""Dynamic task prioritisation (Guo, Haque, Huang, Yeung & Fei-Fei, ECCV 2018)."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import LossWeighting, StepContext

KPIS = ("accuracy", "likelihood")


class DynamicTaskPrioritization(LossWeighting):
    """w_i = -(1 - k_i)^gamma log(k_i), k_i a running key performance indicator in (0, 1).

    Harder tasks (low k) get larger weights, focal-loss style. k_i is an exponential moving
    average, k <- decay k + (1 - decay) kpi, started at the first observation. The KPI:

    - "accuracy" (default): the batch accuracy the trainer passes in `context.accuracies`, the
      paper's choice: the KPI should be the metric the task is judged on, and accuracy is the
      cheap per-batch stand-in for the competition's macro-F1.
    - "likelihood": exp(-L_i), the geometric mean of the probability given to the true label, for
      trainers that pass no accuracies. It is smoother than accuracy on small batches but sits
      lower (one confident mistake pulls it down), so it ranks tasks by calibration as much as
      by correctness.

    The current batch is folded into k before its weight is taken. k advances once per optimiser
    step, as DWA's and FAMO's histories do: under gradient accumulation, micro-batch m of a step is
    weighted from k folded with the mean KPI of micro-batches 0..m, and the step's mean KPI is
    folded in for good at its last micro-batch (so `decay` means the same per step with and without
    accumulation). k is clamped to
    [1e-4, 1 - 1e-4] so the logarithm stays finite. Everything is computed on the device from
    values averaged over processes: no `.item()` and no host round trip per step.

    Params: gamma (focusing exponent, default 2), decay (EMA decay per step, default 0.9: about
    the last ten batches), kpi ("accuracy" or "likelihood").
    """

    name = "dtp"

    def __init__(self, tasks: Sequence[str], *, gamma: float = 2.0, decay: float = 0.9, kpi: str = "accuracy"):
        super().__init__(tasks)
        if kpi not in KPIS:
            raise ValueError(f"dtp kpi must be one of {KPIS}, got {kpi!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"dtp decay must be in [0, 1), got {decay}")
        if gamma < 0:
            raise ValueError(f"dtp gamma must be >= 0, got {gamma}")
        self.gamma, self.decay, self.kpi_name = float(gamma), float(decay), kpi
        self.register_buffer("kpi", torch.zeros(len(self.tasks)))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("weights", torch.ones(len(self.tasks)))
        # the step's micro-batch KPIs so far; empty at every checkpoint (taken between steps)
        self.register_buffer("pending", torch.zeros(len(self.tasks)), persistent=False)

    def observe(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        """This step's KPI per task, float32, averaged over processes."""
        if self.kpi_name == "likelihood":
            return torch.exp(-self.reduced_losses(losses, context))
        missing = [task for task in self.tasks if task not in context.accuracies]
        if missing:
            raise ValueError(f"dtp with kpi='accuracy' needs context.accuracies for {missing} "
                             "(or set weighting.params.kpi: likelihood)")
        accuracies = torch.stack([context.accuracies[task].detach().float().reshape(()) for task in self.tasks])
        return context.reduce_mean(accuracies)

    @staticmethod
    def priorities(kpi: torch.Tensor, gamma: float) -> torch.Tensor:
        k = kpi.clamp(1e-4, 1 - 1e-4)
        return -((1 - k) ** gamma) * torch.log(k)

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        with torch.no_grad():
            self.pending.add_(self.observe(losses, context).to(self.kpi.device))
            current = self.pending / (context.micro_batch + 1)  # the step's mean KPI so far
            smoothed = torch.where(self.observed, self.decay * self.kpi + (1 - self.decay) * current, current)
            self.weights.copy_(self.priorities(smoothed, self.gamma))
            if context.last_micro_batch:
                self.kpi.copy_(smoothed)
                self.observed.fill_(True)
                self.pending.zero_()
        total = (self.weights * self.stacked(losses)).sum()
        context.backward(total)
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))
