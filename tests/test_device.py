"""What a GPU must do, run on the GPU where there is one and on the CPU otherwise: training in
each precision (autocast, fp16's GradScaler with every weighting method), fused AdamW, an exact
resume, the joint encoder pass and bf16 prediction. `benchmarks/gpu_check.py` runs these on a GPU
(`pytest -m device`); every test asserts where it ran, so a GPU run cannot pass on the CPU.
Generated data and a tiny encoder: no competition files needed."""

import math
import os

import numpy as np
import pytest
import torch

from clue_mtl.config import load_config
from clue_mtl.errors import ConfigError
from clue_mtl.predict.inference import LoadedRun, predict_submission
from clue_mtl.runs.folder import RunFolder
from clue_mtl.predict.submission import read_submission
from clue_mtl.data.task_files import FileReader
from clue_mtl.tasks import TASKS
from clue_mtl.recipes.multitask import Trainer, train
from clue_mtl.weighting import METHODS

# cuBLAS picks its reductions per handle; this fixes them (read when the first handle is made)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRECISIONS = ["no", "bf16", "fp16"] if DEVICE == "cuda" else ["no", "bf16"]
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAST_HALF = "fp16" if DEVICE == "cuda" else "bf16"   # fp16 (and its GradScaler) exists on a GPU only
PARAMS = {"dwa": ["weighting.params={window: 1}"], "fixed": ["weighting.params={weights: {ocnli: 2.0}}"]}
LEARNED = {"uncertainty", "gradnorm", "dwa", "dtp", "famo", "mgda"}

pytestmark = pytest.mark.device


@pytest.fixture
def device_config(generated_data_dir, tiny_bert, tmp_path):
    def make(*overrides: str):
        return load_config(overrides=[
            f"data.data_dir={generated_data_dir}", f"model.encoder={tiny_bert}", f"output_dir={tmp_path / 'runs'}",
            "data.max_length=32", "train.steps=4", "train.batch_size=9", "train.eval_every=4",
            "train.log_every=1", "train.lr=1e-3", "train.warmup_ratio=0.2", *overrides])

    return make


