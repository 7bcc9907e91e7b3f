"""Submission zips: writing them safely, reading them strictly, scoring them against gold labels.

The format the leaderboard accepted: one zip with `ocnli_predict.json`, `ocemotion_predict.json`
and `tnews_predict.json` at its top level (`Task.submission_member`), each holding one JSON object
per line, `{"id": "0", "label": "sadness"}`, id and label both strings, lines in test-file order.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from clue_mtl.data.folder import read_task_file
from clue_mtl.data.task_files import CheckedFile
from clue_mtl.errors import SubmissionError
from clue_mtl.predict.metrics import leaderboard_score, task_report
from clue_mtl.tasks import TASK_NAMES, TASKS, Task, get_task

ID_MODES = ("file", "row")
# A real member holds 1,500 lines of about 35 bytes; anything near this bound is not a submission.
MAX_MEMBER_BYTES = 32 * 1024 * 1024
# Rows predicted at a time from a test file: memory is bounded by the chunk, not the file.
CHUNK_ROWS = 4096
# Fixed member timestamps: the same predictions give a byte-identical zip.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Writing


def _label_string(task: Task, value: object, row: int) -> str:
    if isinstance(value, str):
        label = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        label = str(int(value))  # 0/1/2 for OCNLI, 100.. for TNEWS
    else:
        raise SubmissionError(f"{task.name}: prediction {row} is {value!r} "
                              f"({type(value).__name__}); labels must be strings")
    if label not in task.labels:
        raise SubmissionError(f"{task.name}: prediction {row} is {label!r}, not one of the task's "
                              f"labels ({', '.join(task.labels)})")
    return label


def _member_lines(ids: Iterable[str], labels: Iterable[str]) -> bytes:
    return "".join(json.dumps({"id": id_, "label": label}, ensure_ascii=False) + "\n"
                   for id_, label in zip(ids, labels)).encode("utf-8")


def _member_bytes(task: Task, labels: Iterable[object], frame: pd.DataFrame, id_mode: str) -> bytes:
    """Validate one task's predictions against its test frame and serialise them."""
    labels = [_label_string(task, value, row) for row, value in enumerate(labels)]
    if len(labels) != len(frame):
        raise SubmissionError(f"{task.name}: {len(labels)} predictions for {len(frame)} test rows")
    if id_mode == "row":
        ids = [str(i) for i in range(len(frame))]
    else:
        if "id" not in frame.columns:
            raise SubmissionError(f"{task.name}: the test frame has no 'id' column")
        ids = [str(value) for value in frame["id"]]
        counts = pd.Series(ids).value_counts()
        repeated = counts[counts > 1]
        if len(repeated):
            raise SubmissionError(f"{task.name}: {len(repeated)} ids appear more than once in the "
                                  f"test frame (e.g. {', '.join(map(repr, repeated.index[:3]))})")
        if any(not value.strip() for value in ids):
            raise SubmissionError(f"{task.name}: the test frame has an empty id")
    return _member_lines(ids, labels)


def _check_tasks(names: Iterable[str], allow_partial: bool, id_mode: str) -> list[str]:
    """The tasks to write, in the zip's fixed member order (and the id mode checked)."""
    if id_mode not in ID_MODES:
        raise SubmissionError(f"id_mode must be one of {', '.join(ID_MODES)}, not {id_mode!r}")
    names = list(names)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SubmissionError(f"unknown task(s) {', '.join(map(repr, unknown))}; "
                              f"the tasks are {', '.join(TASK_NAMES)}")
    missing = [name for name in TASK_NAMES if name not in names]
    if missing and not allow_partial:
        raise SubmissionError(f"no predictions for {', '.join(missing)} "
                              "(pass allow_partial=True to write a partial submission)")
    if not names:
        raise SubmissionError("no predictions to write")
    return [name for name in TASK_NAMES if name in names]


