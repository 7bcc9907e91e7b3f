"""Blends: weights, macro-F1 biases, cross-fitting, the blend folder, and the baseline as a member."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from clue_mtl.predict import blend as blend_module
from clue_mtl.predict.baseline import BaselineModel, BaselineRun, run_baseline
from clue_mtl.predict.blend import (Blend, BlendError, build_blend, fit_bias, fit_task_blend, fit_weights,
                            log_probabilities, macro_f1, predict_blend_submission, stratified_folds)
from clue_mtl.predict.submission import read_submission


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def draw(probabilities, rng):
    cumulative = probabilities.cumsum(axis=1)
    return (rng.random((len(probabilities), 1)) > cumulative).sum(axis=1)


def test_macro_f1_matches_scikit_learn_with_absent_classes():
    rng = np.random.default_rng(0)
    gold, predicted = rng.integers(0, 4, 500), rng.integers(0, 3, 500)  # class 4 never appears
    expected = f1_score(gold, predicted, labels=range(5), average="macro", zero_division=0)
    assert macro_f1(gold, predicted, 5) == pytest.approx(expected)


def test_weights_recover_a_known_log_linear_mixture():
    rng = np.random.default_rng(1)
    members = [softmax(rng.normal(size=(20000, 4)) * 2) for _ in range(3)]
    true_weights = np.array([0.5, 1.5, 0.0])
    gold = draw(softmax(sum(w * np.log(p) for w, p in zip(true_weights, members))), rng)
    weights = fit_weights(log_probabilities(np.stack(members)), gold)
    np.testing.assert_allclose(weights, true_weights, atol=0.06)


def test_bias_raises_macro_f1_on_an_imbalanced_case():
    rng = np.random.default_rng(2)
    priors = np.array([0.85, 0.1, 0.05])
    gold = rng.choice(3, size=6000, p=priors)
    # an under-confident member that almost always says the majority class
    logits = rng.normal(size=(6000, 3)) + 1.2 * np.eye(3)[gold] + np.log(priors) * 2
    before = macro_f1(gold, logits.argmax(1), 3)
    bias = fit_bias(logits, gold)
    after = macro_f1(gold, (logits + bias).argmax(1), 3)
    assert after > before + 0.05
    assert bias[1] > bias[0] and bias[2] > bias[0]   # rare classes pushed up
    assert np.abs(bias).max() <= 2.0                  # within the bound


def test_bias_leaves_a_balanced_calibrated_case_alone():
    rng = np.random.default_rng(3)
    probabilities = softmax(rng.normal(size=(8000, 4)) * 1.5)
    gold = draw(probabilities, rng)  # argmax of the true probabilities is already the best decision
    bias = fit_bias(np.log(probabilities), gold)
    # argmax is accuracy-optimal, not exactly macro-F1-optimal: a nudge may remain, no more
    assert np.abs(bias).max() <= 0.3
    gain = macro_f1(gold, (np.log(probabilities) + bias).argmax(1), 4) - macro_f1(gold, probabilities.argmax(1), 4)
    assert 0 <= gain < 0.005


def test_cross_fitting_scores_no_row_with_parameters_fitted_on_it(monkeypatch):
    rng = np.random.default_rng(4)
    members = [softmax(rng.normal(size=(300, 3))) for _ in range(2)]
    gold = rng.integers(0, 3, 300)
    fitted_rows = []
    real_fit = blend_module._fit

    def recording_fit(member_log_probs, fit_gold, settings):
        fitted_rows.append({member_log_probs[:, i, :].tobytes() for i in range(member_log_probs.shape[1])})
        return real_fit(member_log_probs, fit_gold, settings)

    monkeypatch.setattr(blend_module, "_fit", recording_fit)
    settings = blend_module.FitSettings(folds=5, seed=0)
    fit_task_blend("ocnli", ["a", "b"], members, gold, settings)
    stacked = log_probabilities(np.stack(members))
    row_bytes = [stacked[:, i, :].tobytes() for i in range(300)]
    folds = stratified_folds(gold, 5, 0)
    assert len(fitted_rows) == 1 + 5 and len(fitted_rows[0]) == 300   # the final fit sees every row
    for fold in range(5):
        held_out = {row_bytes[i] for i in np.flatnonzero(folds == fold)}
        assert held_out and not held_out & fitted_rows[1 + fold]
        assert len(fitted_rows[1 + fold]) == 300 - len(held_out)


def test_stratified_folds_spread_every_class():
    gold = np.array([0] * 50 + [1] * 12 + [2] * 3)
    folds = stratified_folds(gold, 5, seed=0)
    for label, size in ((0, 50), (1, 12)):
        counts = np.bincount(folds[gold == label], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == size
    assert len(set(folds[gold == 2])) == 3   # a tiny class lands in three different folds


# ----------------------------------------------------------------------------- the baseline as a member
@pytest.fixture(scope="module")
def fitted_baseline(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline")
    result = run_baseline(data_dir, out_dir=None, run_dir=run_dir, max_rows=300, progress=False)
    return run_dir, result


def test_baseline_loads_without_pickle_and_predicts_the_same(fitted_baseline, data_dir):
    from clue_mtl.data.folder import load_split

    run_dir, _ = fitted_baseline
    assert {p.suffix for p in run_dir.iterdir()} == {".json", ".safetensors"}
    for path in run_dir.iterdir():
        assert not path.read_bytes().startswith(b"\x80")   # no pickle protocol header anywhere
    frame = load_split(data_dir, "ocemotion", "a")
    loaded = BaselineRun.load(run_dir)
    # refit the same model in memory: the loaded files must predict exactly as it does
    from clue_mtl.data.folder import stratified_split

    train, _ = stratified_split(load_split(data_dir, "ocemotion", "train"), 0.1, 42)
    _, train = stratified_split(train, 300 / len(train), 42)
    fresh = BaselineModel("ocemotion").fit(train)
    np.testing.assert_allclose(loaded.probabilities("ocemotion", frame), fresh.probabilities(frame), atol=1e-5)
    assert loaded.models["ocemotion"].predict(frame) == fresh.predict(frame)


def test_baseline_probabilities_agree_with_scikit_learn(data_dir):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from clue_mtl.data.folder import load_split, stratified_split

    frame = load_split(data_dir, "tnews", "train")
    train, dev = stratified_split(frame, 0.2, 0)
    model = BaselineModel("tnews").fit(train)
    reference = OneVsRestClassifier(LogisticRegression(solver="liblinear", dual=True, class_weight="balanced"))
    reference.fit(model._features(train), train["label"].astype(str))
    assert model.predict(dev) == list(reference.predict(model._features(dev)))


def test_a_corrupt_baseline_folder_is_refused(fitted_baseline, tmp_path):
    import shutil

    from clue_mtl.data.folder import DataError

    run_dir, _ = fitted_baseline
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    meta = json.loads((broken / "tnews.json").read_text())
    meta["terms"] = meta["terms"][:-1]
    (broken / "tnews.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="do not fit together"):
        BaselineRun.load(broken)


# ----------------------------------------------------------------------------- blend folders
@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    from clue_mtl.config import load_config
    from clue_mtl.testing import build_tiny_encoder
    from clue_mtl.recipes.multitask import train

    root = tmp_path_factory.mktemp("tiny-run")
    encoder = build_tiny_encoder(root / "encoder", kind="bert", seed=0)

    def make(name, *overrides):
        config = load_config(overrides=[
            f"data.data_dir={data_dir}", f"model.encoder={encoder}", f"output_dir={root / 'runs'}", f"name={name}",
            "data.max_train_rows=48", "data.max_dev_rows=24", "data.max_length=32", "train.steps=4",
            "train.batch_size=9", "train.eval_every=4", "train.lr=1e-3", *overrides])
        return train(config, show_progress=False).run_dir

    return make


def test_blend_round_trips_and_predicts_a_valid_zip(tiny_run, fitted_baseline, tmp_path):
    run_dir = tiny_run("member")
    baseline_dir, _ = fitted_baseline
    blend = build_blend([run_dir, baseline_dir], tmp_path / "blend", progress=False)
    saved = json.loads((tmp_path / "blend" / "blend.json").read_text())
    assert Blend.load(tmp_path / "blend").to_dict() == blend.to_dict() == saved
    assert [m["name"] for m in saved["members"]] == ["member", baseline_dir.name]
    for task, entry in saved["tasks"].items():
        assert len(entry["weights"]) == 2 and min(entry["weights"]) >= 0
        assert set(entry["dev"]["biased"]) == {"in_sample", "cross_fitted"}
        # the baseline member's score in the blend is its own dev score
        assert entry["dev"]["members"][baseline_dir.name] == pytest.approx(fitted_baseline[1]["reports"][task]["macro_f1"])
    zip_path = predict_blend_submission(tmp_path / "blend", tmp_path / "a.zip", split="a", progress=False)
    assert {task: len(frame) for task, frame in read_submission(zip_path).items()} == \
        {"ocnli": 60, "ocemotion": 60, "tnews": 60}


def test_blend_refuses_a_member_of_another_split(tiny_run, fitted_baseline, tmp_path):
    other = tiny_run("other-split", "data.split_seed=7")
    with pytest.raises(BlendError, match="another (ocnli|ocemotion|tnews) dev split"):
        build_blend([fitted_baseline[0], other], tmp_path / "blend", progress=False)
    assert not (tmp_path / "blend" / "blend.json").exists()


def test_blend_refuses_a_member_changed_since_fitting(tiny_run, fitted_baseline, tmp_path):
    import shutil

    baseline_dir = tmp_path / "baseline"
    shutil.copytree(fitted_baseline[0], baseline_dir)
    build_blend([baseline_dir], tmp_path / "blend", progress=False)
    meta = json.loads((baseline_dir / "baseline.json").read_text())
    meta["note"] = "retrained"
    (baseline_dir / "baseline.json").write_text(json.dumps(meta))
    with pytest.raises(BlendError, match="has changed"):
        predict_blend_submission(tmp_path / "blend", tmp_path / "a.zip", progress=False)


def test_a_tampered_blend_file_is_one_clear_error(tmp_path):
    (tmp_path / "blend.json").write_text(json.dumps({"format": 1, "members": [], "tasks": {"ocnli": {}}}))
    with pytest.raises(BlendError, match="not a blend file"):
        Blend.load(tmp_path)


def test_a_one_task_run_blends_with_a_baseline_of_all_tasks(tiny_run, fitted_baseline, tmp_path):
    run_dir = tiny_run("tnews-only", "data.tasks=[tnews]")
    blend = build_blend([run_dir, fitted_baseline[0]], tmp_path / "blend", progress=False)
    assert list(blend.tasks) == ["ocnli", "ocemotion", "tnews"]   # the splits agree task by task
    assert blend.tasks["tnews"].members == ["tnews-only", fitted_baseline[0].name]
    assert blend.tasks["ocnli"].members == [fitted_baseline[0].name]


def test_blend_settings_and_a_corrupt_dev_file_are_clear_errors(fitted_baseline, tmp_path):
    from clue_mtl.predict.blend import FitSettings, evaluate_blend

    with pytest.raises(BlendError, match="folds >= 2"):
        FitSettings(folds=1)
    build_blend([fitted_baseline[0]], tmp_path / "blend", progress=False)
    (tmp_path / "blend" / "dev.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(BlendError, match="cannot read"):
        evaluate_blend(tmp_path / "blend")


# ----------------------------------------------------------------------------- a kill while saving
def made_blend(weight: float) -> Blend:
    """A one-task blend built by hand: no members or competition files needed."""
    from clue_mtl.predict.blend import FitSettings, TaskBlend

    dev = {"members": {"m": 0.5}, "blend": {"in_sample": 0.5, "cross_fitted": 0.4},
           "biased": {"in_sample": 0.6, "cross_fitted": 0.45}, "rows": 3}
    return Blend([{"name": "m", "kind": "run", "path": "/nowhere/m", "fingerprint": "0123456789abcdef"}],
                 {"ocnli": "fedcba9876543210"}, {"ocnli": TaskBlend("ocnli", ["m"], np.array([weight]), np.zeros(3))},
                 {"ocnli": dev}, FitSettings())


@pytest.mark.parametrize("kill", ["dev file", "rename 1", "rename 2", "removal"])
def test_a_kill_while_a_blend_is_saved_again_keeps_the_previous_one(kill, tmp_path, killed_at):
    """Killed at its first file or at either rename of the swap, the folder still loads as the
    previous blend (not "holds no blend"), with its own dev arrays; killed after the swap, as the new one."""
    import safetensors.numpy

    from clue_mtl import atomic

    folder = tmp_path / "blend"
    blends = {version: made_blend(float(version)) for version in (1, 2, 3)}

    def save(version: int) -> None:
        blends[version].save(folder, {"ocnli/gold": np.full(3, version, dtype=np.int64)})

    def loaded_version() -> int:
        version = int(Blend.load(folder).tasks["ocnli"].weights[0])
        assert Blend.load(folder).to_dict() == blends[version].to_dict()
        assert (safetensors.numpy.load_file(folder / "dev.safetensors")["ocnli/gold"] == version).all()
        return version

    save(1)
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "report.txt").write_text("evaluated")
    module, name, number = {"dev file": (safetensors.numpy, "save_file", 1), "rename 1": (atomic, "_rename", 1),
                            "rename 2": (atomic, "_rename", 2), "removal": (atomic, "_remove_tree", 3)}[kill]
    with killed_at(module, name, number):
        save(2)
    assert loaded_version() == (2 if kill == "removal" else 1)
    save(3)
    assert loaded_version() == 3
    assert (folder / "evaluation" / "report.txt").read_text() == "evaluated"  # what the save does not write stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blend"]
    assert sorted(p.name for p in folder.iterdir()) == ["blend.json", "dev.safetensors", "evaluation"]
