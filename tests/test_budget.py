"""Training by the clock (`train.max_minutes`, `--minutes`): the total the timed steps fix, the
schedule over it, exact resume, the accounts, the refusals. The clock is a fake one: a training
step takes 2 seconds and an evaluation 100, whatever the machine does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_scheduler

from clue_mtl.training import budget
from clue_mtl.training.budget import StepBudget, schedule_factor
from clue_mtl.cli import main
from clue_mtl.config import SCHEDULERS, ConfigError, config_fingerprint, config_to_dict, load_config
from clue_mtl.runs.folder import RunFolder
from clue_mtl.recipes.multitask import Trainer

STEP_SECONDS, EVALUATION_SECONDS = 2.0, 100.0


@pytest.fixture
def fake_clock(monkeypatch):
    """Training steps of 2 s, evaluations of 100 s; the first step untimed, the next two timed."""
    now = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    monkeypatch.setattr(budget, "SKIPPED_STEPS", 1)
    monkeypatch.setattr(budget, "TIMED_STEPS", 2)
    train_step, evaluate = Trainer.train_step, Trainer.evaluate

    def slow_step(self):
        now[0] += STEP_SECONDS
        return train_step(self)

    def slow_evaluation(self):
        now[0] += EVALUATION_SECONDS
        return evaluate(self)

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    monkeypatch.setattr(Trainer, "evaluate", slow_evaluation)
    return now


def budgeted(tiny_config, *overrides: str):
    # 15 s: the steps 1-3 take 6 s and fix the total after step 3 at 3 + (15 - 6) // 2 = 7 steps
    return tiny_config("train.max_minutes=0.25", "train.eval_every=2", "model.dropout=0.1", *overrides)


def record(run_dir: Path) -> dict:
    return json.loads(RunFolder(run_dir).budget_file.read_text())


# ----------------------------------------------------------------------------- the total and the schedule
def test_the_timed_steps_fix_the_total_that_fills_what_is_left(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: clock[0])
    monkeypatch.setattr(budget, "SKIPPED_STEPS", 1)
    monkeypatch.setattr(budget, "TIMED_STEPS", 3)
    steps = StepBudget(1.0)  # 60 s
    for step, seconds in enumerate([10.0, 1.0, 1.0, 1.0], 1):  # a first step of one-off costs, not timed
        with steps.spending("training"):
            clock[0] += seconds
            with steps.spending("evaluation"):  # timed inside a step: its own account only
                clock[0] += 50.0
        assert steps.step_taken(step) == (step == 4)
    assert steps.seconds_per_step == 1.0
    assert steps.total == 4 + (60 - 13) // 1  # what 13 s of 4 steps left of the budget, at 1 s a step
    assert steps.spent == {"training": 13.0, "evaluation": 200.0, "checkpoint": 0.0}
    assert (steps.total_at(3), steps.total_at(4), steps.total_at(50)) == (None, 51, 51)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_starts_the_same_whatever_its_length(name):
    """What the steps before the total is fixed run at: the start, which no total changes."""
    for ratio in (0.0, 0.06, 0.5):
        factor = schedule_factor(name, ratio, lr=1e-3)
        assert {factor(0, total) for total in (1, 7, 1000, 10**6)} == {factor(5, None)}
    assert schedule_factor(name, 0.2, lr=1e-3)(0, None) == (1.0 if name == "constant" else 0.0)


def test_a_budget_fixes_the_steps_records_them_and_evaluation_is_not_charged(tiny_config, fake_clock):
    config = budgeted(tiny_config)
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    assert trainer.state.step == 7
    assert record(trainer.run_dir) == {
        "minutes": 0.25, "seconds_per_step": 2.0, "timed_steps": 2, "fixed_at_step": 3, "total_steps": 7,
        "steps_done": 7, "seconds": {"training": 14.0, "evaluation": 4 * EVALUATION_SECONDS, "checkpoint": 0.0}}
    metrics = RunFolder(trainer.run_dir).metrics()
    # the evaluation at step 2 (before the total was fixed) took 100 s and cost no step; the last evaluates
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [2, 4, 6, 7]
    assert (trainer.run_dir / "checkpoint-7" / "COMPLETE").exists()
    assert trainer.budget.summary(7) == ("budget 0.25 min: 7 of 7 steps at 2 s a step (fixed after step 3); 0.23 min "
                                         "training, 6.67 min evaluating, 0.00 min saving checkpoints")

    # what anneals over the run (the masked LM, teacher annealing): its start until the total is fixed
    trainer.state.step = 2
    assert trainer._schedule_point() == (0, 1)
    trainer.state.step = 5
    assert trainer._schedule_point() == (5, 7)

    # the learning rate each record gives for the next step: the schedule's start (0 in warm-up)
    # until the total is fixed, then what a run of 7 fixed steps (2 of warm-up) has, down to the
    # decayed end value after the last
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fixed_run = get_scheduler("linear", probe, num_warmup_steps=2, num_training_steps=7).lr_lambdas[0]
    peak = trainer.scheduler.scheduler.base_lrs[0]
    lrs = [m["lr"] for m in metrics if m["kind"] == "train"]
    assert lrs == [0.0, 0.0, *(peak * fixed_run(step) for step in range(3, 8))]
    assert lrs[2] == pytest.approx(0.8 * peak) and lrs[-1] == 0.0


def test_a_budget_spent_while_measuring_stops_there_with_an_evaluation_and_a_checkpoint(tiny_config, fake_clock):
    trainer = Trainer(budgeted(tiny_config, "train.max_minutes=0.05"), show_progress=False)  # 3 s
    trainer.train()
    assert trainer.state.step == 2 and record(trainer.run_dir)["total_steps"] == 2
    assert [m["step"] for m in RunFolder(trainer.run_dir).metrics() if m["kind"] == "eval"] == [2]
    assert (trainer.run_dir / "checkpoint-2" / "COMPLETE").exists()


def test_a_second_call_measures_afresh_skipping_its_own_first_step(tiny_config, fake_clock):
    """Stopped at step 2 before the total was fixed, then trained on by the same trainer: the second
    call skips its first step (3) as one-off work and times 4 and 5, not 3 and 4."""
    trainer = Trainer(budgeted(tiny_config), show_progress=False)
    trainer.train(until_step=2)
    assert trainer.budget.total is None
    trainer.resume = True
    trainer.train()
    saved = record(trainer.run_dir)
    assert (saved["fixed_at_step"], saved["timed_steps"], saved["total_steps"]) == (5, 2, 7)


@pytest.mark.parametrize("interruption", ["until step 5", "killed in step 4"])
def test_resume_reproduces_the_budgeted_run(tiny_config, fake_clock, killed_at, tmp_path, interruption):
    """After the total was fixed at step 3: stopped at step 5 (checkpoint 5), or killed in step 4
    with checkpoint 2 the last, saved before the total was fixed (budget.json holds it)."""
    config = budgeted(tiny_config)
    Trainer(config, tmp_path / "straight", show_progress=False).train()

    if interruption == "until step 5":
        Trainer(config, tmp_path / "resumed", show_progress=False).train(until_step=5)
    else:
        with killed_at(Trainer, "train_step", 4):
            Trainer(config, tmp_path / "resumed", show_progress=False).train()
        assert RunFolder(tmp_path / "resumed").entries()[-1] == "checkpoint-2"
        assert record(tmp_path / "resumed")["total_steps"] == 7
    Trainer(config, tmp_path / "resumed", resume=True, show_progress=False).train()

    expected = load_file(tmp_path / "straight/checkpoint-7/model.safetensors")
    got = load_file(tmp_path / "resumed/checkpoint-7/model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert record(tmp_path / "resumed") == record(tmp_path / "straight")
    straight_log, resumed_log = (RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed"))
    assert straight_log == resumed_log


# ----------------------------------------------------------------------------- the config and the command line
def test_the_budget_is_a_key_added_later_and_changes_the_fingerprint():
    current = config_to_dict(load_config())
    assert current["train"]["max_minutes"] is None
    saved = {**current, "train": {k: v for k, v in current["train"].items() if k != "max_minutes"}}
    assert config_fingerprint(saved) == config_fingerprint(current)  # runs saved before the key resume
    assert config_fingerprint(config_to_dict(load_config(overrides=["train.max_minutes=30"]))) != config_fingerprint(current)


@pytest.mark.parametrize("override, message", [
    ("train.max_minutes=0", "train.max_minutes must lie in"),
    ("train.max_minutes=-5", "train.max_minutes must lie in"),
    ("train.max_minutes=1e9", "train.max_minutes must lie in"),
    ("train.max_minutes=.nan", "train.max_minutes: expected a finite number"),
    ("train.max_minutes=soon", "train.max_minutes: expected float"),
    ("train.warmup_steps=-1", "train.warmup_steps must lie in"),
    ("train.warmup_steps=2.5", "train.warmup_steps: expected int"),
])
def test_budgets_that_cannot_train_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize("command", ["train", "run", "pretrain"])
@pytest.mark.parametrize("minutes", ["0", "-3", "nan", "inf", "soon"])
def test_bad_minutes_are_one_line_and_exit_2(command, minutes, capsys):
    assert main([command, "--minutes", minutes]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --minutes must be a positive number of minutes, not {minutes!r}"]


def test_minutes_on_the_command_line_set_the_budget(tmp_path, capsys):
    """`--minutes` reaches the config (a resume under another budget is refused, naming it)."""
    from clue_mtl.config import save_config

    save_config(load_config(overrides=[f"output_dir={tmp_path}", "train.max_minutes=5"]), tmp_path / "c.yaml")
    (tmp_path / "run").mkdir()
    save_config(load_config(overrides=["train.max_minutes=5"]), tmp_path / "run" / "config.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"),
                 "--resume", "--minutes", "7.5"]) == 2
    assert "train.max_minutes: 5.0 -> 7.5" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [None, "train.max_minutes=0.25"])
def test_warmup_steps_fix_the_warm_up_whatever_the_runs_length(tiny_config, fake_clock, budget):
    """constant_with_warmup over 3 steps: the same rates in a run of 7 fixed steps and in one the
    clock fixes (its first steps at the schedule's start, 0), then the peak."""
    config = tiny_config("train.scheduler=constant_with_warmup", "train.warmup_steps=3", "train.steps=7",
                         "train.eval_every=100", *([budget] if budget else []))
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    peak = trainer.scheduler.scheduler.base_lrs[0]
    lrs = [m["lr"] for m in RunFolder(trainer.run_dir).metrics() if m["kind"] == "train"]
    expected = [peak / 3, 2 * peak / 3, peak, peak, peak, peak, peak]
    if budget:   # steps 1-2 untimed at the start, the total fixed after step 3
        expected[:2] = [0.0, 0.0]
    assert lrs == pytest.approx(expected)
