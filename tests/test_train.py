import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clue_mtl.errors import CheckpointError
from clue_mtl.runs.folder import RunFolder
from clue_mtl.recipes.multitask import Trainer, train


def read_metrics(run_dir: Path) -> list[dict]:
    return RunFolder(run_dir).metrics()


def reference_losses(case: str) -> list[dict]:
    """The per-step losses pinned for a case of tests/reference_run_generated.json."""
    return json.loads(Path(__file__).with_name("reference_run_generated.json").read_text())[case]["loss"]


def test_training_writes_a_complete_run_folder(tiny_config):
    trainer = train(tiny_config(), show_progress=False)
    run = trainer.run_dir
    for name in ("config.yaml", "split.json", "labels.json", "metrics.jsonl", "tokenizer/tokenizer_config.json",
                 "best/model.safetensors", "best/model.json", "checkpoint-6/trainer_state.json",
                 "checkpoint-6/COMPLETE"):
        assert (run / name).exists(), name
    metrics = read_metrics(run)
    train_records = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in train_records] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in evals] == [3, 6]
    # tiny_config() is the pinned "equal" reference run
    for record, pinned in zip(train_records, reference_losses("equal"), strict=True):
        assert record["loss"] == pytest.approx(pinned, rel=2e-3)
    assert trainer.state.best_score == max(e["mean_macro_f1"] for e in evals)
    split = json.loads((run / "split.json").read_text())
    assert {task: len(ids) for task, ids in split.items()} == {"ocnli": 40, "ocemotion": 40, "tnews": 40}


def test_loss_falls_on_a_repeated_batch(tiny_config):
    """With a high rate and no dropout, the tiny model must fit what it sees."""
    trainer = Trainer(tiny_config("train.steps=40", "data.max_train_rows=9", "model.dropout=0.0",
                                  "train.eval_every=1000", "train.lr=3e-3", "train.head_lr=3e-3",
                                  "train.warmup_ratio=0.0", "train.length_grouping=false"), show_progress=False)
    trainer.train()
    losses = [sum(m["loss"].values()) for m in read_metrics(trainer.run_dir) if m["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]


def test_resume_reaches_the_uninterrupted_result(tiny_config, tmp_path):
    config = tiny_config("train.eval_every=2", "model.dropout=0.1")
    straight = Trainer(config, tmp_path / "straight", show_progress=False)
    straight.train()

    first = Trainer(config, tmp_path / "resumed", show_progress=False)
    first.train(until_step=3)  # an interruption between two evaluations
    assert json.loads((tmp_path / "resumed/checkpoint-3/trainer_state.json").read_text())["step"] == 3
    second = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False)
    second.train()

    expected = load_file(tmp_path / "straight/checkpoint-6/model.safetensors")
    got = load_file(tmp_path / "resumed/checkpoint-6/model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    straight_log, resumed_log = (RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed"))
    assert straight_log == resumed_log


def test_resume_without_checkpoint_fails_clearly(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(tiny_config(), tmp_path / "empty", resume=True, show_progress=False).train()


def test_early_stopping_stops(tiny_config):
    trainer = Trainer(tiny_config("train.steps=30", "train.eval_every=1", "train.early_stopping_patience=2",
                                  "train.lr=0.0", "train.head_lr=0.0"), show_progress=False)
    trainer.train()
    assert trainer.state.step == 3  # the first evaluation sets the best; two more without gain stop


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_the_encoder_computes_in_the_precision_asked_for(tiny_config, precision, dtype):
    """bf16 on a CPU runs the encoder's matrix products in bf16 (autocast), and float32 does not;
    the weights the optimiser updates stay float32 either way."""
    trainer = Trainer(tiny_config(f"train.mixed_precision={precision}", "train.steps=2", "train.eval_every=2",
                                  f"name={precision}"), show_progress=False)
    seen = set()
    linears = [m for m in trainer.unwrapped.encoder.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda module, args, output: seen.add(output.dtype)) for m in linears]
    trainer.train()
    for hook in hooks:
        hook.remove()
    assert trainer.accelerator.mixed_precision == precision
    assert seen == {dtype}
    assert all(p.dtype == torch.float32 for p in trainer.unwrapped.parameters())
    losses = [m["loss"] for m in read_metrics(trainer.run_dir) if m["kind"] == "train"]
    # step 1 is the pinned "equal" run's first step (the same rows, weights and dropout): exactly in
    # float32, to bf16's three significant digits in bf16
    assert len(losses) == 2
    assert losses[0] == pytest.approx(reference_losses("equal")[0], rel=2e-3 if precision == "no" else 3e-2)


