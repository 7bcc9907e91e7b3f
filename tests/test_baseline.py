import pytest

from clue_mtl.predict.baseline import BaselineRun, run_baseline
from clue_mtl.predict.submission import read_submission
from clue_mtl.tasks import TASK_NAMES


def test_baseline_on_a_small_slice_writes_two_valid_zips_and_its_folder(data_dir, tmp_path, capsys):
    result = run_baseline(data_dir, out_dir=tmp_path / "subs", max_rows=300, run_dir=tmp_path / "baseline")
    assert set(result["zips"]) == {"a", "b"}
    assert list(result["reports"]) == list(TASK_NAMES)
    # each generated label has its own marker character, which the character n-grams find
    assert all(report["macro_f1"] > 0.9 for report in result["reports"].values())
    assert result["mean"] == pytest.approx(sum(r["macro_f1"] for r in result["reports"].values()) / 3)
    for split, path in result["zips"].items():
        assert path == tmp_path / "subs" / f"baseline_test_{split}.zip"
        submission = read_submission(path)
        assert {name: len(frame) for name, frame in submission.items()} == \
            {name: 60 for name in TASK_NAMES}
    first_ocnli_b_id = read_submission(result["zips"]["b"])["ocnli"]["id"].iloc[0]
    assert first_ocnli_b_id == "1000"  # id_mode "file": the test file's own ids (the generated B's)
    out = capsys.readouterr().out
    assert "[baseline 3/3] tnews: train 300 rows" in out
    assert "baseline saved to" in out
    loaded = BaselineRun.load(tmp_path / "baseline")
    assert loaded.tasks == list(TASK_NAMES)
    assert loaded.info["dev_mean_macro_f1"] == result["mean"]


# ----------------------------------------------------------------------------- a kill while saving
def fitted_models(C: float) -> dict:
    """An OCEMOTION baseline fitted on generated rows (no competition files needed)."""
    import pandas as pd

    from clue_mtl.predict.baseline import BaselineModel
    from clue_mtl.tasks import get_task

    labels = get_task("ocemotion").labels
    rows = [(str(i), f"{labels[i % 7]}样本{i % 3}{labels[(i + 1) % 7]}", labels[i % 7]) for i in range(70)]
    frame = pd.DataFrame(rows, columns=["id", "text_a", "label"])
    return {"ocemotion": BaselineModel("ocemotion", C=C).fit(frame)}


def save(run_dir, models, version: int):
    from clue_mtl.predict.baseline import save_baseline

    reports = {"ocemotion": {"macro_f1": version / 10}}
    save_baseline(run_dir, models, {"ocemotion": ["1", "2"]}, {"version": version}, reports)


def loaded_version(run_dir, models_by_version: dict) -> int:
    """The version the folder holds, its model files checked to be that version's."""
    import numpy as np

    loaded = BaselineRun.load(run_dir)
    version = loaded.info["settings"]["version"]
    np.testing.assert_array_equal(loaded.models["ocemotion"].coef, models_by_version[version]["ocemotion"].coef)
    return version


@pytest.mark.parametrize("kill", ["model file", "rename 1", "rename 2", "removal"])
def test_a_kill_while_a_baseline_is_saved_again_keeps_the_previous_one(kill, tmp_path, killed_at):
    """Killed at the first model file or at either rename of the swap, the folder still loads as the
    previous baseline (not "holds no baseline"); killed after the swap, as the new one."""
    from clue_mtl import atomic
    from clue_mtl.predict import baseline

    versions = {1: fitted_models(C=1.0), 2: fitted_models(C=0.01), 3: fitted_models(C=100.0)}
    run_dir = tmp_path / "baseline"
    save(run_dir, versions[1], 1)
    name, number = {"model file": ("save_file", 1), "rename 1": ("_rename", 1), "rename 2": ("_rename", 2),
                     "removal": ("_remove_tree", 3)}[kill]
    with killed_at(baseline if name == "save_file" else atomic, name, number):
        save(run_dir, versions[2], 2)
    assert loaded_version(run_dir, versions) == (2 if kill == "removal" else 1)
    save(run_dir, versions[3], 3)  # the next save works, and sweeps what the kill left
    assert loaded_version(run_dir, versions) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline"]
    assert {p.suffix for p in run_dir.iterdir()} == {".json", ".safetensors"}  # no lock file left behind
