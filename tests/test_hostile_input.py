"""Findings 4 to 7 of the hostile-user probe (issue 11), one test or more each.

(Findings 1 to 3, pickle, kills and run folders, are in test_checkpoint.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from clue_mtl.cli import main
from clue_mtl.config import ConfigError, load_config, save_config
from clue_mtl.errors import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- 4: settings that cannot train
@pytest.mark.parametrize("override, message", [
    ("train.lr=.nan", "train.lr: expected a finite number"),
    ("train.lr=-1e-5", "train.lr must not be negative"),
    ("train.head_lr=-1", "train.head_lr must not be negative"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio must lie in"),
    ("train.weight_decay=-0.01", "train.weight_decay must not be negative"),
    ("train.warmup_ratio=1e309", "train.warmup_ratio: expected a finite number"),
    ("distill.temperature=.inf", "distill.temperature: expected a finite number"),
    ("train.seed=4294967296", "train.seed must lie in"),
    ("weighting.params={gamma: .nan}", "weighting.params.gamma: expected a finite number"),
])
def test_settings_that_cannot_train_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_warmup_of_1e309_in_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train:\n  warmup_ratio: 1e309\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "train.warmup_ratio: expected a finite number" in one_error_line(capsys)


def test_a_diverging_run_stops_naming_step_and_task_and_keeps_no_best(tiny_config, small_data_dir, tmp_path):
    from clue_mtl.recipes.multitask import Trainer

    config = tiny_config(f"data.data_dir={small_data_dir}", "data.dev_fraction=0.2", "train.lr=1e30",
                         "train.head_lr=1e30", "train.warmup_ratio=0.0", "train.grad_clip=0.0")
    trainer = Trainer(config, tmp_path / "run", show_progress=False)
    with pytest.raises(TrainingDiverged, match=r"step 2: non-finite loss \((ocnli|ocemotion|tnews) "):
        trainer.train()
    assert not (tmp_path / "run/best").exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


# ----------------------------------------------------------------------------- 5: YAML alias bombs
BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, n in zip([None, *"abcdefgh"], "abcdefghi"))


def test_an_alias_bomb_is_refused_at_once_in_a_config_and_a_run_folder(tmp_path, capsys):
    assert len(BOMB) < 400  # 9 levels of 9 aliases: 9**9 (387 million) strings once expanded
    (tmp_path / "bomb.yaml").write_text(BOMB)
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best/model.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text(BOMB)
    started = time.perf_counter()
    assert main(["train", "--config", str(tmp_path / "bomb.yaml")]) == 2
    assert "aliases (*a) are not allowed" in one_error_line(capsys)
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "x.zip")]) == 2
    assert f"{run / 'config.yaml'}:2: YAML aliases" in one_error_line(capsys)
    assert time.perf_counter() - started < 5


def test_soft_label_teachers_configs_are_read_boundedly(tmp_path):
    from clue_mtl.training.distill import _teacher_record

    (tmp_path / "config.yaml").write_text(BOMB)
    with pytest.raises(ConfigError, match="aliases"):
        _teacher_record(tmp_path, ["tnews"])


# ----------------------------------------------------------------------------- 6: one line, exit 2
def submission_with(path: Path, line: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for member in ("ocnli_predict.json", "ocemotion_predict.json", "tnews_predict.json"):
            archive.writestr(member, b'{"id": "0", "label": "0"}\n' + line + b"\n")


@pytest.mark.parametrize("line, message", [
    (b'{"id": ' + b"7" * 5000 + b', "label": "0"}', "line 2: not a submission line"),
    (b"[" * 50000 + b"]" * 50000, "line 2: not a submission line (nested too deeply)"),
])
def test_hostile_submission_lines_are_one_line_errors(tmp_path, capsys, line, message):
    submission_with(tmp_path / "s.zip", line)
    (tmp_path / "gold.csv").write_text("0\ta\tb\t0\n")
    assert main(["score", str(tmp_path / "s.zip"), "--gold", f"ocnli={tmp_path / 'gold.csv'}"]) == 2
    assert message in one_error_line(capsys)


def test_gold_specs_name_a_known_task_once(tmp_path, capsys):
    assert main(["score", "x.zip", "--gold", f"foo={tmp_path}"]) == 2
    assert "unknown task 'foo'" in one_error_line(capsys)
    assert main(["score", "x.zip", "--gold", "ocnli=a.csv", "--gold", "OCNLI=b.csv"]) == 2
    assert "names ocnli twice" in one_error_line(capsys)


@pytest.mark.parametrize("text, message", [
    (b"train:\n  1: 2\n", ":2: key '1' is not a name (YAML reads it as int)"),
    (b"yes: 1\n", ":1: key 'yes' is not a name (YAML reads it as bool)"),
    (b"train:\n  lr: [1, 2\n", ":3: not valid YAML (expected ',' or ']'"),
    (b"name: caf\xe9\n", ":1: not UTF-8 (byte 0xe9)"),
    (b"train:\n  lr: 1\n  lr: 2\n", ":3: key 'lr' is given twice"),
])
def test_yaml_that_is_not_a_config_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_bytes(text)
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert f"{tmp_path / 'c.yaml'}{message}" in one_error_line(capsys)


def test_an_encoder_that_is_a_file_is_one_line(tmp_path, capsys, data_dir):
    (tmp_path / "weights.bin").write_bytes(b"x")
    argv = ["train", "--set", f"model.encoder={tmp_path / 'weights.bin'}", "--set", f"data.data_dir={data_dir}",
            "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "is a file; pass a model folder" in one_error_line(capsys)


def test_an_unreadable_data_folder_is_one_line(tmp_path, monkeypatch, capsys):
    from clue_mtl.data import folder as data

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.Path, "iterdir", refuse)  # as root, chmod 000 would not stop a read
    assert main(["check-data", "--data-dir", str(tmp_path)]) == 2
    assert "cannot list the data folder (Permission denied)" in capsys.readouterr().err


def test_resume_with_a_changed_learning_rate_is_one_line(tiny_config, tmp_path, capsys):
    config = tiny_config("train.steps=2", "train.eval_every=2")
    save_config(config, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"), "--resume",
            "--set", "train.lr=0.5"]
    assert main(argv) == 2
    assert "another config (train.lr: 0.001 -> 0.5)" in one_error_line(capsys)
    assert main(argv[:-3] + ["--set", "train.steps=4"]) == 2  # a fresh start over it is refused too
    assert main(argv[:-2]) == 0  # the same config: resumes (the run is finished: nothing to do)


def test_an_internal_fault_is_one_line_and_exit_1(monkeypatch, capsys):
    from clue_mtl import cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_check_data", broken)
    assert main(["check-data"]) == 1
    assert one_error_line(capsys).startswith("error: internal error ZeroDivisionError: division by zero")


def test_error_exits_do_not_import_torch(tmp_path):
    """A one-line error costs no torch import (5 s and 512 MB before)."""
    (tmp_path / "bomb.yaml").write_text(BOMB)
    script = (
        "import sys\nfrom clue_mtl.cli import main\n"
        f"codes = [main(['score', 'missing.zip', '--gold', 'foo=x']), main(['train', '--set', 'train.lr=-1']),\n"
        f"         main(['train', '--config', {str(tmp_path / 'bomb.yaml')!r}]), main(['check-data', '--data-dir', 'nowhere']),\n"
        f"         main(['score', 'missing.zip', '--gold', 'ocnli=nowhere.csv'])]\n"
        "assert codes == [2, 2, 2, 2, 2], codes\nassert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("error: ") == 4 and "Traceback" not in result.stderr
    assert "nowhere: data folder not found" in result.stderr  # check-data lists problems without the prefix


# ----------------------------------------------------------------------------- 7: leftovers and vague messages
def test_a_killed_writers_temporary_file_is_swept(tmp_path):
    from clue_mtl.predict.submission import write_submission
    from clue_mtl.tasks import TASKS

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".a.zip.{dead.stdout.strip()}.k3x9q2.tmp"  # what kill -9 of that process left
    leftover.write_bytes(b"half a zip")
    foreign = tmp_path / f".a.zip.{os.getpid()}.live.tmp"  # a live writer's: kept
    foreign.write_bytes(b"being written")
    import pandas as pd

    frames = {name: pd.DataFrame({"id": ["0"]}) for name in TASKS}
    write_submission({name: [TASKS[name].labels[0]] for name in TASKS}, frames, tmp_path / "a.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.zip", foreign.name])


@pytest.mark.parametrize("make, message", [
    (lambda path: path.mkdir(), "is a folder, not a file"),
    (lambda path: os.mkfifo(path), "not a regular file (a FIFO"),
    (lambda path: path.symlink_to(path.name), "cannot open the file (Too many levels of symbolic links)"),
])
def test_a_data_file_that_is_not_a_file_says_what_it_is(tmp_path, capsys, make, message):
    make(tmp_path / "OCNLI_train1128.csv")
    assert main(["check-data", "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'OCNLI_train1128.csv'}: {message}" in capsys.readouterr().err


def test_two_case_variants_of_a_file_name_are_ambiguous(tmp_path, capsys):
    (tmp_path / "ocnli_train1128.csv").write_text("0\ta\tb\t0\n")
    (tmp_path / "OCNLI_TRAIN1128.csv").write_text("0\ta\tb\t0\n")
    assert main(["check-data", "--data-dir", str(tmp_path)]) == 2
    assert "ambiguous: OCNLI_TRAIN1128.csv, ocnli_train1128.csv" in capsys.readouterr().err


@pytest.mark.parametrize("row, message", [
    ("1 2\tok\t0", "id '1 2' contains U+0020 (SPACE)"),
    ("\ufeff12\tok\t0", "id '\\ufeff12' contains U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
])
def test_ids_that_cannot_be_right_are_refused(tmp_path, row, message):
    from clue_mtl.data.folder import DataError, read_task_file

    path = tmp_path / "TNEWS_train1128.csv"
    path.write_bytes(f"0\tfine\t100\r\n{row.replace(chr(9) + '0', chr(9) + '100')}\r\n".encode())
    with pytest.raises(DataError) as caught:
        read_task_file(path, "tnews", labelled=True)
    assert f"{path}:2: {message}" in str(caught.value)


@pytest.mark.parametrize("row, message, kept", [
    ("3\t\u200b\u00ad\t0", "text is empty after normalisation (only invisible characters) (row skipped)", False),
    ("4\tab\x00c\t0", "text contains the control character U+0000 (NUL) at column 3, made a space (kept)", True),
    ("5\tab\rc\t0", "text contains the control character U+000D (CARRIAGE RETURN) at column 3, made a space (kept)",
     True),
])
def test_training_texts_are_mended_or_skipped_with_a_warning(tmp_path, row, message, kept):
    from clue_mtl.data.folder import DataError, DataWarning, read_task_file

    path = tmp_path / "TNEWS_train1128.csv"
    path.write_bytes(f"0\tfine\t100\r\n{row.replace(chr(9) + '0', chr(9) + '100')}\r\n".encode())
    with pytest.warns(DataWarning) as caught:
        frame = read_task_file(path, "tnews", labelled=True)
    assert str(caught[0].message) == f"{path}:2: {message}"
    assert len(frame) == 1 + kept and (not kept or frame["text_a"][1] == "ab c")
    with pytest.raises(DataError):  # `check-data --strict`'s reading
        read_task_file(path, "tnews", labelled=True, strict=True)


def test_a_repeated_test_file_for_one_task_is_refused(capsys):
    assert main(["predict", "--run", "r", "--out", "x.zip", "--test", "tnews=a", "--test", "tnews=b"]) == 2
    assert "--test names tnews twice" in one_error_line(capsys)
