"""Hostile run, baseline and blend folders (issue 34): a folder a user downloaded is input.

Each finding of the probe is a test that hung, ate memory without bound or ended in an internal
error before `clue_mtl/untrusted.py`; now each is one `error: ...` line naming the file, exit 2.
Reads that could hang or eat memory run under `bounded` (an alarm, and an address-space limit),
or in a subprocess with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clue_mtl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPARSE_SIZE = 50 * 2**30


class Hung(BaseException):
    """The alarm rang: a read that should have been refused at once is still waiting.
    A BaseException, so the command line's catch-all does not turn it into an exit status."""


@contextlib.contextmanager
def bounded(seconds: int = 60, headroom: int = 4 << 30):
    """Fail rather than hang or eat the machine: SIGALRM after `seconds`, and at most `headroom`
    bytes of address space more than now, so reading /dev/zero ends in a MemoryError."""
    def ring(signum, frame):
        raise Hung(f"still running after {seconds} s")

    in_use = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmSize:"))) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = in_use + headroom if hard == resource.RLIM_INFINITY else min(in_use + headroom, hard)
    previous = signal.signal(signal.SIGALRM, ring)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refused(argv: list[str], capsys) -> str:
    """Run the command under `bounded`; it must end with exit 2 and one `error:` line, the last."""
    with bounded():
        code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-2000:]
    return errors[0]


# ----------------------------------------------------------------------------- folders to spoil
@pytest.fixture(scope="module")
def trained_run(data_dir, tiny_bert, tmp_path_factory) -> Path:
    from clue_mtl.config import load_config
    from clue_mtl.recipes.multitask import train

    root = tmp_path_factory.mktemp("hostile-run")
    config = load_config(overrides=[
        f"data.data_dir={data_dir}", f"model.encoder={tiny_bert}", f"output_dir={root}", "name=run",
        "data.max_train_rows=48", "data.max_dev_rows=24", "data.max_length=32", "train.steps=2",
        "train.batch_size=9", "train.eval_every=2", "train.lr=1e-3"])
    return train(config, show_progress=False).run_dir


@pytest.fixture(scope="module")
def fitted_baseline(small_data_dir, tmp_path_factory) -> Path:
    from clue_mtl.predict.baseline import run_baseline

    run_dir = tmp_path_factory.mktemp("hostile-baseline") / "baseline"
    run_baseline(small_data_dir, out_dir=None, run_dir=run_dir, progress=False)
    return run_dir


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A copy of the trained run, this test's to spoil."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture
def baseline(fitted_baseline, tmp_path) -> Path:
    return Path(shutil.copytree(fitted_baseline, tmp_path / "baseline"))


