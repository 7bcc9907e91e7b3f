import io
import json
import struct
import zipfile

import pandas as pd
import pytest

from clue_mtl.predict import submission
from clue_mtl.predict.submission import (SubmissionError, gold_from_dir, gold_from_specs, parse_gold_specs,
                                 read_submission, score_submission, write_submission)
from clue_mtl.tasks import TASK_NAMES, TASKS

from test_evaluate import (EXPECTED, EXPECTED_MEAN, OCEMOTION_GOLD, OCEMOTION_PRED, OCNLI_GOLD,
                           OCNLI_PRED, TNEWS_GOLD, TNEWS_PRED)

MEMBERS = [TASKS[name].submission_member for name in TASK_NAMES]


def frames(n=3, ocnli_start=0):
    """Test frames: OCNLI ids from ocnli_start (1500 for test B), the others from 0."""
    return {name: pd.DataFrame({"id": [str(i + (ocnli_start if name == "ocnli" else 0))
                                       for i in range(n)]})
            for name in TASK_NAMES}


def labels(n=3):
    return {name: [TASKS[name].labels[i % TASKS[name].num_labels] for i in range(n)]
            for name in TASK_NAMES}


def member_lines(path, member):
    with zipfile.ZipFile(path) as archive:
        return archive.read(member).decode("utf-8").splitlines()


def lines_bytes(rows):
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def valid_members(n=3):
    return {TASKS[name].submission_member:
            lines_bytes({"id": str(i), "label": TASKS[name].labels[i % TASKS[name].num_labels]}
                        for i in range(n))
            for name in TASK_NAMES}


def make_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# ---------------------------------------------------------------------------------------------
# write_submission


def test_writer_format(tmp_path):
    path = write_submission(labels(4), frames(4), tmp_path / "sub.zip")
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == MEMBERS  # top level, nothing else
    for name in TASK_NAMES:
        lines = member_lines(path, TASKS[name].submission_member)
        rows = [json.loads(line) for line in lines]
        assert [row["id"] for row in rows] == ["0", "1", "2", "3"]
        assert [row["label"] for row in rows] == labels(4)[name]
        assert all(set(row) == {"id", "label"} and isinstance(row["id"], str)
                   and isinstance(row["label"], str) for row in rows)
    assert member_lines(path, "ocemotion_predict.json")[0] == '{"id": "0", "label": "sadness"}'
    assert read_submission(path)["tnews"]["label"].tolist() == labels(4)["tnews"]


def test_writer_keeps_test_file_order_and_id_modes(tmp_path):
    test = frames(3, ocnli_start=1500)
    test["tnews"] = pd.DataFrame({"id": ["7", "3", "5"]})  # file order, not sorted
    by_file = write_submission(labels(3), test, tmp_path / "file.zip")
    assert [json.loads(line)["id"] for line in member_lines(by_file, "ocnli_predict.json")] == \
        ["1500", "1501", "1502"]
    assert [json.loads(line)["id"] for line in member_lines(by_file, "tnews_predict.json")] == \
        ["7", "3", "5"]
    by_row = write_submission(labels(3), test, tmp_path / "row.zip", id_mode="row")
    for member in MEMBERS:
        assert [json.loads(line)["id"] for line in member_lines(by_row, member)] == ["0", "1", "2"]


def test_writer_accepts_integer_labels_and_is_deterministic(tmp_path):
    predictions = labels(3) | {"ocnli": [0, 1, 2], "tnews": [100, 101, 102]}
    first = write_submission(predictions, frames(3), tmp_path / "one.zip")
    second = write_submission(labels(3) | {"ocnli": ["0", "1", "2"], "tnews": ["100", "101", "102"]},
                              frames(3), tmp_path / "two.zip")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("change, message", [
    (lambda p, f: p["ocemotion"].__setitem__(0, "joy"), "'joy', not one of the task's labels"),
    (lambda p, f: p["tnews"].__setitem__(0, "105"), "'105', not one of"),
    (lambda p, f: p["ocnli"].__setitem__(0, 1.0), "labels must be strings"),
    (lambda p, f: p["tnews"].pop(), "2 predictions for 3 test rows"),
    (lambda p, f: f.__setitem__("ocnli", pd.DataFrame({"id": ["1", "1", "2"]})), "more than once"),
    (lambda p, f: p.pop("tnews"), "no predictions for tnews"),
    (lambda p, f: p.__setitem__("cmnli", []), "unknown task"),
    (lambda p, f: f.pop("ocnli"), "no test frame"),
])
def test_writer_validates(tmp_path, change, message):
    predictions, test = labels(3), frames(3)
    change(predictions, test)
    with pytest.raises(SubmissionError, match=message):
        write_submission(predictions, test, tmp_path / "sub.zip")
    assert list(tmp_path.iterdir()) == []


