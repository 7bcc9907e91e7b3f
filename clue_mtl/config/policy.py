"""Training policy the config decides: the encoder pass `auto` resolves to, the losses the weighting combines.

Here rather than in `training/`: the config resolves `train.encoder_pass: auto` as it is read (so the
saved config and the checkpoint's fingerprint hold the pass that runs), and its checks build the
weighting over these losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clue_mtl.config.schema import RunConfig


def resolved_encoder_pass(config: RunConfig) -> str:
    """`train.encoder_pass` with auto resolved: one pass over every task's rows (joint; 1.05-1.11x
    the whole step on 2 AMX cores: benchmarks/train_throughput, step_experiments) unless a task has
    private layers or adapters (its rows need an encoder of their own), or the weighting method
    backpropagates each task's loss alone (PCGrad, MGDA: one backward per task through one shared
    graph would need it retained)."""
    from clue_mtl.weighting import METHODS

    if config.train.encoder_pass != "auto":
        return config.train.encoder_pass
    per_task = bool(config.model.private) or METHODS[config.weighting.method].manual_gradients
    return "per_task" if per_task else "joint"


def weighted_tasks(config: RunConfig) -> list[str]:
    """The losses the weighting combines: the tasks, and the auxiliary masked LM where it is on."""
    from clue_mtl.tasks import MLM_TASK

    return [*config.data.tasks, *([MLM_TASK] if config.auxiliary_mlm.batch_size else [])]
