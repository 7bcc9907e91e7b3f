import numpy as np
import pytest

from clue_mtl.predict.evaluate import plot_confusion
from clue_mtl.predict.metrics import format_report, leaderboard_score, task_report
from clue_mtl.tasks import OCEMOTION, OCNLI, TNEWS

# OCNLI, 6 rows, classes 0/1/2:
#   gold 0 0 1 1 2 2
#   pred 0 1 1 1 0 0
# class 0: TP 1 (row 1), FP 2 (rows 5, 6), FN 1 (row 2): P 1/3, R 1/2, F1 2*(1/6)/(5/6) = 0.4
# class 1: TP 2, FP 1 (row 2), FN 0: P 2/3, R 1, F1 2*(2/3)/(5/3) = 0.8
# class 2: never predicted: TP 0, F1 0
# macro-F1 (0.4 + 0.8 + 0) / 3 = 0.4; accuracy 3/6 = 0.5
OCNLI_GOLD = ["0", "0", "1", "1", "2", "2"]
OCNLI_PRED = ["0", "1", "1", "1", "0", "0"]

# OCEMOTION, 4 rows, 7 classes:
#   gold sadness sadness   happiness fear
#   pred sadness happiness happiness sadness
# sadness: TP 1, FP 1, FN 1: F1 0.5; happiness: TP 1, FP 1, FN 0: P 1/2, R 1, F1 2/3;
# fear: F1 0; disgust, like, anger, surprise (absent from gold and predictions): F1 0.
# macro-F1 over all 7 classes: (1/2 + 2/3) / 7 = 1/6
OCEMOTION_GOLD = ["sadness", "sadness", "happiness", "fear"]
OCEMOTION_PRED = ["sadness", "happiness", "happiness", "sadness"]

# TNEWS, 2 rows, both right: F1 1 for 100 and 101, 0 for the 13 other classes: macro-F1 2/15
TNEWS_GOLD = ["100", "101"]
TNEWS_PRED = ["100", "101"]

# mean (0.4 + 1/6 + 2/15) / 3 = (12 + 5 + 4) / 30 / 3 = 0.7 / 3
EXPECTED = {"ocnli": 0.4, "ocemotion": 1 / 6, "tnews": 2 / 15}
EXPECTED_MEAN = 0.7 / 3


def hand_reports():
    return {
        "ocnli": task_report(OCNLI, OCNLI_GOLD, OCNLI_PRED),
        "ocemotion": task_report(OCEMOTION, OCEMOTION_GOLD, OCEMOTION_PRED),
        "tnews": task_report(TNEWS, TNEWS_GOLD, TNEWS_PRED),
    }


def test_task_report_by_hand():
    report = task_report(OCNLI, OCNLI_GOLD, OCNLI_PRED)
    assert report["task"] == "ocnli" and report["n"] == 6
    assert report["macro_f1"] == pytest.approx(0.4)
    assert report["accuracy"] == pytest.approx(0.5)
    per_class = report["per_class"]
    assert list(per_class) == ["0", "1", "2"]
    assert per_class["0"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert per_class["1"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert per_class["2"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2})


def test_macro_f1_counts_every_class_of_the_task():
    reports = hand_reports()
    for name, expected in EXPECTED.items():
        assert reports[name]["macro_f1"] == pytest.approx(expected)
    assert len(reports["tnews"]["per_class"]) == 15
    assert reports["ocemotion"]["per_class"]["fear"]["f1"] == 0.0
    assert leaderboard_score(reports) == pytest.approx(EXPECTED_MEAN)
    assert leaderboard_score(list(reports.values())) == pytest.approx(EXPECTED_MEAN)


def test_labels_compared_as_strings_and_validated():
    assert task_report(OCNLI, [0, 1, 2], ["0", "1", "2"])["macro_f1"] == 1.0
    with pytest.raises(ValueError, match="not in the task's label set"):
        task_report(OCNLI, ["0"], ["entailment"])
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        task_report("ocnli", ["0", "1"], ["0"])
    with pytest.raises(ValueError):
        leaderboard_score({})


def test_format_report_has_tasks_classes_and_mean_last():
    text = format_report(hand_reports())
    lines = text.splitlines()
    assert lines[0].startswith("ocnli") and "0.4000" in lines[0]
    assert any(line.split()[0] == "fear" for line in lines)
    assert any(line.split()[0] == "116" for line in lines)
    assert lines[-1].startswith("mean") and f"{EXPECTED_MEAN:.4f}" in lines[-1]


def test_plot_confusion_writes_png(tmp_path):
    path = plot_confusion(OCEMOTION, OCEMOTION_GOLD, OCEMOTION_PRED, tmp_path / "plots" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_bootstrap_of_the_same_predictions_is_zero_and_of_better_ones_positive():
    from clue_mtl.predict.metrics import macro_f1, paired_bootstrap

    rng = np.random.default_rng(0)
    gold = {"a": (rng.integers(0, 3, 300), 3), "b": (rng.integers(0, 5, 200), 5)}
    guesses = {task: rng.integers(0, n, len(truth)) for task, (truth, n) in gold.items()}
    same = paired_bootstrap([(guesses, guesses)], gold, samples=200)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    # a variant right on the first half of each task's rows, where the default guessed
    better = {task: np.where(np.arange(len(truth)) < len(truth) // 2, truth, guesses[task])
              for task, (truth, n) in gold.items()}
    gain = paired_bootstrap([(better, guesses)], gold, samples=200)
    expected = np.mean([macro_f1(truth, better[t], n) - macro_f1(truth, guesses[t], n) for t, (truth, n) in gold.items()])
    assert gain["difference"] == pytest.approx(expected)
    assert 0 < gain["low"] < gain["difference"] < gain["high"]
    # two seed pairs average: the same pair twice gives the same point, a pair of equals halves it
    assert paired_bootstrap([(better, guesses)] * 2, gold, samples=50)["difference"] == pytest.approx(expected)
    assert paired_bootstrap([(better, guesses), (guesses, guesses)], gold, samples=50)["difference"] == pytest.approx(expected / 2)
