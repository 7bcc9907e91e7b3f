from clue_mtl.baseline import BaselineRun, run_baseline
from clue_mtl.submission import read_submission
from clue_mtl.tasks import TASK_NAMES


def test_baseline_on_a_small_slice_writes_two_valid_zips_and_its_folder(data_dir, tmp_path, capsys):
    # data_dir (conftest.py) skips when ../shared/data/tianchi is missing
    result = run_baseline(data_dir, out_dir=tmp_path / "subs", max_rows=300, run_dir=tmp_path / "baseline")
    assert set(result["zips"]) == {"a", "b"}
    assert list(result["reports"]) == list(TASK_NAMES)
    assert 0 < result["mean"] < 1
    for report in result["reports"].values():
        assert 0 < report["macro_f1"] < 1
    for split, path in result["zips"].items():
        assert path == tmp_path / "subs" / f"baseline_test_{split}.zip"
        submission = read_submission(path)
        assert {name: len(frame) for name, frame in submission.items()} == \
            {name: 1500 for name in TASK_NAMES}
    first_ocnli_b_id = read_submission(result["zips"]["b"])["ocnli"]["id"].iloc[0]
    assert first_ocnli_b_id == "1500"  # id_mode "file": the test file's own ids
    out = capsys.readouterr().out
    assert "[baseline 3/3] tnews: train 300 rows" in out
    assert "baseline saved to" in out
    loaded = BaselineRun.load(tmp_path / "baseline")
    assert loaded.tasks == list(TASK_NAMES)
    assert loaded.info["dev_mean_macro_f1"] == result["mean"]
