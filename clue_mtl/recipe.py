"""What the training recipes share: the step loop, the metrics log and the resumable checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


class RunRecipe:
    """A base for recipes (`train.Trainer`, `pretrain.Pretrainer`).

    Subclasses set `config` (with `train.steps`, `log_every`, `eval_every`), `run_dir`,
    `accelerator`, `resume`, `show_progress`, `state` (a dataclass with `step` and `to_dict()`)
    and `state_class`, and implement `train_step`, `_log_step`, `_evaluate_and_checkpoint` and
    `_write_run_files`. The checkpoint is Accelerate's full state (models, optimisers, schedulers,
    RNGs and registered objects) plus the recipe state as JSON.
    """

    run_dir: Path
    accelerator: Accelerator
    state_class: type
    progress_name: str = "train"
    _checkpoint_step: int = -1

    def train(self, until_step: int | None = None):
        """Train to `config.train.steps`, or stop at `until_step` with a checkpoint to resume from."""
        accelerator, cfg = self.accelerator, self.config.train
        last_step = min(until_step or cfg.steps, cfg.steps)
        if self.resume:
            self.load_checkpoint()
        elif accelerator.is_main_process:
            self._write_run_files()
        accelerator.wait_for_everyone()

        progress = tqdm(total=cfg.steps, initial=self.state.step, desc=self.progress_name, dynamic_ncols=True,
                        disable=not (self.show_progress and accelerator.is_main_process))
        self._before_training(progress)
        started, steps_at_start = time.perf_counter(), self.state.step
        while self.state.step < last_step:
            output = self.train_step()
            progress.update(1)
            finished = self.state.step == cfg.steps
            if self.state.step % cfg.log_every == 0 or finished:
                speed = (self.state.step - steps_at_start) / max(time.perf_counter() - started, 1e-9)
                progress.set_postfix(self._log_step(output, speed))
            if (self.state.step % cfg.eval_every == 0 or finished) and self._evaluate_and_checkpoint(progress):
                break  # early stopping
        progress.close()
        if self.state.step < cfg.steps and self._checkpoint_step != self.state.step:
            self.save_checkpoint()
        self._after_training()
        accelerator.wait_for_everyone()
        return self.state

    def _before_training(self, progress) -> None:
        """A hook before the first step of this call (e.g. a baseline evaluation)."""

    def _after_training(self) -> None:
        """A hook after the loop (e.g. exporting the trained model)."""

    def _append_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def save_checkpoint(self) -> None:
        """Write the state beside the last checkpoint, then swap it in: a run killed mid-save keeps
        a complete checkpoint (weights and step always match)."""
        directory, staging = self.run_dir / CHECKPOINT_DIR, self.run_dir / (CHECKPOINT_DIR + ".new")
        self._checkpoint_step = self.state.step
        self.accelerator.save_state(str(staging))
        if self.accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(self.state.to_dict(), indent=2))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if directory.exists():
                shutil.rmtree(directory)
            staging.rename(directory)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> None:
        directory, staging = self.run_dir / CHECKPOINT_DIR, self.run_dir / (CHECKPOINT_DIR + ".new")
        if not (directory / STATE_FILE).exists() and (staging / STATE_FILE).exists():
            directory = staging  # killed between the two renames: the new state is complete
        if not (directory / STATE_FILE).exists():
            raise FileNotFoundError(f"nothing to resume: {directory} holds no checkpoint")
        self.accelerator.load_state(str(directory))
        self.state = self.state_class(**json.loads((directory / STATE_FILE).read_text()))
        self._checkpoint_step = self.state.step
        self._truncate_metrics_after(self.state.step)

    def _truncate_metrics_after(self, step: int) -> None:
        """Drop metrics an interrupted run logged after its last checkpoint."""
        path = self.run_dir / METRICS_FILE
        if self.accelerator.is_main_process and path.exists():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                     if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
