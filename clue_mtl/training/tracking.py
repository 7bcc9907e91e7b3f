"""Experiment trackers through Accelerate (`train.report_to`): the metrics log, flattened, beside the run.

The metrics log (`metrics.jsonl`) stays the record every tool of the kit reads; a tracker gets a
copy of each record with nested values flattened under its kind to `train/loss/ocnli`, `train/weights/tnews`,
`eval/macro_f1/ocemotion`, and the resolved config as hyperparameters. TensorBoard writes into the
run folder (`tracking/NAME/`); Weights & Biases, MLflow and trackio write where they are
configured to (their environment variables), under the run's name.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from clue_mtl.config import REPORT_TO
from clue_mtl.errors import ConfigError
from clue_mtl.runs.folder import RunFolder


def accelerator_kwargs(report_to: str, folder: RunFolder) -> dict:
    """`log_with` and `project_dir` for `Accelerator(...)`; nothing for `none`. Each tracker's
    package has the tracker's name."""
    if report_to == "none":
        return {}
    if report_to not in REPORT_TO:
        raise ConfigError(f"train.report_to: unknown tracker {report_to!r}; choose from {', '.join(REPORT_TO)}")
    if importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"train.report_to={report_to} needs the {report_to} package (pip install {report_to}), "
                          "or set train.report_to=none")
    return {"log_with": report_to, "project_dir": str(folder.tracking_dir)}


def flat_record(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record at one level, under its kind:
    {"kind": "train", "loss": {"ocnli": 1.1}} -> {"train/loss/ocnli": 1.1}; the step is left out
    (the tracker gets it as its own argument)."""
    values = {key: value for key, value in record.items() if key not in ("kind", "step")}
    return _numbers(values, f"{record.get('kind', 'record')}/")


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def hyperparameters(config_values: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The resolved config as `section.key` -> a value every tracker accepts (lists and None as text)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config_values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(hyperparameters(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, ensure_ascii=False)
    return flat
