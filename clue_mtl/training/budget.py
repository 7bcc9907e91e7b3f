"""Training by the clock (`train.max_minutes`): the steps that fill a budget of minutes, measured
on the run's own first steps and fixed once, the schedules over them, and where the minutes went.

Fixing the total. A call of `train()` does not time its first `SKIPPED_STEPS` steps (one-off
costs: memory allocation, kernel choice, caches); it times the next `TIMED_STEPS`, and their mean
time s fixes the total after the step k that ends them:

    total = k + floor((budget - training seconds so far) / s)

(at least k: a budget spent before the measurement ends stops at the step it is spent at). Only
training steps are on the clock. Evaluation, checkpoints and whatever runs before or after the
step loop are timed into accounts of their own, never charged, so a slow evaluation costs no
step. Under several processes each times its own steps and the slowest decides, so every
process fixes the same total at the same step. `train.steps` is not read.

The schedules before the total is known. The learning-rate schedule (`train.scheduler`, warm-up
over `ceil(warmup_ratio * total)` steps) and what anneals over the run (`auxiliary_mlm.anneal`,
BAM's teacher annealing) need the total, which the first k steps run without: they run at the
schedules' starting values, the same for any length. With warm-up that is a learning rate of 0
(Adam's moments fill, no weight moves); without it the peak; the anneals at their start. From
step k on, every step s gets exactly what a run of `total` fixed steps gives step s: a linear
warm-up of W steps goes from 0 to k/W of the peak at step k, where it would be, and the last step
gets the decayed end value. Zero is the only starting learning rate below every warm-up a total
could give (a guessed total would make the warm-up fall back when the real one is longer), and
it needs no clock, so a resume replays it.

Resuming. The total and the step it was fixed at go to `budget.json` in the run folder
(atomically, when they are fixed) and into every checkpoint, with the seconds spent so far. The
schedules are a function of (step, total, the step it was fixed at), so a resume from any
checkpoint saved after the total was fixed, or before it with `budget.json` there, reproduces
the uninterrupted run exactly. A run killed before it fixed its total measures again.

The report: `budget.json` at the end of `train()` holds the budget, the measured seconds a step,
the total, the steps done and the seconds spent training, evaluating and saving checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from clue_mtl.config import MAX_STEPS
from clue_mtl.errors import RunFolderError
from clue_mtl.untrusted import read_json

SKIPPED_STEPS = 2
TIMED_STEPS = 10
ACCOUNTS = ("training", "evaluation", "checkpoint")


def clock() -> float:
    """Seconds on a monotonic clock (tests replace it)."""
    return time.perf_counter()


class StepBudget:
    """A budget of minutes of training steps: the total once measured (`step_taken`), the total
    a schedule reads at a step (`total_at`), the seconds spent per account (`spending`), a
    checkpoint component (`state_dict`) and the run folder's record (`record`, `adopt`).

    agree: the values of every process -> their maximum (several processes); synchronize: waits
    for the device, so a step's time is its work and not only its launch (CUDA).
    """

    def __init__(self, minutes: float, *, agree: Callable[[list[float]], list[float]] | None = None,
                 synchronize: Callable[[], None] | None = None):
        self.minutes = minutes
        self.seconds = minutes * 60.0
        self.total: int | None = None           # steps that fill the budget, once fixed
        self.fixed_at: int | None = None        # the step after which the total was fixed
        self.seconds_per_step: float | None = None
        self.timed_steps = 0
        self.spent = dict.fromkeys(ACCOUNTS, 0.0)
        self._agree = agree or (lambda values: values)
        self._synchronize = synchronize or (lambda: None)
        self._steps_this_call = 0         # steps of this call of `train()` (`begin_call`)
        self._timed_seconds = 0.0         # their timed seconds, while measuring
        self._open: list[list] = []  # the blocks being timed, outermost first: [account, started, inner seconds]
        self._last = 0.0             # the last block's own seconds

    # ------------------------------------------------------------------------- the total
    def begin_call(self) -> None:
        """A new call of `train()` (after any resume): while the total is not fixed, its measurement
        starts again, skipping this call's first steps (a second call on one trainer included)."""
        self._steps_this_call, self._timed_seconds = 0, 0.0
        if self.total is None:
            self.timed_steps = 0

    def total_at(self, step: int) -> int | None:
        """The total the schedules follow at `step` (counted from 0): None before the step the
        total was fixed at, so a resumed run gives every step what it had."""
        return self.total if self.total is not None and step >= self.fixed_at else None

    def step_taken(self, step: int) -> bool:
        """Count the training step just timed by `spending("training")`, which ended at `step`;
        True when this fixes the total."""
        if self.total is not None:
            return False
        self._steps_this_call += 1
        if self._steps_this_call > SKIPPED_STEPS:
            self.timed_steps += 1
            self._timed_seconds += self._last
        spent, timed = self._agree([self.spent["training"], self._timed_seconds])
        if self.timed_steps < TIMED_STEPS and spent < self.seconds:
            return False
        self.seconds_per_step = timed / self.timed_steps if self.timed_steps else self._last
        left = max(self.seconds - spent, 0.0)
        self.total = step + min(math.floor(left / max(self.seconds_per_step, 1e-9)), MAX_STEPS - step)
        self.fixed_at = step
        return True

    # ------------------------------------------------------------------------- the accounts
    @contextlib.contextmanager
    def spending(self, account: str):
        """Time the block into `account`; a block timed inside it counts in its own account only."""
        self._synchronize()
        block = [account, clock(), 0.0]
        self._open.append(block)
        try:
            yield
        finally:
            self._synchronize()
            self._open.pop()
            elapsed = clock() - block[1]
            self._last = elapsed - block[2]
            self.spent[account] += self._last
            if self._open:
                self._open[-1][2] += elapsed

    def _spent_now(self) -> dict[str, float]:
        """The seconds per account with the open blocks' so far: a checkpoint saved inside an
        evaluation holds that evaluation's seconds up to the save."""
        spent, now = dict(self.spent), clock()
        for block, inside in zip(self._open, [*self._open[1:], None]):
            spent[block[0]] += (inside[1] if inside else now) - block[1] - block[2]
        return spent

    # ------------------------------------------------------------------------- checkpoint and record
    def state_dict(self) -> dict:
        return {"total": self.total, "fixed_at": self.fixed_at, "seconds_per_step": self.seconds_per_step,
                "timed_steps": self.timed_steps, "spent": self._spent_now()}

    def load_state_dict(self, state: dict) -> None:
        self._fix(state["total"], state["fixed_at"], state["seconds_per_step"], state["timed_steps"])
        self.spent = {account: float(state["spent"][account]) for account in ACCOUNTS}

    def _fix(self, total, fixed_at, seconds_per_step, timed_steps) -> None:
        if total is not None and not (isinstance(total, int) and isinstance(fixed_at, int)
                                      and 0 <= fixed_at <= total <= MAX_STEPS):
            raise ValueError(f"total {total!r} fixed at step {fixed_at!r} is not a budget's")
        self.total, self.fixed_at = total, fixed_at
        self.seconds_per_step = None if seconds_per_step is None else float(seconds_per_step)
        self.timed_steps = int(timed_steps) if total is not None else 0  # else the measurement starts again

    def record(self, steps_done: int) -> dict:
        """What `budget.json` holds: the measurement, the total, and how the minutes were spent."""
        return {"minutes": self.minutes, "seconds_per_step": self.seconds_per_step, "timed_steps": self.timed_steps,
                "fixed_at_step": self.fixed_at, "total_steps": self.total, "steps_done": steps_done,
                "seconds": {account: round(seconds, 3) for account, seconds in self.spent.items()}}

    def adopt(self, path: Path) -> None:
        """Take the total recorded in `path` (a run folder's `budget.json`) where it exists."""
        if not path.exists():
            return
        record = read_json(path, what="budget record", error=RunFolderError)
        try:
            self._fix(record["total_steps"], record["fixed_at_step"], record["seconds_per_step"],
                      record["timed_steps"])
        except (KeyError, TypeError, ValueError) as error:
            raise RunFolderError(f"{path}: not a budget record ({error}); resume needs the total it "
                                 "fixed") from None

    def summary(self, steps_done: int) -> str:
        """One line: the steps, the measurement, and the minutes per account."""
        steps = (f"{steps_done:,} of {self.total:,} steps at {self.seconds_per_step:.3g} s a step (fixed after step "
                 f"{self.fixed_at:,})" if self.total is not None else f"{steps_done:,} steps (total not fixed yet)")
        minutes = {account: seconds / 60 for account, seconds in self.spent.items()}
        return (f"budget {self.minutes:g} min: {steps}; {minutes['training']:.2f} min training, "
                f"{minutes['evaluation']:.2f} min evaluating, {minutes['checkpoint']:.2f} min saving checkpoints")


