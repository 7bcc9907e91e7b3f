"""The run folder: where a recipe keeps its files, claiming a folder for a run, reading a run back.

    config.yaml       the resolved config
    split.json        the dev ids per task (fine-tuning runs)
    labels.json       each task's labels in head order
    mended_rows.json  per task, the training rows reading cleaned or skipped (control characters, empty texts)
    metrics.jsonl     one JSON object per logged step or evaluation
    budget.json       training by the clock (`train.max_minutes`): the total it fixed, where the minutes went
    tokenizer/        the encoder's tokenizer
    best/             the best model by dev mean macro-F1 (model.safetensors, model.json), swapped in whole
    evaluation/       `evaluate`'s reports and plots
    tracking/         TensorBoard's events (`train.report_to: tensorboard`)
    averaged_from.json  the sources of a weight-averaged run (`average-weights`)
    encoder/          a pre-training run's result; source/ its trimmed starting encoder
    checkpoint-STEP/  the latest full training state, for resume (`checkpoint.py`)
    cache/            the frozen layers' stored output (`train.cache_frozen`, `frozen.py`)
    .lock             while a command writes the folder: its holder (`atomic.FolderLock`)

Every module that reads or writes these names asks a `RunFolder` for the path. Nothing here
imports torch: the command line checks a folder before it loads a model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from clue_mtl.atomic import (
    FolderLock,
    in_use,
    lock_holder,
    recover_folder,
    remove_swap_leftovers,
    swap_pending,
    write_text_atomic,
)
from clue_mtl.config import ADDED_KEYS, config_differences, read_yaml
from clue_mtl.errors import RunFolderError
from clue_mtl.runs import checkpoint
from clue_mtl.tasks import TASKS
from clue_mtl.untrusted import METRICS_LIMIT, first_line, read_json, read_text

MODEL_FILE = "model.safetensors"   # in best/ and in every saved model folder (`MultiTaskModel.save`)
MODEL_META_FILE = "model.json"
# What a run leaves in its folder (recipes' outputs); any of them means the folder holds a run.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "budget.json", "split.json", "labels.json", "mended_rows.json",
               "tokenizer", "best", "evaluation", "tracking", "encoder", "source", "cache",
               *checkpoint.LEGACY_CHECKPOINTS)
# metrics-log fields that are timings: they differ between two runs of the same steps
TIMING_KEYS = frozenset({"steps_per_second", "samples_per_second", "model_flops_per_second", "fraction_of_peak"})


class RunFolder:
    """One run's folder: `RunFolder(path).metrics_file` and so on name its files."""

    SWAP_WAIT_SECONDS = 5.0   # how long a reader waits for a live save to finish swapping `best/` in

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------------- the layout
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def split_file(self) -> Path:
        return self.path / "split.json"

    @property
    def labels_file(self) -> Path:
        return self.path / "labels.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def budget_file(self) -> Path:
        return self.path / "budget.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    @property
    def best_model_file(self) -> Path:
        return self.best_dir / MODEL_FILE

    @property
    def best_meta_file(self) -> Path:
        return self.best_dir / MODEL_META_FILE

    @property
    def averaged_from_file(self) -> Path:
        return self.path / "averaged_from.json"

    @property
    def evaluation_dir(self) -> Path:
        return self.path / "evaluation"

    @property
    def tracking_dir(self) -> Path:
        return self.path / "tracking"

    @property
    def encoder_dir(self) -> Path:
        return self.path / "encoder"

    @property
    def source_dir(self) -> Path:
        return self.path / "source"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    # ------------------------------------------------------------------------- reading a run
    def has_model(self) -> bool:
        self.recover_best()
        return self.best_model_file.is_file()

    def recover_best(self) -> None:
        """Put `best/` back where a kill between the two renames of its swap (`MultiTaskModel.save`)
        left it aside; not while another command holds the folder: its save may be in the swap, so
        wait up to `SWAP_WAIT_SECONDS` for it to finish. Every reader of `best/` calls this
        (`has_model` does) before it reads."""
        recover_folder(self.best_dir, locked_by=self.path)
        deadline = time.monotonic() + self.SWAP_WAIT_SECONDS
        while swap_pending(self.best_dir) and lock_holder(self.path) is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def read_labels(self) -> dict[str, list[str]]:
        """Each task's labels in head order: a task's own labels, in any order; anything else is one line."""
        labels = read_json(self.labels_file, what="run's labels", error=RunFolderError)
        if not isinstance(labels, dict) or not labels:
            raise RunFolderError(f"{self.labels_file}: expected {{task: [label, ...]}} for at least one task")
        for task, names in labels.items():
            if not (task in TASKS and isinstance(names, list) and all(isinstance(name, str) for name in names)
                    and sorted(names) == sorted(TASKS[task].labels)):
                raise RunFolderError(f"{self.labels_file}: {task!r}: expected one of the tasks ({', '.join(TASKS)}) "
                                     "with its own labels")
        return labels

    def write_labels(self, labels: dict[str, list[str]]) -> None:
        write_text_atomic(self.labels_file, json.dumps(labels, indent=2, ensure_ascii=False))

    @property
    def mended_rows_file(self) -> Path:
        return self.path / "mended_rows.json"

    def write_mended_rows(self, mended: dict[str, dict]) -> None:
        """Per task, what reading the training file cleaned or skipped (`FileReport.summary`), so
        nothing is dropped silently."""
        write_text_atomic(self.mended_rows_file, json.dumps(mended, indent=2, ensure_ascii=False) + "\n")

    def metrics(self, *, timings: bool = True) -> list[dict]:
        """Every record of the metrics log (empty when there is none); `timings=False` leaves out
        the fields that differ between two runs of the same steps (`TIMING_KEYS`)."""
        if not self.metrics_file.exists():
            return []
        text = read_text(self.metrics_file, limit=METRICS_LIMIT, what="metrics log", error=RunFolderError)
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError) as error:
            raise RunFolderError(f"{self.metrics_file}: a line is not a JSON record ({first_line(error)})") from None
        if not all(isinstance(record, dict) for record in records):
            raise RunFolderError(f"{self.metrics_file}: a line is not a JSON object")
        if timings:
            return records
        return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def best_evaluation(self) -> dict | None:
        """The first evaluation with the highest dev mean macro-F1 (the one `best/` holds), or None."""
        best = None
        for record in self.metrics():
            if record.get("kind") == "eval" and (best is None or record["mean_macro_f1"] > best["mean_macro_f1"]):
                best = record
        if best is None:
            return None
        return {"step": best["step"], "mean_macro_f1": best["mean_macro_f1"], "macro_f1": best.get("macro_f1", {})}

    # ------------------------------------------------------------------------- claiming the folder
    def entries(self) -> list[str]:
        """What of a run the folder holds (empty for a new or empty folder)."""
        if not self.path.is_dir():
            return []
        held = [name for name in RUN_ENTRIES if os.path.lexists(self.path / name)]
        return held + checkpoint.checkpoint_names(self.path)

    def check_claim(self, config_values: dict, *, resume: bool, overwrite: bool,
                    added: dict = ADDED_KEYS, locked: bool = False) -> None:
        """Raise `RunFolderError` unless a run may start (or resume) here under this config
        (`added`: the keys added since its kind of run was first saved, `config.added_keys`), or
        while another command holds the folder's lock (`locked`: this run holds it, under several
        processes through the main one)."""
        if resume and overwrite:
            raise RunFolderError("resume and overwrite exclude each other: resume continues the run, overwrite "
                                 "discards it")
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a run folder")
        holder = None if locked else lock_holder(self.path)
        if holder is not None:  # said first: what the folder holds is changing under another command
            raise in_use(self.path, holder)
        if resume:
            if self.config_file.is_file():
                saved = read_yaml(self.config_file)
                differences = config_differences(saved if isinstance(saved, dict) else {}, config_values, added)
                if differences:
                    shown = "; ".join(differences[:4]) + (
                        f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
                    raise RunFolderError(f"{self.path} holds a run under another config ({shown}); resume it "
                                         "with its own config, or pass --overwrite to start a new run there")
        elif not overwrite:
            held = self.entries()
            if held:
                raise RunFolderError(f"{self.path} already holds a run ({', '.join(held[:4])}); pass --resume "
                                     "to continue it or --overwrite to replace it")

    def clear(self) -> None:
        """Remove the run from the folder (what `entries` lists and leftovers), for `overwrite`."""
        checkpoint.remove_entries(self.path, self.entries())
        remove_swap_leftovers(self.best_dir)

    def lock(self) -> FolderLock:
        """The folder's lock (`atomic.FolderLock`, the file `.lock`, not a run entry): a recipe holds
        it from its claim to the end of its run, `baseline` and `blend` while they write their folder."""
        return FolderLock(self.path)
