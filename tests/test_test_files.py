"""Every row of a test file gets a prediction: content is mended and noted, only structure refuses.

The cases are the hostile user's of issue 34: 20 test-A rows per task (of the generated files, in
the real format), one row changed at a time.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from clue_mtl.cli import main
from clue_mtl.data.folder import DataError, DataWarning, checked_test_files, read_task_file
from clue_mtl.tasks import TASKS

ROWS = 20
CHANGED = 5  # the 1-based line changed in each case


@pytest.fixture
def test_rows(data_dir) -> dict[str, list[bytes]]:
    """The first 20 lines of each task's test A file, without line ends."""
    return {task.name: (data_dir / task.test_a_file).read_bytes().split(b"\r\n")[:ROWS] for task in TASKS.values()}


def write_lines(path: Path, lines: list[bytes], end: bytes = b"\r\n") -> Path:
    path.write_bytes(end.join(lines) + end)
    return path


def with_text(line: bytes, text: bytes, column: int = 1) -> bytes:
    fields = line.split(b"\t")
    fields[column] = text
    return b"\t".join(fields)


def predicted_frame(path: Path, task: str, *, id_mode: str = "file"):
    """What prediction reads: the file checked, then walked in chunks (two rows a chunk)."""
    (checked,) = checked_test_files([task], test_files={task: path}, id_mode=id_mode).values()
    import pandas as pd

    return pd.concat(list(checked.chunks(2)), ignore_index=True), checked.report


CONTENT_CASES = {
    # name: (task, text column, new text bytes, the note's words, the text predicted)
    "empty text": ("tnews", 1, b"", "empty text (predicted anyway)", ""),
    "empty sentence2": ("ocnli", 2, b"", "empty sentence2 (predicted anyway)", ""),
    "ASCII spaces only": ("ocemotion", 1, b"   ", "empty text (predicted anyway)", ""),
    "ideographic space only": ("tnews", 1, "\u3000\u3000".encode(), "empty text (predicted anyway)", ""),
    "invisible only": ("tnews", 1, "\u200b\u2060".encode(), "text is empty after normalisation", ""),
    "surrogate bytes": ("ocemotion", 1, b"ab\xed\xa0\x80cd", "text is not valid UTF-8 (byte 0xed at byte 3); "
                        "decoded with U+FFFD (predicted anyway)", "ab\ufffd\ufffd\ufffdcd"),
    "truncated sequence": ("tnews", 1, "新闻".encode()[:4], "text is not valid UTF-8", "新\ufffd"),
    "DEL": ("tnews", 1, b"ab\x7fcd", "U+007F (DELETE) at column 3, made a space (predicted anyway)", "ab cd"),
    "NEL": ("ocemotion", 1, "ab\u0085cd".encode(), "U+0085 (NEXT LINE) at column 3", "ab cd"),
    "lone CR": ("ocnli", 1, b"ab\rcd", "sentence1 contains the control character U+000D (CARRIAGE RETURN)", "ab cd"),
    "backspace at column 16": ("tnews", 1, "一二三四五六七八九十一二三四五\b七".encode(),
                               "U+0008 (BACKSPACE) at column 16, made a space", "一二三四五六七八九十一二三四五 七"),
}


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_content_faults_are_mended_noted_and_predicted(test_rows, tmp_path, case):
    task, column, text, note, predicted = CONTENT_CASES[case]
    lines = list(test_rows[task])
    lines[CHANGED - 1] = with_text(lines[CHANGED - 1], text, column)
    path = write_lines(tmp_path / "test.csv", lines)
    with pytest.warns(DataWarning) as caught:
        frame, report = predicted_frame(path, task)
    assert len(frame) == ROWS and frame["id"].tolist() == [line.split(b"\t")[0].decode() for line in lines]
    assert frame[f"text_{'ab'[column - 1]}"][CHANGED - 1] == TASKS[task].normalize(predicted)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{path}:{CHANGED}: ") and note in message
    assert report.note_count == 1


def test_notes_list_the_first_twenty_rows_and_count_the_rest(tmp_path):
    lines = [f"{i}\t".encode() for i in range(40)]  # 40 empty texts
    path = write_lines(tmp_path / "test.csv", lines)
    with pytest.warns(DataWarning) as caught:
        frame, _ = predicted_frame(path, "tnews")
    assert len(frame) == 40 and set(frame["text_a"]) == {""}
    shown = str(caught[0].message).splitlines()
    assert len(shown) == 21 and shown[-1] == f"{path}: ... and 20 more rows mended"