# ----------------------------------------------------------------------------- the schedule
def schedule_factor(name: str, warmup_ratio: float, lr: float, warmup_steps: int | None = None
                    ) -> Callable[[int, int | None], float]:
    """factor(step, total): `transformers.get_scheduler(name)`'s learning-rate factor at `step`
    of a run of `total` steps with `warmup_count(total, ...)` warm-up steps (lr: the optimiser's
    default, which the polynomial schedule reads); with total None, the factor at step 0, which
    every schedule of `config.SCHEDULERS` has whatever its length."""
    factors: dict[int, Callable[[int], float]] = {}

    def factor(step: int, total: int | None) -> float:
        if total is None:
            step, total = 0, 1
        if total not in factors:
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
            factors[total] = get_scheduler(name, probe, num_training_steps=total,
                                           num_warmup_steps=warmup_count(total, warmup_ratio, warmup_steps)).lr_lambdas[0]
        return factors[total](step)
    return factor


def warmup_count(total: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """The warm-up steps of a run of `total`: `warmup_steps` where set (at most the run), else
    `ceil(warmup_ratio * total)`."""
    return min(warmup_steps, total) if warmup_steps is not None else math.ceil(warmup_ratio * total)


def budget_schedule(optimizer: torch.optim.Optimizer, name: str, warmup_ratio: float, budget: StepBudget,
                    warmup_steps: int | None = None) -> LambdaLR:
    """The learning-rate schedule over the budget's total: its start until the total is fixed
    (`refresh_learning_rates` then), the schedule of a run of `total` steps from there."""
    factor = schedule_factor(name, warmup_ratio, optimizer.defaults["lr"], warmup_steps)
    return LambdaLR(optimizer, lambda step: factor(step, budget.total_at(step)))


def refresh_learning_rates(scheduler) -> None:
    """Each group's learning rate for the next step read again from the schedule (after the
    total is fixed: the step just taken set it from the start)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # inside Accelerate's wrapper
    for group, factor in zip(inner.optimizer.param_groups, inner.lr_lambdas):
        group["lr"] = group["initial_lr"] * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
