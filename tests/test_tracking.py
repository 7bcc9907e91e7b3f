"""Trackers through Accelerate (`train.report_to`) and the learning-rate schedule (`train.scheduler`)."""

import math

import pytest

from clue_mtl.config import ConfigError, load_config
from clue_mtl.runs.folder import RunFolder
from clue_mtl.training.tracking import flat_record, hyperparameters
from clue_mtl.recipes.multitask import Trainer


def test_a_metrics_record_flattens_under_its_kind():
    record = {"kind": "train", "step": 3, "loss": {"ocnli": 1.5, "tnews": 2.0}, "total_loss": 3.5,
              "weights": {"ocnli": 1.0}, "lr": 1e-4, "note": "text", "flag": True}
    assert flat_record(record) == {"train/loss/ocnli": 1.5, "train/loss/tnews": 2.0, "train/total_loss": 3.5,
                                   "train/weights/ocnli": 1.0, "train/lr": 1e-4}
    assert flat_record({"kind": "eval", "step": 6, "mean_macro_f1": 0.5, "macro_f1": {"ocnli": 0.4}}) == {
        "eval/mean_macro_f1": 0.5, "eval/macro_f1/ocnli": 0.4}


def test_hyperparameters_are_scalars_every_tracker_takes():
    flat = hyperparameters({"train": {"lr": 1e-4, "steps": 5}, "data": {"tasks": ["ocnli"], "max_rows": None},
                            "model": {"task_pooling": {}}})
    assert flat == {"train.lr": 1e-4, "train.steps": 5, "data.tasks": '["ocnli"]', "data.max_rows": "null",
                    "model.task_pooling": "{}"}


def test_tensorboard_events_hold_the_metrics_log(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(tiny_config("train.report_to=tensorboard", "train.steps=4", "train.eval_every=2",
                                  "name=tracked"), tmp_path / "run", show_progress=False)
    trainer.train()
    folder = RunFolder(tmp_path / "run")
    events = EventAccumulator(str(folder.tracking_dir / "tracked"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    logged = [record for record in folder.metrics() if record["kind"] == "train"]
    losses = events.Scalars("train/loss/ocnli")
    assert [event.step for event in losses] == [record["step"] for record in logged] == [1, 2, 3, 4]
    assert [event.value for event in losses] == pytest.approx([record["loss"]["ocnli"] for record in logged])
    assert [event.step for event in events.Scalars("eval/mean_macro_f1")] == [2, 4]
    assert {"train/weights/tnews", "eval/macro_f1/ocemotion", "train/lr"} <= set(scalars)
    assert "tracking" in folder.entries()  # cleared with the run by --overwrite


def test_report_to_is_checked_and_may_change_on_resume(tiny_config):
    with pytest.raises(ConfigError, match="train.report_to must be one of"):
        tiny_config("train.report_to=neptune")
    from clue_mtl.config import config_fingerprint, config_to_dict

    assert (config_fingerprint(config_to_dict(tiny_config("train.report_to=tensorboard")))
            == config_fingerprint(config_to_dict(tiny_config())))


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_the_schedule_follows_train_scheduler(tiny_config, tmp_path, name):
    trainer = Trainer(tiny_config(f"train.scheduler={name}", "train.steps=10", "train.warmup_ratio=0.2",
                                  "train.eval_every=100", "train.lr=1e-3", "train.head_lr=1e-3",
                                  "train.layer_lr_decay=1.0"), tmp_path / name, show_progress=False)
    trainer.train()
    lrs = [record["lr"] for record in RunFolder(tmp_path / name).metrics() if record["kind"] == "train"]
    progress = [(step - 2) / 8 for step in range(1, 11)]  # after the 2 warmup steps
    expected = {
        "linear": [1e-3 * min(s / 2, 1 - p) for s, p in zip(range(1, 11), progress)],
        "cosine": [1e-3 * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * p))) for s, p in zip(range(1, 11), progress)],
        "constant_with_warmup": [1e-3 * min(s / 2, 1.0) for s in range(1, 11)],
    }[name]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_an_unknown_scheduler_is_a_config_error():
    with pytest.raises(ConfigError, match="train.scheduler must be one of"):
        load_config(overrides=["train.scheduler=sawtooth"])
