"""The Accelerator a run gets: the precision this hardware runs fast, CPU processes in a gloo group."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from clue_mtl.errors import ConfigError
from clue_mtl.hardware import resolve_precision


def fresh_accelerator(**kwargs) -> Accelerator:
    """An Accelerator for this run.

    `mixed_precision="auto"` becomes what the hardware runs fast (`hardware.resolve_precision`).
    Without a GPU it asks for the CPU explicitly, which is what makes Accelerate form a gloo
    process group when several CPU processes are launched. In a single process (a notebook, a
    test) the global state of an earlier run is reset first, so one session can switch precision.
    fp16 is refused without a GPU: Accelerate would run a CPU in float32 under that name.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    on_cpu = not torch.accelerator.is_available()
    if "mixed_precision" in kwargs:
        kwargs["mixed_precision"] = resolve_precision(kwargs["mixed_precision"], "cpu" if on_cpu else None)
        if on_cpu and kwargs["mixed_precision"] == "fp16":
            raise ConfigError("train.mixed_precision: fp16 needs a GPU (on a CPU Accelerate would train in "
                              "float32 under that name); use bf16 or auto")
    return Accelerator(cpu=on_cpu, **kwargs)
