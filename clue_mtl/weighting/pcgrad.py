"""PCGrad: gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020)."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import GradientWeighting, StepContext, gram_matrix


def pcgrad_coefficients(gram: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """Coefficients c with sum_i g_i^PC = sum_k c_k g_k, from the Gram matrix G_jk = g_j . g_k.

    Each projected gradient stays a combination of the original ones, g_i^PC = sum_k C_ik g_k, so
    the projections "if g_i^PC . g_j < 0: g_i^PC -= (g_i^PC . g_j) / |g_j|^2 g_j" only touch the
    small matrix C: g_i^PC . g_j = C_i . G_:j. The conflict test is a clamp, not a branch, so
    nothing leaves the device. orders[i] is the order in which task i meets the others.
    """
    tasks = gram.shape[0]
    coefficients = torch.eye(tasks, dtype=gram.dtype, device=gram.device)
    squared_norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny)
    for i in range(tasks):
        for j in orders[i]:
            dot = coefficients[i] @ gram[:, j]
            coefficients[i, j] -= dot.clamp(max=0) / squared_norms[j]
    return coefficients.sum(0)


class PCGrad(GradientWeighting):
    """Project each task's shared gradient off the others' where they conflict, then sum.

    For each task i and each other task j, in an order shuffled per task and step: if
    g_i^PC . g_j < 0, g_i^PC -= (g_i^PC . g_j) / |g_j|^2 g_j (g_j the original gradient). The
    shared update is sum_i g_i^PC; the heads keep their own task's gradient.

    Cost: per-task gradients of all shared parameters (one backward in total, since the tasks'
    graphs are disjoint; memory: tasks x shared parameters in float32), one Gram matrix, then
    projections in coefficient space (see `pcgrad_coefficients`). The shuffles come from a CPU
    generator seeded with (seed, step): identical on every rank and after a resume, and no state.

    DDP: per-task gradients are averaged over processes before projecting (so every rank projects
    the same global gradients), heads via `context.head_parameters`; the trainer must skip DDP's
    own synchronisation (`manual_gradients`). Mixed precision: the projection is homogeneous of
    degree one, so the fp16 loss scale passes through and is unscaled before clipping; the
    gradients are gathered in float32 and the small projection algebra runs in float64.

    Params: seed (shuffling, default 0).
    """

    name = "pcgrad"

    def __init__(self, tasks: Sequence[str], *, seed: int = 0):
        super().__init__(tasks)
        self.seed = int(seed)

    def orders(self, step: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tasks = len(self.tasks)
        orders = []
        for i in range(tasks):
            others = [j for j in range(tasks) if j != i]
            orders.append([others[k] for k in torch.randperm(len(others), generator=generator).tolist()])
        return orders

    def combine(self, task_grads: torch.Tensor, losses: torch.Tensor, context: StepContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        gram = gram_matrix(task_grads)
        coefficients = pcgrad_coefficients(gram, self.orders(context.step))
        return coefficients.to(task_grads.dtype) @ task_grads, losses.sum()

    def task_weights(self) -> dict[str, float]:
        return {task: 1.0 for task in self.tasks}
