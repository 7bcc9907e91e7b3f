"""Poolings: how a head turns token states (and the attention mask) into one vector per row."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


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


class Pooling(nn.Module):
    """A pooling by name as a module; `attention` learns a query (one score per token, softmax over
    the row's tokens, the weighted sum), the others have no parameters."""

    def __init__(self, name: str, width: int):
        super().__init__()
        if name not in (*POOLINGS, "attention"):
            raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}, attention")
        self.name = name
        self.score = nn.Linear(width, 1) if name == "attention" else None
        self.out_width = width * (2 if name == "mean_max" else 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.score is None:
            return POOLINGS[self.name](hidden, mask)
        return attend(self.score(hidden).squeeze(-1), hidden, mask)


def attend(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` (rows x tokens) over the tokens `mask` keeps, applied to `values`."""
    scores = scores.float().masked_fill(~mask.bool(), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.einsum("bt,btd->bd", weights, values)
