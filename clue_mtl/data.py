"""Reading and validating the competition files, and splitting off a development set.

The files are tab separated with no quoting (a text may begin with `"`), CRLF line ends and no
header. Readers check the whole file and raise one `DataError` that lists every problem as
`FILE:LINE: what is wrong`, so a file can be fixed in one pass.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
import unicodedata
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from .errors import DataError
from .tasks import TASKS, Task, as_task

if TYPE_CHECKING:
    from .config import DataConfig

SPLITS = ("train", "a", "b")
MAX_PROBLEMS_PER_FILE = 20

# CLUE's OCNLI spells its labels out; the competition files use their index in Task.labels.
CLUE_LABELS = {"ocnli": {"entailment": "0", "neutral": "1", "contradiction": "2"}}
CLUE_TEXT_FIELDS = {"ocnli": ("sentence1", "sentence2"), "tnews": ("sentence",), "ocemotion": ("content",)}
CLUE_NO_CONSENSUS = "-"  # OCNLI pairs the annotators did not agree on


class _Row(NamedTuple):
    line: int
    id: str
    texts: tuple[str, ...]
    label: str | None


class _Problems:
    """The problems of one file, with their line numbers (0 for the file as a whole)."""

    def __init__(self, path: str | Path):
        self.file = str(path)
        self.found: list[tuple[int, str]] = []

    def add(self, line: int, message: str) -> None:
        self.found.append((line, message))

    def raise_if_any(self) -> None:
        if not self.found:
            return
        ordered = sorted(self.found, key=lambda problem: problem[0])
        lines = [f"{self.file}:{line}: {message}" if line else f"{self.file}: {message}"
                 for line, message in ordered[:MAX_PROBLEMS_PER_FILE]]
        if len(ordered) > MAX_PROBLEMS_PER_FILE:
            lines.append(f"{self.file}: ... and {len(ordered) - MAX_PROBLEMS_PER_FILE} more problems")
        raise DataError(lines)


def _text_names(task: Task) -> tuple[str, ...]:
    return ("sentence1", "sentence2") if task.text_columns == 2 else ("text",)


# ---------------------------------------------------------------------------------------------
# Reading


def read_task_file(path: str | Path, task: Task | str, *, labelled: bool,
                   normalize: bool = True) -> pd.DataFrame:
    """A competition file as columns id, text_a, text_b (None for single texts) and, if labelled, label.

    Rows stay in file order. With `normalize`, texts go through `task.normalize`, the same function
    at training and at prediction.
    """
    task = as_task(task)
    problems = _Problems(path)
    rows = _tsv_rows(_read_lines(path, problems), task, labelled, problems)
    _check_rows(rows, task, labelled, problems)
    problems.raise_if_any()
    return _to_frame(rows, task, labelled, normalize)


def read_clue_jsonl(path: str | Path, task: Task | str, *, labelled: bool = True,
                    normalize: bool = True) -> pd.DataFrame:
    """A CLUE benchmark JSON-lines file, in the same columns and label spelling as `read_task_file`.

    Ids come from an `id` field where there is one, else the line number. OCNLI pairs labelled "-"
    (no annotator consensus) are skipped.
    """
    task = as_task(task)
    problems = _Problems(path)
    rows = []
    for number, line in _read_lines(path, problems):
        row = _json_row(number, line, task, labelled, problems)
        if row is not None:
            rows.append(row)
    _check_rows(rows, task, labelled, problems)
    problems.raise_if_any()
    return _to_frame(rows, task, labelled, normalize)


def _read_lines(path: str | Path, problems: _Problems) -> list[tuple[int, str]]:
    """The decoded lines with their 1-based numbers; undecodable lines are reported and left out."""
    kind = _file_kind(Path(path))
    if kind != "file":
        problems.add(0, kind)
        return []
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        problems.add(0, f"cannot read the file ({error.strerror or error})")
        return []
    lines = raw.removeprefix(codecs.BOM_UTF8).split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        problems.add(0, "empty file (no rows)")
    decoded = []
    for number, line in enumerate(lines, 1):
        try:
            decoded.append((number, line.removesuffix(b"\r").decode("utf-8")))
        except UnicodeDecodeError as error:
            problems.add(number, f"not valid UTF-8 (byte 0x{line[error.start]:02x} at byte {error.start + 1})")
    return decoded


def _tsv_rows(lines: list[tuple[int, str]], task: Task, labelled: bool,
              problems: _Problems) -> list[_Row]:
    columns = ("id", *_text_names(task), *(("label",) if labelled else ()))
    split_lines = [(number, line.split("\t")) for number, line in lines]
    if _is_wrong_kind_of_file(split_lines, len(columns), labelled, problems):
        return []
    rows = []
    for number, fields in split_lines:
        if len(fields) == len(columns):
            label = fields[-1] if labelled else None
            rows.append(_Row(number, fields[0], tuple(fields[1:1 + task.text_columns]), label))
        elif fields == [""]:
            problems.add(number, "blank line")
        else:
            hint = " (a tab inside a text?)" if len(fields) > len(columns) else ""
            problems.add(number, f"expected {len(columns)} columns ({', '.join(columns)}), "
                                 f"found {len(fields)}{hint}")
    return rows


def _is_wrong_kind_of_file(split_lines: list[tuple[int, list[str]]], expected: int, labelled: bool,
                           problems: _Problems) -> bool:
    """A test file read as training data, or the reverse: one problem instead of one per line."""
    found = {len(fields) for _, fields in split_lines}
    first_line = split_lines[0][0] if split_lines else 0
    if labelled and found == {expected - 1}:
        problems.add(first_line, "looks like a test file (no label column); expected a training file")
    elif not labelled and found == {expected + 1}:
        problems.add(first_line, "looks like a training file (it has a label column); expected a test file")
    else:
        return False
    return True


def _json_row(number: int, line: str, task: Task, labelled: bool, problems: _Problems) -> _Row | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        problems.add(number, f"not valid JSON ({error.msg} at column {error.colno})")
        return None
    if not isinstance(record, dict):
        problems.add(number, "expected a JSON object")
        return None
    text_fields = CLUE_TEXT_FIELDS[task.name]
    missing = [name for name in (*text_fields, *(("label",) if labelled else ())) if name not in record]
    if missing:
        problems.add(number, f"missing field {', '.join(missing)}")
        return None
    not_text = [name for name in text_fields if not isinstance(record[name], str)]
    if not_text:
        problems.add(number, f"field {', '.join(not_text)} should be a string")
        return None
    label = str(record["label"]) if labelled else None
    if label == CLUE_NO_CONSENSUS:
        return None
    label = CLUE_LABELS.get(task.name, {}).get(label, label)
    texts = tuple(record[name] for name in text_fields)
    return _Row(number, str(record.get("id", number)), texts, label)


def _file_kind(path: Path) -> str:
    """ "file" for a regular file (or a link to one), else what the path is, as a problem."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "dangling symbolic link" if os.path.islink(path) else "missing file"
    except OSError as error:  # a symbolic link loop (ELOOP), a component that is not a folder, no permission
        return f"cannot open the file ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return "file"
    return "is a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"


