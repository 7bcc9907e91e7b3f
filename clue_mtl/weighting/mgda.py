"""MGDA: multi-task learning as multi-objective optimisation (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from .base import GradientWeighting, StepContext, gram_matrix


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """alpha = argmin over the simplex of |sum_i alpha_i g_i|^2 = alpha^T G alpha, exactly.

    G is the Gram matrix (float64 on the CPU). Candidates: for every pair, the closed-form
    minimiser on the segment (Sener & Koltun's Algorithm 1, clamped to [0, 1], which also covers
    the vertices); for every support of three or more tasks, the minimiser on the affine hull
    from the KKT system [[G_S, 1], [1^T, 0]] (least squares, so singular G_S is fine), kept when
    all its weights are >= 0. The smallest value wins, the smaller support on ties. That is
    2^T - T - 1 small solves: a handful for the three CLUE tasks.
    """
    tasks = gram.shape[0]
    if tasks == 1:
        return torch.ones(1, dtype=gram.dtype)
    best, best_value = None, math.inf

    def consider(alpha: torch.Tensor) -> None:
        nonlocal best, best_value
        value = float(alpha @ gram @ alpha)
        if not math.isfinite(value):
            return
        if best is None or value < best_value - 1e-9 * abs(best_value):  # relative: G has the fp16 scale
            best, best_value = alpha, value

    for i, j in itertools.combinations(range(tasks), 2):
        difference = gram[i, i] + gram[j, j] - 2 * gram[i, j]
        gamma = 0.5 if difference <= 0 else float(((gram[j, j] - gram[i, j]) / difference).clamp(0, 1))
        alpha = torch.zeros(tasks, dtype=gram.dtype)
        alpha[i], alpha[j] = gamma, 1 - gamma
        consider(alpha)
    for size in range(3, tasks + 1):
        for support in itertools.combinations(range(tasks), size):
            index = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=gram.dtype)
            kkt[:size, :size] = gram[index][:, index]
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            rhs = torch.zeros(size + 1, 1, dtype=gram.dtype)
            rhs[size] = 1
            solution = torch.linalg.lstsq(kkt, rhs, driver="gelsd").solution[:size, 0]
            if not torch.isfinite(solution).all() or (solution < -1e-10).any():
                continue
            alpha = torch.zeros(tasks, dtype=gram.dtype)
            alpha[index] = solution.clamp_min(0)
            consider(alpha / alpha.sum())
    if best is None:  # non-finite gradients: any weights do, the fp16 scaler skips this step
        return torch.full((tasks,), 1.0 / tasks, dtype=gram.dtype)
    return best


class MGDA(GradientWeighting):
    """The min-norm point of the convex hull of the tasks' shared gradients (MGDA).

    The update of the shared parameters is sum_i alpha_i g_i with alpha = argmin over the simplex
    of |sum_i alpha_i g_i|; the heads keep their own task's gradient (unweighted).

    Which gradients: all shared parameters, not `last_shared_parameters`. The paper's MGDA-UB
    bound replaces the gradients by gradients w.r.t. one shared representation to save T-1
    backward passes; here every task runs the encoder on its own batch, so there is no common
    representation and no saving to be had: the per-task gradients of all shared parameters cost
    one backward in total (the graphs are disjoint), and the update needs them anyway. So alpha
    is exact MGDA over the parameters it moves. No gradient normalisation (the paper's theory;
    their code's "loss+" option is left out).

    The solver (`min_norm_weights`) is exact and runs on the CPU on the tasks x tasks Gram matrix:
    one small device-to-host copy per step. DDP: per-task gradients are averaged over processes
    first, so alpha is identical on every rank; heads via `context.head_parameters`; the trainer
    must skip DDP's own synchronisation (`manual_gradients`). Mixed precision: gradients gathered
    in float32, Gram and solver in float64; alpha does not depend on a common scale, so the fp16
    loss scale passes through and is unscaled before clipping.
    """

    name = "mgda"

    def __init__(self, tasks: Sequence[str]):
        super().__init__(tasks)
        self.register_buffer("weights", torch.full((len(self.tasks),), 1.0 / len(self.tasks)))

    def combine(self, task_grads: torch.Tensor, losses: torch.Tensor, context: StepContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        gram = gram_matrix(task_grads).cpu()
        alpha = min_norm_weights(gram).to(task_grads.device, torch.float32)
        self.weights.copy_(alpha)
        return alpha @ task_grads, (alpha * losses.float()).sum()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))
