import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clue_mtl.data.folder import (DataError, DataWarning, check_data, load_split, load_split_ids, read_clue_jsonl,
                           read_task_file, resolve_data_file, save_split, stratified_split)
from clue_mtl.tasks import OCEMOTION, OCNLI, TASKS, TNEWS

EXPECTED_ROWS = {
    "OCNLI_train1128.csv": 21_577, "OCEMOTION_train1128.csv": 31_728, "TNEWS_train1128.csv": 53_360,
    "OCNLI_a.csv": 1_500, "OCEMOTION_a.csv": 1_500, "TNEWS_a.csv": 1_500,
    "ocnli_test_B.csv": 1_500, "ocemotion_test_B.csv": 1_500, "tnews_test_B.csv": 1_500,
}


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def problems_of(call) -> list[str]:
    with pytest.raises(DataError) as raised:
        call()
    return raised.value.problems


# --- the real files ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS.values(), ids=list(TASKS))
@pytest.mark.parametrize("split", ["train", "a", "b"])
def test_real_files_read_with_expected_rows(real_data_dir, task, split):
    frame = load_split(real_data_dir, task, split)
    assert len(frame) == EXPECTED_ROWS[resolve_data_file(real_data_dir, task, split).name]
    columns = ["id", "text_a", "text_b"] + (["label"] if split == "train" else [])
    assert list(frame.columns) == columns
    assert frame["id"].is_unique
    if task.text_columns == 1:
        assert frame["text_b"].isna().all()
    else:
        assert frame["text_b"].map(type).eq(str).all()
    if split == "train":
        assert set(frame["label"]) == set(task.labels)


def test_reading_tnews_is_fast(real_data_dir):
    start = time.perf_counter()
    load_split(real_data_dir, TNEWS, "train")
    assert time.perf_counter() - start < 3  # about 0.3 s alone; generous for a shared machine


@pytest.mark.parametrize("task, row_id, column, start", [
    (OCEMOTION, "4403", "text_a", '"玩闹也会有误伤、以后再也不欠啦。。'),
    (TNEWS, "2229", "text_a", '"老公不见面,一个月给10万",这种豪门生活'),
    (OCNLI, "45242", "text_b", '"你“是偷渡客'),
])
def test_text_starting_with_a_quote_is_read_intact(real_data_dir, task, row_id, column, start):
    frame = load_split(real_data_dir, task, "train")
    row = frame.set_index("id").loc[row_id]
    assert row[column].startswith(start)
    assert row["label"] in task.labels


def test_ocnli_test_b_ids_start_at_1500(real_data_dir):
    frame = load_split(real_data_dir, OCNLI, "b")
    assert frame["id"].iloc[0] == "1500" and frame["id"].iloc[-1] == "2999"


def test_raw_test_text_is_normalised(real_data_dir):
    raw = load_split(real_data_dir, OCEMOTION, "a", normalize=False)["text_a"].str.cat()
    clean = load_split(real_data_dir, OCEMOTION, "a")["text_a"].str.cat()
    raw_marks = re.compile(r"[A-Z\uff01-\uff5e\u3000]")
    assert raw_marks.search(raw), "the raw file should need normalising"
    assert not raw_marks.search(clean)


def test_check_data_on_the_real_folder(real_data_dir):
    report, problems, notes = check_data(real_data_dir)
    assert problems == [] and notes == []
    for name, rows in EXPECTED_ROWS.items():
        assert any(line.startswith(f"{name}: {rows:,} rows") for line in report), name
    assert any("sadness 11,210" in line for line in report)


# --- bad input ----------------------------------------------------------------------------------


def test_wrong_column_count(tmp_path):
    path = write(tmp_path, "e.csv", "0\tok\tlike\r\n1\tone\ttab\tlike\r\n")
    (problem,) = problems_of(lambda: read_task_file(path, "ocemotion", labelled=True))
    assert problem.startswith(f"{path}:2: expected 3 columns (id, text, label), found 4")


def test_a_training_row_with_an_empty_text_is_skipped_and_a_blank_line_noted(tmp_path):
    path = write(tmp_path, "n.csv", "0\tpremise\t \t1\r\n\r\n2\tp\th\t0\r\n")
    with pytest.warns(DataWarning) as caught:
        frame = read_task_file(path, OCNLI, labelled=True)
    assert frame["id"].tolist() == ["2"]
    assert str(caught[0].message).splitlines() == [f"{path}:1: empty sentence2 (row skipped)",
                                                    f"{path}:2: blank line (skipped)"]
    assert problems_of(lambda: read_task_file(path, OCNLI, labelled=True, strict=True)) == [
        f"{path}:1: empty sentence2 (refused: --strict)", f"{path}:2: blank line (skipped)"]


