"""Reading one competition file: rows, the structural faults that refuse it, the content it mends.

The files are tab separated with no quoting (a text may begin with `"`), CRLF line ends and no
header. Two kinds of fault are told apart:

- **structure** makes the rows ambiguous, and refuses the file with `FILE:LINE: what` (a
  `DataError`, every problem at once): a non-empty extra column (a tab inside a text), a missing
  column, a missing or malformed id, a duplicate id where ids matter, an unknown label, CR-only
  line ends, a file that is not text;
- **content** never stops a test file: a control character (Cc: C0, DEL, C1) becomes a space,
  undecodable bytes become U+FFFD, and a text left empty is predicted as the empty string. A
  training file is mended the same way, and a row whose text is empty is skipped. Each such row
  is a note, `FILE:LINE: what (predicted anyway)`, shown as one `DataWarning` per file (the first
  20 and a count). `strict` turns notes into problems.

Tolerated with a note: a trailing *empty* column, a blank line, a header row (detected, skipped).
Files are read line by line, so `FileReader.chunks` walks a file of any size in bounded memory.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
import unicodedata
import warnings
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from clue_mtl.errors import DataError, DataWarning
from clue_mtl.tasks import Task, as_task

SHOWN = 20                      # problems and notes listed per file; the rest are counted
MAX_LINE_BYTES = 16 << 20       # a longer "line" is not a competition row (a binary file, CR-only ends)
_SAMPLE_BYTES = 64 << 10        # what the file-level checks (binary data, CR-only line ends) look at
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")       # Unicode category Cc: C0, DEL and C1
_SPACE = re.compile(r"\s")
# A first line is a header only when every field is a column name: a row whose text happens to
# be an English word is still a row.
HEADER_IDS = ("id", "idx", "index", "guid")
HEADER_NAMES = (*HEADER_IDS, "text", "sentence", "sentence1", "sentence2", "content", "label", "text_a", "text_b",
                "premise", "hypothesis", "title", "")
_BINARY_SAMPLE = 1024           # fewer bytes than this are never called binary: structure decides them
_C0 = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


class Row(NamedTuple):
    line: int
    id: str
    texts: tuple[str, ...]      # mended, and normalised by the task where the reader normalises
    label: str | None


def text_names(task: Task) -> tuple[str, ...]:
    return ("sentence1", "sentence2") if task.text_columns == 2 else ("text",)


def describe_char(char: str) -> str:
    name = unicodedata.name(char, "") or {"\0": "NUL", "\r": "CARRIAGE RETURN", "\b": "BACKSPACE", "\x0b": "LINE TABULATION",
                                          "\x0c": "FORM FEED", "\x1b": "ESCAPE", "\x7f": "DELETE",
                                          "\x85": "NEXT LINE"}.get(char, "a control character")
    return f"U+{ord(char):04X} ({name})"


@dataclass
class FileReport:
    """What reading one file found: problems refuse it, notes were mended; each kept up to `SHOWN`."""

    file: str
    labelled: bool
    strict: bool = False
    rows: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    problem_count: int = 0
    notes: list[tuple[int, str]] = field(default_factory=list)
    note_counts: dict[str, int] = field(default_factory=dict)   # by kind: cleaned, empty, skipped, ...

    @property
    def kept(self) -> str:
        """What became of a mended row: a test row is always predicted; a training row trains."""
        return "refused: --strict" if self.strict else "kept" if self.labelled else "predicted anyway"

    @property
    def dropped(self) -> str:
        """What became of a row with nothing left to read."""
        return "refused: --strict" if self.strict else "row skipped" if self.labelled else "predicted anyway"

    def problem(self, line: int, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < SHOWN:
            self.problems.append((line, message))

    def note(self, line: int, kind: str, message: str) -> None:
        """A mended row; under `strict` a problem instead."""
        if self.strict:
            self.problem(line, message)
            return
        self.note_counts[kind] = self.note_counts.get(kind, 0) + 1
        if len(self.notes) < SHOWN:
            self.notes.append((line, message))

    @property
    def note_count(self) -> int:
        return sum(self.note_counts.values())

    def _lines(self, found: list[tuple[int, str]], count: int, what: str) -> list[str]:
        shown = [f"{self.file}:{line}: {message}" if line else f"{self.file}: {message}"
                 for line, message in sorted(found)]
        if count > len(found):
            shown.append(f"{self.file}: ... and {count - len(found)} more {what}")
        return shown

    def raise_if_any(self) -> None:
        if self.problem_count:
            raise DataError(self._lines(self.problems, self.problem_count, "problems"))

    def note_lines(self) -> list[str]:
        return self._lines(self.notes, self.note_count, "rows mended")

    def warn(self) -> None:
        """One warning for the file. Issued from this one line, so that under the "default"
        warnings filter a file read twice (checked first, read later) is reported once."""
        if self.note_count:
            warnings.warn(DataWarning("\n".join(self.note_lines())), stacklevel=1)

    def summary(self) -> dict:
        """For a run folder: rows read, counts by kind, the first notes."""
        return {"file": self.file, "rows": self.rows, "mended": dict(self.note_counts),
                "first": self.note_lines()[:SHOWN]}


# ----------------------------------------------------------------------------- the file's lines
def file_kind(path: Path) -> str:
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


def _sample_problem(sample: bytes, columns: int) -> str | None:
    """A file-level fault seen in the first bytes: binary data (or a file in another encoding than
    UTF-8), or CR-only line ends. A few control characters or bad bytes are content, mended row
    by row; only a sample of 1 KB or more where nearly a third of the characters are undecodable
    or C0 controls is not text."""
    decoded = sample.decode("utf-8", errors="replace")
    odd = decoded.count("\ufffd") + len(_C0.findall(decoded))
    if len(sample) >= _BINARY_SAMPLE and odd > 0.3 * len(decoded):
        return "not a UTF-8 text file (a third of its first characters do not decode or are control characters)"
    if b"\n" not in sample and sample.count(b"\r") >= 2:
        # several rows split by CR alone: each whole piece has the file's columns (a lone CR inside
        # one row's text leaves pieces that do not)
        pieces = sample.rstrip(b"\r").split(b"\r")
        whole = pieces if len(sample) < _SAMPLE_BYTES else pieces[:-1]  # the sample may cut the last
        if len(pieces) >= 2 and whole and all(piece.count(b"\t") in (columns - 1, columns) for piece in whole):
            return "its lines end in CR alone (classic Mac line ends); save it with LF or CRLF line ends"
    return None


def _lines(path: Path, columns: int, report: FileReport) -> Iterator[tuple[int, bytes]]:
    """(1-based number, line without its line end) of every line but blank ones (noted where a row follows)."""
    kind = file_kind(path)
    if kind != "file":
        report.problem(0, kind)
        return
    try:
        handle = open(path, "rb")
    except OSError as error:
        report.problem(0, f"cannot read the file ({error.strerror or error})")
        return
    with handle:
        sample = handle.read(_SAMPLE_BYTES)
        handle.seek(0)
        fault = _sample_problem(sample.removeprefix(codecs.BOM_UTF8), columns)
        if fault:
            report.problem(0, fault)
            return
        blank: list[int] = []   # blank lines are noted only once a row follows them
        for number, line in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(line) > MAX_LINE_BYTES:
                report.problem(number, f"a line longer than {MAX_LINE_BYTES >> 20} MB: not a competition file")
                return
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            line = line.removesuffix(b"\n").removesuffix(b"\r")
            if b"\t" not in line and not line.strip():  # a line of tabs is a row of empty fields
                blank.append(number)
                continue
            for empty in blank:
                report.note(empty, "blank", "blank line (skipped)")
            blank = []
            yield number, line


# ----------------------------------------------------------------------------- one row
def id_problem(id_: str) -> str | None:
    if not id_.strip():
        return "empty id"
    if id_.isprintable() and not _SPACE.search(id_):
        return None
    odd = next(c for c in id_ if c.isspace() or not c.isprintable())
    return f"id {id_!r} contains {describe_char(odd)}; ids are printable and have no spaces"


def is_header(fields: list[bytes]) -> bool:
    """`id<TAB>text...`: a first line of column names, not a row."""
    try:
        names = [value.decode("ascii").strip() for value in fields]
    except UnicodeDecodeError:
        return False
    return names[0].lower() in HEADER_IDS and all(name.lower() in HEADER_NAMES for name in names)


class _Columns:
    """How the rows' column counts compare with the file kind expected, for the one-line verdict
    "looks like a test file" instead of a problem on every row."""

    def __init__(self, task: Task, labelled: bool):
        self.names = ("id", *text_names(task), *(("label",) if labelled else ()))
        self.rows = self.one_fewer = self.one_more = self.first_line = 0

    def count(self, number: int, fields: list[bytes]) -> None:
        self.first_line = self.first_line or number
        self.rows += 1
        self.one_fewer += len(fields) == len(self.names) - 1
        self.one_more += len(fields) == len(self.names) + 1 and fields[-1].strip() != b""


class FileReader:
    """One competition file of `task`, read row by row with its faults sorted out (module doc)."""

    def __init__(self, path: str | Path, task: Task | str, *, labelled: bool, strict: bool = False,
                 unique_ids: bool = True, normalize: bool = True):
        self.path = Path(path)
        self.task = as_task(task)
        self.labelled = labelled
        self.strict = strict
        self.unique_ids = unique_ids  # test files read with `--id-mode row` may repeat ids: they are not written
        self.normalize = normalize    # texts through `task.normalize`, the same function at training and prediction

    def rows(self, report: FileReport) -> Iterator[Row]:
        """Every row in file order; faults go to `report` (the caller raises)."""
        columns = _Columns(self.task, self.labelled)
        first = True
        for number, line in _lines(self.path, len(columns.names), report):
            fields = line.split(b"\t")
            if first and is_header(fields):
                report.note(number, "header", "a header row (skipped)")
                first = False
                continue
            first = False
            columns.count(number, fields)
            row = self._row(number, fields, columns.names, report)
            if row is not None:
                report.rows += 1
                yield row
        if not columns.rows and not report.problem_count:
            report.problem(0, "empty file (no rows)" if first else "no rows (only a header or blank lines)")
        self._file_kind_verdict(columns, report)

    def _file_kind_verdict(self, columns: _Columns, report: FileReport) -> None:
        if not columns.rows:
            return
        if self.labelled and columns.one_fewer == columns.rows:
            verdict = "looks like a test file (no label column); expected a training file"
        elif not self.labelled and columns.one_more == columns.rows:
            verdict = "looks like a training file (it has a label column); expected a test file"
        else:
            return
        report.problems, report.problem_count = [(columns.first_line, verdict)], 1

    def _row(self, number: int, fields: list[bytes], names: tuple[str, ...], report: FileReport) -> Row | None:
        if len(fields) == len(names) + 1 and not fields[-1].strip():
            report.note(number, "trailing_column", "a trailing empty column (ignored)")
            fields = fields[:-1]
        if len(fields) != len(names):
            hint = " (a tab inside a text?)" if len(fields) > len(names) else ""
            report.problem(number, f"expected {len(names)} columns ({', '.join(names)}), found {len(fields)}{hint}")
            return None
        try:
            id_ = fields[0].decode("utf-8")
        except UnicodeDecodeError:
            report.problem(number, "the id is not valid UTF-8")
            return None
        problem = id_problem(id_)
        if problem:
            report.problem(number, problem)
            return None
        label = None
        if self.labelled:
            label = fields[-1].decode("utf-8", errors="replace")
            if label not in self.task.labels:
                report.problem(number, f"unknown label {label!r}; {self.task.name} labels are "
                                       f"{', '.join(self.task.labels)}")
                return None
        texts = []
        for name, raw in zip(text_names(self.task), fields[1:1 + self.task.text_columns]):
            text = self._text(number, name, raw, report)
            if text is None:
                return None
            texts.append(text)
        return Row(number, id_, tuple(texts), label)

    def _text(self, number: int, name: str, raw: bytes, report: FileReport) -> str | None:
        """The text with its content faults mended (and noted), normalised where the reader
        normalises; None where a training row is skipped."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            text = raw.decode("utf-8", errors="replace")
            report.note(number, "undecodable", f"{name} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte "
                                               f"{error.start + 1}); decoded with U+FFFD ({report.kept})")
        control = _CONTROL.search(text)
        mended = _CONTROL.sub(" ", text) if control else text
        normal = self.task.normalize(mended)
        if not normal.strip():  # one note a row: emptiness is what matters
            what = f"empty {name}" if not mended.strip() else f"{name} is empty after normalisation (only invisible characters)"
            report.note(number, "empty", f"{what} ({report.dropped})")
            return None if self.labelled else ""
        if control:
            report.note(number, "control", f"{name} contains the control character {describe_char(control.group())} "
                                           f"at column {control.start() + 1}, made a space ({report.kept})")
        return normal if self.normalize else mended

    # ------------------------------------------------------------------------- reading
    def read(self, *, warn: bool = True) -> tuple[pd.DataFrame, FileReport]:
        """The whole file as a frame (`to_frame`) and its report; raises `DataError` on structure."""
        report = FileReport(str(self.path), self.labelled, self.strict)
        rows = list(self.rows(report))
        if self.unique_ids or self.labelled:
            report_duplicate_ids(rows, report)
        report.raise_if_any()
        if warn:
            report.warn()
        return to_frame(rows, self.task, self.labelled), report

    def check(self, *, warn: bool = True) -> FileReport:
        """One pass over the file keeping no text (8 bytes a row): its report, or `DataError` on structure."""
        report = FileReport(str(self.path), self.labelled, self.strict)
        hashes, lines = array("q"), array("q")
        for row in self.rows(report):
            if self.unique_ids or self.labelled:
                hashes.append(hash(row.id))
                lines.append(row.line)
        if len(hashes):
            self._duplicates_by_hash(np.frombuffer(hashes, np.int64), np.frombuffer(lines, np.int64), report)
        report.raise_if_any()
        if warn:
            report.warn()
        return report

    def chunks(self, rows_per_chunk: int) -> Iterator[pd.DataFrame]:
        """The file in frames of at most `rows_per_chunk` rows, in order, without notes (`check` first)."""
        report = FileReport(str(self.path), self.labelled, self.strict)
        batch: list[Row] = []
        for row in self.rows(report):
            batch.append(row)
            if len(batch) == rows_per_chunk:
                yield to_frame(batch, self.task, self.labelled)
                batch = []
        report.raise_if_any()  # the file changed since it was checked
        if batch:
            yield to_frame(batch, self.task, self.labelled)

    def _duplicates_by_hash(self, hashes: np.ndarray, lines: np.ndarray, report: FileReport) -> None:
        """Duplicate ids from 8 bytes a row; only rows whose hash repeats are read again, by id."""
        values, counts = np.unique(hashes, return_counts=True)
        repeated = set(values[counts > 1].tolist())
        if not repeated:
            return
        suspects = set(lines[np.isin(hashes, list(repeated))].tolist())
        rows = (row for row in self.rows(FileReport(report.file, self.labelled)) if row.line in suspects)
        report_duplicate_ids(rows, report)


@dataclass(frozen=True)
class CheckedFile:
    """A file that passed `FileReader.check`: its reader, for `chunks`, and what the check found."""

    reader: FileReader
    report: FileReport

    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def rows(self) -> int:
        return self.report.rows

    def chunks(self, rows_per_chunk: int) -> Iterator[pd.DataFrame]:
        return self.reader.chunks(rows_per_chunk)


def report_duplicate_ids(rows: Iterable[Row], report: FileReport) -> None:
    first_line: dict[str, int] = {}
    for row in rows:
        if row.id in first_line:
            report.problem(row.line, f"duplicate id {row.id!r} (first on line {first_line[row.id]})")
        else:
            first_line[row.id] = row.line


def to_frame(rows: list[Row], task: Task, labelled: bool) -> pd.DataFrame:
    """Columns id, text_a, text_b (None for single texts) and, if labelled, label."""
    frame = pd.DataFrame({
        "id": [row.id for row in rows],
        "text_a": [row.texts[0] for row in rows],
        "text_b": [row.texts[1] if task.text_columns == 2 else None for row in rows],
    })
    if labelled:
        frame["label"] = [row.label for row in rows]
    return frame
