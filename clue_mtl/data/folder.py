"""The competition files of a data folder: finding and reading them, checking the folder, and
splitting off a development set.

One file's rows, its structural faults (refused with one `DataError` listing every problem as
`FILE:LINE: what is wrong`, so a file can be fixed in one pass) and the content it mends (a
`DataWarning`) are `task_files`' concern.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from clue_mtl.atomic import write_text_atomic
from clue_mtl.data.task_files import (  # noqa: F401 (DataWarning)
    CheckedFile,
    DataWarning,
    FileReader,
    FileReport,
    Row,
    file_kind,
    report_duplicate_ids,
    to_frame,
)
from clue_mtl.errors import DataError
from clue_mtl.tasks import TASKS, Task, as_task

if TYPE_CHECKING:
    from clue_mtl.config import DataConfig

SPLITS = ("train", "a", "b")

# CLUE's OCNLI spells its labels out; the competition files use their index in Task.labels.
CLUE_LABELS = {"ocnli": {"entailment": "0", "neutral": "1", "contradiction": "2"}}
CLUE_TEXT_FIELDS = {"ocnli": ("sentence1", "sentence2"), "tnews": ("sentence",), "ocemotion": ("content",)}
CLUE_NO_CONSENSUS = "-"  # OCNLI pairs the annotators did not agree on


# ---------------------------------------------------------------------------------------------
# Reading


def read_task_file(path: str | Path, task: Task | str, *, labelled: bool, normalize: bool = True,
                   strict: bool = False, unique_ids: bool = True) -> pd.DataFrame:
    """A competition file as columns id, text_a, text_b (None for single texts) and, if labelled, label.

    Rows stay in file order. With `normalize`, texts go through `task.normalize`, the same function
    at training and at prediction. Structural faults raise `DataError` (every one, FILE:LINE);
    mended content is one `DataWarning` (`task_files`). `unique_ids=False`: a test file whose ids
    are not written (`--id-mode row`) may repeat them.
    """
    frame, _ = FileReader(path, task, labelled=labelled, strict=strict, unique_ids=unique_ids,
                          normalize=normalize).read()
    return frame


def read_clue_jsonl(path: str | Path, task: Task | str, *, labelled: bool = True,
                    normalize: bool = True) -> pd.DataFrame:
    """A CLUE benchmark JSON-lines file, in the same columns and label spelling as `read_task_file`.

    Ids come from an `id` field where there is one, else the line number. OCNLI pairs labelled "-"
    (no annotator consensus) are skipped.
    """
    task = as_task(task)
    report = FileReport(str(path), labelled)
    rows = []
    for number, line in _json_lines(Path(path), report):
        row = _json_row(number, line, task, labelled, report)
        if row is not None:
            rows.append(row)
    report_duplicate_ids(rows, report)
    report.raise_if_any()
    if normalize:
        rows = [row._replace(texts=tuple(task.normalize(text) for text in row.texts)) for row in rows]
    return to_frame(rows, task, labelled)


def _json_lines(path: Path, report: FileReport) -> list[tuple[int, str]]:
    kind = file_kind(path)
    if kind != "file":
        report.problem(0, kind)
        return []
    lines = []
    for number, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            report.problem(number, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1})")
    if not lines and not report.problem_count:
        report.problem(0, "empty file (no rows)")
    return [(number, line) for number, line in lines if line.strip()]


def _json_row(number: int, line: str, task: Task, labelled: bool, report: FileReport) -> Row | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        report.problem(number, f"not valid JSON ({error.msg} at column {error.colno})")
        return None
    if not isinstance(record, dict):
        report.problem(number, "expected a JSON object")
        return None
    text_fields = CLUE_TEXT_FIELDS[task.name]
    missing = [name for name in (*text_fields, *(("label",) if labelled else ())) if name not in record]
    if missing:
        report.problem(number, f"missing field {', '.join(missing)}")
        return None
    not_text = [name for name in text_fields if not isinstance(record[name], str)]
    if not_text:
        report.problem(number, f"field {', '.join(not_text)} should be a string")
        return None
    label = str(record["label"]) if labelled else None
    if label == CLUE_NO_CONSENSUS:
        return None
    label = CLUE_LABELS.get(task.name, {}).get(label, label)
    if labelled and label not in task.labels:
        report.problem(number, f"unknown label {label!r}; {task.name} labels are {', '.join(task.labels)}")
        return None
    texts = tuple(record[name] for name in text_fields)
    return Row(number, str(record.get("id", number)), texts, label)


# ---------------------------------------------------------------------------------------------
# Finding the files


def resolve_data_file(data_dir: str | Path, task: Task | str, split: str) -> Path:
    """The path of a task's training file (split "train") or test file ("a" or "b") in `data_dir`."""
    task = as_task(task)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    name = task.train_file if split == "train" else task.test_file(split)
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found; put the competition files there")
    path = folder / name
    try:
        same_name = sorted(p for p in folder.iterdir() if p.name.lower() == name.lower())
    except OSError as error:
        raise DataError(f"{folder}: cannot list the data folder ({error.strerror or error})") from None
    if len(same_name) > 1:
        raise DataError(f"{folder}: ambiguous: {', '.join(p.name for p in same_name)} all name the "
                        f"{task.name} file {name}; keep one")
    if same_name:
        kind = file_kind(same_name[0])
        if kind != "file":
            raise DataError(f"{same_name[0]}: {kind}; expected the {task.name} file {name}")
        return same_name[0]
    what = "training file" if split == "train" else f"test {split.upper()} file"
    raise DataError(f"{path}: missing file; expected the {task.name} {what} named {name}")