@pytest.mark.parametrize("case, change, note", [
    ("blank line", lambda lines: lines[:4] + [b""] + lines[4:], f":{CHANGED}: blank line (skipped)"),
    ("trailing tab on one row", lambda lines: lines[:4] + [lines[4] + b"\t"] + lines[5:],
     f":{CHANGED}: a trailing empty column (ignored)"),
    ("trailing tab on every row", lambda lines: [line + b"\t" for line in lines], ":1: a trailing empty column"),
    ("header row", lambda lines: [b"id\ttext"] + lines, ":1: a header row (skipped)"),
])
def test_tolerated_structure_is_noted_and_every_row_kept(test_rows, tmp_path, case, change, note):
    path = write_lines(tmp_path / "test.csv", change(list(test_rows["tnews"])))
    with pytest.warns(DataWarning, match=re.escape(f"{path}{note}")):
        frame, _ = predicted_frame(path, "tnews")
    assert frame["id"].tolist() == [str(i) for i in range(ROWS)]


def test_a_header_row_of_a_pair_file_is_skipped(test_rows, tmp_path):
    path = write_lines(tmp_path / "test.csv", [b"ID\tsentence1\tsentence2"] + test_rows["ocnli"])
    with pytest.warns(DataWarning, match="a header row"):
        frame, _ = predicted_frame(path, "ocnli")
    assert frame["id"].tolist()[0] == "0" and len(frame) == ROWS