def replace_with_link(path: Path, target: str | Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def replace_with_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def rewrite_json(path: Path, change) -> None:
    values = json.loads(path.read_text(encoding="utf-8"))
    change(values)
    path.write_text(json.dumps(values), encoding="utf-8")


def blend_of(member: Path, out: Path) -> Path:
    """A blend folder over one member, written by hand (fitting one predicts the whole dev split):
    Blend.load accepts it, and `predict --blend` reaches the member's fingerprint."""
    from clue_mtl.predict.blend import BLEND_FILE, Blend, FitSettings, TaskBlend, member_fingerprint

    dev = {"members": {member.name: 0.5}, "blend": {"in_sample": 0.5, "cross_fitted": 0.5},
           "biased": {"in_sample": 0.5, "cross_fitted": 0.5}, "rows": 10}
    blend = Blend([{"name": member.name, "kind": "run", "path": str(member.resolve()),
                    "fingerprint": member_fingerprint(member)}], {"tnews": "0" * 16},
                  {"tnews": TaskBlend("tnews", [member.name], np.ones(1), np.zeros(15))}, {"tnews": dev},
                  FitSettings())
    out.mkdir(parents=True)
    (out / BLEND_FILE).write_text(json.dumps(blend.to_dict()), encoding="utf-8")
    Blend.load(out)  # the hand-made folder is a blend
    return out


# ----------------------------------------------------------------------------- memory without bound, and hangs
@pytest.mark.parametrize("name, spoil", [
    ("labels.json", lambda path: replace_with_link(path, "/dev/zero")),
    ("best/model.json", lambda path: replace_with_link(path, "/dev/zero")),
    ("labels.json", replace_with_fifo),
], ids=["labels-dev-zero", "model-json-dev-zero", "labels-fifo"])
def test_predict_refuses_a_run_file_that_is_a_device_or_a_fifo(run, tmp_path, capsys, name, spoil):
    spoil(run / name)
    line = refused(["predict", "--run", str(run), "--out", str(tmp_path / "a.zip")], capsys)
    assert f"{run / name}: not a regular file" in line


def test_predict_refuses_a_sparse_50_gb_labels_file_at_once(run, tmp_path, capsys):
    labels = run / "labels.json"
    with open(labels, "r+b") as handle:
        handle.truncate(SPARSE_SIZE)  # holes: no disk used
    try:
        line = refused(["predict", "--run", str(run), "--out", str(tmp_path / "a.zip")], capsys)
    finally:
        labels.unlink()
    assert f"{labels}: {SPARSE_SIZE:,} bytes, more than" in line


def test_evaluate_refuses_a_split_file_that_is_a_fifo(run, capsys):
    replace_with_fifo(run / "split.json")
    assert f"{run / 'split.json'}: not a regular file (a FIFO)" in refused(["evaluate", "--run", str(run)], capsys)


def test_evaluate_refuses_a_metrics_log_linked_to_dev_zero(run, capsys):
    rewrite_json(run / "split.json", lambda ids: ids.update({task: ids[task][:12] for task in ids}))  # quick to score
    replace_with_link(run / "metrics.jsonl", "/dev/zero")  # read for the training curves, after the scores
    line = refused(["evaluate", "--run", str(run)], capsys)
    assert f"{run / 'metrics.jsonl'}: not a regular file (a character device)" in line


def test_a_fifo_in_the_tokenizer_folder_is_refused_not_skipped(run, tmp_path, capsys):
    os.mkfifo(run / "tokenizer" / "added_tokens.json")  # transformers would pass over it as missing
    line = refused(["predict", "--run", str(run), "--out", str(tmp_path / "a.zip")], capsys)
    assert f"{run / 'tokenizer' / 'added_tokens.json'}: not a regular file (a FIFO)" in line


@pytest.mark.slow
def test_a_sparse_50_gb_tokenizer_file_is_refused_at_once(run, tmp_path):
    """The tokenizers library reads tokenizer.json in Rust, which aborts the process when an
    allocation fails: a subprocess, with a timeout and at most 16 GB of address space."""
    tokenizer_file = run / "tokenizer" / "tokenizer.json"
    with open(tokenizer_file, "r+b") as handle:
        handle.truncate(SPARSE_SIZE)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "clue_mtl", "predict", "--run", str(run), "--out", str(tmp_path / "a.zip")],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30)))
    finally:
        tokenizer_file.unlink()
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"{tokenizer_file}: {SPARSE_SIZE:,} bytes, more than the {64 << 20:,}" in last_line


@pytest.mark.parametrize("name, spoil", [
    ("notes.json", lambda path: replace_with_link(path, "/dev/zero")),
    ("config.yaml", replace_with_fifo),
], ids=["json-dev-zero", "config-fifo"])
def test_predict_blend_refuses_a_member_holding_a_device_or_a_fifo(run, tmp_path, capsys, name, spoil):
    blend = blend_of(run, tmp_path / "blend")
    spoil(run / name)  # member_fingerprint digests every *.json and config.yaml of the member
    line = refused(["predict", "--blend", str(blend), "--out", str(tmp_path / "a.zip")], capsys)
    assert f"{run / name}: not a regular file" in line


def test_blend_refuses_a_run_member_holding_a_fifo(run, tmp_path, capsys):
    rewrite_json(run / "split.json", lambda ids: ids.update({task: ids[task][:12] for task in ids}))  # quick to predict
    os.mkfifo(run / "notes.json")  # read by nothing but the fingerprint, taken after the dev predictions
    line = refused(["blend", "--run", str(run), "--out", str(tmp_path / "blend")], capsys)
    assert f"{run / 'notes.json'}: not a regular file (a FIFO)" in line
    assert not (tmp_path / "blend" / "blend.json").exists()


def test_the_fingerprint_refuses_a_fifo_among_the_weights_rather_than_skip_it(run):
    from clue_mtl.predict.blend import BlendError, member_fingerprint

    os.mkfifo(run / "best" / "extra.safetensors")
    with bounded(), pytest.raises(BlendError, match="extra.safetensors: not a regular file"):
        member_fingerprint(run)


@pytest.mark.parametrize("name, spoil", [
    ("baseline.json", lambda path: replace_with_link(path, "/dev/zero")),
    ("tnews.json", replace_with_fifo),
], ids=["description-dev-zero", "vocabulary-fifo"])
def test_blend_refuses_a_baseline_file_that_is_a_device_or_a_fifo(baseline, tmp_path, capsys, name, spoil):
    spoil(baseline / name)
    line = refused(["blend", "--baseline", str(baseline), "--out", str(tmp_path / "blend")], capsys)
    assert f"{baseline / name}: not a regular file" in line


