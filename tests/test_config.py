import json

import pytest

from clue_mtl.config import ConfigError, config_to_dict, load_config, save_config


def test_defaults_validate():
    config = load_config()
    assert config.data.tasks == ["ocnli", "ocemotion", "tnews"]
    assert config.weighting.method == "equal"


def test_overrides_convert_and_nest():
    config = load_config(overrides=["train.lr=3e-5", "data.tasks=[ocnli]", "data.max_train_rows=100",
                                    "weighting.method=fixed", "weighting.params={weights: {ocnli: 2}}",
                                    "train.head_lr=1"])
    assert config.train.lr == pytest.approx(3e-5)
    assert config.train.head_lr == 1.0 and isinstance(config.train.head_lr, float)
    assert config.data.tasks == ["ocnli"]
    assert config.data.max_train_rows == 100
    assert config.weighting.params == {"weights": {"ocnli": 2}}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key in train: train.lrr"),
    ("trian.lr=1", "unknown key: trian"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.steps=many", "train.steps: expected int"),
    ("data.tasks=ocnli", "data.tasks: expected a list"),
    ("data.tasks=[cmnli]", "unknown task"),
    ("train.mixed_precision=fp8", "mixed_precision"),
    ("data.dev_fraction=1.5", "dev_fraction"),
    ("train.length_grouping=1", "expected bool"),
    ("novalue", "key=value"),
    ("train.eval_every=0", "eval_every"),
    ("data.max_dev_rows=0", "max_dev_rows"),
    ("model.dropout=2", "dropout"),
    ("model.pooling=cls", "unknown pooling"),
    ("weighting.method=softmax", "unknown weighting method"),
    ("weighting.params={alpha: 1}", "bad parameters"),
])
def test_bad_overrides_fail_loudly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_yaml_round_trip_and_scientific_notation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-5\n  steps: 7\nmodel:\n  pooling: first\n")
    config = load_config(path)
    assert config.train.lr == pytest.approx(2e-5) and config.train.steps == 7
    save_config(config, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == config


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        if "pretrain" not in path.name:
            load_config(path)


def test_fgm_refuses_gradient_level_weighting():
    with pytest.raises(ConfigError, match="writes gradients by hand"):
        load_config(overrides=["train.fgm_epsilon=1.0", "weighting.method=pcgrad"])


@pytest.mark.parametrize("name, encoder, epochs", [("gpu-roberta-wwm-ext", "hfl/chinese-roberta-wwm-ext", 4),
                                                   ("gpu-bert-base", "bert-base-chinese", 3)])
def test_gpu_configs_follow_public_solutions(name, encoder, epochs):
    from pathlib import Path

    from clue_mtl.data.batching import task_batch_sizes

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert (config.name, config.model.encoder, config.train.mixed_precision) == (name, encoder, "bf16")
    assert config.train.lr == config.train.head_lr == 2e-5 and config.train.batch_size == 32
    assert 128 <= config.data.max_length <= 256 and config.model.pooling in ("first", "mean")
    assert not config.model.freeze_word_embeddings and config.data.max_dev_rows is None
    # training rows after the 10% dev split; an epoch of TNEWS, the largest task, in steps
    sizes = {"ocnli": 19419, "ocemotion": 28555, "tnews": 48024}
    rows = task_batch_sizes(sizes, config.train.batch_size, config.train.sampling, config.train.sampling_alpha)
    epoch = sizes["tnews"] / rows["tnews"]
    assert abs(config.train.steps / epoch - epochs) < 0.01 and abs(config.train.eval_every / epoch - 1) < 0.01


def test_quickstart_m3e_is_the_quickstart_on_m3e():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    quickstart, m3e = (config_to_dict(load_config(configs / f"{n}.yaml")) for n in ("quickstart", "quickstart-m3e"))
    assert m3e["model"]["encoder"] == "artifacts/m3e-small" and m3e["name"] == "quickstart-m3e"
    assert quickstart["model"]["freeze_word_embeddings"] and not m3e["model"]["freeze_word_embeddings"]
    # m3e's steps train for the quickstart's minutes, at the step times measured for that choice
    speed = json.loads((configs.parent / "benchmarks" / "results" / "encoder_choice_speed.json").read_text())["figures"]
    equal_time = quickstart["train"]["steps"] * speed["e5-small"]["step_seconds"] / speed["m3e-small"]["step_seconds"]
    assert m3e["train"]["steps"] == round(equal_time)
    for config in (quickstart, m3e):
        del config["name"], config["model"]["encoder"], config["model"]["freeze_word_embeddings"]
        del config["train"]["steps"]
    assert m3e == quickstart


def test_a_key_added_later_reads_as_its_old_behaviour_when_a_saved_config_lacks_it():
    """Runs saved before `train.scheduler` existed trained with the linear schedule: they resume."""
    from clue_mtl.config import ADDED_KEYS, config_differences, config_fingerprint

    current = config_to_dict(load_config())
    saved = {**current, "train": {k: v for k, v in current["train"].items() if k != "scheduler"}}
    assert ADDED_KEYS["train.scheduler"] == current["train"]["scheduler"] == "linear"
    assert config_differences(saved, current) == []
    assert config_fingerprint(saved) == config_fingerprint(current)
    cosine = config_to_dict(load_config(overrides=["train.scheduler=cosine"]))
    assert config_differences(saved, cosine) == ["train.scheduler: 'linear' -> 'cosine'"]
    assert config_fingerprint(saved) != config_fingerprint(cosine)


def test_a_run_saved_before_the_joint_encoder_pass_resumes_only_as_it_ran():
    """Such runs ran the encoder once per task. auto is resolved as the config is read: where it
    now gives one joint pass, resuming names what changed; where it still gives one pass per task
    (private layers, PCGrad, MGDA), or with per_task written out, the run resumes with the
    fingerprint it was saved with."""
    from clue_mtl.config import config_differences, config_fingerprint

    def saved_before_the_key(values: dict) -> dict:
        return {**values, "train": {k: v for k, v in values["train"].items() if k != "encoder_pass"}}

    current = config_to_dict(load_config())
    assert current["train"]["encoder_pass"] == "joint"
    saved = saved_before_the_key(current)
    assert config_differences(saved, current) == ["train.encoder_pass: 'per_task' -> 'joint'"]
    assert config_fingerprint(saved) != config_fingerprint(current)
    as_it_ran = config_to_dict(load_config(overrides=["train.encoder_pass=per_task"]))
    assert config_differences(saved, as_it_ran) == []
    assert config_fingerprint(saved) == config_fingerprint(as_it_ran)
    for override in ("weighting.method=pcgrad", "model.private={ocnli: {type: layers, layers: 1}}"):
        still_per_task = config_to_dict(load_config(overrides=[override]))
        assert still_per_task["train"]["encoder_pass"] == "per_task"
        assert config_differences(saved_before_the_key(still_per_task), still_per_task) == []
        assert config_fingerprint(saved_before_the_key(still_per_task)) == config_fingerprint(still_per_task)


def test_a_saved_run_config_reads_as_the_run_ran(tmp_path):
    """A run folder's config.yaml saved before a key existed reads with that key's old behaviour
    (one encoder pass per task), not today's default; a mangled section is named, not a traceback."""
    from clue_mtl.config import load_run_config

    path = tmp_path / "config.yaml"
    save_config(load_config(), path)
    assert load_run_config(path).train.encoder_pass == "joint"
    text = path.read_text(encoding="utf-8")
    path.write_text("\n".join(line for line in text.splitlines() if "encoder_pass" not in line), encoding="utf-8")
    assert load_run_config(path).train.encoder_pass == "per_task"
    assert load_config(path).train.encoder_pass == "joint"  # a config to train with takes today's default
    path.write_text(text.replace("train:\n", "train: 5\nunused:\n", 1), encoding="utf-8")
    with pytest.raises(ConfigError, match="config.yaml"):
        load_run_config(path)
