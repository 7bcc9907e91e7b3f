"""Per-task input features: which of the encoder's hidden states a task's head reads.

`last`: the top layer's token states (the official baseline). `scalar_mix`: a learned softmax mix
of every layer, embeddings included, times a learned scale (ELMo, Peters et al. 2018); lower
layers carry more syntax, and each task finds its own blend. `concat`: the top n layers' token
states side by side (n times as wide; pooling them is pooling each layer and concatenating).
"""

from __future__ import annotations

import torch
from torch import nn


class LayerFeatures(nn.Module):
    """Token states (rows x tokens x `width`) from the list [embeddings, layer 1, ..., layer N]."""

    def __init__(self, kind: str, hidden_size: int, num_states: int, layers: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "scalar_mix":
            self.mix_logits = nn.Parameter(torch.zeros(num_states))  # uniform to start, as in ELMo
            self.scale = nn.Parameter(torch.ones(()))
        elif kind == "concat":
            if not 1 <= (layers or 0) <= num_states:
                raise ValueError(f"features: concat of {layers} layers, but the encoder has {num_states} hidden "
                                 "states (embeddings included)")
        elif kind != "last":
            raise ValueError(f"unknown features {kind!r}")
        self.layers = layers if kind == "concat" else 1
        self.width = hidden_size * self.layers

    @property
    def needs_all_layers(self) -> bool:
        return self.kind != "last"

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "last":
            return states[-1]
        if self.kind == "concat":
            return torch.cat(states[-self.layers:], dim=-1)
        weights = torch.softmax(self.mix_logits.float(), dim=0).to(states[-1].dtype)
        return self.scale.to(states[-1].dtype) * torch.einsum("l,lbtd->btd", weights, torch.stack(states))
