"""The loss-weighting strategy interface.

A strategy receives the per-task losses of one step and performs the backward pass. Methods that
reweight losses (equal, fixed, uncertainty, DWA, DTP, FAMO, and GradNorm, which first takes
per-task gradient norms over `context.last_shared_parameters`) combine them and call
`context.backward(total)` once; gradient-level methods (PCGrad, MGDA) take per-task gradients
over `context.shared_parameters` and combine them (`GradientWeighting`).

Learned weighting parameters are `nn.Parameter`s of the strategy; the trainer gives them their
own optimiser and learning rate. Every strategy fills their `.grad` itself, in float32, from losses
and norms already averaged over processes: the gradients are unscaled (no fp16 loss scale) and
identical on every rank, so that optimiser needs neither `accelerator.prepare` nor a DDP average.
Running state (initial losses, loss windows) lives in registered buffers so it is saved in
checkpoints and resumes exactly.

Gradient-level strategies (`manual_gradients = True`) write the shared parameters' gradients by
hand: they average per-task gradients over processes themselves, so the trainer must run the
step's forward passes and `backward` inside `accelerator.no_sync(model)` (no DDP averaging).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    accuracies: each task's batch accuracy as a 0-dim tensor on the device (DTP's KPI); may be
        left empty for strategies that do not use it.
    head_parameters: the trainable parameters outside the shared encoder (the task heads).
        Gradient-level strategies average their gradients over processes, since DDP does not;
        may be left empty on one process.
    micro_batch, micro_batches: this call's position among the optimiser step's micro-batches
        (gradient accumulation). Strategies with a per-step history (DWA, FAMO) record the step's
        mean loss once, at its last micro-batch.
    """

    backward: Callable[[torch.Tensor], None]
    shared_parameters: Sequence[nn.Parameter]
    last_shared_parameters: Sequence[nn.Parameter]
    features: dict[str, torch.Tensor]
    step: int
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor
    accuracies: dict[str, torch.Tensor] = field(default_factory=dict)
    head_parameters: Sequence[nn.Parameter] = ()
    micro_batch: int = 0
    micro_batches: int = 1

    @property
    def last_micro_batch(self) -> bool:
        return self.micro_batch == self.micro_batches - 1


class LossWeighting(nn.Module):
    """Base class: subclasses set `name` and implement `backward`.

    manual_gradients: True where `backward` writes the shared gradients by hand and averages them
        over processes itself; the trainer then wraps the step in `accelerator.no_sync(model)`.
    """

    name: str = ""
    manual_gradients: bool = False

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

    def reduced_losses(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        """The task losses as detached float32, averaged over processes: what weights are computed from."""
        return context.reduce_mean(self.stacked(losses).detach().float())


def gram_matrix(task_grads: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """task_grads @ task_grads.T accumulated in float64 over column chunks: the float64 products
    the solvers need, without a float64 copy of the whole (tasks x parameters) matrix."""
    gram = torch.zeros(task_grads.shape[0], task_grads.shape[0], dtype=torch.float64, device=task_grads.device)
    for block in task_grads.split(chunk, dim=1):
        block = block.double()
        gram += block @ block.T
    return gram


def accumulate_grad(parameter: nn.Parameter, grad: torch.Tensor) -> None:
    """Add `grad` to `parameter.grad` (set it when empty), as autograd would."""
    grad = grad.to(parameter.dtype)
    if parameter.grad is None:
        parameter.grad = grad.clone()
    else:
        parameter.grad.add_(grad)


class GradientWeighting(LossWeighting):
    """Base for strategies that combine per-task gradients of the shared parameters.

    Each task's loss is backpropagated alone through `context.backward` (the tasks' graphs are
    disjoint, so the three passes cost about one backward of the summed loss). The task heads keep
    their own task's gradient unchanged; the shared gradients are gathered into one float32 matrix
    (tasks x shared parameters), averaged over processes, combined by `combine` and written back.
    Gradients present before the call (gradient accumulation) are kept and added to.

    Mixed precision: `context.backward` applies the fp16 loss scale to every task alike; the
    combinations are homogeneous of degree one in the gradients, so the scale passes through and
    is removed by the usual unscale before clipping. Non-finite gradients stay non-finite, and the
    scaler skips the step.
    """

    manual_gradients = True

    def backward(self, losses: dict[str, torch.Tensor], context: StepContext) -> torch.Tensor:
        parameters = [p for p in context.shared_parameters if p.requires_grad]
        if not parameters:
            raise ValueError(f"{self.name} needs context.shared_parameters (the encoder's trainable parameters)")
        carried = [p.grad for p in parameters]
        for parameter in parameters:
            parameter.grad = None
        sizes = [p.numel() for p in parameters]
        device = parameters[0].device
        task_grads = torch.zeros(len(self.tasks), sum(sizes), dtype=torch.float32, device=device)
        for row, task in enumerate(self.tasks):
            context.backward(losses[task])
            offset = 0
            for parameter, size in zip(parameters, sizes):
                if parameter.grad is not None:
                    task_grads[row, offset:offset + size] = parameter.grad.reshape(-1)
                    parameter.grad = None
                offset += size
        task_grads = context.reduce_mean(task_grads)
        self._average_head_gradients(context)
        combined, total = self.combine(task_grads, self.stacked(losses).detach(), context)
        for parameter, grad, previous in zip(parameters, combined.split(sizes), carried):
            grad = grad.view_as(parameter).to(parameter.dtype)
            parameter.grad = grad if previous is None else previous + grad
        return total

    def combine(self, task_grads: torch.Tensor, losses: torch.Tensor, context: StepContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """From per-task gradients (tasks x parameters, float32), the shared update and the loss to log."""
        raise NotImplementedError

    @staticmethod
    def _average_head_gradients(context: StepContext) -> None:
        heads = [p for p in context.head_parameters if p.grad is not None]
        if not heads:
            return
        flat = context.reduce_mean(torch.cat([p.grad.reshape(-1) for p in heads]))
        for parameter, grad in zip(heads, flat.split([p.numel() for p in heads])):
            parameter.grad = grad.view_as(parameter).to(parameter.grad.dtype)