def train_records(run_dir) -> list[dict]:
    return [m for m in RunFolder(run_dir).metrics() if m["kind"] == "train"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_computes_on_the_device_in_the_precision_asked_for(device_config, precision):
    trainer = Trainer(device_config(f"train.mixed_precision={precision}", f"name={precision}"), show_progress=False)
    seen = set()
    linears = [m for m in trainer.unwrapped.encoder.modules() if isinstance(m, torch.nn.Linear)]
    for module in linears:
        module.register_forward_hook(lambda module, args, output: seen.add((output.dtype, output.device.type)))
    trainer.train()
    assert trainer.accelerator.device.type == DEVICE
    assert seen == {(DTYPES[precision], DEVICE)}
    assert {(p.dtype, p.device.type) for p in trainer.unwrapped.parameters()} == {(torch.float32, DEVICE)}
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    records = train_records(trainer.run_dir)
    assert len(records) == 4 and all(math.isfinite(v) for m in records for v in m["loss"].values())
    assert ("peak_memory_gib" in records[-1]) == (DEVICE == "cuda")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU fp16 trains (above)")
def test_fp16_without_a_gpu_is_refused(device_config):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        Trainer(device_config("train.mixed_precision=fp16"), show_progress=False)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_weighting_method_trains_in_the_fast_half_precision(device_config, method):
    """fp16 on a GPU: the GradScaler unscales the task gradients and the learned weights' own."""
    trainer = Trainer(device_config(f"weighting.method={method}", f"train.mixed_precision={FAST_HALF}",
                                    "train.steps=6", "train.eval_every=6", *PARAMS.get(method, [])),
                      show_progress=False)
    trainer.train()
    assert trainer.accelerator.device.type == DEVICE
    records = train_records(trainer.run_dir)
    assert all(math.isfinite(v) for m in records for v in [*m["loss"].values(), *m["weights"].values()])
    if method in LEARNED:
        assert records[-1]["weights"] != records[0]["weights"]
    if FAST_HALF == "fp16":
        assert math.isfinite(trainer.accelerator.scaler.get_scale())
    learned = [p for p in trainer.weighting.parameters()] if hasattr(trainer.weighting, "parameters") else []
    assert all(torch.isfinite(p).all() for p in learned)


def test_adamw_runs_fused_on_the_device(device_config):
    trainer = Trainer(device_config("train.mixed_precision=bf16"), show_progress=False)
    optimizer = trainer.optimizer.optimizer   # under Accelerate's wrapper
    assert optimizer.defaults["fused"] and trainer.accelerator.device.type == DEVICE
    before = {name: p.detach().clone() for name, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.unwrapped.named_parameters())
    assert all(not torch.equal(before[name], after[name]) for name in before if "heads" in name)


def test_a_resumed_run_on_the_device_ends_where_the_straight_one_does(device_config, tmp_path):
    """Dropout on: the device's random state is saved and restored with the checkpoint."""
    config = device_config("model.dropout=0.1", "train.mixed_precision=bf16", "train.steps=6",
                           "train.eval_every=2")
    torch.use_deterministic_algorithms(True)
    try:
        straight = Trainer(config, tmp_path / "straight", show_progress=False)
        straight.train()
        Trainer(config, tmp_path / "resumed", show_progress=False).train(until_step=3)
        resumed = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False)
        resumed.train()
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed.accelerator.device.type == DEVICE
    expected, got = straight.unwrapped.state_dict(), resumed.unwrapped.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    logs = (RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed"))
    assert next(logs) == next(logs)


HEADS = ("model.heads={ocnli: {type: san, steps: 2, features: scalar_mix}, ocemotion: {type: bilstm, hidden: 8}, "
         "tnews: {type: attention, heads: 2}}")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_one_joint_encoder_pass_gives_every_task_the_output_of_its_own_pass(device_config, precision):
    """A training step's batches on the device, heads that read segments, every token and every
    layer: the joint pass hands each head what the task's own pass would (no dropout: eval mode)."""
    trainer = Trainer(device_config("train.encoder_pass=joint", f"train.mixed_precision={precision}", HEADS),
                      show_progress=False)
    batches = trainer._micro_batches(0)
    trainer.model.eval()
    with torch.no_grad(), trainer.accelerator.autocast():
        together = trainer._task_outputs(batches)
        trainer.joint_pass = False
        alone = trainer._task_outputs(batches)
    tolerance = {"no": 1e-5, "bf16": 2e-2}[precision]
    for task in batches:
        assert together[task][0].device.type == DEVICE
        torch.testing.assert_close(together[task][0], alone[task][0], rtol=tolerance, atol=tolerance)


def test_prediction_on_the_device_in_bf16_agrees_with_float32_and_writes_a_whole_zip(device_config, tmp_path,
                                                                                    generated_data_dir):
    run_dir = train(device_config("train.mixed_precision=bf16"), show_progress=False).run_dir
    fast = LoadedRun(run_dir, device=DEVICE, show_progress=False)
    exact = LoadedRun(run_dir, device=DEVICE, show_progress=False, float32_weights=True)
    weights = {(p.dtype, p.device.type) for p in fast.model.parameters()}
    assert weights == {(torch.bfloat16 if fast.bf16 else torch.float32, DEVICE)}
    if DEVICE == "cuda":
        assert fast.bf16
    task = TASKS["tnews"]
    frame, _ = FileReader(generated_data_dir / task.test_a_file, task, labelled=False).read(warn=False)
    assert np.abs(fast.probabilities("tnews", frame) - exact.probabilities("tnews", frame)).max() < 0.02
    zip_path = predict_submission([run_dir], tmp_path / "a.zip", data_dir=generated_data_dir, progress=False)
    assert {task: len(rows) for task, rows in read_submission(zip_path).items()} == {name: 12 for name in TASKS}