def _member_info(task: Task) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(task.submission_member, date_time=_ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def write_submission(predictions: Mapping[str, Sequence[str]], test_frames: Mapping[str, pd.DataFrame],
                     path: str | Path, *, id_mode: str = "file", allow_partial: bool = False) -> Path:
    """Validate predictions and write the submission zip atomically; returns the zip's path.

    predictions: task name -> labels in test-file order. test_frames: task name -> the test
    DataFrame (its `id` column and row count are used). id_mode "file" writes the test file's own
    ids, "row" the row positions 0..n-1 (they differ for OCNLI test B, whose ids run 1500..2999).
    All three tasks are required unless allow_partial. Everything is validated and serialised
    before the zip is written to a temporary file beside `path` and moved into place with
    os.replace, so a failure never leaves a half-written zip and never touches an existing one.
    """
    members: list[tuple[Task, bytes]] = []
    for name in _check_tasks(predictions, allow_partial, id_mode):
        if name not in test_frames:
            raise SubmissionError(f"{name}: predictions given but no test frame")
        task = TASKS[name]
        members.append((task, _member_bytes(task, predictions[name], test_frames[name], id_mode)))

    def write(archive: zipfile.ZipFile) -> None:
        for task, data in members:
            archive.writestr(_member_info(task), data)

    return _write_zip(Path(path), write)


def write_streamed_submission(test_files: Mapping[str, CheckedFile],
                              decide: Callable[[str, pd.DataFrame], Sequence[object]], path: str | Path, *,
                              id_mode: str = "file", allow_partial: bool = False,
                              rows_per_chunk: int = CHUNK_ROWS, progress: bool = True) -> Path:
    """Predict test files chunk by chunk into a submission zip, in memory bounded by the chunk.

    test_files: task -> a checked test file (`data.folder.checked_test_files`: every structural fault
    already refused, so the zip gets one line per row, in file order). decide(task, frame): the
    labels of a chunk's rows. The zip is written beside `path` and moved into place whole, as
    `write_submission` does.
    """
    from tqdm.auto import tqdm

    names = _check_tasks(test_files, allow_partial, id_mode)
    bar = tqdm(total=sum(test_files[name].rows for name in names), desc="predict", unit="row",
               disable=not progress, dynamic_ncols=True)

    def write(archive: zipfile.ZipFile) -> None:
        for name in names:
            task, written = TASKS[name], 0
            bar.set_postfix_str(name)
            with _member_stream(archive, task) as member:
                for frame in test_files[name].chunks(rows_per_chunk):
                    labels = decide(name, frame)
                    if len(labels) != len(frame):
                        raise SubmissionError(f"{name}: {len(labels)} predictions for a chunk of {len(frame)} rows")
                    labels = [_label_string(task, value, written + row) for row, value in enumerate(labels)]
                    ids = (frame["id"].astype(str) if id_mode == "file"
                           else map(str, range(written, written + len(frame))))
                    member.write(_member_lines(ids, labels))
                    written += len(frame)
                    bar.update(len(frame))
            if written != test_files[name].rows:  # the file changed since it was checked
                raise SubmissionError(f"{test_files[name].path}: {written} rows now, {test_files[name].rows} "
                                      "when it was checked; predict again")

    with bar:
        return _write_zip(Path(path), write)


@contextlib.contextmanager
def _member_stream(archive: zipfile.ZipFile, task: Task):
    """A member written as it goes; one over zip's 2 GiB (about 60M rows) is a one-line refusal."""
    try:
        with archive.open(_member_info(task), "w") as member:
            yield member
    except RuntimeError as error:
        if "force_zip64" not in str(error):
            raise
        raise SubmissionError(f"{task.name}: the predictions pass 2 GiB, more than a submission member holds") from None


def _write_zip(path: Path, write_members: Callable[[zipfile.ZipFile], None]) -> Path:
    """A zip written by `write_members` into a temporary file beside `path`, flushed to disk and
    renamed over it: a failure or a kill never leaves a half-written zip at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporary_files(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                         delete=False)
    tmp = Path(handle.name)
    try:
        with handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            write_members(archive)
        with open(tmp, "rb") as check:  # flush to disk before the rename makes it visible
            os.fsync(check.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sweep_temporary_files(path: str | Path) -> None:
    """Remove `.NAME.PID.*.tmp` files a killed writer of `path` left (their process is gone)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = leftover.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or not _process_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or a number we cannot check: leave its file alone
    return True


# ---------------------------------------------------------------------------------------------
# Reading


def _is_ignored(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or name.endswith("/")


def _escapes(name: str) -> bool:
    normal = name.replace("\\", "/")
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":"):
        return True
    return ".." in PurePosixPath(normal).parts


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, limit: int) -> bytes:
    if info.file_size > limit:
        raise SubmissionError(f"{where}: declares {info.file_size:,} bytes uncompressed, more than "
                              f"the {limit:,} allowed (a zip bomb?)")
    if info.flag_bits & 0x1:
        raise SubmissionError(f"{where}: is encrypted")
    try:
        with archive.open(info) as stream:
            data = stream.read(limit + 1)  # capped: a lying header cannot make this grow
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as error:
        raise SubmissionError(f"{where}: cannot be decompressed ({error})") from None
    if len(data) > limit:
        raise SubmissionError(f"{where}: more than {limit:,} bytes uncompressed (a zip bomb?)")
    return data