# every head type and private part over the three tasks (test_structures' mixed structure)
STRUCTURE = ["model.heads={ocnli: {type: san, steps: 3, features: scalar_mix}, "
             "ocemotion: {type: bilstm, hidden: 8}, tnews: {type: attention, heads: 2, pooling: attention}}",
             "model.private={ocnli: {type: lora, rank: 4}, ocemotion: {type: layers, layers: 1}}"]
# training by the clock: each rank times its own steps; the slowest decides the total for both
BUDGET = ["train.max_minutes=0.1", "train.eval_every=1000"]
CACHED = ("model.frozen_layers=1", "train.cache_frozen=true")  # each rank stores its own rows' states
# name -> (method, overrides); the tracked run last: ending its trackers ends the process group
# (`Accelerator.end_training`), which the runs after it in the same processes would need
DDP_CASES = {"equal": ("equal", ()), "uncertainty": ("uncertainty", ()), "pcgrad": ("pcgrad", ()),
             "equal-structures": ("equal", STRUCTURE), "pcgrad-structures": ("pcgrad", STRUCTURE),
             "equal-budget": ("equal", BUDGET), "equal-cached": ("equal", CACHED),
             "equal-tracked": ("equal", ("train.report_to=tensorboard",))}


@pytest.mark.slow
def test_two_cpu_processes_hold_identical_weights(tiny_config, tmp_path):
    """DDP over gloo on two CPU processes: after a few steps both ranks hold the same model and
    task weights (a loss-level method, a learned one, and one that writes gradients by hand; and
    per-task structures with private layers and adapters, where no parameter may go unused; and
    a budget of minutes, whose total both ranks must fix alike; and frozen layers cached, each
    rank storing its own rows; and a run with a tracker). Every case runs in one launch of the two
    processes, one after another, so torch starts twice and not twice a case."""
    from clue_mtl.config import save_config

    paths = []
    for name, (method, overrides) in DDP_CASES.items():
        paths.append(tmp_path / f"{name}.yaml")
        save_config(tiny_config("train.steps=3", "train.eval_every=3", "train.batch_size=12",
                                f"weighting.method={method}", *overrides), paths[-1])
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
         str(worker), *map(str, paths), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for number, (name, (method, overrides)) in enumerate(DDP_CASES.items()):
        ranks = [json.loads((tmp_path / "out" / f"rank{r}-{number}.json").read_text()) for r in range(2)]
        run = tmp_path / "out" / f"run{number}"
        assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2, name
        assert ranks[0]["checksum"] == ranks[1]["checksum"], name
        assert ranks[0]["checksum"] != ranks[0]["initial_checksum"], name
        assert ranks[0]["task_weights"] == ranks[1]["task_weights"], name
        if method == "uncertainty":
            assert ranks[0]["task_weights"] != {"ocnli": 1.0, "ocemotion": 1.0, "tnews": 1.0}
        if name == "equal-tracked":
            assert list((run / "tracking").rglob("events.out.tfevents.*"))
        if overrides is BUDGET:
            total = json.loads((run / "budget.json").read_text())["total_steps"]
            assert ranks[0]["steps"] == ranks[1]["steps"] == total >= 1
        if overrides is CACHED:
            stored = sorted(path.name for path in (run / "cache").rglob("states-*.bin"))
            assert stored == ["states-0.bin", "states-1.bin"]


@pytest.mark.parametrize("method", ["dwa", "famo"])
def test_step_histories_advance_once_per_optimiser_step_under_accumulation(tiny_config, method):
    trainer = train(tiny_config(f"weighting.method={method}", "train.steps=3", "train.eval_every=3",
                                "train.grad_accumulation=2", "weighting.params={window: 1}" if method == "dwa" else
                                "weighting.params={gamma: 0.01}"), show_progress=False)
    weighting = trainer.weighting
    if method == "dwa":
        assert weighting.recorded.item() == 3
    else:
        assert weighting.has_previous.item()
        assert weighting.logits.detach().abs().sum() > 0  # stepped from the second optimiser step on
    assert weighting.pending.abs().sum().item() == 0