def load_split(data_dir: str | Path, task: Task | str, split: str, *,
               normalize: bool = True) -> pd.DataFrame:
    """Read a task's training file ("train", labelled) or test file ("a" or "b") from `data_dir`."""
    path = resolve_data_file(data_dir, task, split)
    return read_task_file(path, task, labelled=split == "train", normalize=normalize)


def checked_test_files(tasks: list[str], *, split: str = "a", data_dir: str | Path | None = None,
                       test_files: dict[str, str | Path] | None = None, id_mode: str = "file",
                       strict: bool = False) -> dict[str, CheckedFile]:
    """Every task's test file, checked in full before any model pass: task -> the checked file,
    whose `chunks` then walk it in bounded memory.

    A task's file is `test_files[task]` where given, else the competition's file for `split` in
    `data_dir`. The structural faults of all the files are raised together (one `DataError`); mended
    rows are one `DataWarning` a file. Ids must be unique where they are written (`id_mode` "file").
    """
    checked, problems = {}, []
    for task in tasks:
        try:
            path = Path(test_files[task]) if test_files and task in test_files else resolve_data_file(
                data_dir or "data", task, split)
            reader = FileReader(path, task, labelled=False, strict=strict, unique_ids=id_mode == "file")
            checked[task] = CheckedFile(reader, reader.check())
        except DataError as error:
            problems.extend(error.problems)
    if problems:
        raise DataError(problems)
    return checked


def check_training_files(data_dir: str | Path, tasks: list[str]) -> None:
    """Read every task's training file once, so that a fault in the last costs seconds, not the
    minutes of work on the others; all their structural faults raised together."""
    problems = []
    for task in tasks:
        try:
            FileReader(resolve_data_file(data_dir, task, "train"), task, labelled=True).check()
        except DataError as error:
            problems.extend(error.problems)
    if problems:
        raise DataError(problems)


# ---------------------------------------------------------------------------------------------
# Development split


def stratified_split(frame: pd.DataFrame, dev_fraction: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, dev): round(len * dev_fraction) rows for dev, each class's share within one row.

    The result depends only on the rows (not their order, the machine or PYTHONHASHSEED): rows are
    taken per class, in label order, from a numpy Generator over the rows sorted by id. A class
    always keeps at least one row in train. Both frames keep file order.
    """
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must lie strictly between 0 and 1, not {dev_fraction}")
    labels = frame["label"].to_numpy()
    ids = frame["id"].to_numpy()
    dev_counts = _dev_counts(Counter(labels), dev_fraction)
    rng = np.random.default_rng(seed)
    is_dev = np.zeros(len(frame), dtype=bool)
    for label in sorted(dev_counts):
        positions = sorted(np.flatnonzero(labels == label), key=lambda position: ids[position])
        chosen = rng.permutation(len(positions))[: dev_counts[label]]
        is_dev[[positions[i] for i in chosen]] = True
    return frame[~is_dev].reset_index(drop=True), frame[is_dev].reset_index(drop=True)


def _dev_counts(class_sizes: Counter, dev_fraction: float) -> dict[str, int]:
    """Dev rows per class by largest remainder, so the total is exact and every class within a row.

    (sklearn's stratified split rejects classes of one row and depends on the input order.)
    """
    sizes = {label: size for label, size in class_sizes.items() if size > 1}
    shares = {label: size * dev_fraction for label, size in sizes.items()}
    counts = {label: int(share) for label, share in shares.items()}
    missing = round(sum(sizes.values()) * dev_fraction) - sum(counts.values())
    by_remainder = sorted(counts, key=lambda label: (counts[label] - shares[label], label))
    for label in [label for label in by_remainder if counts[label] + 1 < sizes[label]][:missing]:
        counts[label] += 1
    return counts


def save_split(dev_ids: dict[str, list[str]], path: str | Path) -> None:
    """Write the dev ids of each task as JSON, so an evaluation can be reproduced from a run folder."""
    as_strings = {task: [str(id_) for id_ in ids] for task, ids in dev_ids.items()}
    write_text_atomic(path, json.dumps(as_strings, ensure_ascii=False) + "\n")


def load_dev_rows(data_dir: str | Path, task: Task | str, dev_ids: list[str], split_file: str | Path) -> pd.DataFrame:
    """The training file's rows with the ids of `split_file` (a run's `split.json`), in that order."""
    task = as_task(task)
    frame = load_split(data_dir, task, "train")
    missing = sorted(set(dev_ids) - set(frame["id"]))
    if missing:
        raise DataError(f"{task.name}: {len(missing)} dev ids of {split_file} are not in the training "
                        f"file (e.g. {missing[0]!r}): is it the same data?")
    return frame.set_index("id", drop=False).loc[dev_ids].reset_index(drop=True)


def dev_frames(data_dir: str | Path, tasks: list[str], dev_ids: dict[str, list[str]],
               split_file: str | Path) -> dict[str, pd.DataFrame]:
    """Every task's dev rows (`load_dev_rows`), all read before the caller's first model pass; the
    faults of every file raised together."""
    frames, problems = {}, []
    for task in tasks:
        if task not in dev_ids:
            problems.append(f"{split_file}: no {task} dev ids")
            continue
        try:
            frames[task] = load_dev_rows(data_dir, task, dev_ids[task], split_file)
        except DataError as error:
            problems.extend(error.problems)
    if problems:
        raise DataError(problems)
    return frames


def load_split_ids(path: str | Path) -> dict[str, list[str]]:
    """A run's dev ids per task (`split.json`), read as an untrusted file: regular, a few MB at most."""
    from clue_mtl.untrusted import read_json

    values = read_json(path, what="dev split", error=DataError)
    well_formed = isinstance(values, dict) and all(
        isinstance(ids, list) and all(isinstance(id_, str) for id_ in ids) for ids in values.values())
    if not well_formed:
        raise DataError(f"{path}: expected a JSON object mapping each task to a list of id strings")
    return values


