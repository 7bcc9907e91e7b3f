"""Loss-weighting strategies, chosen by name in the config (`weighting.method`)."""

from __future__ import annotations

from typing import Any, Sequence

from .base import GradientWeighting, LossWeighting, StepContext
from .dtp import DynamicTaskPrioritization
from .dwa import DynamicWeightAverage
from .famo import FAMO
from .gradnorm import GradNorm
from .mgda import MGDA
from .pcgrad import PCGrad
from .static import EqualWeighting, FixedWeighting
from .uncertainty import UncertaintyWeighting

METHODS: dict[str, type[LossWeighting]] = {
    cls.name: cls for cls in (
        EqualWeighting, FixedWeighting, UncertaintyWeighting, GradNorm, DynamicWeightAverage,
        DynamicTaskPrioritization, PCGrad, MGDA, FAMO,
    )
}


def build_weighting(method: str, tasks: Sequence[str], params: dict[str, Any] | None = None) -> LossWeighting:
    try:
        cls = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown weighting method {method!r}; choose from {', '.join(sorted(METHODS))}") from None
    try:
        return cls(tasks, **(params or {}))
    except TypeError as error:
        raise ValueError(f"weighting {method!r}: bad parameters {params}: {error}") from None


__all__ = ["LossWeighting", "GradientWeighting", "StepContext", "METHODS", "build_weighting"]
