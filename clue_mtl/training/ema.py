"""An exponential moving average of a model's weights, for evaluation and saving.

    ema_1 = w_1,   ema_t = decay * ema_{t-1} + (1 - decay) * w_t     (w_t: weights after update t)

over every parameter and floating-point buffer; integer buffers (BERT's position_ids) are copied.
It is torch's `AveragedModel` (a deep copy of the model, updated with a fused `_foreach_lerp_`)
with one change: `get_ema_multi_avg_fn` runs integer buffers through `ema * decay + w * (1 - decay)`
and truncates, so a counter (BatchNorm's num_batches_tracked) would never move; here they are
copied instead. Frozen parameters are averaged too, which leaves them exactly as they are (lerp of
equal values) at the cost of the lerp (e5-small's frozen word embedding is 96M of its 118M).

`apply_to(model)` swaps the averaged weights into the live model in place (no second copy of the
model) and swaps them back on exit, bit for bit; `state_dict`/`load_state_dict` carry the average
and its update count for exact resume.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def _ema_multi_avg_fn(decay: float):
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _count) -> None:
        # AveragedModel groups tensors by device and dtype, so one group is all float or all not.
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    return update


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return itertools.chain(model.parameters(), model.buffers())


class ExponentialMovingAverage:
    """EMA of `model`'s parameters and buffers. Call `update()` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), not {decay}")
        self.model = model
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        for parameter in self.averaged.parameters():
            parameter.grad = None   # deepcopy copies gradients; the average needs none

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self) -> None:
        self.averaged.update_parameters(self.model)

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module | None = None):
        """Within the block `model` (default: the tracked one) holds the averaged weights."""
        model = model if model is not None else self.model
        if self.updates == 0:
            raise RuntimeError("the EMA has no update yet; call update() after an optimiser step")
        pairs = list(zip(_tensors(model), _tensors(self.averaged.module), strict=True))
        for live, average in pairs:
            if live.shape != average.shape:
                raise ValueError(f"the EMA does not fit this model: shapes {tuple(average.shape)} and "
                                 f"{tuple(live.shape)}")
        _swap(pairs)
        try:
            yield model
        finally:
            _swap(pairs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)


@torch.no_grad()
def _swap(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for live, average in pairs:
        held = live.detach().clone()
        live.detach().copy_(average)
        average.detach().copy_(held)
