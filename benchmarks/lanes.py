"""Runs trained side by side in single-thread lanes: each `python -m clue_mtl train` in its own
process with one torch thread (OMP_NUM_THREADS=1). On 2 cores two lanes do about 1.5x the work of
one two-thread process; their step times are lane times, never the machine's.

A lane whose run folder holds its finished run is not trained again; an unfinished one is resumed
from its last checkpoint, or started again where it left none. A run folder holding a run of other
settings is refused, and so is an unfinished one reached through a link (a run of another study
standing in for a lane): neither is trained over.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import processes
from benchmarks.common import ROOT, refuse, smoke_job_overrides, smoke_run

LANE_OVERRIDES = ["train.num_threads=1"]   # what every lane's command adds to its config


@dataclass(frozen=True)
class Lane:
    """One run: its name (the run folder's, under the run root), config and overrides."""

    name: str
    config: str                                       # relative to the repository root
    overrides: list[str] = field(default_factory=list)

    def loaded(self):
        """The lane's config as its run reads it (the smoke inputs in a smoke run)."""
        from clue_mtl.config import load_config

        return load_config(str(ROOT / self.config), [*LANE_OVERRIDES, *smoke_job_overrides(), *self.overrides])


def other_settings(config, run_dir: Path) -> list[str]:
    """`key: saved -> wanted` for each setting the run in `run_dir` differs in from `config` (none
    for a folder without a run)."""
    from clue_mtl.config import load_config
    from clue_mtl.config.compat import added_keys, config_differences
    from clue_mtl.config.loading import config_to_dict
    from clue_mtl.runs.folder import RunFolder

    saved = RunFolder(run_dir).config_file
    if not saved.exists():
        return []
    return config_differences(config_to_dict(load_config(saved)), config_to_dict(config), added_keys(config))


def finished(config, run_dir: Path) -> bool:
    """The run folder holds this config's run trained to its last step and evaluated there (a lane
    killed during its final evaluation is not finished), with its best model. A run of other
    settings ends the script (exit 2)."""
    from clue_mtl.runs.folder import RunFolder

    differences = other_settings(config, run_dir)
    if differences:
        refuse(f"{run_dir} holds a run of other settings ({'; '.join(differences[:3])}); move it or pick "
               "another run root")
    if not (run_dir / "best").is_dir() or not (run_dir / "metrics.jsonl").exists():
        return False
    evaluated = [record["step"] for record in RunFolder(run_dir).metrics() if record.get("kind") == "eval"]
    return max(evaluated, default=0) >= config.train.steps


def started_over_or_resumed(run_dir: Path) -> list[str]:
    """`--resume` where the lane left a checkpoint, else `--overwrite` (a lane killed before its
    first checkpoint starts again)."""
    return ["--resume"] if any(run_dir.glob("checkpoint-*")) else ["--overwrite"]


def train_lanes(lanes: list[Lane], run_root: Path) -> bool:
    """Every unfinished lane trained (or resumed) at once, each with one thread and its log in
    `RUN_ROOT/logs/NAME.log`; whether any lane trained. A failed lane ends the script (exit 2)."""
    running = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for lane in lanes:
        run_dir = run_root / lane.name
        if finished(lane.loaded(), run_dir):
            print(f"{lane.name}: trained already ({run_dir})", flush=True)
            continue
        if run_dir.is_symlink():
            refuse(f"{run_dir} links to an unfinished run ({run_dir.resolve()}); finish it there or remove the link")
        command = processes.module_command(
            "clue_mtl", "train", "--config", str(ROOT / lane.config), "--run-dir", str(run_dir),
            *[f"--set={override}" for override in [*LANE_OVERRIDES, *smoke_job_overrides(), *lane.overrides]],
            *started_over_or_resumed(run_dir))
        log = run_root / "logs" / f"{lane.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{lane.name}: training in a lane (log {log})", flush=True)
        with log.open("a") as output:   # appended: a resumed lane keeps the log of the attempt before
            # a smoke run's lanes are forks: two steps each, where a fresh interpreter would import for seconds
            running[lane.name] = processes.start(command, fork=smoke_run(), cwd=ROOT, env=environment,
                                                 stdout=output, stderr=subprocess.STDOUT)
    failed = [name for name, process in running.items() if process.wait() != 0]
    if failed:
        refuse(f"lane {', '.join(failed)} failed; see {run_root / 'logs'}")
    return bool(running)


def lane_window(run_dir: Path) -> tuple[float, float]:
    """When the lane ran: its config.yaml written (once its data and model are set up, about 20 s
    in) and its last metrics record (its final evaluation), as file times."""
    return (run_dir / "config.yaml").stat().st_mtime, (run_dir / "metrics.jsonl").stat().st_mtime


def lane_minutes(run_dirs: list[Path]) -> float:
    """From the first lane's start to the last lane's end (`lane_window`)."""
    windows = [lane_window(run_dir) for run_dir in run_dirs]
    return (max(end for _, end in windows) - min(start for start, _ in windows)) / 60


def seconds_a_step(run_dir: Path) -> float:
    """Training seconds a step over the steps before the run's first evaluation, warm-up included:
    the rate its last training record there gives (counted from the start of training, and no
    evaluation or checkpoint has run by then, so no resume either)."""
    from clue_mtl.runs.folder import RunFolder

    records = RunFolder(run_dir).metrics()
    first_eval = min((r["step"] for r in records if r.get("kind") == "eval"), default=float("inf"))
    rates = [r["steps_per_second"] for r in records if r.get("kind") == "train" and r["step"] <= first_eval]
    if not rates:
        refuse(f"{run_dir}: no training record before its first evaluation")
    return 1 / rates[-1]
