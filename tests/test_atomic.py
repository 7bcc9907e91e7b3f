"""Folder locks and atomic replacement (`clue_mtl.atomic`): a second command is refused with one
line, a kill at any step of a write leaves the previous result readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clue_mtl import atomic
from clue_mtl.atomic import FolderLock, recover_folder, replace_folder, write_atomic
from clue_mtl.cli import main
from clue_mtl.errors import RunFolderError
from clue_mtl.runs.folder import RunFolder

HOLD = ("import sys; from clue_mtl.atomic import FolderLock; lock = FolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read()")


class Holder:
    """Another process holding `folder`'s lock until `stop` (or a kill)."""

    def __init__(self, folder: Path):
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)  # no clean-up runs: the operating system lets go
        self.process.wait(timeout=30)
        self.process.stdin.close()
        self.process.stdout.close()


def try_lock_elsewhere(folder: Path) -> subprocess.CompletedProcess:
    code = "import sys; from clue_mtl.atomic import FolderLock; FolderLock(sys.argv[1]).acquire()"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- the lock
def test_a_folder_another_process_holds_is_refused_naming_it_until_it_is_killed(tmp_path):
    folder = tmp_path / "run"
    holder = Holder(folder)
    try:
        with pytest.raises(RunFolderError, match=rf"run is in use by another clue-mtl command "
                                                 rf"\(pid {holder.process.pid} on .+\); wait for it to end"):
            FolderLock(folder).acquire()
        assert atomic.lock_holder(folder).startswith(f"pid {holder.process.pid} on ")
    finally:
        holder.kill()
    assert atomic.lock_holder(folder) is None
    with FolderLock(folder):  # a killed holder's lock is free at once
        assert atomic.lock_holder(folder) is None  # this process's own hold is no one else's
        assert try_lock_elsewhere(folder).returncode == 1


def test_the_lock_is_shared_within_a_process_and_leaves_no_trace(tmp_path):
    new, kept = tmp_path / "new" / "folder", tmp_path / "kept"
    kept.mkdir()
    with FolderLock(new) as outer, FolderLock(kept):
        with FolderLock(new):  # a recipe's hold, then the save it calls
            assert (new / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        assert outer.held and (new / ".lock").exists()
        assert RunFolder(new).entries() == []  # the lock file is not a run
    # released: no lock file; a folder the lock created and nothing filled is gone again
    assert not new.exists() and (tmp_path / "new").is_dir()
    assert kept.is_dir() and list(kept.iterdir()) == []
    assert try_lock_elsewhere(kept).returncode == 0


def test_a_planted_lock_file_is_neither_followed_nor_truncated(tmp_path):
    folder, target = tmp_path / "run", tmp_path / "precious.txt"
    folder.mkdir()
    target.write_text("keep me")
    (folder / ".lock").symlink_to(target)
    with pytest.raises(RunFolderError, match="cannot lock"):
        FolderLock(folder).acquire()
    assert target.read_text() == "keep me"
    (folder / ".lock").unlink()
    os.mkfifo(folder / ".lock")
    with pytest.raises(RunFolderError, match="not a regular file"):
        FolderLock(folder).acquire()


@pytest.mark.parametrize("command", [
    ["baseline", "--data-dir", "{tmp}/no-data", "--run-dir", "{folder}"],
    ["blend", "--baseline", "{tmp}/no-member", "--out", "{folder}"],
    ["train", "--set", "train.steps=1", "--run-dir", "{folder}"],
])
def test_a_command_into_a_folder_in_use_is_one_line_and_exit_2(command, tmp_path, capsys):
    folder = tmp_path / "busy"
    argv = [part.format(tmp=tmp_path, folder=folder) for part in command]
    holder = Holder(folder)
    try:
        assert main(argv) == 2
        line = one_error_line(capsys)
        assert f"{folder} is in use by another clue-mtl command (pid {holder.process.pid} on " in line
    finally:
        holder.kill()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written; the dead holder's lock file


# ----------------------------------------------------------------------------- atomic files
def test_a_killed_file_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "labels.json"
    write_atomic(path, b'{"old": 1}')

    def half_then_killed(temporary: Path) -> None:
        temporary.write_bytes(b'{"ne')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.replace_file(path, half_then_killed)
    assert path.read_bytes() == b'{"old": 1}' and os.listdir(tmp_path) == ["labels.json"]
    write_atomic(path, b'{"new": 2}')
    assert path.read_bytes() == b'{"new": 2}' and os.listdir(tmp_path) == ["labels.json"]


# ----------------------------------------------------------------------------- atomic folders
def write_result(folder: Path, version: int) -> None:
    with FolderLock(folder), replace_folder(folder) as staging:
        (staging / "result.json").write_text(json.dumps({"version": version}))
        (staging / f"part-{version}.bin").write_bytes(bytes([version]) * 100)


def read_result(folder: Path) -> int:
    recover_folder(folder)  # what every reader of a swapped folder does first
    version = json.loads((folder / "result.json").read_text())["version"]
    assert (folder / f"part-{version}.bin").read_bytes() == bytes([version]) * 100
    return version


def kill_at(monkeypatch, name: str, number: int) -> None:
    """Raise KeyboardInterrupt instead of the `number`-th call of `atomic.NAME` (a kill there)."""
    original, calls = getattr(atomic, name), []

    def killable(*args):
        calls.append(args)
        if len(calls) == number:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(atomic, name, killable)


# (name, call): the calls of a replacement are _remove_tree(staging), _remove_tree(previous) for
# leftovers, _rename(folder, previous), _rename(staging, folder), _remove_tree(previous)
KILLS = [("_rename", 1), ("_rename", 2), ("_remove_tree", 3)]


@pytest.mark.parametrize("name, number", KILLS)
def test_a_kill_at_each_step_of_a_folder_swap_leaves_a_whole_result(name, number, tmp_path, monkeypatch):
    folder = tmp_path / "result"
    write_result(folder, 1)
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "report.txt").write_text("kept")
    with monkeypatch.context() as patch:
        kill_at(patch, name, number)
        with pytest.raises(KeyboardInterrupt):
            write_result(folder, 2)
    # the old result until the second rename has happened, the new one after
    assert read_result(folder) == (2 if name == "_remove_tree" else 1)
    write_result(folder, 3)
    assert read_result(folder) == 3
    assert (folder / "evaluation" / "report.txt").read_text() == "kept"  # entries the writer did not write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]    # no staging or previous folder left


def test_a_reader_leaves_a_live_writers_swap_alone(tmp_path):
    """Between a writer's two renames the folder is missing; while the writer lives (its lock held),
    a reader must not put the old folder back under it."""
    folder, previous = tmp_path / "result", tmp_path / ".result.previous"
    write_result(folder, 1)
    os.rename(folder, previous)
    with FolderLock(previous):  # the writer's lock file went aside with the old folder
        recover_folder(folder)
        assert not folder.exists()
    recover_folder(folder)  # the writer is gone (killed): the old folder comes back
    assert read_result(folder) == 1
