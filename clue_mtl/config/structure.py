"""The model's per-task structure as configured: which features a head reads, its network, and its
private share of the encoder (`model.heads`, `model.private`); validated, then resolved into the
plain dictionaries the model is built from and saved with.

A task without an entry gets the hard-sharing head of the official baseline: the model-wide
pooling (or `model.task_pooling`) over the last layer and a linear classifier (an MLP where
`model.head_hidden` is set). The model-wide settings are the defaults of every entry, too: an
entry without a type is linear (or an MLP of `model.head_hidden` units), one without a pooling
pools as `model.task_pooling` or `model.pooling` say. Settings that do not apply to a head's type are refused rather than
ignored, so `{type: linear, steps: 5}` is an error, not a silent SAN that never was.

No torch here: configs are validated before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

HEAD_TYPES = ("linear", "mlp", "bilstm", "attention", "san")
FEATURES = ("last", "scalar_mix", "concat")
PRIVATE_TYPES = ("layers", "lora")
POOLING_NAMES = ("first", "mean", "max", "mean_max", "attention")  # `pooling.py`; attention is learned

# the settings each head type takes beyond the common ones (type, features, layers, pooling, samples)
TYPE_SETTINGS = {"linear": (), "mlp": ("hidden",), "bilstm": ("hidden",), "attention": ("heads",),
                 "san": ("steps", "step_dropout")}
HEAD_DEFAULTS = {"layers": 4, "hidden": 256, "heads": 4, "steps": 5, "step_dropout": 0.1}
PRIVATE_DEFAULTS = {"layers": {"layers": 1}, "lora": {"rank": 8, "targets": None}}
MAX_SAMPLES = 64
MAX_SAN_STEPS = 64


@dataclass
class HeadConfig:
    """`model.heads.<task>`; a setting left null takes its default (`HEAD_DEFAULTS`)."""
    type: str | None = None              # linear | mlp | bilstm | attention | san (pairs); null: mlp where model.head_hidden is set, else linear
    features: str = "last"               # last | scalar_mix (softmax mix of every layer) | concat (top `layers`)
    layers: int | None = None            # concat: how many of the top layers (4)
    pooling: str | None = None           # first | mean | max | mean_max | attention; null: model.pooling
    samples: int = 1                     # multi-sample dropout: classifier passes averaged in training
    hidden: int | None = None            # mlp: hidden units (model.head_hidden or 256); bilstm: units per direction (256)
    heads: int | None = None             # attention: attention heads of the block (4)
    steps: int | None = None             # san: reasoning steps (5)
    step_dropout: float | None = None    # san: chance of dropping a step's prediction in training (0.1)


@dataclass
class PrivateConfig:
    """`model.private.<task>`: the task's own capacity beside the shared encoder."""
    type: str = "layers"                 # layers: own copies of the top encoder layers; lora: own low-rank adapters
    layers: int | None = None            # layers: how many top layers are the task's own (1)
    rank: int | None = None              # lora: adapter rank (8)
    alpha: float | None = None           # lora: scale numerator (2 x rank)
    targets: list[str] | None = None     # lora: module names to adapt (null: peft's default for the encoder)