def test_distilled_student_with_ema_and_fgm(tiny_config, small_data_dir, tmp_path):
    """A teacher's soft labels drive an annealed student trained with EMA and FGM, end to end
    (their losses are pinned in tests/reference_run_generated.json)."""
    from clue_mtl.cli import main
    from clue_mtl.training.distill import read_soft_labels
    from clue_mtl.tasks import TASKS

    small = small_data_dir  # the first 200 rows of each training file: soft labels must cover them all
    teacher = train(tiny_config(f"data.data_dir={small}", "name=teacher", "data.max_train_rows=null"),
                    show_progress=False)
    soft = tmp_path / "soft.safetensors"
    assert main(["distill-labels", "--run", str(teacher.run_dir), "--out", str(soft)]) == 0
    assert {task: len(read_soft_labels(soft).ids[task]) for task in TASKS} == {t: 200 for t in TASKS}

    student = train(tiny_config(f"data.data_dir={small}", "name=student", "data.max_train_rows=null",
                                f"distill.soft_labels={soft}", "distill.mode=annealed",
                                "train.ema_decay=0.9", "train.fgm_epsilon=0.5", "train.eval_every=6"),
                    show_progress=False)
    records = [m for m in read_metrics(student.run_dir) if m["kind"] == "train"]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    assert student.ema.updates == 6
    # the one evaluation (step 6) is the best; the saved model holds the EMA weights, not the raw ones
    best = load_file(student.run_dir / "best/model.safetensors")
    key = "heads.tnews.classifier.1.weight"
    assert not torch.equal(best[key], student.unwrapped.state_dict()[key])
    with student.ema.apply_to(student.unwrapped):
        assert torch.equal(best[key], student.unwrapped.state_dict()[key])


def test_bert_segment_ids_reach_the_encoder_in_training_fgm_and_evaluation(tiny_config):
    """Every encoder call of a step (the tasks' forwards, FGM's second forwards) and of the dev
    evaluation gets the tokenizer's segment ids: 1 from text B through the last [SEP] of a pair."""
    trainer = Trainer(tiny_config("train.fgm_epsilon=0.5"), show_progress=False)
    sep = trainer.tokenizer.sep_token_id
    calls = []
    trainer.unwrapped.encoder.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs), with_kwargs=True)

    def expected_segments(input_ids, attention_mask):
        segments = torch.zeros_like(input_ids)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            seps = (ids == sep).nonzero().flatten().tolist()
            if len(seps) == 2:   # a pair: [CLS] A [SEP] B [SEP]
                segments[row, seps[0] + 1:seps[1] + 1] = 1
        return segments

    trainer.train_step()
    assert len(calls) == 4   # one pass over the three tasks' rows, then FGM's pass per task
    trainer.evaluate()
    for call in calls:
        assert torch.equal(call["token_type_ids"].cpu(), expected_segments(call["input_ids"], call["attention_mask"]))
    pair_calls = [call for call in calls if call["token_type_ids"].any()]
    assert len(pair_calls) >= 3  # the joint pass, FGM's OCNLI pass, the OCNLI evaluation


@pytest.mark.parametrize("overrides, joint", [
    ((), True),
    (("weighting.method=gradnorm",), True),          # its per-task gradients reach only the last layer
    (("weighting.method=pcgrad",), False),           # backpropagates each task alone
    (("weighting.method=mgda",), False),
    (("model.private={tnews: {type: lora, rank: 2}}",), False),
    (("model.private={ocnli: {type: layers, layers: 1}}",), False),
    (("train.encoder_pass=per_task",), False),
])
def test_auto_runs_one_encoder_pass_per_step_unless_a_task_needs_its_own(tiny_config, overrides, joint):
    trainer = Trainer(tiny_config(*overrides), show_progress=False)
    calls = []
    trainer.unwrapped.encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    trainer.train_step()
    assert trainer.joint_pass is joint
    assert len(calls) == (1 if joint else 3)
    assert trainer.state.step == 1


@pytest.mark.parametrize("override, message", [
    ("train.encoder_pass=both", "train.encoder_pass must be auto, joint or per_task"),
    ("weighting.method=pcgrad", "backpropagates each task alone"),
    ("model.private={tnews: {type: lora, rank: 2}}", "model.private gives tasks"),
])
def test_a_joint_encoder_pass_that_cannot_work_is_refused(tiny_config, override, message):
    from clue_mtl.errors import ConfigError

    overrides = [override] if override.startswith("train.") else ["train.encoder_pass=joint", override]
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_one_encoder_pass_counts_the_padded_tokens_it_ran(tiny_config):
    """The throughput meter's tokens are the joint batch's: every row padded to the step's widest."""
    trainer = Trainer(tiny_config(), show_progress=False)
    batches = trainer.batches[0]
    trainer.train_step()
    width = max(batch["input_ids"].shape[1] for batch in batches.values())
    assert trainer.step_tokens == width * sum(len(batch["input_ids"]) for batch in batches.values())
