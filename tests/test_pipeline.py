"""The main job (`pipeline.main_job`) on generated files and a tiny encoder: what it writes, and that it
checks each input file once and the run folder before any of them."""

from __future__ import annotations

from collections import Counter

import pytest

from clue_mtl.config import load_config
from clue_mtl.data.task_files import FileReader
from clue_mtl.errors import RunFolderError
from clue_mtl.pipeline import main_job
from clue_mtl.predict.submission import read_submission
from clue_mtl.tasks import TASKS


@pytest.fixture
def job_config(generated_data_dir, tiny_bert, tmp_path):
    return load_config(overrides=[
        f"data.data_dir={generated_data_dir}", f"model.encoder={tiny_bert}", f"output_dir={tmp_path / 'runs'}",
        "name=job", "data.max_length=32", "train.steps=4", "train.batch_size=9", "train.eval_every=2",
        "train.log_every=1", "train.lr=1e-3", "train.warmup_ratio=0.25",
    ])


@pytest.fixture
def checked_files(monkeypatch) -> Counter:
    """How many times each data file was checked (`FileReader.check`, the one full pass before work)."""
    counts: Counter = Counter()
    check = FileReader.check

    def counted(self, *args, **kwargs):
        counts[self.path.name] += 1
        return check(self, *args, **kwargs)

    monkeypatch.setattr(FileReader, "check", counted)
    return counts


def test_main_job_writes_the_run_baseline_blend_and_both_zips(job_config, generated_data_dir, tmp_path,
                                                               checked_files, capsys):
    result = main_job(job_config, blend_dir=tmp_path / "blends" / "job", out_dir=tmp_path / "submissions")

    files = [task.train_file for task in TASKS.values()] + [task.test_file(s) for task in TASKS.values() for s in "ab"]
    assert checked_files == Counter(files)  # all nine files, each once: prediction reads the checked ones
    assert result.run_dir == tmp_path / "runs" / "job" and (result.run_dir / "best").is_dir()
    assert (result.run_dir / "evaluation" / "report.json").is_file()
    assert result.baseline_dir == tmp_path / "runs" / "baseline" and (result.baseline_dir / "baseline.json").is_file()
    assert (result.blend_dir / "blend.json").is_file() and (result.blend_dir / "evaluation" / "report.txt").is_file()
    for split, first_id in (("a", 0), ("b", 1000)):
        assert result.zips[split] == tmp_path / "submissions" / f"job-test-{split}.zip"
        submission = read_submission(result.zips[split])
        assert {task: frame["id"].tolist() for task, frame in submission.items()} == {
            task: [str(first_id + row) for row in range(12)] for task in TASKS}  # every test row predicted
        assert result.zip_rows[split] == 36
    assert set(result.dev_macro_f1) == set(TASKS)
    assert result.dev_mean_macro_f1 == pytest.approx(sum(result.dev_macro_f1.values()) / 3)
    out = capsys.readouterr().out
    assert result.report in out and "the zips decide by the biased blend" in out
    assert f"test B submission: {result.zips['b']} (36 rows, validated)" in out


def test_a_refused_run_folder_stops_the_job_before_any_file_is_read(job_config, tmp_path, checked_files):
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")  # another run's
    with pytest.raises(RunFolderError, match="already holds a run"):
        main_job(job_config, blend_dir=tmp_path / "blend", out_dir=tmp_path / "submissions")
    assert not checked_files and not (tmp_path / "runs" / "baseline").exists()