_SPACE = re.compile(r"\s")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")                      # Unicode category Cc
_VISIBLE = re.compile(r"[^\s\u00ad\u200b-\u200f\u202a-\u202e\u2060\ufeff]")  # what normalising keeps


def _id_problem(id_: str) -> str | None:
    if not id_.strip():
        return "empty id"
    if id_.isprintable() and not _SPACE.search(id_):
        return None
    odd = next(c for c in id_ if c.isspace() or not c.isprintable())
    return f"id {id_!r} contains {_describe_char(odd)}; ids are printable and have no spaces"


def _describe_char(char: str) -> str:
    name = unicodedata.name(char, "") or {"\0": "NUL", "\r": "CARRIAGE RETURN"}.get(char, "a control character")
    return f"U+{ord(char):04X} ({name})"


def _text_problem(task: Task, name: str, text: str) -> str | None:
    if not text.strip():
        return f"empty {name}"
    control = _CONTROL.search(text)
    if control:
        return (f"{name} contains the control character {_describe_char(control.group())} "
                f"at column {control.start() + 1}")
    # The regex is the fast test; short texts also get the exact one (NFKC may fold a few more away).
    if not _VISIBLE.search(text) or (len(text) < 8 and not task.normalize(text).strip()):
        return f"{name} is empty after normalisation (only invisible characters)"
    return None


