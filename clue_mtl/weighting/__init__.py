"""Loss-weighting strategies, chosen by name in the config (`weighting.method`)."""

from __future__ import annotations

from typing import Any, Sequence

from .base import LossWeighting, StepContext
from .static import EqualWeighting, FixedWeighting

METHODS: dict[str, type[LossWeighting]] = {
    cls.name: cls for cls in (EqualWeighting, FixedWeighting)
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


__all__ = ["LossWeighting", "StepContext", "METHODS", "build_weighting"]
