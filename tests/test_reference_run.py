"""Tiny trainings pinned to stored values: per-step losses, task weights and dev macro-F1, each run
straight and resumed at step 4.

Two sets. `reference_run.json` holds runs on slices of the real files, written by the kit before
its refactor into `metrics`, `run_folder` and the named training steps, so they also say the
refactor changed no arithmetic; they skip where the real files are absent.
`reference_run_generated.json` holds runs on the generated files (conftest's `data_dir`), which
run everywhere: PCGrad, distillation, FGM, every head type and private parts.

A change that moves them on purpose (a new default, another sampling order) rewrites a file:
`CLUE_MTL_WRITE_REFERENCE=1 pytest tests/test_reference_run.py`, and the commit says why. The
tolerance allows for another CPU's float32 rounding (AVX2 vs AVX-512), not for another sequence of
batches, seeds or formulas.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from clue_mtl.recipes.multitask import Trainer

REFERENCE = Path(__file__).with_name("reference_run.json")
GENERATED_REFERENCE = Path(__file__).with_name("reference_run_generated.json")
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
BASE = ("train.mixed_precision=no", "train.steps=6", "train.eval_every=3", "model.dropout=0.1")
SOFT_LABELS = "distill.soft_labels={soft_labels}"  # the module's teachers' file, filled in at run time
GENERATED_CASES = {
    "equal": BASE,  # linear heads on mean pooling, one encoder pass: what the other cases vary
    # gradients projected by hand, one encoder pass per task
    "pcgrad": (*BASE, "weighting.method=pcgrad"),
    # BAM: the target moves from the teachers to gold with the step (a resume must restore it)
    "distill-annealed": (*BASE, SOFT_LABELS, "distill.mode=annealed", "distill.kind=soft_ce"),
    # the fixed mix at T = 2 over two teachers: the mean of their tempered distributions
    "distill-fixed-t2": (*BASE, SOFT_LABELS, "distill.mode=fixed", "distill.mix=0.5", "distill.temperature=2.0"),
    # a second forward on perturbed word embeddings, and the average of the weights evaluated
    "fgm-ema": (*BASE, "train.fgm_epsilon=0.5", "train.ema_decay=0.9"),
    # the SAN's random step dropout, a BiLSTM, an attention block with attention pooling
    "heads-san-bilstm-attention": (*BASE, "model.heads={ocnli: {type: san, steps: 3}, ocemotion: {type: bilstm, "
                                          "hidden: 8}, tnews: {type: attention, heads: 2, pooling: attention}}"),
    # an MLP on the top layers concatenated, multi-sample dropout, a linear head on a mix of layers
    "heads-mlp-features": (*BASE, "model.heads={ocnli: {type: mlp, hidden: 16, features: concat, layers: 2}, "
                                  "ocemotion: {type: mlp, hidden: 8, samples: 3}, "
                                  "tnews: {type: linear, features: scalar_mix, pooling: mean_max}}"),
    # a task's own top layer and another's LoRA adapters
    "private-layers-lora": (*BASE, "model.private={ocnli: {type: layers, layers: 1}, tnews: {type: lora, rank: 2}}"),
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


def _straight_and_resumed(config, root: Path) -> tuple[dict, dict]:
    """The records of a run straight through, and of one stopped at step 4 and resumed."""
    Trainer(config, root / "straight", show_progress=False).train()
    Trainer(config, root / "resumed", show_progress=False).train(until_step=4)
    Trainer(config, root / "resumed", resume=True, show_progress=False).train()
    return _record(root / "straight"), _record(root / "resumed")


def _check_or_write(reference: Path, case: str, settings: tuple, straight: dict, resumed: dict) -> None:
    if os.environ.get("CLUE_MTL_WRITE_REFERENCE") == "1":
        # every case reads, changes and writes one file: two xdist workers would lose cases
        assert not os.environ.get("PYTEST_XDIST_WORKER"), "write the reference runs in one process: add -p no:xdist"
        stored = json.loads(reference.read_text()) if reference.exists() else {}
        stored[case] = {"settings": settings, **straight}
        reference.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"wrote {case} to {reference.name}")
    stored = dict(json.loads(reference.read_text())[case])
    assert tuple(stored.pop("settings")) == settings
    _close(stored, straight, "straight")
    _close(stored, resumed, "resumed")  # the steps after the resume are the stored ones too
    assert len(straight["loss"]) == 6 and len(straight["macro_f1"]) == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tiny_run_on_the_real_files_and_its_resume_reproduce_the_stored_values(real_tiny_config, tmp_path, case):
    straight, resumed = _straight_and_resumed(real_tiny_config(*CASES[case]), tmp_path)
    _check_or_write(REFERENCE, case, CASES[case], straight, resumed)


@pytest.fixture(scope="module")
def soft_labels(data_dir, tiny_bert, tmp_path_factory) -> Path:
    """Soft labels for every generated training row from two 6-step teachers (seeds 42 and 1),
    as `clue-mtl distill-labels` writes them."""
    from clue_mtl.config import load_config
    from clue_mtl.recipes.multitask import train
    from clue_mtl.training.distill import write_soft_labels

    root = tmp_path_factory.mktemp("teachers")

    def teacher(seed: int) -> Path:
        config = load_config(overrides=[
            f"data.data_dir={data_dir}", f"model.encoder={tiny_bert}", f"output_dir={root}", f"name=seed{seed}",
            "data.max_train_rows=48", "data.max_dev_rows=24", "data.max_length=32", "train.steps=6",
            "train.batch_size=9", "train.eval_every=6", "train.lr=1e-3", f"train.seed={seed}"])
        return train(config, show_progress=False).run_dir

    return write_soft_labels([teacher(42), teacher(1)], root / "soft.safetensors", device="cpu")


@pytest.mark.parametrize("case", sorted(GENERATED_CASES))
def test_a_tiny_run_on_the_generated_files_and_its_resume_reproduce_the_stored_values(tiny_config, tmp_path,
                                                                                     request, case):
    settings = GENERATED_CASES[case]
    overrides = [SOFT_LABELS.format(soft_labels=request.getfixturevalue("soft_labels")) if setting == SOFT_LABELS
                 else setting for setting in settings]
    straight, resumed = _straight_and_resumed(tiny_config(*overrides), tmp_path)
    _check_or_write(GENERATED_REFERENCE, case, settings, straight, resumed)
