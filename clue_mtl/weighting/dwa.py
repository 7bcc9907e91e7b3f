"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019), over windows of steps."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import LossWeighting, StepContext


class DynamicWeightAverage(LossWeighting):
    """w_i = K exp(r_i / T) / sum_j exp(r_j / T), with K the number of tasks.

    The paper's r_i is the ratio of task i's loss over the last two epochs. Fine-tuning lasts a
    few epochs, so, as in nash-mtl, r_i here is the mean loss over the last `window` steps divided
    by the mean over the `window` steps before those. The weights are 1 until two full windows of
    losses exist. The current step's loss is not used for its own weight (the paper weights epoch
    t by epochs t-1 and t-2); it is recorded afterwards.

    The loss history is a ring buffer of 2 * window rows in a registered buffer (it checkpoints);
    rows are losses averaged over processes, so the weights are the same on every rank. Everything
    stays on the device: no host synchronisation per step. One row is recorded per optimiser
    step: under gradient accumulation, the mean of its micro-batches' losses.

    Params: window (steps per window, default 50), temperature (T, default 2).
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], *, window: int = 50, temperature: float = 2.0):
        super().__init__(tasks)
        if window < 1:
            raise ValueError(f"dwa window must be >= 1, got {window}")
        if temperature <= 0:
            raise ValueError(f"dwa temperature must be > 0, got {temperature}")
        self.window = int(window)
        self.temperature = float(temperature)
        self.register_buffer("history", torch.zeros(2 * self.window, len(self.tasks)))
        self.register_buffer("recorded", torch.zeros((), dtype=torch.long))
        self.register_buffer("weights", torch.ones(len(self.tasks)))
        # the step's micro-batch losses so far; empty at every checkpoint (taken between steps)
        self.register_buffer("pending", torch.zeros(len(self.tasks)), persistent=False)

    def current_weights(self) -> torch.Tensor:
        """The weights from the recorded history (float32, on the buffers' device)."""
        size = 2 * self.window
        newest_first = (self.recorded - 1 - torch.arange(size, device=self.history.device)) % size
        ordered = self.history[newest_first]
        recent, before = ordered[: self.window].mean(0), ordered[self.window:].mean(0)
        ratios = recent / before.clamp_min(torch.finfo(before.dtype).tiny)
        dynamic = len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0)
        return torch.where(self.recorded >= size, dynamic, torch.ones_like(dynamic))

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        weights = self.current_weights()
        total = (weights * self.stacked(losses)).sum()
        context.backward(total)
        with torch.no_grad():
            self.weights.copy_(weights)
            self.pending.add_(self.reduced_losses(losses, context) / context.micro_batches)
            if context.last_micro_batch:
                row = (self.recorded % (2 * self.window)).reshape(1)
                self.history.index_copy_(0, row, self.pending.unsqueeze(0))
                self.recorded.add_(1)
                self.pending.zero_()
        return total.detach()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))
