"""benchmarks/lanes.py without training: what counts as a lane's finished run, what is refused
before any lane starts, and the step time read from a run's metrics."""

import json
import os

import pytest

from benchmarks.lanes import Lane, finished, lane_minutes, seconds_a_step, train_lanes
from clue_mtl.config import load_config
from clue_mtl.config.loading import save_config

CONFIG = "configs/cpu-best-e5.yaml"


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_the_step_time_is_read_before_the_first_evaluation(tmp_path):
    write_metrics(tmp_path, [{"kind": "train", "step": 50, "steps_per_second": 1.0},
                             {"kind": "train", "step": 100, "steps_per_second": 0.5},
                             {"kind": "eval", "step": 100},
                             {"kind": "train", "step": 150, "steps_per_second": 0.2}])   # evaluation time in it
    assert seconds_a_step(tmp_path) == 2.0


def test_a_run_folder_holding_other_settings_is_refused_in_one_line(tmp_path, capsys):
    lane = Lane("heads-s43", CONFIG, ["train.seed=43"])
    run_dir = tmp_path / lane.name
    run_dir.mkdir()
    save_config(load_config(CONFIG, ["train.num_threads=1", "train.seed=42"]), run_dir / "config.yaml")
    with pytest.raises(SystemExit) as ended:
        finished(lane.loaded(), run_dir)
    assert ended.value.code == 2
    assert "other settings (train.seed: 42 -> 43)" in capsys.readouterr().err
    save_config(lane.loaded(), run_dir / "config.yaml")
    assert not finished(lane.loaded(), run_dir)   # the same settings, not trained yet


def test_an_unfinished_run_behind_a_link_is_never_trained_over(tmp_path, capsys):
    lane = Lane("none-s42", CONFIG, ["train.seed=42"])
    elsewhere = tmp_path / "cpu-best" / "e5"
    elsewhere.mkdir(parents=True)
    save_config(lane.loaded(), elsewhere / "config.yaml")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / lane.name).symlink_to(elsewhere)
    with pytest.raises(SystemExit) as ended:
        train_lanes([lane], tmp_path / "study")
    assert ended.value.code == 2 and "links to an unfinished run" in capsys.readouterr().err
    assert sorted(path.name for path in elsewhere.iterdir()) == ["config.yaml"]


def lane_ran(run_dir, start: float, end: float) -> None:
    """A lane's folder whose config.yaml was written at `start` and last metrics record at `end`."""
    write_metrics(run_dir, [{"kind": "eval", "step": 2}])
    (run_dir / "config.yaml").write_text("name: lane\n")
    os.utime(run_dir / "config.yaml", (start, start))
    os.utime(run_dir / "metrics.jsonl", (end, end))


def test_lanes_overlap_when_their_windows_do_and_their_minutes_span_them_all(tmp_path):
    from benchmarks.heads_long import overlapping

    lane_ran(tmp_path / "a", 1000, 1600)
    lane_ran(tmp_path / "b", 1500, 2200)   # started before a ended
    lane_ran(tmp_path / "c", 1600, 1700)   # started as a ended: not beside it
    assert overlapping(tmp_path / "a", tmp_path / "b") and overlapping(tmp_path / "b", tmp_path / "a")
    assert not overlapping(tmp_path / "a", tmp_path / "c") and overlapping(tmp_path / "b", tmp_path / "c")
    assert lane_minutes([tmp_path / "a", tmp_path / "b", tmp_path / "c"]) == 20.0
