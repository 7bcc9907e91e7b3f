"""What the training recipes share, as parts their own `train()` calls: the run folder's lock,
the clock of `train.max_minutes`, the metrics log and the resumable checkpoint.

There is no loop here and no hook to fill in: each recipe (`recipes.multitask.Trainer`,
`recipes.pretrain.Pretrainer`) writes its step loop out in its `train()`, and calls these parts
by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from clue_mtl.atomic import FolderLock, write_text_atomic
from clue_mtl.config import added_keys, config_fingerprint, config_to_dict
from clue_mtl.errors import RunFolderError, TrainingDiverged
from clue_mtl.runs import checkpoint
from clue_mtl.runs.folder import RunFolder
from clue_mtl.training.accelerator import fresh_accelerator
from clue_mtl.training.budget import StepBudget, budget_schedule, refresh_learning_rates, warmup_count
from clue_mtl.training.tracking import accelerator_kwargs, flat_record, hyperparameters


class RunParts:
    """A mixin of the parts a recipe's loop calls: the run folder's claim and lock, the budget's
    clock, the metrics log and the resumable checkpoint.

    A recipe sets `config` (with `train.steps`, `max_minutes`, `scheduler`, `warmup_ratio`,
    `report_to`), `folder` (a `RunFolder`), `accelerator`, `resume`, `show_progress`, `budget`
    (`_step_budget()`), `state` (a dataclass with `step` and `to_dict()`), `model` and
    `checkpointed` (name -> object with `state_dict`/`load_state_dict` that the checkpoint holds
    besides the model). Whatever follows the run's length (the learning rate:
    `_learning_rate_schedule`; annealing: `_schedule_point`) reads `total_steps`. A non-finite
    loss or weight stops training (`TrainingDiverged`) before anything is saved.
    """

    folder: RunFolder
    accelerator: Accelerator
    checkpointed: dict
    _checkpoint_step: int = -1
    _run_lock: FolderLock | None = None   # the main process's hold on the run folder
    _holding_run_dir: bool = False        # on every process: the main one holds it
    budget: StepBudget | None = None      # `train.max_minutes`: the steps fixed by the clock

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    def _open_run(self, config, run_dir: str | Path | None, *, resume: bool, show_progress: bool,
                  accelerator: Accelerator | None, **accelerator_options) -> None:
        """What every recipe starts from: its config, run folder (default OUTPUT_DIR/NAME), resume
        and progress flags, torch's threads (`train.num_threads`), and the Accelerator: the caller's,
        or one for `train.mixed_precision` and `train.report_to` (the schedule steps once a step)."""
        self.config = config
        self.folder = RunFolder(run_dir or Path(config.output_dir) / config.name)
        self.resume, self.show_progress = resume, show_progress
        train = config.train
        if train.num_threads > 0:
            torch.set_num_threads(train.num_threads)
        self.accelerator = accelerator or fresh_accelerator(
            mixed_precision=train.mixed_precision, step_scheduler_with_optimizer=False,
            **accelerator_options, **accelerator_kwargs(train.report_to, self.folder))

    # ------------------------------------------------------------------------- the run's length
    @property
    def total_steps(self) -> int | None:
        """The run's steps: `train.steps`, or the budget's total (None until it is fixed)."""
        return self.config.train.steps if self.budget is None else self.budget.total

    def _last_step(self, until_step: int | None) -> int | float:
        """Where this call of `train()` stops: `until_step` or the run's end, whichever comes first."""
        total = self.total_steps
        if total is None:  # still measuring: on until the budget fixes the total
            return until_step or math.inf
        return min(until_step or total, total)

    def _schedule_point(self) -> tuple[int, int]:
        """(step, steps) for what anneals over the run: the step about to run of `total_steps`;
        before a budget has fixed its total, the start (0, 1): see `budget.py`."""
        step = self.state.step
        if self.budget is None:
            return step, self.config.train.steps
        total = self.budget.total_at(step)
        return (step, total) if total is not None else (0, 1)

    # ------------------------------------------------------------------------- a call of train()
    def _start_or_resume(self, write_run_files: Callable[[], None]) -> None:
        """Load the checkpoint (`resume`), or write a fresh run's files; start the trackers and,
        with a budget, this call's measurement."""
        if self.resume:
            self.load_checkpoint()
            if self.budget is not None and self.budget.total is None:  # saved before the total was fixed
                self.budget.adopt(self.folder.budget_file)
        elif self.accelerator.is_main_process:
            write_run_files()
        self.accelerator.wait_for_everyone()
        if self._tracking and not self.accelerator.trackers:  # a caller's accelerator may track already
            self.accelerator.init_trackers(self.config.name, config=hyperparameters(config_to_dict(self.config)))
        if self.budget is not None:
            self.budget.begin_call()

    def _progress_bar(self, name: str) -> tqdm:
        """The bar over the run's steps (shown on the main process with `show_progress`)."""
        return tqdm(total=self.total_steps, initial=self.state.step, desc=name, dynamic_ncols=True,
                    disable=not (self.show_progress and self.accelerator.is_main_process))

    def _checkpoint_if_stopped_short(self) -> None:
        """A checkpoint to resume from, when this call stopped before the run's end (`until_step`)
        and the last step has none yet."""
        short = self.total_steps is None or self.state.step < self.total_steps
        if short and self._checkpoint_step != self.state.step:
            self.save_checkpoint()

    def _close_run(self) -> None:
        """Every process done; the trackers' writers closed. Not `Accelerator.end_training`, which
        also ends the process group that a caller's next barrier still needs."""
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    @property
    def _tracking(self) -> bool:
        return self.config.train.report_to != "none"

    @staticmethod
    def _steps_per_second(steps: int, started: float) -> float:
        """`steps` over the seconds since `started` (`time.perf_counter`)."""
        return steps / max(time.perf_counter() - started, 1e-9)

    # ------------------------------------------------------------------------- training by the clock
    def _step_budget(self) -> StepBudget | None:
        """The budget of `train.max_minutes` (None without one); set before `_learning_rate_schedule`."""
        minutes, accelerator = self.config.train.max_minutes, self.accelerator
        if minutes is None:
            return None
        agree = None
        if accelerator.num_processes > 1:  # the slowest process decides, so all fix the same total
            def agree(values: list[float]) -> list[float]:
                mine = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
                return accelerator.gather(mine).amax(0).tolist()
        synchronize = torch.cuda.synchronize if accelerator.device.type == "cuda" else None
        return StepBudget(minutes, agree=agree, synchronize=synchronize)

    def _learning_rate_schedule(self, optimizer):
        """`train.scheduler` with warm-up over `train.warmup_steps`, or else `ceil(warmup_ratio *
        steps)`, of the run's steps: `train.steps`, or the total the budget fixes
        (`budget.budget_schedule`)."""
        train = self.config.train
        if self.budget is not None:
            return budget_schedule(optimizer, train.scheduler, train.warmup_ratio, self.budget, train.warmup_steps)
        return get_scheduler(train.scheduler, optimizer, num_training_steps=train.steps,
                             num_warmup_steps=warmup_count(train.steps, train.warmup_ratio, train.warmup_steps))

    def _spending(self, account: str):
        """Time a block into the budget's `account` (nothing without a budget)."""
        return self.budget.spending(account) if self.budget is not None else contextlib.nullcontext()

    def _count_budget_step(self, progress: tqdm) -> None:
        """Count the step just timed into the budget; once the timed steps fix the total, the
        learning rate of the next step is read again from the schedule and the total recorded in
        `budget.json` and on the bar."""
        if self.budget is None or not self.budget.step_taken(self.state.step):
            return
        refresh_learning_rates(self.scheduler)
        self._write_budget_record()
        progress.total = self.total_steps
        progress.refresh()
        if self.show_progress and self.accelerator.is_main_process:
            progress.write(f"budget {self.budget.minutes:g} min: {self.budget.seconds_per_step:.3g} s a step over "
                           f"{self.budget.timed_steps} timed steps; {self.total_steps:,} steps in all")

    def _write_budget_record(self) -> None:
        if self.accelerator.is_main_process:
            write_text_atomic(self.folder.budget_file, json.dumps(self.budget.record(self.state.step), indent=2) + "\n")

    def _report_budget(self) -> None:
        """`budget.json` with the minutes spent in this run's steps, and one line saying so."""
        if self.budget is None:
            return
        self._write_budget_record()
        if self.show_progress:
            self.accelerator.print(self.budget.summary(self.state.step))

    # ------------------------------------------------------------------------- the run folder and the checkpoint
    def _claim_run_dir(self, overwrite: bool) -> None:
        """Lock the folder for this run (until `train` ends); then refuse a folder holding another run
        (or this run under another config), and clear it for `overwrite`. Checked under the lock, so
        no second command can write between the check and the run."""
        self._lock_run_dir()
        try:
            self.folder.check_claim(config_to_dict(self.config), resume=self.resume, overwrite=overwrite,
                                   added=added_keys(self.config), locked=True)
            self.accelerator.wait_for_everyone()
            if overwrite and self.accelerator.is_main_process:
                self.folder.clear()
            self.accelerator.wait_for_everyone()
        except BaseException:
            self._release_run_dir()
            raise

    @contextlib.contextmanager
    def _released_if_setup_fails(self):
        """Let the run folder's lock go when the setup after the claim fails (a missing encoder, a
        bad data file), so that the next command in the same process (a notebook) can claim it."""
        try:
            yield
        except BaseException:
            self._release_run_dir()
            raise

    def _lock_run_dir(self) -> None:
        """The main process takes the folder's lock; every process learns whether it could, so a
        refusal stops them all (one line each) rather than leaving the others at a barrier."""
        if self._holding_run_dir:
            return
        refusal = None
        if self.accelerator.is_main_process:
            try:
                self._run_lock = self.folder.lock().acquire()
            except RunFolderError as error:
                refusal = error
        refused = torch.tensor([0.0 if refusal is None else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            refused = self.accelerator.reduce(refused, "sum")
        if refusal is not None:
            raise refusal
        if refused.item():
            raise RunFolderError(f"{self.run_dir}: the main process could not lock the folder (see its error)")
        self._holding_run_dir = True

    def _release_run_dir(self) -> None:
        if self._run_lock is not None:
            self._run_lock.release()
        self._run_lock, self._holding_run_dir = None, False

    @contextlib.contextmanager
    def _holding_run_folder(self):
        """The run folder's lock for a call of `train()`: the claim's (or taken again by a second
        call), let go at the end, whatever ends it."""
        self._lock_run_dir()
        try:
            yield
        finally:
            self._release_run_dir()

    def _all_checkpoint_components(self) -> dict:
        """What the checkpoint holds besides the model: the recipe's `checkpointed`, the fp16 loss
        scaler and the budget."""
        components = dict(self.checkpointed)
        if self.accelerator.scaler is not None:  # fp16
            components["scaler"] = self.accelerator.scaler
        if self.budget is not None:
            components["budget"] = self.budget
        return components

    def _append_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.folder.append_metrics(record)
        if self._tracking:
            self.accelerator.log(flat_record(record), step=record["step"])

    def _fingerprint(self) -> str:
        return config_fingerprint(config_to_dict(self.config), added_keys(self.config))

    def save_checkpoint(self) -> None:
        """`checkpoint-STEP/` beside the last checkpoint, swapped in so that no kill strands the run."""
        self._stop_if_weights_not_finite()
        self._checkpoint_step = self.state.step
        with self._spending("checkpoint"):
            checkpoint.save_checkpoint(
                self.run_dir, self.state.step, model=self.model, components=self._all_checkpoint_components(),
                recipe_state=self.state.to_dict(), fingerprint=self._fingerprint(),
                accelerator=self.accelerator)

    def load_checkpoint(self) -> None:
        """Continue from the newest complete checkpoint (`CheckpointError` when there is none)."""
        values = checkpoint.load_checkpoint(
            self.run_dir, model=self.model, components=self._all_checkpoint_components(),
            fingerprint=self._fingerprint(), accelerator=self.accelerator)
        try:
            self.state = type(self.state)(**values)
        except TypeError as error:
            raise checkpoint.CheckpointError(f"{self.run_dir}: the checkpoint's recipe state does not fit "
                                             f"({error})") from None
        self._checkpoint_step = self.state.step
        self._truncate_metrics_after(self.state.step)

    def _truncate_metrics_after(self, step: int) -> None:
        """Drop metrics an interrupted run logged after its last checkpoint, and a last line a kill cut short."""
        path = self.folder.metrics_file
        if not (self.accelerator.is_main_process and path.exists()):
            return
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                logged_at = record["step"]
            except (ValueError, TypeError, KeyError, RecursionError):
                if number >= len(lines) - 1:  # the last line, cut short by a kill
                    continue
                raise RunFolderError(f"{path}:{number}: not a metrics record; the log was edited or damaged") from None
            if isinstance(logged_at, int) and logged_at <= step:
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))  # a kill here keeps the whole log

    def _stop_if_not_finite(self, values: dict[str, torch.Tensor]) -> None:
        """Raise `TrainingDiverged` when a loss of this step is NaN or infinite, on every process."""
        flags = torch.stack([~torch.isfinite(value.detach().float()).all() for value in values.values()]).float()
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "sum")
        bad = [name for name, flag in zip(values, flags.tolist()) if flag]
        if bad:
            found = ", ".join(f"{name} {float(values[name].detach().float().sum()):.4g}" for name in bad)
            raise TrainingDiverged(
                f"training diverged at step {self.state.step + 1}: non-finite loss ({found}); nothing of that "
                f"step was saved (last checkpoint: step {max(self._checkpoint_step, 0)}); lower train.lr "
                "or keep train.grad_clip on")

    def _stop_if_weights_not_finite(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()), None)
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "sum")
        if flag.item():
            raise TrainingDiverged(f"training diverged by step {self.state.step}: non-finite weights "
                                   f"({bad or 'on another process'}); nothing was saved; lower train.lr")