def validate_structure(model: Any, tasks: list[str], need: Callable[[bool, str], None]) -> None:
    """Check `model.heads` and `model.private` (a `ModelConfig`) against the trained `tasks`."""
    from clue_mtl.tasks import get_task

    for section in ("heads", "private"):
        strangers = [t for t in getattr(model, section) if t not in tasks]
        need(not strangers, f"model.{section} names tasks not trained: {strangers}")
    for task, head in model.heads.items():
        where = f"model.heads.{task}"
        need(head.type is None or head.type in HEAD_TYPES, f"{where}.type must be one of {', '.join(HEAD_TYPES)}")
        if head.type is None:
            head = dataclasses.replace(head, type="mlp" if model.head_hidden else "linear")
        need(head.features in FEATURES, f"{where}.features must be one of {', '.join(FEATURES)}")
        need(head.pooling is None or head.pooling in POOLING_NAMES,
             f"{where}.pooling must be one of {', '.join(POOLING_NAMES)}")
        allowed = set(TYPE_SETTINGS[head.type])
        stray = [key for key in ("hidden", "heads", "steps", "step_dropout")
                 if getattr(head, key) is not None and key not in allowed]
        need(not stray, f"{where}: {', '.join(stray)} do(es) not apply to a {head.type} head")
        need(head.layers is None or head.features == "concat", f"{where}.layers applies to features: concat only")
        need(head.type != "san" or get_task(task).text_columns == 2,
             f"{where}: the SAN answer module reads sentence pairs; {task} has single texts")
        need(head.type != "san" or head.pooling is None, f"{where}.pooling: a SAN head attends, it does not pool")
        need(head.type != "san" or task not in model.task_pooling,
             f"model.task_pooling.{task}: a SAN head attends, it does not pool")
        need(1 <= head.samples <= MAX_SAMPLES, f"{where}.samples must lie in [1, {MAX_SAMPLES}]")
        need(head.layers is None or 1 <= head.layers <= 1024, f"{where}.layers must lie in [1, 1024]")
        need(head.hidden is None or 1 <= head.hidden <= 1 << 16, f"{where}.hidden must lie in [1, 65536]")
        need(head.heads is None or 1 <= head.heads <= 256, f"{where}.heads must lie in [1, 256]")
        need(head.steps is None or 1 <= head.steps <= MAX_SAN_STEPS, f"{where}.steps must lie in [1, {MAX_SAN_STEPS}]")
        need(head.step_dropout is None or 0 <= head.step_dropout < 1, f"{where}.step_dropout must lie in [0, 1)")
    for task, private in model.private.items():
        where = f"model.private.{task}"
        need(private.type in PRIVATE_TYPES, f"{where}.type must be one of {', '.join(PRIVATE_TYPES)}")
        lora = private.type == "lora"
        stray = [key for key in (("layers",) if lora else ("rank", "alpha", "targets"))
                 if getattr(private, key) is not None]
        need(not stray, f"{where}: {', '.join(stray)} do(es) not apply to private {private.type}")
        need(private.layers is None or 1 <= private.layers <= 1024, f"{where}.layers must lie in [1, 1024]")
        need(private.rank is None or 1 <= private.rank <= 4096, f"{where}.rank must lie in [1, 4096]")
        need(private.alpha is None or private.alpha > 0, f"{where}.alpha must be positive")
        need(private.targets is None or (len(private.targets) > 0 and all(private.targets)),
             f"{where}.targets must name at least one module")


def resolve_heads(model: Any, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Every task's head as a complete plain dictionary (the model's build and save format)."""
    resolved = {}
    for task in tasks:
        head = model.heads.get(task) or HeadConfig()
        if head.type is None:
            head = dataclasses.replace(head, type="mlp" if model.head_hidden else "linear")
        spec = dataclasses.asdict(head)
        spec["pooling"] = head.pooling or model.task_pooling.get(task, model.pooling)
        if head.type == "san":
            spec["pooling"] = None
        if head.type == "mlp" and head.hidden is None and model.head_hidden:
            spec["hidden"] = model.head_hidden
        if head.features == "concat" and spec["layers"] is None:
            spec["layers"] = HEAD_DEFAULTS["layers"]
        for key in TYPE_SETTINGS[head.type]:
            if spec[key] is None:
                spec[key] = HEAD_DEFAULTS[key]
        resolved[task] = {key: value for key, value in spec.items() if value is not None}
    return resolved


def resolve_private(model: Any) -> dict[str, dict[str, Any]]:
    """Each task's private part, complete: `{type: layers, layers: k}` or `{type: lora, rank, alpha, targets}`."""
    resolved = {}
    for task, private in model.private.items():
        spec = {"type": private.type, **PRIVATE_DEFAULTS[private.type]}
        spec.update({k: v for k, v in dataclasses.asdict(private).items() if v is not None and k != "type"})
        if private.type == "lora" and "alpha" not in spec:
            spec["alpha"] = 2.0 * spec["rank"]
        resolved[task] = spec
    return resolved