# ---------------------------------------------------------------------------------------------
# Checking a data folder


def check_data(data_dir: str | Path, *, strict: bool = False,
               id_mode: str = "file") -> tuple[list[str], list[str], list[str]]:
    """(report, problems, notes): rows and label counts of all nine files, every structural problem
    found, and every row that reading mends (`strict`: those are problems too). Test ids must be
    unique where they are written (`id_mode` "file")."""
    if not Path(data_dir).is_dir():
        return [], [f"{data_dir}: data folder not found; put the competition files there"], []
    report, problems, notes = [], [], []
    for task in TASKS.values():
        for split in SPLITS:
            try:
                path = resolve_data_file(data_dir, task, split)
                reader = FileReader(path, task, labelled=split == "train", strict=strict,
                                    unique_ids=id_mode == "file", normalize=False)
                frame, found = reader.read(warn=False)
            except DataError as error:
                problems.extend(error.problems)
                continue
            report.append(f"{path.name}: {_describe(frame, task)}")
            notes.extend(found.note_lines())
    return report, problems, notes


def _describe(frame: pd.DataFrame, task: Task) -> str:
    if "label" not in frame:
        return f"{len(frame):,} rows, ids {frame['id'].iloc[0]}..{frame['id'].iloc[-1]}"
    counts = frame["label"].value_counts()
    return f"{len(frame):,} rows; " + ", ".join(f"{label} {counts.get(label, 0):,}" for label in task.labels)


# ----------------------------------------------------------------------------- a run's rows
def sample_rows(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most `limit` rows, stratified by label, in a deterministic order."""
    if limit is None or len(frame) <= limit:
        return frame
    _, sample = stratified_split(frame, limit / len(frame), seed)
    return sample


class TaskFrames(NamedTuple):
    train: pd.DataFrame      # the training rows a run trains on (`max_train_rows` sampled)
    dev: pd.DataFrame        # the dev rows it evaluates on during training (`max_dev_rows` sampled)
    dev_ids: list[str]       # the whole dev split's ids, saved for `evaluate`
    mended: dict             # what reading the training file mended or skipped (`FileReport.summary`)


def task_frames(data: DataConfig, task: str) -> TaskFrames:
    """Split a task's training file into training and dev rows as every run does."""
    reader = FileReader(resolve_data_file(data.data_dir, task, "train"), task, labelled=True)
    frame, report = reader.read()
    train_frame, dev_frame = stratified_split(frame, data.dev_fraction, data.split_seed)
    if dev_frame.empty:
        raise DataError(f"{task}: the dev split is empty ({len(frame)} rows, dev_fraction "
                        f"{data.dev_fraction}); raise data.dev_fraction")
    return TaskFrames(sample_rows(train_frame, data.max_train_rows, data.split_seed),
                      sample_rows(dev_frame, data.max_dev_rows, data.split_seed), dev_frame["id"].tolist(),
                      report.summary())
