"""AdamW: parameter groups (no decay for biases and norms, layer-wise learning-rate decay, head
rates) and the optimiser itself, fused where torch has the kernel.

`parameter_groups` is the one place groups are built: every recipe hands it its parameters, each
with its learning rate, and takes the groups back in a layout its checkpoints pin."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from clue_mtl.model.private import is_adapter

# The group layouts. An optimiser's saved state names each group by its index, so a layout, once
# a recipe's checkpoints hold it, never changes: resume builds the same groups in the same order.
BY_RATE = "by_rate"  # the multi-task model
PAIRS = "pairs"      # pre-training's encoder and head, the auxiliary masked-LM head
LAYOUTS = (BY_RATE, PAIRS)


def decays(parameter: nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: to matrices (weights, embeddings), not to vectors
    (biases, LayerNorm weights)."""
    return parameter.ndim >= 2


def parameter_groups(rated: Iterable[tuple[nn.Parameter, float]], *, weight_decay: float, layout: str,
                     lr: float = 1.0) -> list[dict]:
    """AdamW's groups for `rated`: (parameter, factor) pairs in the model's order; a parameter
    learns at lr * factor (with lr 1, the factors are the rates), with `weight_decay` where it
    `decays`, else none. Parameters that take no gradient are left out.

    layout BY_RATE: one group per (factor, decays) that holds a parameter, the lowest factor
    first, at one factor the vectors before the matrices. Layout PAIRS: per factor, the highest
    first, the matrices then the vectors, both groups even when one is empty; no parameter at all
    still gives the pair, at lr.
    """
    trainable = [(parameter, factor) for parameter, factor in rated if parameter.requires_grad]
    decay_of = {True: weight_decay, False: 0.0}
    if layout == BY_RATE:
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for parameter, factor in trainable:
            groups.setdefault((factor, decays(parameter)), []).append(parameter)
        return [{"params": params, "lr": lr * factor, "weight_decay": decay_of[decay]}
                for (factor, decay), params in sorted(groups.items(), key=lambda item: item[0])]
    if layout == PAIRS:
        factors = sorted({factor for _, factor in trainable}, reverse=True) or [1.0]
        return [{"params": [p for p, f in trainable if f == factor and decays(p) == decay], "lr": lr * factor,
                 "weight_decay": decay_of[decay]}
                for factor in factors for decay in (True, False)]
    raise ValueError(f"unknown parameter-group layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def multitask_rates(model: nn.Module, *, lr: float, head_lr: float,
                    layer_lr_decay: float = 1.0) -> list[tuple[nn.Parameter, float]]:
    """(parameter, learning rate) for each parameter of a `MultiTaskModel`, in its order.

    Encoder layer i of n (the embeddings are layer 0) learns at lr * layer_lr_decay ** (n - i), as
    in BAM! and ELECTRA; a task's private copy of a layer learns as the layer it copies. Parameters
    above the last layer learn at lr. What a task trains from scratch learns at head_lr: its head
    and its LoRA adapters (which start at zero, as a head does).
    """
    scale_of: dict[int, float] = {}
    for layers in model.encoder_stacks():
        scale_of |= layer_rate_scales(layers, layer_lr_decay)
    return [(parameter, head_lr if name.startswith("heads.") or is_adapter(name)
             else lr * scale_of.get(id(parameter), 1.0))
            for name, parameter in model.named_parameters()]


def layer_rate_scales(layers: list[nn.Module], decay: float) -> dict[int, float]:
    """id(parameter) -> decay ** (layers above its layer), for [embeddings, layer 1, ..., top] as
    `encoders.encoder_layers` lists them: the learning-rate factor of layer-wise decay."""
    return {id(parameter): decay ** (len(layers) - 1 - i)
            for i, layer in enumerate(layers) for parameter in layer.parameters()}


FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def adamw(groups: list[dict], *, device_type: str, fused: bool = True, precision: str = "no",
          **kwargs) -> torch.optim.AdamW:
    """AdamW over `groups`; with `fused`, torch's fused kernel where the device has one, except
    under fp16: there the GradScaler hands the overflow check to a fused kernel and always calls
    `step()`, so Accelerate could no longer tell a skipped step (the scheduler, EMA and weighting
    optimiser would advance on overflowed steps).

    On CPU torch's default is the per-tensor loop (no foreach kernel there): one small update per
    parameter tensor, about 200 of them for e5-small. The fused kernel does the same arithmetic in
    one pass and measured about 0.2 s faster per quickstart step on 2 AVX2 cores
    (benchmarks/results/train_throughput.md).
    """
    if fused and device_type in FUSED_DEVICES and precision != "fp16":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
