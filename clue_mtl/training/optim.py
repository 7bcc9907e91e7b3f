"""AdamW: parameter groups (no decay for biases and norms, layer-wise learning-rate decay, head
rates) and the optimiser itself, fused where torch has the kernel."""

from __future__ import annotations

import torch
from torch import nn

from clue_mtl.model.private import is_adapter


def parameter_groups(model: nn.Module, *, lr: float, head_lr: float, weight_decay: float,
                     layer_lr_decay: float = 1.0) -> list[dict]:
    """Groups for a `MultiTaskModel`.

    Encoder layer i of n (the embeddings are layer 0) learns at lr * layer_lr_decay ** (n - i), as
    in BAM! and ELECTRA; a task's private copy of a layer learns as the layer it copies. Parameters
    above the last layer learn at lr. What a task trains from scratch learns at head_lr: its head
    and its LoRA adapters (which start at zero, as a head does). Vectors (biases, LayerNorm
    weights) take no weight decay.
    """
    scale_of: dict[int, float] = {}
    for layers in model.encoder_stacks():
        scale_of |= layer_rate_scales(layers, layer_lr_decay)

    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        from_scratch = name.startswith("heads.") or is_adapter(name)
        rate = head_lr if from_scratch else lr * scale_of.get(id(parameter), 1.0)
        groups.setdefault((rate, parameter.ndim >= 2), []).append(parameter)
    return [
        {"params": params, "lr": rate, "weight_decay": weight_decay if decays else 0.0}
        for (rate, decays), params in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1]))
    ]


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
