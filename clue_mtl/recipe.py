"""What the training recipes share: the run folder's metrics log and the resumable checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


class RunRecipe:
    """A base for recipes (`train.Trainer`, `pretrain.Pretrainer`).

    Subclasses set `run_dir`, `accelerator`, `state` (a dataclass with `step` and `to_dict()`)
    and `state_class`. The checkpoint is Accelerate's full state (models, optimisers, schedulers,
    RNGs and registered objects) plus the recipe state as JSON.
    """

    run_dir: Path
    accelerator: Accelerator
    state_class: type
    _checkpoint_step: int = -1

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