def test_predict_blend_refuses_a_blend_file_that_is_a_fifo(tmp_path, capsys):
    os.mkfifo(tmp_path / "blend.json")
    line = refused(["predict", "--blend", str(tmp_path), "--out", str(tmp_path / "a.zip")], capsys)
    assert f"{tmp_path / 'blend.json'}: not a regular file (a FIFO)" in line


# ----------------------------------------------------------------------------- files that do not parse
def not_json(path: Path) -> None:
    (path.parent / "notes.txt").write_text("not JSON\n")
    replace_with_link(path, path.parent / "notes.txt")


def not_safetensors(path: Path) -> None:
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + b"\x00" * 64)


def set_meta(key: str, value):
    def change(values: dict) -> None:
        if key == "model_type":
            values["encoder_config"]["model_type"] = value
        else:
            values[key] = value
    return lambda path: rewrite_json(path, change)


@pytest.mark.parametrize("name, spoil, named, message", [
    ("labels.json", not_json, "labels.json", "not valid JSON"),
    ("tokenizer/tokenizer.json", not_json, "tokenizer", "not a tokenizer folder"),
    ("best/model.safetensors", not_safetensors, "best/model.safetensors", "not a safetensors file"),
    ("best/model.json", set_meta("model_type", "evil"), "best/model.json", "'evil' is not a model type"),
    ("best/model.json", set_meta("task_labels", "all"), "best/model.json", "task_labels must map each task"),
    ("best/model.json", set_meta("heads", {"tnews": {"type": "mlp", "hidden": 10**9}}), "best/model.json",
     "heads must map each task"),
    ("labels.json", lambda path: path.write_text('{"tnews": ["a", "b"]}'), "labels.json", "with its own labels"),
], ids=["labels-not-json", "tokenizer-not-json", "weights-not-safetensors", "model-type-evil", "task-labels-all",
        "heads-of-other-tasks", "labels-of-another-task"])
def test_run_files_that_do_not_parse_are_one_line_naming_the_file(run, tmp_path, capsys, name, spoil, named, message):
    spoil(run / name)
    line = refused(["predict", "--run", str(run), "--out", str(tmp_path / "a.zip")], capsys)
    assert line.startswith(f"error: {run / named}: ") and message in line, line


def test_a_head_of_a_billion_units_is_refused_before_it_is_built(run, tmp_path, capsys):
    def enormous(values: dict) -> None:
        task = next(iter(values["heads"]))
        values["heads"][task] = {"type": "mlp", "features": "last", "pooling": "mean", "samples": 1, "hidden": 10**9}
    rewrite_json(run / "best" / "model.json", enormous)
    line = refused(["predict", "--run", str(run), "--out", str(tmp_path / "a.zip")], capsys)
    assert f"{run / 'best' / 'model.json'}: model.heads." in line and "hidden must lie in" in line


def test_weights_of_another_shape_are_refused_from_the_header(run, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    weights = run / "best" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = np.zeros((3, 3), dtype=np.float32)
    save_file(tensors, str(weights))
    line = refused(["predict", "--run", str(run), "--out", str(tmp_path / "a.zip")], capsys)
    assert f"{weights}: not this model's weights ({name} [3, 3]" in line


def test_baseline_weights_that_are_not_safetensors_name_the_file(baseline, tmp_path, capsys):
    not_safetensors(baseline / "ocnli.safetensors")
    line = refused(["blend", "--baseline", str(baseline), "--out", str(tmp_path / "blend")], capsys)
    assert f"{baseline / 'ocnli.safetensors'}: not a safetensors file" in line


# ----------------------------------------------------------------------------- the reader itself
def test_the_reader_refuses_without_reading_and_imports_nothing_heavy(tmp_path):
    from clue_mtl.errors import RunFolderError
    from clue_mtl.untrusted import read_json

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.json").write_bytes(b'{"a": "caf\xe9"}')
    (tmp_path / "link").symlink_to(tmp_path / "link")
    expected = {"fifo": "not a regular file (a FIFO)", "nested.json": "not valid JSON (nested too deeply)",
                "latin1.json": "not UTF-8 (byte 0xe9)", "link": "cannot be read (Too many levels of symbolic links)",
                "missing.json": "missing; expected the labels"}
    for name, message in expected.items():
        with bounded(), pytest.raises(RunFolderError) as caught:
            read_json(tmp_path / name, what="labels", error=RunFolderError)
        assert str(caught.value).startswith(f"{tmp_path / name}: {message}")
    script = ("import sys, clue_mtl.untrusted\n"
              "assert not {'torch', 'transformers', 'safetensors', 'numpy'} & set(sys.modules), sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
