"""Shared-private: a task's own capacity beside the shared encoder (`model.private`).

`layers`: the task runs the shared encoder's bottom layers, then its own copies of the top k
(initialised from the pre-trained ones). Where every task has copies, the shared encoder's top
layers would train on nothing (and leave DDP with unused parameters), so the model cuts them.

`lora`: the task's own low-rank adapters (Hu et al. 2021, through peft) on the shared encoder's
attention projections, switched on for the task's forward pass only; the shared weights still
train. On e5-small, rank 8 on the query and value projections is 147k parameters per task,
against 1.8M for one private layer.

Both are task parameters, not shared ones: the gradient-level weighting methods (PCGrad, MGDA,
GradNorm's last shared layer) never see them.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

from torch import nn

from clue_mtl.errors import ConfigError
from clue_mtl.model.encoders import layer_slot

ADAPTER_MARK = "lora_"  # peft's LoRA parameter names contain it


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


class PrivateLayers(nn.Module):
    """Each task's copies of the encoder's top layers, and the layer list the task runs."""

    def __init__(self, encoder: nn.Module, depths: dict[str, int]):
        super().__init__()
        owner, name = layer_slot(getattr(encoder, "base_model", encoder))
        layers = getattr(owner, name)
        for task, depth in depths.items():
            if not 1 <= depth < len(layers):
                raise ConfigError(f"model.private.{task}.layers is {depth}, but the encoder has {len(layers)} "
                                  "layers: keep at least one shared")
        self.copies = nn.ModuleDict({task: nn.ModuleList(copy.deepcopy(layers[len(layers) - depth:]))
                                     for task, depth in depths.items()})
        self.full_depth = len(layers)
        self._slot = (owner, name)

    def stack(self, task: str) -> nn.ModuleList | None:
        """The task's layers, bottom to top (shared ones below its copies); None: the shared list."""
        if task not in self.copies:
            return None
        shared = getattr(*self._slot)
        return nn.ModuleList([*shared[:self.full_depth - len(self.copies[task])], *self.copies[task]])

    @contextlib.contextmanager
    def running(self, task: str):
        """The encoder runs the task's layers inside the block (its own list swapped in, then back)."""
        stack = self.stack(task)
        if stack is None:
            yield
            return
        owner, name = self._slot
        shared = getattr(owner, name)
        owner._modules[name] = stack  # not setattr: the stack is no registered child of the model
        try:
            yield
        finally:
            owner._modules[name] = shared


class TaskAdapters:
    """Per-task LoRA adapters injected into the shared encoder; `activate(task)` before its forward."""

    def __init__(self, encoder: nn.Module, specs: dict[str, dict]):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        for task, spec in specs.items():
            config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                target_modules=spec.get("targets"))
            with warnings.catch_warnings():  # the second adapter: "Already found a peft_config ..."
                warnings.simplefilter("ignore", UserWarning)
                try:
                    inject_adapter_in_model(config, encoder, adapter_name=task)
                except ValueError as error:
                    raise ConfigError(f"model.private.{task}: {str(error).splitlines()[0]} "
                                      "(name the modules in targets)") from None
        for parameter in encoder.parameters():  # peft froze the base weights; here they are the shared ones
            parameter.requires_grad_(True)
        self.tasks = set(specs)
        self._layers = [module for module in encoder.modules() if isinstance(module, BaseTunerLayer)]
        self._parameters = [p for n, p in encoder.named_parameters() if is_adapter(n)]

    @contextlib.contextmanager
    def active(self, task: str):
        """Only `task`'s adapters (none for a task without) take part in forward passes inside the
        block; outside it, none do (the plain shared encoder)."""
        self._switch([task] if task in self.tasks else [])
        try:
            yield
        finally:
            self._switch([])

    def _switch(self, names: list[str]) -> None:
        for layer in self._layers:
            layer.set_adapter(names)
        # peft's switch also sets requires_grad off on the inactive adapters; autograd skips a leaf
        # that no longer requires grad at backward time, and the step's backward comes after every
        # task's forward, so all adapters stay trainable.
        for parameter in self._parameters:
            parameter.requires_grad_(True)
        # (ending with none active is safe: the graph of a forward pass keeps the adapters it used)
