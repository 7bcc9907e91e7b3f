"""The fuzzers of `tests/fuzz.py` on a small sample with a fixed seed: no tracebacks, exit 2, located messages."""

import pytest

import fuzz


@pytest.mark.parametrize("name, cases", [("data", 2 * len(fuzz.DATA_KINDS)), ("zip", len(fuzz.ZIP_KINDS)),
                                         ("config", len(fuzz.DOCUMENTS) + 30)])
def test_fuzzer_finds_no_traceback_wrong_exit_or_unlocated_message(name, cases, data_dir, capsys):
    tally = fuzz.FUZZERS[name](cases, 0, data_dir) if name == "data" else fuzz.FUZZERS[name](cases, 0)
    with capsys.disabled():
        print(f"\n{tally.summary(name)}")
    assert tally.cases >= cases
    assert tally.failures == []
    assert (tally.tracebacks, tally.wrong_exits, tally.missing_location, tally.incomplete_zips) == (0, 0, 0, 0)


def test_the_data_fuzzer_notices_a_corruption_the_reader_misses(data_dir, monkeypatch):
    """A fuzzer that cannot fail proves nothing: with the id checks off, its id cases count wrong exits."""
    from clue_mtl.data import task_files

    monkeypatch.setattr(task_files, "id_problem", lambda id_: None)
    tally = fuzz.fuzz_data(len(fuzz.DATA_KINDS), 0, data_dir)
    assert tally.wrong_exits + tally.missing_location >= 3  # empty id, BOM in an id, space in an id


def test_the_data_fuzzer_notices_a_test_row_left_out_of_the_zip(data_dir, monkeypatch):
    """With empty test texts dropped (as training rows are), its content cases count incomplete zips."""
    from clue_mtl.data import task_files

    mend = task_files.FileReader._text
    monkeypatch.setattr(task_files.FileReader, "_text", lambda *args: mend(*args) or None)
    tally = fuzz.fuzz_data(len(fuzz.DATA_KINDS), 0, data_dir)
    assert tally.incomplete_zips >= 1