def test_empty_id(tmp_path):
    path = write(tmp_path, "t.csv", "0\tnews\r\n\tnews\r\n")
    assert problems_of(lambda: read_task_file(path, TNEWS, labelled=False)) == [f"{path}:2: empty id"]


def test_unknown_label_lists_the_valid_ones(tmp_path):
    path = write(tmp_path, "e.csv", "0\ttext\tlike\r\n1\ttext\tjoy\r\n")
    (problem,) = problems_of(lambda: read_task_file(path, OCEMOTION, labelled=True))
    assert problem.startswith(f"{path}:2: unknown label 'joy'")
    assert "sadness, happiness" in problem


def test_duplicate_id_names_both_lines(tmp_path):
    path = write(tmp_path, "e.csv", "7\ta\tlike\r\n8\tb\tlike\r\n7\tc\tfear\r\n")
    (problem,) = problems_of(lambda: read_task_file(path, OCEMOTION, labelled=True))
    assert problem == f"{path}:3: duplicate id '7' (first on line 1)"


def test_undecodable_bytes_are_replaced_and_noted_and_reading_goes_on(tmp_path):
    path = write(tmp_path, "e.csv", b"0\tok\tlike\r\n1\tbad \xff\tlike\r\n2\tok\tjoy\r\n")
    (problem,) = problems_of(lambda: read_task_file(path, OCEMOTION, labelled=True))
    assert problem.startswith(f"{path}:3: unknown label 'joy'")  # a refusal lists the structure alone
    path.write_bytes(b"0\tok\tlike\r\n1\tbad \xff\tlike\r\n")
    with pytest.warns(DataWarning, match=re.escape(f"{path}:2: text is not valid UTF-8 (byte 0xff at byte 5); "
                                                   "decoded with U+FFFD (kept)")):
        assert read_task_file(path, OCEMOTION, labelled=True)["text_a"].tolist() == ["ok", "bad \ufffd"]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    assert problems_of(lambda: read_task_file(path, TNEWS, labelled=True)) == [f"{path}: missing file"]
    (problem,) = problems_of(lambda: resolve_data_file(tmp_path, OCNLI, "b"))
    assert "missing file" in problem and "ocnli_test_B.csv" in problem


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.csv", "\r\n")
    assert problems_of(lambda: read_task_file(path, TNEWS, labelled=True)) == [f"{path}: empty file (no rows)"]


def test_test_file_where_training_file_expected(tmp_path):
    path = write(tmp_path, "t.csv", "0\tnews one\r\n1\tnews two\r\n")
    (problem,) = problems_of(lambda: read_task_file(path, TNEWS, labelled=True))
    assert problem.startswith(f"{path}:1: looks like a test file (no label column)")


def test_training_file_where_test_file_expected(tmp_path):
    path = write(tmp_path, "t.csv", "0\tnews one\t101\r\n1\tnews two\t102\r\n")
    (problem,) = problems_of(lambda: read_task_file(path, TNEWS, labelled=False))
    assert problem.startswith(f"{path}:1: looks like a training file")


def test_bom_lf_and_missing_final_newline_are_accepted(tmp_path):
    path = write(tmp_path, "t.csv", "\ufeff0\tＡ新闻\t101\n1\t\"unbalanced\t102")
    frame = read_task_file(path, TNEWS, labelled=True)
    assert frame["id"].tolist() == ["0", "1"]
    assert frame["text_a"].tolist() == ["a新闻", '"unbalanced']
    assert frame["label"].tolist() == ["101", "102"]


def test_all_problems_of_a_file_are_reported_at_once(tmp_path):
    path = write(tmp_path, "e.csv", "0\ta\tlike\r\n0\tb\tlike\r\n2\t\x01\tlike\r\n3\tc\tbad\r\n4\tonly two\r\n")
    problems = problems_of(lambda: read_task_file(path, OCEMOTION, labelled=True))
    assert [int(p.split(":")[1]) for p in problems] == [2, 4, 5]


def test_number_of_problems_is_capped(tmp_path):
    path = write(tmp_path, "e.csv", "".join(f"{i}\ttext\tjoy\r\n" for i in range(50)))
    with pytest.raises(DataError) as raised:
        read_task_file(path, OCEMOTION, labelled=True)
    assert len(raised.value.problems) == 21
    assert raised.value.problems[-1] == f"{path}: ... and 30 more problems"
    assert raised.value.problems[19].startswith(f"{path}:20:")
    assert len(str(raised.value).splitlines()) == 21