def _check_rows(rows: list[_Row], task: Task, labelled: bool, problems: _Problems) -> None:
    first_line_of_id: dict[str, int] = {}
    known_labels = set(task.labels)
    for row in rows:
        id_problem = _id_problem(row.id)
        if id_problem:
            problems.add(row.line, id_problem)
        elif row.id in first_line_of_id:
            problems.add(row.line, f"duplicate id {row.id!r} (first on line {first_line_of_id[row.id]})")
        else:
            first_line_of_id[row.id] = row.line
        for name, text in zip(_text_names(task), row.texts):
            text_problem = _text_problem(task, name, text)
            if text_problem:
                problems.add(row.line, text_problem)
        if labelled and row.label not in known_labels:
            problems.add(row.line, f"unknown label {row.label!r}; {task.name} labels are {', '.join(task.labels)}")


def _to_frame(rows: list[_Row], task: Task, labelled: bool, normalize: bool) -> pd.DataFrame:
    clean = task.normalize if normalize else str
    frame = pd.DataFrame({
        "id": [row.id for row in rows],
        "text_a": [clean(row.texts[0]) for row in rows],
        "text_b": [clean(row.texts[1]) if task.text_columns == 2 else None for row in rows],
    })
    if labelled:
        frame["label"] = [row.label for row in rows]
    return frame


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
        kind = _file_kind(same_name[0])
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
    Path(path).write_text(json.dumps(as_strings, ensure_ascii=False) + "\n", encoding="utf-8")


def load_dev_rows(data_dir: str | Path, task: Task | str, dev_ids: list[str], split_file: str | Path) -> pd.DataFrame:
    """The training file's rows with the ids of `split_file` (a run's `split.json`), in that order."""
    task = as_task(task)
    frame = load_split(data_dir, task, "train")
    missing = sorted(set(dev_ids) - set(frame["id"]))
    if missing:
        raise DataError(f"{task.name}: {len(missing)} dev ids of {split_file} are not in the training "
                        f"file (e.g. {missing[0]!r}): is it the same data?")
    return frame.set_index("id", drop=False).loc[dev_ids].reset_index(drop=True)


def load_split_ids(path: str | Path) -> dict[str, list[str]]:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the split ({error})") from None
    well_formed = isinstance(values, dict) and all(
        isinstance(ids, list) and all(isinstance(id_, str) for id_ in ids) for ids in values.values())
    if not well_formed:
        raise DataError(f"{path}: expected a JSON object mapping each task to a list of id strings")
    return values


# ---------------------------------------------------------------------------------------------
# Checking a data folder


def check_data(data_dir: str | Path) -> tuple[list[str], list[str]]:
    """(report, problems): rows and label counts of all nine files, and every problem found."""
    if not Path(data_dir).is_dir():
        return [], [f"{data_dir}: data folder not found; put the competition files there"]
    report, problems = [], []
    for task in TASKS.values():
        for split in SPLITS:
            try:
                path = resolve_data_file(data_dir, task, split)
                frame = read_task_file(path, task, labelled=split == "train", normalize=False)
            except DataError as error:
                problems.extend(error.problems)
                continue
            report.append(f"{path.name}: {_describe(frame, task)}")
    return report, problems


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


def task_frames(data: DataConfig, task: str) -> TaskFrames:
    """Split a task's training file into training and dev rows as every run does."""
    frame = load_split(data.data_dir, task, "train")
    train_frame, dev_frame = stratified_split(frame, data.dev_fraction, data.split_seed)
    if dev_frame.empty:
        raise DataError(f"{task}: the dev split is empty ({len(frame)} rows, dev_fraction "
                        f"{data.dev_fraction}); raise data.dev_fraction")
    return TaskFrames(sample_rows(train_frame, data.max_train_rows, data.split_seed),
                      sample_rows(dev_frame, data.max_dev_rows, data.split_seed), dev_frame["id"].tolist())
