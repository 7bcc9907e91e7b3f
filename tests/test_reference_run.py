"""A tiny training pinned to stored values: per-step losses, task weights and dev macro-F1.

The stored values (`reference_run.json`) were written by the kit before its refactor into
`metrics`, `run_folder` and the named training steps, so this test also says the refactor changed
no arithmetic. A change that moves them on purpose (a new default, another sampling order)
rewrites the file: `CLUE_MTL_WRITE_REFERENCE=1 pytest tests/test_reference_run.py`, and the
commit says why. The tolerance allows for another CPU's float32 rounding (AVX2 vs AVX-512), not
for another sequence of batches, seeds or formulas.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from clue_mtl.recipes.multitask import Trainer

REFERENCE = Path(__file__).with_name("reference_run.json")
CASES = {
    "uncertainty": ("train.mixed_precision=no", "train.steps=6", "train.eval_every=3", "model.dropout=0.1",
                    "weighting.method=uncertainty", "train.encoder_pass=per_task"),
    # one encoder pass over the three tasks' rows (the default where no task needs its own)
    "uncertainty-joint": ("train.mixed_precision=no", "train.steps=6", "train.eval_every=3", "model.dropout=0.1",
                          "weighting.method=uncertainty", "train.encoder_pass=joint"),
    # accumulation, EMA and a weighting optimiser: the order of the steps after the last micro-batch
    "famo-accumulation-ema": ("train.mixed_precision=no", "train.steps=6", "train.eval_every=3",
                              "model.dropout=0.1", "weighting.method=famo", "train.grad_accumulation=2",
                              "train.ema_decay=0.9", "train.encoder_pass=per_task"),
}
RELATIVE_TOLERANCE = 2e-3


def _record(run_dir: Path) -> dict:
    """The figures of a run's metrics log that do not depend on timing (read without `RunFolder`,
    so that the kit before the refactor can write the stored values)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "loss": [record["loss"] for record in records if record["kind"] == "train"],
        "weights": [record["weights"] for record in records if record["kind"] == "train"],
        "macro_f1": [record["macro_f1"] for record in records if record["kind"] == "eval"],
    }


def _close(expected, got, where: str) -> None:
    if isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            _close(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(expected) == len(got), where
        for number, (a, b) in enumerate(zip(expected, got)):
            _close(a, b, f"{where}[{number}]")
    else:
        assert math.isclose(expected, got, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-6), f"{where}: {expected} vs {got}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tiny_run_and_its_resume_reproduce_the_stored_values(tiny_config, tmp_path, case):
    config = tiny_config(*CASES[case])
    Trainer(config, tmp_path / "straight", show_progress=False).train()
    straight = _record(tmp_path / "straight")

    Trainer(config, tmp_path / "resumed", show_progress=False).train(until_step=4)
    Trainer(config, tmp_path / "resumed", resume=True, show_progress=False).train()
    resumed = _record(tmp_path / "resumed")

    if os.environ.get("CLUE_MTL_WRITE_REFERENCE") == "1":
        stored = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
        stored[case] = {"settings": CASES[case], **straight}
        REFERENCE.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"wrote {case} to {REFERENCE.name}")
    stored = dict(json.loads(REFERENCE.read_text())[case])
    assert tuple(stored.pop("settings")) == CASES[case]
    _close(stored, straight, "straight")
    _close(stored, resumed, "resumed")  # the steps after the resume are the stored ones too
    assert len(straight["loss"]) == 6 and len(straight["macro_f1"]) == 2