def _parse_member(task: Task, data: bytes, where: str) -> pd.DataFrame:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SubmissionError(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from None
    lines = text.split("\n")
    while lines and not lines[-1].strip():  # the final newline, trailing blank lines
        lines.pop()
    ids: list[str] = []
    labels: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        at = f"{where} line {number}"
        line = line.rstrip("\r")
        if not line.strip():
            raise SubmissionError(f"{at}: empty line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SubmissionError(f"{at}: not JSON ({error.msg}): {line[:60]!r}") from None
        except (ValueError, RecursionError) as error:  # a number of thousands of digits; nesting
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
            raise SubmissionError(f"{at}: not a submission line ({reason}): {line[:60]!r}") from None
        if not isinstance(row, dict) or set(row) != {"id", "label"}:
            raise SubmissionError(f"{at}: expected an object with exactly 'id' and 'label', "
                                  f"got {line[:60]!r}")
        id_, label = row["id"], row["label"]
        if not isinstance(id_, str):
            raise SubmissionError(f"{at}: id {_shown(id_)} is a {type(id_).__name__}, not a string")
        if not isinstance(label, str):
            raise SubmissionError(f"{at}: label {_shown(label)} is a {type(label).__name__}, not a string")
        if label not in task.labels:
            raise SubmissionError(f"{at}: unknown label {label!r} for {task.name} "
                                  f"(labels: {', '.join(task.labels)})")
        if id_ in first_line:
            raise SubmissionError(f"{at}: duplicate id {id_!r} (first on line {first_line[id_]})")
        first_line[id_] = number
        ids.append(id_)
        labels.append(label)
    if not ids:
        raise SubmissionError(f"{where}: is empty")
    return pd.DataFrame({"id": ids, "label": labels})


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def read_submission(path: str | Path, *, allow_partial: bool = False,
                    max_member_bytes: int = MAX_MEMBER_BYTES) -> dict[str, pd.DataFrame]:
    """Read and strictly validate a submission zip: task name -> DataFrame(id, label), file order.

    Raises SubmissionError with a one-line reason for anything the leaderboard could reject or that
    is unsafe: not a zip, a missing, nested, duplicated or unexpected member, a member name that
    escapes the archive, a member over `max_member_bytes` uncompressed (declared or actual),
    non-JSON lines, non-string ids or labels, unknown labels, duplicate ids. `__MACOSX/` entries,
    `.DS_Store` files and directory entries are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise SubmissionError(f"{path}: not a zip file")
    expected = {TASKS[name].submission_member: TASKS[name] for name in TASK_NAMES}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise SubmissionError(f"{path}: not a readable zip file ({error})") from None
    with archive:
        infos = archive.infolist()
        for info in infos:  # unsafe names first, whatever else is wrong
            if _escapes(info.filename):
                raise SubmissionError(f"{path}: member name {info.filename!r} escapes the archive")
        found: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if _is_ignored(name):
                continue
            base = name.replace("\\", "/").split("/")[-1]
            if name != base:
                hint = (f"; {base} must be at the top level of the zip" if base in expected
                        else "")
                raise SubmissionError(f"{path}: member {name!r} is in a nested path{hint}")
            if name not in expected:
                raise SubmissionError(f"{path}: unexpected member {name!r} (expected "
                                      f"{', '.join(expected)})")
            if name in found:
                raise SubmissionError(f"{path}: member {name!r} appears twice")
            found[name] = info
        missing = [member for member in expected if member not in found]
        if missing and (not allow_partial or not found):
            raise SubmissionError(f"{path}: missing member(s) {', '.join(missing)}")
        result: dict[str, pd.DataFrame] = {}
        for member, task in expected.items():
            if member not in found:
                continue
            where = f"{path.name}:{member}"
            data = _read_member(archive, found[member], where, max_member_bytes)
            result[task.name] = _parse_member(task, data, where)
    return result


# ---------------------------------------------------------------------------------------------
# Scoring


def _examples(values: Iterable[str], count: int = 3) -> str:
    shown = sorted(values, key=lambda v: (len(v), v))[:count]
    return ", ".join(repr(v) for v in shown)


def score_submission(path: str | Path, gold: Mapping[str, pd.DataFrame]) -> dict:
    """Score a submission zip against gold labels, aligning rows by id.

    gold: task name -> DataFrame with `id` and `label` columns; only these tasks are scored (each
    must be in the zip). Missing or extra ids raise SubmissionError naming counts and examples.
    Returns {"reports": {task: metrics.task_report(...)}, "mean": mean macro-F1 of those tasks}.
    """
    if not gold:
        raise SubmissionError("no gold labels to score against")
    submission = read_submission(path, allow_partial=True)
    reports: dict[str, dict] = {}
    for name in gold:
        task = get_task(name)
        if task.name not in submission:
            raise SubmissionError(f"{path}: missing member {task.submission_member}")
        truth = gold[name]
        gold_ids = [str(value) for value in truth["id"]]
        if len(set(gold_ids)) != len(gold_ids):
            raise SubmissionError(f"{task.name}: the gold labels repeat ids")
        predicted = submission[task.name]
        pred_ids = set(predicted["id"])
        missing = set(gold_ids) - pred_ids
        extra = pred_ids - set(gold_ids)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} gold ids missing from the submission "
                             f"(e.g. {_examples(missing)})")
            if extra:
                parts.append(f"{len(extra)} submitted ids not in the gold "
                             f"(e.g. {_examples(extra)})")
            raise SubmissionError(f"{task.name}: " + "; ".join(parts))
        by_id = dict(zip(predicted["id"], predicted["label"]))
        reports[task.name] = task_report(task, [str(v) for v in truth["label"]],
                                         [by_id[i] for i in gold_ids])
    return {"reports": reports, "mean": leaderboard_score(reports)}


# ---------------------------------------------------------------------------------------------
# Gold labels


def _read_gold_file(path: Path, task: Task) -> pd.DataFrame:
    frame = read_task_file(path, task, labelled=True)
    return frame[["id", "label"]].astype(str).reset_index(drop=True)


def gold_from_dir(gold_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Gold labels from training-format files named as the training files (`OCNLI_train1128.csv`
    ...) in `gold_dir`: task -> DataFrame(id, label). tasks=None reads all three."""
    gold_dir = Path(gold_dir)
    names = TASK_NAMES if tasks is None else tuple(get_task(name).name for name in tasks)
    result = {}
    for name in names:
        task = TASKS[name]
        path = gold_dir / task.train_file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no gold file for {task.name}")
        result[name] = _read_gold_file(path, task)
    return result


def _gold_task(name: str) -> Task:
    try:
        return get_task(name)
    except ValueError as error:
        raise SubmissionError(f"gold labels: {error}") from None


def parse_gold_specs(specs: Sequence[str] | str) -> dict[str, Path]:
    """`--gold` values: each `TASK=PATH` (a training-format file) -> {task: Path}."""
    if isinstance(specs, str):
        specs = [specs]
    result: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise SubmissionError(f"gold spec {spec!r} is not TASK=PATH")
        task = _gold_task(name.strip())
        if task.name in result:
            raise SubmissionError(f"gold spec for {task.name} given twice")
        result[task.name] = Path(file.strip())
    return result


def gold_from_specs(specs: Mapping[str, str | Path] | Sequence[str] | str) -> dict[str, pd.DataFrame]:
    """Gold labels for `--gold`: {task: path} or `TASK=PATH` strings, each path a training-format
    file; task -> DataFrame(id, label), only the tasks named (they alone are scored)."""
    if isinstance(specs, Mapping):
        paths: dict[str, Path] = {}
        for name, file in specs.items():
            task = _gold_task(name)
            if task.name in paths:
                raise SubmissionError(f"gold spec for {task.name} given twice")
            paths[task.name] = Path(file)
    else:
        paths = parse_gold_specs(specs)
    result = {}
    for name, file in paths.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no gold file for {name}")
        result[name] = _read_gold_file(file, TASKS[name])
    return result
