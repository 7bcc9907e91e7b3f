"""Checkpoints: no pickle is ever loaded, no kill strands a run, a run folder holds one run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clue_mtl.runs import checkpoint
from clue_mtl.config import save_config
from clue_mtl.errors import CheckpointError, ConfigError, RunFolderError
from clue_mtl.runs.folder import RunFolder
from clue_mtl.recipes.multitask import Trainer

FILE_OPERATIONS = ("_make_dir", "_write_bytes", "_write_model", "_rename", "_remove_tree")


@pytest.fixture
def small_config(tiny_config, small_data_dir):
    """Four steps, a checkpoint at steps 2 and 4, on 200 rows per task."""
    return lambda *overrides: tiny_config(f"data.data_dir={small_data_dir}", "train.steps=4", "train.eval_every=2",
                                          "data.dev_fraction=0.2", *overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return RunFolder(run_dir).metrics(timings=False)


def same_tensors(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- no pickle
class Payload:
    """Unpickling this writes `marker`: what a stranger's run folder could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


LEGACY_FILES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                "scheduler.bin", "pytorch_model.bin", "scaler.pt")


def plant(path: Path, marker: Path) -> None:
    if path.suffix in (".bin", ".pt", ".pkl"):
        torch.save(Payload(marker), path)  # what torch.load(weights_only=False) would run
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_a_payload_in_any_file_a_resume_reads_runs_nothing(small_config, tmp_path):
    config = small_config()
    original = tmp_path / "original"
    Trainer(config, original, show_progress=False).train(until_step=2)
    names = sorted(p.name for p in (original / "checkpoint-2").iterdir())
    assert names == ["COMPLETE", "model.safetensors", "rng-0.safetensors", "state.safetensors", "trainer_state.json"]
    outcomes = {}
    for target in [*names, *LEGACY_FILES, "legacy-folder", "config.yaml"]:
        run, marker = tmp_path / f"run-{target}", tmp_path / f"ran-{target}"
        shutil.copytree(original, run)
        folder = run / "checkpoint-2"
        if target == "legacy-folder":  # Accelerate's layout, as kit versions up to 0.1 wrote it
            (run / "checkpoint").mkdir()
            (run / "checkpoint/trainer_state.json").write_text('{"step": 2}')
            for name in LEGACY_FILES:
                plant(run / "checkpoint" / name, marker)
        elif target == "config.yaml":
            (run / target).write_text(f"name: !!python/object/apply:exec [\"open({str(marker)!r}, 'w')\"]\n")
        else:
            plant(folder / target, marker)
            manifest = json.loads((folder / "COMPLETE").read_text()) if target != "COMPLETE" else None
            if manifest is not None and target in manifest["files"]:  # sizes right: the loader reads it
                manifest["files"][target] = (folder / target).stat().st_size
                (folder / "COMPLETE").write_text(json.dumps(manifest))
        try:
            Trainer(config, run, resume=True, show_progress=False).train()
            outcomes[target] = "resumed"
        except (CheckpointError, ConfigError) as error:
            outcomes[target] = type(error).__name__
        assert not marker.exists(), f"{target}: the payload ran"
    # a poisoned file a resume reads is refused; files it does not read are ignored
    assert outcomes == {"COMPLETE": "CheckpointError", "model.safetensors": "CheckpointError",
                        "rng-0.safetensors": "CheckpointError", "state.safetensors": "CheckpointError",
                        "trainer_state.json": "CheckpointError", **{name: "resumed" for name in LEGACY_FILES},
                        "legacy-folder": "resumed", "config.yaml": "ConfigError"}


def test_a_checkpoint_holds_no_pickle(small_config, tmp_path):
    trainer = Trainer(small_config("weighting.method=uncertainty", "train.ema_decay=0.5"), tmp_path / "run",
                      show_progress=False)
    trainer.train(until_step=2)
    for path in (tmp_path / "run/checkpoint-2").iterdir():
        data = path.read_bytes()
        assert b"\x80\x02" not in data[:2] and not data.startswith(b"PK"), path.name  # neither pickle nor torch.save
    state = checkpoint._read_state(tmp_path / "run/checkpoint-2/state.safetensors")
    assert set(state) == {"optimizer", "scheduler", "weighting", "weighting_optimizer", "ema", "accelerator_step"}
    assert torch.equal(state["weighting"]["log_variances"], trainer.weighting.log_variances.detach())