def test_writer_id_mode_and_partial(tmp_path):
    with pytest.raises(SubmissionError, match="id_mode"):
        write_submission(labels(3), frames(3), tmp_path / "sub.zip", id_mode="index")
    partial = {"ocnli": labels(3)["ocnli"]}
    path = write_submission(partial, frames(3), tmp_path / "part.zip", allow_partial=True)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["ocnli_predict.json"]
    with pytest.raises(SubmissionError, match="missing member"):
        read_submission(path)
    assert list(read_submission(path, allow_partial=True)) == ["ocnli"]


def _assert_untouched(folder, path):
    assert path.read_bytes() == b"the previous submission"
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary file left


def test_atomic_when_predictions_raise_mid_way(tmp_path):
    path = tmp_path / "sub.zip"
    path.write_bytes(b"the previous submission")

    def failing():
        yield "0"
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        write_submission(labels(3) | {"ocnli": failing()}, frames(3), path)
    _assert_untouched(tmp_path, path)


def test_atomic_when_serialising_fails(tmp_path, monkeypatch):
    path = tmp_path / "sub.zip"
    path.write_bytes(b"the previous submission")
    calls = []
    real_dumps = json.dumps

    def dumps(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise ValueError("serialiser broke")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(submission.json, "dumps", dumps)
    with pytest.raises(ValueError, match="serialiser broke"):
        write_submission(labels(3), frames(3), path)
    _assert_untouched(tmp_path, path)


def test_atomic_when_zip_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "sub.zip"
    path.write_bytes(b"the previous submission")
    real_writestr = zipfile.ZipFile.writestr

    def writestr(self, info, data, *args, **kwargs):
        if info.filename == "ocemotion_predict.json":  # the second member: the zip is half written
            raise OSError("disk full")
        return real_writestr(self, info, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    with pytest.raises(OSError, match="disk full"):
        write_submission(labels(3), frames(3), path)
    _assert_untouched(tmp_path, path)


# ---------------------------------------------------------------------------------------------
# read_submission


def test_reads_a_valid_zip_ignoring_macos_litter(tmp_path):
    members = valid_members() | {"__MACOSX/._ocnli_predict.json": b"\x00\x05\x16\x07 junk",
                                 "__MACOSX/": b"", ".DS_Store": b"\x00\x00\x00\x01Bud1"}
    result = read_submission(make_zip(tmp_path / "sub.zip", members))
    assert list(result) == list(TASK_NAMES)
    assert result["ocemotion"].columns.tolist() == ["id", "label"]
    assert result["ocemotion"]["label"].tolist() == ["sadness", "happiness", "disgust"]


def test_crlf_and_final_newline_are_accepted(tmp_path):
    members = valid_members()
    members["tnews_predict.json"] = b'{"id": "0", "label": "100"}\r\n{"id": "1", "label": "116"}'
    result = read_submission(make_zip(tmp_path / "sub.zip", members))
    assert result["tnews"]["label"].tolist() == ["100", "116"]


def _replace_member(members, member, data):
    return members | {member: data}


BAD_CASES = {
    "missing member": (lambda m: {k: v for k, v in m.items() if k != "tnews_predict.json"},
                       "missing member.*tnews_predict.json"),
    "nested path": (lambda m: {f"sub/{k}": v for k, v in m.items()},
                    "'sub/ocnli_predict.json' is in a nested path; ocnli_predict.json must be at the top"),
    "unexpected member": (lambda m: m | {"notes.txt": b"hi"}, "unexpected member 'notes.txt'"),
    "duplicate ids": (lambda m: _replace_member(m, "ocnli_predict.json", lines_bytes(
        [{"id": "0", "label": "0"}, {"id": "1", "label": "1"}, {"id": "0", "label": "2"}])),
        "line 3: duplicate id '0' \\(first on line 1\\)"),
    "unknown label": (lambda m: _replace_member(m, "ocemotion_predict.json", lines_bytes(
        [{"id": "0", "label": "joy"}])), "unknown label 'joy' for ocemotion"),
    "label spelled as a number": (lambda m: _replace_member(m, "tnews_predict.json", lines_bytes(
        [{"id": "0", "label": 100}])), "label 100 is a int, not a string"),
    "non-string id": (lambda m: _replace_member(m, "ocnli_predict.json", lines_bytes(
        [{"id": 0, "label": "0"}])), "line 1: id 0 is a int, not a string"),
    "unparsable line": (lambda m: _replace_member(m, "ocnli_predict.json",
                                                  b'{"id": "0", "label": "0"}\n{"id": "1", label: 1}\n'),
                        "ocnli_predict.json line 2: not JSON"),
    "empty line": (lambda m: _replace_member(m, "ocnli_predict.json",
                                             b'{"id": "0", "label": "0"}\n\n{"id": "1", "label": "1"}\n'),
                   "line 2: empty line"),
    "extra key": (lambda m: _replace_member(m, "ocnli_predict.json", lines_bytes(
        [{"id": "0", "label": "0", "prob": "0.9"}])), "exactly 'id' and 'label'"),
    "a list, not an object": (lambda m: _replace_member(m, "ocnli_predict.json", b'["0", "0"]\n'),
                              "exactly 'id' and 'label'"),
    "empty member": (lambda m: _replace_member(m, "ocnli_predict.json", b""), "is empty"),
    "not utf-8": (lambda m: _replace_member(m, "ocnli_predict.json", b'{"id": "\xff", "label": "0"}'),
                  "not UTF-8"),
    "parent directory": (lambda m: m | {"../ocnli_predict.json": b"x"}, "escapes the archive"),
    "absolute path": (lambda m: m | {"/etc/ocnli_predict.json": b"x"}, "escapes the archive"),
    "windows drive": (lambda m: m | {"C:\\temp\\x.json": b"x"}, "escapes the archive"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_read_rejects(tmp_path, case):
    change, message = BAD_CASES[case]
    path = make_zip(tmp_path / "sub.zip", change(valid_members()))
    with pytest.raises(SubmissionError, match=message) as error:
        read_submission(path)
    assert "\n" not in str(error.value)


def test_read_rejects_files_that_are_not_zips(tmp_path):
    text = tmp_path / "sub.zip"
    text.write_text('{"id": "0", "label": "0"}\n')
    with pytest.raises(SubmissionError, match="not a zip file"):
        read_submission(text)
    with pytest.raises(SubmissionError, match="no such file"):
        read_submission(tmp_path / "absent.zip")


def test_read_rejects_a_duplicated_member(tmp_path):
    path = make_zip(tmp_path / "sub.zip", valid_members())
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("ocnli_predict.json", b'{"id": "0", "label": "0"}\n')
    with pytest.raises(SubmissionError, match="appears twice"):
        read_submission(path)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory):
    """200 MB of zeros as ocnli_predict.json, about 200 KB on disk (written in well under a second)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in valid_members().items():
            if member != "ocnli_predict.json":
                archive.writestr(member, data)
        with archive.open("ocnli_predict.json", "w") as stream:
            chunk = bytes(1 << 20)
            for _ in range(200):
                stream.write(chunk)
    assert path.stat().st_size < 1 << 20
    return path


def _set_declared_size(path, member, size):
    """Rewrite a member's uncompressed size in both its local and its central directory header."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    assert data[info.header_offset:info.header_offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, info.header_offset + 22, size)
    central = data.index(b"PK\x01\x02")
    while struct.unpack_from("<I", data, central + 42)[0] != info.header_offset:
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))


def test_read_rejects_a_zip_bomb_by_declared_size(zip_bomb):
    with pytest.raises(SubmissionError, match="declares 209,715,200 bytes uncompressed.*zip bomb"):
        read_submission(zip_bomb)


def test_read_rejects_a_zip_bomb_whose_header_lies(zip_bomb, tmp_path):
    liar = tmp_path / "liar.zip"
    liar.write_bytes(zip_bomb.read_bytes())
    _set_declared_size(liar, "ocnli_predict.json", 1000)
    with zipfile.ZipFile(liar) as archive:
        assert archive.getinfo("ocnli_predict.json").file_size == 1000
    # CPython stops at the declared 1,000 bytes, then the CRC check fails
    with pytest.raises(SubmissionError, match="ocnli_predict.json: cannot be decompressed"):
        read_submission(liar)


def test_read_caps_the_bytes_it_decompresses(tmp_path, monkeypatch):
    path = make_zip(tmp_path / "sub.zip", valid_members(50))
    with pytest.raises(SubmissionError, match="declares 1,340 bytes uncompressed, more than the 100"):
        read_submission(path, max_member_bytes=100)
    # CPython already stops at the declared size; should a reader not, the read itself is capped
    opened = []

    def endless_open(self, info, *args, **kwargs):
        opened.append(info.filename)
        return io.BytesIO(bytes(1 << 20))

    monkeypatch.setattr(zipfile.ZipFile, "open", endless_open)
    with pytest.raises(SubmissionError, match="more than 100,000 bytes uncompressed"):
        read_submission(path, max_member_bytes=100_000)
    assert opened == ["ocnli_predict.json"]


def test_the_real_example_submission_parses(real_data_dir):
    result = read_submission(real_data_dir / "examples/test_a_submission_scored_0.5834.zip")
    assert list(result) == list(TASK_NAMES)
    for name, frame in result.items():
        assert len(frame) == 1500
        assert frame["id"].tolist() == [str(i) for i in range(1500)]
        assert set(frame["label"]) <= set(TASKS[name].labels)


# ---------------------------------------------------------------------------------------------
# score_submission and gold labels


def hand_gold():
    gold = {"ocnli": OCNLI_GOLD, "ocemotion": OCEMOTION_GOLD, "tnews": TNEWS_GOLD}
    return {name: pd.DataFrame({"id": [str(i) for i in range(len(values))], "label": values})
            for name, values in gold.items()}


def test_score_matches_the_hand_computed_example(tmp_path):
    gold = hand_gold()
    predictions = {"ocnli": OCNLI_PRED, "ocemotion": OCEMOTION_PRED, "tnews": TNEWS_PRED}
    # shuffle the submission's line order: scoring aligns by id, not by position
    test = {name: frame[["id"]].iloc[::-1].reset_index(drop=True) for name, frame in gold.items()}
    reversed_predictions = {name: list(reversed(values)) for name, values in predictions.items()}
    path = write_submission(reversed_predictions, test, tmp_path / "sub.zip")
    result = score_submission(path, gold)
    for name, expected in EXPECTED.items():
        assert result["reports"][name]["macro_f1"] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(EXPECTED_MEAN)
    only_ocnli = score_submission(path, {"ocnli": gold["ocnli"]})
    assert list(only_ocnli["reports"]) == ["ocnli"] and only_ocnli["mean"] == pytest.approx(0.4)


def test_score_rejects_missing_and_extra_ids(tmp_path):
    gold = hand_gold()
    predictions = {"ocnli": OCNLI_PRED, "ocemotion": OCEMOTION_PRED, "tnews": TNEWS_PRED}
    test = {name: frame[["id"]] for name, frame in gold.items()}
    test["ocnli"] = pd.DataFrame({"id": ["0", "1", "2", "3", "4", "99"]})
    path = write_submission(predictions, test, tmp_path / "sub.zip")
    with pytest.raises(SubmissionError,
                       match="ocnli: 1 gold ids missing from the submission \\(e.g. '5'\\); "
                             "1 submitted ids not in the gold \\(e.g. '99'\\)"):
        score_submission(path, gold)
    partial = write_submission({"ocnli": OCNLI_PRED}, {"ocnli": gold["ocnli"]}, tmp_path / "part.zip",
                               allow_partial=True)
    with pytest.raises(SubmissionError, match="missing member ocemotion_predict.json"):
        score_submission(partial, gold)


def _write_training_format(folder):
    """Tiny files in the competition's training format: tab separated, CRLF, no header."""
    rows = {"ocnli": ["0\t他来了\t他到了\t0", "1\t下雨了\t天晴\t2"],
            "ocemotion": ["0\t好开心\thappiness", "1\t好难过\tsadness"],
            "tnews": ["0\t股市大涨\t104", "1\t球赛\t107"]}
    for name, lines in rows.items():
        (folder / TASKS[name].train_file).write_bytes(("\r\n".join(lines) + "\r\n").encode())


def test_gold_from_dir_and_specs(tmp_path):
    _write_training_format(tmp_path)
    gold = gold_from_dir(tmp_path)
    assert list(gold) == list(TASK_NAMES)
    assert gold["ocnli"].to_dict("list") == {"id": ["0", "1"], "label": ["0", "2"]}
    assert gold["tnews"]["label"].tolist() == ["104", "107"]
    specs = [f"TNEWS={tmp_path / 'TNEWS_train1128.csv'}", f"ocnli={tmp_path / 'OCNLI_train1128.csv'}"]
    assert parse_gold_specs(specs) == {"tnews": tmp_path / "TNEWS_train1128.csv",
                                       "ocnli": tmp_path / "OCNLI_train1128.csv"}
    loaded = gold_from_specs(specs)
    assert list(loaded) == ["tnews", "ocnli"]
    assert loaded["ocnli"]["label"].tolist() == ["0", "2"]
    assert list(gold_from_specs({"OCEMOTION": str(tmp_path / "OCEMOTION_train1128.csv")})) == ["ocemotion"]
    with pytest.raises(FileNotFoundError, match="no gold file for tnews"):
        gold_from_specs({"tnews": tmp_path / "absent.csv"})
    with pytest.raises(ValueError, match="not TASK=PATH"):
        parse_gold_specs(["ocnli"])
    with pytest.raises(ValueError, match="unknown task"):
        parse_gold_specs(["cmnli=x.csv"])
    with pytest.raises(ValueError, match="given twice"):
        parse_gold_specs(["ocnli=a.csv", "OCNLI=b.csv"])
    (tmp_path / "TNEWS_train1128.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no gold file for tnews"):
        gold_from_dir(tmp_path)
    assert list(gold_from_dir(tmp_path, tasks=["ocnli"])) == ["ocnli"]