def test_a_duplicate_id_refuses_only_where_ids_are_written(test_rows, tmp_path):
    lines = list(test_rows["tnews"])
    lines[CHANGED - 1] = b"0" + lines[CHANGED - 1][lines[CHANGED - 1].index(b"\t"):]
    path = write_lines(tmp_path / "test.csv", lines)
    with pytest.raises(DataError, match=re.escape(f"{path}:{CHANGED}: duplicate id '0' (first on line 1)")):
        predicted_frame(path, "tnews", id_mode="file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame, _ = predicted_frame(path, "tnews", id_mode="row")
    assert len(frame) == ROWS


@pytest.mark.parametrize("case, content, message", [
    ("a tab inside a text", lambda lines: lines[:4] + [lines[4] + b"\tmore"] + lines[5:],
     f":{CHANGED}: expected 2 columns (id, text), found 3 (a tab inside a text?)"),
    ("a missing id", lambda lines: lines[:4] + [with_text(lines[4], b"", 0)] + lines[5:], f":{CHANGED}: empty id"),
    ("an id with a space", lambda lines: lines[:4] + [b"4 4" + lines[4][1:]] + lines[5:],
     f":{CHANGED}: id '4 4' contains U+0020 (SPACE)"),
    ("an undecodable id", lambda lines: lines[:4] + [b"\xff" + lines[4]] + lines[5:],
     f":{CHANGED}: the id is not valid UTF-8"),
    ("a label column", lambda lines: [line + b"\t101" for line in lines], ":1: looks like a training file"),
    ("CR-only line ends", None, ": its lines end in CR alone"),
    ("not text", None, ": not a UTF-8 text file"),
    ("only a header", lambda lines: [b"id\ttext"], ": no rows (only a header or blank lines)"),
    ("a line of tabs", lambda lines: lines[:4] + [b"\t"] + lines[5:], f":{CHANGED}: empty id"),
])
def test_structural_faults_refuse_with_file_and_line(test_rows, tmp_path, capsys, case, content, message):
    path = tmp_path / "TNEWS_a.csv"
    if case == "CR-only line ends":
        write_lines(path, test_rows["tnews"], end=b"\r")
    elif case == "not text":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        write_lines(path, content(list(test_rows["tnews"])))
    with pytest.raises(DataError) as caught:
        predicted_frame(path, "tnews")
    assert str(caught.value).startswith(f"{path}{message}")
    assert main(["check-data", "--data-dir", str(tmp_path)]) == 2
    assert f"{path}{message}" in capsys.readouterr().err


@pytest.mark.parametrize("case, content, rows, note", [
    ("a lone CR, no final newline", b"0\tfoo\rbar", 1, ":1: text contains the control character U+000D"),
    ("nine NULs", b"0\t" + b"\0" * 9 + b"x\r\n1\thello\r\n", 2, ":1: text contains the control character U+0000"),
    ("Latin-1 bytes", "0\tcaf\xe9 \xe0 la cr\xe8me br\xfbl\xe9e\r\n1\thi\r\n".encode("latin-1"), 2,
     ":1: text is not valid UTF-8 (byte 0xe9 at byte 4)"),
    ("a first row whose id is 'id'", b"id\tHello world\r\n1\thi\r\n", 2, None),
    ("a form feed alone", b"0\t\x0c\r\n", 1, ":1: empty text (predicted anyway)"),
])
def test_content_that_looks_like_structure_is_still_content(tmp_path, case, content, rows, note):
    """The review's findings: none of these may refuse the file or lose a row; one note a row."""
    path = tmp_path / "test.csv"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame, report = predicted_frame(path, "tnews")
    assert len(frame) == rows
    notes = [line for w in caught for line in str(w.message).splitlines()]
    assert notes == ([] if note is None else [next(line for line in notes if line.startswith(f"{path}{note}"))])


def test_a_training_file_is_mended_the_same_way_and_skips_rows_left_empty(data_dir, tmp_path):
    lines = (data_dir / "TNEWS_train1128.csv").read_bytes().split(b"\r\n")[:ROWS]
    lines[2] = with_text(lines[2], "新闻\b标题".encode())
    lines[3] = with_text(lines[3], b" ")
    path = write_lines(tmp_path / "train.csv", lines)
    with pytest.warns(DataWarning) as caught:
        frame = read_task_file(path, "tnews", labelled=True)
    assert len(frame) == ROWS - 1 and "新闻 标题" in frame["text_a"].tolist()
    assert str(caught[0].message).splitlines() == [
        f"{path}:3: text contains the control character U+0008 (BACKSPACE) at column 3, made a space (kept)",
        f"{path}:4: empty text (row skipped)"]


def hostile_data_dir(data_dir: Path, folder: Path) -> Path:
    """The competition files, with the issue's TNEWS test A (a header row, U+0008 inside row 5's
    text, an empty row-6 text) and the same two faults in TNEWS training rows 5 and 6."""
    folder.mkdir()
    for path in data_dir.glob("*.csv"):
        (folder / path.name).symlink_to(path)
    for name, header in (("TNEWS_a.csv", [b"id\ttext"]), ("TNEWS_train1128.csv", [])):
        lines = (data_dir / name).read_bytes().split(b"\r\n")[:-1]
        lines[4] = with_text(lines[4], lines[4].split(b"\t")[1][:15] + b"\x08" + lines[4].split(b"\t")[1][15:])
        lines[5] = with_text(lines[5], b"")
        (folder / name).unlink()
        write_lines(folder / name, header + lines)
    return folder


def test_a_backspace_and_an_empty_text_still_give_every_row_a_prediction(data_dir, tiny_config, tmp_path, capsys):
    """Issue 34's check: `check-data` exits 0 naming both lines; the main job, `predict` and
    `baseline` write zips with every test id; the run folder records the mended training rows."""
    import json
    import zipfile

    from clue_mtl.predict.baseline import run_baseline
    from clue_mtl.config import save_config

    data = hostile_data_dir(data_dir, tmp_path / "data")
    assert main(["check-data", "--data-dir", str(data)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {data / 'TNEWS_a.csv'}:6: text contains the control character U+0008" in err
    assert f"warning: {data / 'TNEWS_a.csv'}:7: empty text (predicted anyway)" in err
    assert f"warning: {data / 'TNEWS_train1128.csv'}:6: empty text (row skipped)" in err

    config = tmp_path / "run.yaml"
    save_config(tiny_config(f"data.data_dir={data}", "data.tasks=[tnews]", "name=hostile"), config)
    assert main(["run", "--config", str(config), "--out-dir", str(tmp_path / "subs"),
                 "--blend-dir", str(tmp_path / "blend")]) == 0
    assert main(["predict", "--run", str(tmp_path / "runs" / "hostile"), "--out", str(tmp_path / "run.zip"),
                 "--test", f"tnews={data / 'TNEWS_a.csv'}"]) == 0
    run_baseline(data, out_dir=tmp_path / "baseline", tasks=["tnews"], max_rows=200, progress=False)
    for zip_path in (tmp_path / "subs" / "hostile-test-a.zip", tmp_path / "run.zip",
                     tmp_path / "baseline" / "baseline_test_a.zip"):
        with zipfile.ZipFile(zip_path) as archive:
            ids = [json.loads(line)["id"] for line in archive.read("tnews_predict.json").decode().splitlines()]
        assert ids == [str(i) for i in range(60)], zip_path
    mended = json.loads((tmp_path / "runs" / "hostile" / "mended_rows.json").read_text())["tnews"]
    assert mended["mended"] == {"control": 1, "empty": 1} and mended["rows"] == 399  # of 400
    assert mended["first"][1] == f"{data / 'TNEWS_train1128.csv'}:6: empty text (row skipped)"