def test_clue_jsonl_bad_json_line(tmp_path):
    path = write(tmp_path, "tnews.json", '{"sentence": "新闻", "label": "101"}\n{"sentence": \n')
    (problem,) = problems_of(lambda: read_clue_jsonl(path, TNEWS))
    assert problem.startswith(f"{path}:2: not valid JSON")


def test_clue_jsonl_ocnli_labels_mapped_and_dash_skipped(tmp_path):
    lines = [{"sentence1": "甲", "sentence2": "乙", "label": "entailment", "id": 10},
             {"sentence1": "丙", "sentence2": "丁", "label": "-", "id": 11},
             {"sentence1": "ＡＢ", "sentence2": "戊", "label": "contradiction", "id": 12}]
    path = write(tmp_path, "ocnli.json", "\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    frame = read_clue_jsonl(path, OCNLI)
    assert frame.to_dict("list") == {"id": ["10", "12"], "text_a": ["甲", "AB"], "text_b": ["乙", "戊"],
                                     "label": ["0", "2"]}


def test_clue_jsonl_tnews_and_emotion(tmp_path):
    tnews = write(tmp_path, "tnews.json", '{"label": "102", "label_desc": "news_entertainment", "sentence": "A"}\n'
                                          '{"label": 116, "sentence": "b"}\n')
    frame = read_clue_jsonl(tnews, TNEWS)
    assert frame[["id", "text_a", "label"]].values.tolist() == [["1", "a", "102"], ["2", "b", "116"]]
    emotion = write(tmp_path, "emotion.json", '{"content": "好", "label": "like"}\n{"text": "x", "label": "like"}\n')
    (problem,) = problems_of(lambda: read_clue_jsonl(emotion, OCEMOTION))
    assert problem == f"{emotion}:2: missing field content"


# --- splits -------------------------------------------------------------------------------------

SPLIT_FRAME_CODE = """
import pandas as pd
sizes = {"a": 503, "b": 211, "c": 57, "d": 9, "e": 1}
labels = [label for label, size in sizes.items() for _ in range(size)]
frame = pd.DataFrame({"id": [str(i * 7919 % 10007) for i in range(len(labels))], "label": labels})
"""


def split_frame() -> pd.DataFrame:
    scope = {}
    exec(SPLIT_FRAME_CODE, scope)
    return scope["frame"]


def test_split_is_deterministic_and_ignores_row_order():
    frame = split_frame()
    _, dev = stratified_split(frame, 0.1, seed=3)
    _, again = stratified_split(frame, 0.1, seed=3)
    _, shuffled = stratified_split(frame.sample(frac=1, random_state=1), 0.1, seed=3)
    _, other_seed = stratified_split(frame, 0.1, seed=4)
    assert dev["id"].tolist() == again["id"].tolist()
    assert sorted(dev["id"]) == sorted(shuffled["id"])
    assert sorted(dev["id"]) != sorted(other_seed["id"])


def test_split_is_the_same_under_another_hash_seed():
    code = SPLIT_FRAME_CODE + (
        "from clue_mtl.data.folder import stratified_split\n"
        "print(','.join(stratified_split(frame, 0.1, seed=3)[1]['id']))\n")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    _, dev = stratified_split(split_frame(), 0.1, seed=3)
    assert result.stdout.strip() == ",".join(dev["id"])


@pytest.mark.parametrize("dev_fraction", [0.1, 0.25, 0.5])
def test_split_is_stratified_and_sized(dev_fraction):
    frame = split_frame()
    train, dev = stratified_split(frame, dev_fraction, seed=0)
    assert len(train) + len(dev) == len(frame)
    assert set(train["id"]).isdisjoint(dev["id"])
    splittable = frame[frame["label"] != "e"]
    assert len(dev) == round(len(splittable) * dev_fraction)
    class_sizes = frame["label"].value_counts()
    dev_sizes = dev["label"].value_counts()
    for label in ["a", "b", "c", "d"]:
        assert abs(dev_sizes.get(label, 0) - class_sizes[label] * dev_fraction) < 1, label
    assert "e" in set(train["label"]) and "e" not in set(dev["label"])


def test_split_ids_round_trip(tmp_path):
    dev_ids = {"ocnli": ["1", "20"], "tnews": ["5"]}
    save_split(dev_ids, tmp_path / "split.json")
    assert load_split_ids(tmp_path / "split.json") == dev_ids
    write(tmp_path, "bad.json", '{"ocnli": [1, 2]}')
    assert "list of id strings" in problems_of(lambda: load_split_ids(tmp_path / "bad.json"))[0]