# ----------------------------------------------------------------------------- kills
class Killed(BaseException):
    """A simulated kill -9: not an Exception, so no handler of the kit catches it."""


def kill_at(monkeypatch, number: int | None, log: list) -> None:
    """Kill the `number`-th file operation of the save at step 4 half done, and every later one.

    A write leaves half its bytes, a removal deletes one file of a folder; a folder creation or a
    rename (atomic) does not happen. `number=None` counts the operations without killing.
    """
    armed = []
    original_save = checkpoint.save_checkpoint

    def save(run_dir, step, **kwargs):
        armed.append(step == 4)
        return original_save(run_dir, step, **kwargs)

    def wrap(name, operation):
        def killable(*args):
            if not armed or not armed[-1]:
                return operation(*args)
            log.append((name, Path(args[-1] if name == "_write_model" else args[0]).name))
            if number is None or len(log) < number:
                return operation(*args)
            if len(log) == number:
                half_done(name, args)
            raise Killed(f"killed at {name}")
        return killable

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    for name in FILE_OPERATIONS:
        monkeypatch.setattr(checkpoint, name, wrap(name, getattr(checkpoint, name)))


def half_done(name: str, args) -> None:
    if name == "_write_bytes":
        path, data = args
        path.write_bytes(data[: len(data) // 2])
    elif name == "_write_model":
        args[1].write_bytes(b"\x00" * 64)
    elif name == "_remove_tree" and args[0].is_dir():
        files = sorted(p for p in args[0].iterdir() if p.is_file())
        if files:
            files[0].unlink()


def test_no_kill_during_the_checkpoint_swap_strands_the_run(small_config, tmp_path, monkeypatch, capsys):
    """Kill the save at every one of its file operations: resume finishes with the same weights."""
    config = small_config()
    straight = tmp_path / "straight"
    Trainer(config, straight, show_progress=False).train()
    operations: list = []
    with monkeypatch.context() as patch:
        kill_at(patch, None, operations)
        Trainer(config, tmp_path / "counted", show_progress=False).train()
    assert [name for name, _ in operations] == ["_make_dir", "_write_bytes", "_write_model", "_write_bytes",
                                                "_write_bytes", "_write_bytes", "_rename", "_rename", "_remove_tree"]
    resumed = identical = 0
    for number in range(1, len(operations) + 1):
        run = tmp_path / f"killed-{number}"
        with monkeypatch.context() as patch:
            kill_at(patch, number, [])
            with pytest.raises(Killed):
                Trainer(config, run, show_progress=False).train()
        trainer = Trainer(config, run, resume=True, show_progress=False)
        trainer.train()
        resumed += trainer.state.step == 4
        same = (same_tensors(straight / "checkpoint-4/model.safetensors", run / "checkpoint-4/model.safetensors")
                and same_tensors(straight / "best/model.safetensors", run / "best/model.safetensors")
                and read_metrics(straight) == read_metrics(run))
        identical += same
        assert same, f"killed at operation {number} {operations[number - 1]}"
        assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]
    with capsys.disabled():
        print(f"\nkill test: {len(operations)} kills, {resumed} resumes finished, {identical} final weights identical")
    assert resumed == identical == len(operations)


def test_a_newest_checkpoint_missing_a_file_is_passed_over(small_config, tmp_path):
    """Finding 2: a kill left the newest checkpoint without a file; resume takes the complete older one."""
    config = small_config()
    Trainer(config, tmp_path / "straight", show_progress=False).train()
    run = tmp_path / "run"
    Trainer(config, run, show_progress=False).train(until_step=2)
    shutil.copytree(run / "checkpoint-2", tmp_path / "kept")
    Trainer(config, run, resume=True, show_progress=False).train(until_step=3)
    shutil.copytree(tmp_path / "kept", run / "checkpoint-2")
    (run / "checkpoint-3/state.safetensors").unlink()
    trainer = Trainer(config, run, resume=True, show_progress=False)
    trainer.train()
    assert trainer.state.step == 4
    assert same_tensors(tmp_path / "straight/checkpoint-4/model.safetensors", run / "checkpoint-4/model.safetensors")
    assert read_metrics(tmp_path / "straight") == read_metrics(run)


def test_only_an_incomplete_checkpoint_is_nothing_to_resume(small_config, tmp_path):
    run = tmp_path / "run"
    Trainer(small_config(), run, show_progress=False).train(until_step=2)
    (run / "checkpoint-2/rng-0.safetensors").write_bytes(b"cut")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(small_config(), run, resume=True, show_progress=False).train()


def test_a_metrics_log_cut_short_by_a_kill_resumes(small_config, tmp_path):
    run = tmp_path / "run"
    Trainer(small_config(), run, show_progress=False).train(until_step=2)
    with open(run / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "step": 3, "lo')
    trainer = Trainer(small_config(), run, resume=True, show_progress=False)
    trainer.train()
    assert [m["step"] for m in read_metrics(run) if m["kind"] == "train"] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- one run per folder
def test_a_fresh_start_refuses_a_folder_holding_a_run(small_config, tmp_path):
    """Finding 3: a new run must not start over an old one's checkpoint and best model."""
    run = tmp_path / "run"
    Trainer(small_config(), run, show_progress=False).train(until_step=2)
    with pytest.raises(RunFolderError, match="already holds a run .*--overwrite"):
        Trainer(small_config("train.lr=2e-3"), run, show_progress=False)
    assert (run / "checkpoint-2/COMPLETE").exists() and (run / "metrics.jsonl").stat().st_size > 0

    trainer = Trainer(small_config("train.lr=2e-3"), run, overwrite=True, show_progress=False)
    assert not (run / "checkpoint-2").exists() and not (run / "best").exists()
    trainer.train(until_step=1)
    assert [m["step"] for m in read_metrics(run)] == [1]


def test_resume_under_another_config_says_what_differs(small_config, tmp_path):
    run = tmp_path / "run"
    Trainer(small_config(), run, show_progress=False).train(until_step=2)
    with pytest.raises(RunFolderError, match=r"another config \(train.lr: 0.001 -> 0.002\)"):
        Trainer(small_config("train.lr=2e-3"), run, resume=True, show_progress=False)
    # the config file changed behind the checkpoint's back: its fingerprint still tells
    save_config(small_config("train.lr=2e-3"), run / "config.yaml")
    with pytest.raises(CheckpointError, match="another config"):
        Trainer(small_config("train.lr=2e-3"), run, resume=True, show_progress=False).train()
    # settings that change nothing computed may differ
    Trainer(small_config("train.num_threads=1"), tmp_path / "other", show_progress=False).train(until_step=2)
    Trainer(small_config("train.num_threads=0"), tmp_path / "other", resume=True, show_progress=False).train()


# ----------------------------------------------------------------------------- one command per folder
LOCK = ("import sys; from clue_mtl.atomic import FolderLock; lock = FolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read()")


def locks_elsewhere(folder: Path) -> bool:
    """Whether another process can take the folder's lock now."""
    import subprocess
    import sys

    code = "import sys; from clue_mtl.atomic import FolderLock; FolderLock(sys.argv[1]).acquire()"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, timeout=60).returncode == 0


def test_a_run_holds_its_folder_from_claim_to_end_and_lets_go_after(small_config, tmp_path, monkeypatch):
    """Two runs into one folder at once: the second is refused naming the first's pid, whatever
    its flags, instead of both logging every step twice; the lock goes with the run, however it ends."""
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(RunFolderError, match=rf"in use by another clue-mtl command \(pid {holder.pid} on "):
                Trainer(small_config(), run, show_progress=False, **flags)
    finally:
        holder.kill()
        holder.communicate()

    held_at_evaluations = []
    evaluate = Trainer._evaluate_and_keep_best

    def evaluate_and_try_the_lock(self, progress):
        held_at_evaluations.append(not locks_elsewhere(run))
        return evaluate(self, progress)

    monkeypatch.setattr(Trainer, "_evaluate_and_keep_best", evaluate_and_try_the_lock)
    trainer = Trainer(small_config(), run, show_progress=False)
    assert not locks_elsewhere(run)  # from the claim on, before the first step
    trainer.train()
    assert held_at_evaluations == [True, True]
    assert not (run / ".lock").exists() and locks_elsewhere(run)
    assert [m["step"] for m in read_metrics(run) if m["kind"] == "train"] == [1, 2, 3, 4]

    def fail(self):
        raise RuntimeError("a fault mid-run")

    monkeypatch.setattr(Trainer, "train_step", fail)
    with pytest.raises(RuntimeError):
        Trainer(small_config(), run, overwrite=True, show_progress=False).train()
    assert not (run / ".lock").exists() and locks_elsewhere(run)

    monkeypatch.setattr(Trainer, "_setup_model", fail)   # a setup that fails after the claim
    with pytest.raises(RuntimeError):
        Trainer(small_config(), run, overwrite=True, show_progress=False)
    assert not (run / ".lock").exists() and locks_elsewhere(run)


def test_a_kill_while_best_is_saved_again_keeps_the_previous_best(small_config, tmp_path, monkeypatch):
    """`best/` is written beside and swapped in whole: a kill in the middle of writing the new
    weights leaves the previous best model whole and loadable, and nothing beside it."""
    from clue_mtl.model import multitask as model_module
    from clue_mtl.model.multitask import MultiTaskModel

    run = tmp_path / "run"
    trainer = Trainer(small_config(), run, show_progress=False)
    trainer.train(until_step=2)
    best = run / "best"
    before = load_file(best / "model.safetensors")
    with torch.no_grad():
        for parameter in trainer.unwrapped.parameters():
            parameter.add_(1.0)

    def killed_half_way(model, filename, **kwargs):
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{half")
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(model_module, "save_model", killed_half_way)
        with pytest.raises(Killed):
            trainer.unwrapped.save(best)
    assert sorted(p.name for p in best.iterdir()) == ["model.json", "model.safetensors"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".best")]  # the half-written folder is gone
    after = load_file(best / "model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    MultiTaskModel.load(best)
    trainer.unwrapped.save(best)  # the next save writes the new weights
    saved = load_file(best / "model.safetensors")
    assert not torch.equal(saved["encoder.embeddings.word_embeddings.weight"],
                           before["encoder.embeddings.word_embeddings.weight"])


def half_written_weights(model, filename, **kwargs):
    """A weight writer killed half way: part of a safetensors file, then the kill."""
    Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{half")
    raise Killed


@pytest.mark.parametrize("kill", ["weights", "meta", "first rename", "second rename", "removal"])
def test_a_kill_anywhere_in_a_save_of_best_leaves_a_whole_best(kill, tiny_bert, tmp_path, monkeypatch):
    """Wherever a kill lands in `MultiTaskModel.save` of `best/`, a reader of the run folder finds
    one whole model there: the previous one until the new folder is renamed in, the new one after
    (between the two renames the previous waits at `.best.previous`, and the reader puts it back);
    the next save leaves nothing beside `best/`."""
    from clue_mtl import atomic
    from clue_mtl.config import load_config
    from clue_mtl.model import multitask as model_module
    from clue_mtl.model.encoders import load_encoder
    from clue_mtl.model.multitask import MultiTaskModel, build_model

    config = load_config(overrides=[f"model.encoder={tiny_bert}"])
    encoder, tokenizer = load_encoder(config.model.encoder)
    model = build_model(encoder, ["ocnli", "tnews"], config.model, sep_token_id=tokenizer.sep_token_id)
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        model.save(folder.best_dir)
    old = {k: v.clone() for k, v in load_file(folder.best_model_file).items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    new = {k: v.clone() for k, v in model.state_dict().items()}

    calls = []

    def killed_at(name, number):
        original = getattr(atomic, name)

        def killable(*args):
            calls.append(name)
            if calls.count(name) == number:
                raise Killed
            return original(*args)
        return killable

    with monkeypatch.context() as patch, pytest.raises(Killed), folder.lock():
        if kill == "weights":
            patch.setattr(model_module, "save_model", half_written_weights)
        elif kill == "meta":
            def half_written_meta(path, text, **kwargs):
                path.write_bytes(text.encode("utf-8")[:10])
                raise Killed

            patch.setattr(Path, "write_text", half_written_meta)
        else:  # the swap's calls: _remove_tree(staging), _remove_tree(previous), _rename x 2, _remove_tree(previous)
            name, number = {"first rename": ("_rename", 1), "second rename": ("_rename", 2),
                            "removal": ("_remove_tree", 3)}[kill]
            patch.setattr(atomic, name, killed_at(name, number))
        model.save(folder.best_dir)

    assert folder.has_model()  # a reader: puts back a best/ the kill left aside
    assert sorted(p.name for p in folder.best_dir.iterdir()) == ["model.json", "model.safetensors"]
    expected = new if kill == "removal" else old
    loaded = MultiTaskModel.load(folder.best_dir).state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in old)
    with folder.lock():
        model.save(folder.best_dir)
    assert sorted(p.name for p in folder.path.iterdir()) == ["best"]
    assert all(torch.equal(v, new[k]) for k, v in load_file(folder.best_model_file).items())


def test_a_reader_leaves_best_alone_while_another_command_holds_the_run(tmp_path, monkeypatch):
    """Between the two renames of a live save `best/` is missing: a reader must not put the old
    one back under the writer, which holds the run folder's lock (not a lock inside `best/`)."""
    import subprocess
    import sys

    monkeypatch.setattr(RunFolder, "SWAP_WAIT_SECONDS", 0.2)
    folder = RunFolder(tmp_path / "run")
    previous = folder.path / ".best.previous"
    previous.mkdir(parents=True)
    (previous / "model.safetensors").write_bytes(b"old")
    hold = ("import sys; from clue_mtl.atomic import FolderLock; lock = FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not folder.has_model() and previous.is_dir()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert folder.has_model() and not previous.exists()  # the writer is gone: the old best/ comes back


def test_a_reader_waits_for_a_live_save_to_swap_best_in(tmp_path):
    """A reader that comes between the two renames of a live save waits for the second: it sees
    the new model, not "no trained model"."""
    import subprocess
    import sys

    folder = RunFolder(tmp_path / "run")
    previous, staged = folder.path / ".best.previous", folder.path / ".best.partial"
    for path, weights in ((previous, b"old"), (staged, b"new")):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(weights)
    finish = ("import os, sys, time; from clue_mtl.atomic import FolderLock; lock = FolderLock(sys.argv[1]).acquire(); "
              "print('held', flush=True); time.sleep(0.5); "
              "os.rename(os.path.join(sys.argv[1], '.best.partial'), os.path.join(sys.argv[1], 'best')); sys.stdin.read()")
    writer = subprocess.Popen([sys.executable, "-c", finish, str(folder.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        assert folder.has_model()
        assert folder.best_model_file.read_bytes() == b"new" and previous.is_dir()   # the writer removes it
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
        writer.stdout.close()


@pytest.mark.slow
def test_under_two_processes_a_refused_lock_stops_both_ranks(tiny_config, tmp_path):
    """Only the main process takes the lock; its refusal reaches the other rank, which stops too
    instead of waiting at a barrier for ever."""
    import subprocess
    import sys

    from forked import run_ranks

    save_config(tiny_config("train.steps=2", "train.eval_every=2"), tmp_path / "config.yaml")
    run = tmp_path / "out" / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # two forks of this process: no launcher stops rank 1 for it when rank 0 fails
        result = run_ranks("ddp_worker", [str(tmp_path / "config.yaml"), str(tmp_path / "out")], port=29633,
                           cwd=tmp_path, timeout=240)
    finally:
        holder.kill()
        holder.communicate()
    assert result.returncode != 0
    assert f"in use by another clue-mtl command (pid {holder.pid} on " in result.stderr
    assert "the main process could not lock the folder" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of a run was written
