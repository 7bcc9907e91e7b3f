"""The `clue-mtl` commands, run in-process on the generated files (the real ones where a test says
so) and a tiny encoder."""

import json
import zipfile

import pytest

from clue_mtl.cli import main
from clue_mtl.config import save_config


def test_check_data_passes_on_the_real_files(real_data_dir, capsys):
    assert main(["check-data", "--data-dir", str(real_data_dir)]) == 0
    out = capsys.readouterr().out
    assert "OCNLI_train1128.csv" in out and "tnews_test_B.csv" in out


def test_check_data_passes_on_the_generated_files(data_dir, capsys):
    """The files the suite trains on are in the real format: nothing to report or note."""
    assert main(["check-data", "--data-dir", str(data_dir)]) == 0
    captured = capsys.readouterr()
    assert "OCNLI_train1128.csv: 400 rows" in captured.out and "tnews_test_B.csv: 60 rows" in captured.out
    assert captured.err == ""


def test_check_data_reports_problems_with_exit_2(tmp_path, capsys):
    (tmp_path / "OCNLI_train1128.csv").write_text("0\tA\tB\t7\n", encoding="utf-8")
    assert main(["check-data", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "OCNLI_train1128.csv:1:" in err and "Traceback" not in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "x.zip").write_text("not a zip")
    assert main(["score", str(tmp_path / "x.zip"), "--gold", "ocnli=nowhere.csv"]) == 2
    assert main(["train", "--set", "train.stepz=3"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "train.stepz" in errors[1]


def test_main_job_trains_evaluates_and_writes_valid_zips(tiny_config, tmp_path, capsys):
    config_path = tmp_path / "tiny.yaml"
    save_config(tiny_config(), config_path)
    out_dir = tmp_path / "submissions"
    blend_dir = tmp_path / "blends" / "run"
    assert main(["run", "--config", str(config_path), "--out-dir", str(out_dir), "--blend-dir", str(blend_dir)]) == 0
    out = capsys.readouterr().out
    assert "[baseline 3/3] tnews: train 48 rows" in out  # the baseline fits the run's training rows
    assert "biased blend (cross-fitted)" in out and "the zips decide by the biased blend" in out
    members = json.loads((blend_dir / "blend.json").read_text())["members"]
    assert [m["kind"] for m in members] == ["run", "baseline"]
    assert (blend_dir / "evaluation" / "blend.png").stat().st_size > 1000   # the side-by-side figure
    run_dir = tmp_path / "runs" / "run"
    evaluation = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert set(evaluation["reports"]) == {"ocnli", "ocemotion", "tnews"}
    assert evaluation["reports"]["tnews"]["n"] == 40  # the whole saved dev split (10% of 400 rows)
    for name in ("confusion_ocnli.png", "confusion_tnews.png", "training.png"):
        assert (run_dir / "evaluation" / name).stat().st_size > 1000
    for split in ("a", "b"):
        with zipfile.ZipFile(out_dir / f"run-test-{split}.zip") as archive:
            assert sorted(archive.namelist()) == ["ocemotion_predict.json", "ocnli_predict.json", "tnews_predict.json"]
            first = json.loads(archive.read("ocnli_predict.json").decode().splitlines()[0])
            assert first["id"] == ("0" if split == "a" else "1000")  # the generated test B ids

    # an ensemble of the run with itself, through `predict`, with an explicit test file and row ids
    ensemble = tmp_path / "ensemble.zip"
    assert main(["predict", "--run", str(run_dir), "--run", str(run_dir), "--split", "b", "--id-mode", "row",
                 "--out", str(ensemble)]) == 0
    with zipfile.ZipFile(ensemble) as archive:
        assert json.loads(archive.read("ocnli_predict.json").decode().splitlines()[0])["id"] == "0"
        ensemble_lines = archive.read("tnews_predict.json").decode().splitlines()
    single = tmp_path / "single.zip"
    assert main(["predict", "--run", str(run_dir), "--split", "b", "--out", str(single)]) == 0
    with zipfile.ZipFile(single) as archive:
        single_lines = archive.read("tnews_predict.json").decode().splitlines()
    labels = lambda lines: [json.loads(line)["label"] for line in lines]
    assert labels(ensemble_lines) == labels(single_lines)  # averaging a run with itself changes nothing

    # the blend the main job fitted predicts the same zip again through `predict --blend`
    again = tmp_path / "again.zip"
    assert main(["predict", "--blend", str(blend_dir), "--split", "b", "--out", str(again)]) == 0
    assert again.read_bytes() == (out_dir / "run-test-b.zip").read_bytes()
    assert main(["predict", "--blend", str(blend_dir), "--run", str(run_dir), "--out", str(again)]) == 2


def test_score_the_example_submission_against_its_own_labels(real_data_dir, tmp_path, capsys):
    """Scoring a zip against gold files made of its own predictions: every row right."""
    from clue_mtl.predict.submission import read_submission
    from clue_mtl.tasks import get_task

    example = next((real_data_dir / "examples").glob("*.zip"))
    submission = read_submission(example)
    for task, frame in submission.items():
        test = (real_data_dir / get_task(task).test_a_file).read_text(encoding="utf-8").splitlines()
        rows = [line.rstrip("\r").split("\t") + [label] for line, label in zip(test, frame["label"])]
        (tmp_path / get_task(task).train_file).write_text("\n".join("\t".join(r) for r in rows) + "\n",
                                                            encoding="utf-8")
    assert main(["score", str(example), "--gold-dir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(report["accuracy"] == 1.0 for report in result["reports"].values())
    assert result["reports"]["ocnli"]["macro_f1"] == pytest.approx(1.0)  # all three classes are predicted
    assert result["mean"] == pytest.approx(sum(r["macro_f1"] for r in result["reports"].values()) / 3)


def test_main_job_with_one_task_writes_partial_zips(tiny_config, tmp_path):
    config_path = tmp_path / "one.yaml"
    save_config(tiny_config("data.tasks=[tnews]", "name=tnews-only"), config_path)
    assert main(["run", "--config", str(config_path), "--out-dir", str(tmp_path / "subs"),
                 "--blend-dir", str(tmp_path / "blend")]) == 0
    for split in ("a", "b"):
        with zipfile.ZipFile(tmp_path / "subs" / f"tnews-only-test-{split}.zip") as archive:
            assert archive.namelist() == ["tnews_predict.json"]
