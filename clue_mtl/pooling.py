"""Poolings: how a head turns the encoder's token states (and the attention mask) into one vector."""

from __future__ import annotations

from typing import Callable

import torch


def pool_first(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def pool_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)


def pool_mean_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([pool_mean(hidden, mask), pool_max(hidden, mask)], dim=-1)


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "first": pool_first, "mean": pool_mean, "max": pool_max, "mean_max": pool_mean_max,
}
