"""Writes no kill can leave half done, and one command at a time in a folder: atomic files, folder swaps, folder locks.

- `write_atomic(path, data)` and `replace_file(path, write)`: the new content goes into a
  temporary file beside `path`, is flushed to the disk, then renamed over it (`os.replace`): a
  reader sees the old file or the new one, never a part of one.
- `replace_folder(folder)`: the body writes a whole new folder into `.NAME.partial` beside it;
  when the body ends, entries of the old folder it did not write are carried over (hard links),
  the old folder is renamed to `.NAME.previous`, the new one to `folder`, and the old one removed.
  A kill before the first rename leaves the old folder as it was; a kill between the two renames
  leaves it complete under `.NAME.previous`, and `recover_folder` (which the lock and the readers
  call) renames it back. A run folder's `best/` is swapped in this way (`MultiTaskModel.save`).
- `FolderLock(folder)`: an exclusive `fcntl.flock` on `folder/.lock`, which names its holder. A
  second command is refused at once with one line (`RunFolderError`); the operating system
  releases the lock when its holder ends, however it ends. Locks are per process: nested holders
  in one process share the lock (a recipe, then the save it calls). The lock file is removed on
  release, and the folder too when the lock created it and it is still empty.

Only the standard library: the command line locks a folder before it imports torch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from clue_mtl.errors import RunFolderError

try:
    import fcntl
except ImportError:  # not a POSIX system: folders are not locked
    fcntl = None

LOCK_FILE = ".lock"


# ----------------------------------------------------------------------------- files
def replace_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary)` for a temporary file beside `path`, flush it to the disk, then rename
    it over `path`. For writers that take a path (safetensors, numpy); the temporary name keeps
    the suffix, since `np.savez` adds `.npz` to a name without it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per writer, so two processes writing one file never write into the same temporary
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | Path, data: bytes) -> Path:
    """`path` holds `data`, or (after a kill) what it held before: never a part of `data`."""
    def write(temporary: Path) -> None:
        with open(temporary, "xb") as file:
            file.write(data)

    return replace_file(path, write)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, text.encode("utf-8"))


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


# ----------------------------------------------------------------------------- folders
def _staging(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.partial")


def _previous(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


# The two file operations of a swap, apart so a test can kill it at each.
def _rename(source: Path, target: Path) -> None:
    os.rename(source, target)


def _remove_tree(path: Path) -> None:
    remove_tree(path)


def remove_tree(path: Path) -> None:
    """A folder and what it holds, or a file or a link (never followed); nothing where nothing is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def recover_folder(folder: str | Path, *, locked_by: str | Path | None = None) -> None:
    """Rename back the folder a kill between `replace_folder`'s two renames left at `.NAME.previous`.

    Not while a live writer may be between its renames (it finishes the swap itself): one holds
    the folder's own lock, whose file went aside with the old folder, or, for a folder inside a
    locked one (a run folder's `best/`), `locked_by`'s lock, held by another process."""
    folder = Path(os.path.realpath(folder))
    previous = _previous(folder)
    if os.path.lexists(folder) or not previous.is_dir():
        return  # nothing to recover
    writer = _holder(previous / LOCK_FILE) if locked_by is None else lock_holder(locked_by)
    if writer is not None:
        return
    try:
        os.rename(previous, folder)
    except OSError:
        pass  # a writer's own rename, or another reader's, came first: `folder` is there now


def swap_pending(folder: str | Path) -> bool:
    """True while `folder` is missing and its old self waits at `.NAME.previous`: a live
    `replace_folder` between its two renames, or one a kill stopped there."""
    folder = Path(os.path.realpath(folder))
    return not os.path.lexists(folder) and _previous(folder).is_dir()


def remove_swap_leftovers(folder: str | Path) -> None:
    """Remove what a killed `replace_folder` of `folder` left beside it: its staging folder, and
    the old folder set aside (recover it first to keep it)."""
    folder = Path(os.path.realpath(folder))
    _remove_tree(_staging(folder))
    _remove_tree(_previous(folder))


def _holder(path: Path) -> str | None:
    """What the lock file `path` says of its holder when a process holds it, else None. Nothing
    is created, and a link or a FIFO planted under the name is neither followed nor waited on."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # (closing the descriptor below lets the shared lock go at once)
    except BlockingIOError:
        return os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replace_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder for the body to fill; swap it in for `folder` when the body
    ends (see the module doc). The caller holds `folder`'s lock: two writers share the staging name.
    A link to a folder stays a link: the folder it names is the one replaced."""
    folder = Path(os.path.realpath(folder))
    if os.path.lexists(folder) and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a folder")
    recover_folder(folder)
    staging, previous = _staging(folder), _previous(folder)
    _remove_tree(staging)   # what a killed writer left
    _remove_tree(previous)
    staging.mkdir(parents=True)
    try:
        yield staging
        _carry_over(folder, staging)
        for path in staging.rglob("*"):  # on the disk before the rename makes the folder current
            if path.is_file() and not path.is_symlink():
                _fsync(path)
    except BaseException:
        _remove_tree(staging)
        raise
    _swap_in(folder, staging, previous)


def _swap_in(folder: Path, staging: Path, previous: Path) -> None:
    if folder.exists():
        _rename(folder, previous)  # from here ...
    try:
        _rename(staging, folder)   # ... to here a kill leaves the old folder at `previous`
    except OSError as error:      # a reader's `recover_folder` put the old one back in between
        raise RunFolderError(f"{folder}: the previous folder came back during the swap ({error.strerror}); "
                             "nothing was replaced, run the command again") from None
    _remove_tree(previous)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link into `new` what of `old` the writer did not write (`evaluation/`, the lock file:
    the same file, so the lock holds across the swap); copied where links are not supported."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        target = new / entry.name
        if os.path.lexists(target):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.name == LOCK_FILE:
            with contextlib.suppress(OSError):  # a copy would be another, unlocked file
                os.link(entry, target)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ----------------------------------------------------------------------------- the lock
class _Held:
    """This process's hold on one folder: the open lock file, how many holders share it, and
    whether taking it created the folder."""

    def __init__(self, folder: Path, descriptor: int, created: bool):
        self.folder, self.descriptor, self.created, self.count = folder, descriptor, created, 1


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.RLock()  # re-entrant: `__del__` may run inside it


class FolderLock:
    """`with FolderLock(folder):` or `acquire()`/`release()`: one command at a time writes `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(os.path.abspath(folder))
        self._key: str | None = None

    def __repr__(self) -> str:
        return f"FolderLock({str(self.folder)!r}{', held' if self.held else ''})"

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> "FolderLock":
        """Take the lock (creating the folder), or raise `RunFolderError` naming its holder."""
        if self.held:
            return self
        with _HELD_GUARD:
            key = os.path.realpath(self.folder)
            if key in _HELD:
                _HELD[key].count += 1
            else:
                _HELD[key] = _take(self.folder)
            self._key = key
        return self

    def release(self) -> None:
        """Let the next command in; the last holder in this process removes the lock file."""
        if not self.held:
            return
        with _HELD_GUARD:
            held = _HELD[self._key]
            held.count -= 1
            if held.count == 0:
                del _HELD[self._key]
                _give_back(held)
            self._key = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit the module may be gone already
            self.release()  # a holder dropped without release lets go with it


def _take(folder: Path) -> _Held:
    recover_folder(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a folder")
    for _ in range(5):  # a releasing holder may remove the folder or the lock file between our steps
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        try:  # a link or a FIFO planted under the name is neither followed nor waited on
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise RunFolderError(f"cannot lock {folder}: {path.name} {error.strerror}") from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise RunFolderError(f"cannot lock {folder}: {path} is not a regular file; remove it")
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
                os.close(descriptor)
                raise in_use(folder, holder) from None
        if _is_current(path, descriptor):  # not a file its last holder removed after we opened it
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return _Held(folder, descriptor, created)
        os.close(descriptor)
    raise RunFolderError(f"cannot lock {folder}: its lock file keeps being replaced")


def in_use(folder: Path, holder: str) -> RunFolderError:
    return RunFolderError(f"{folder} is in use by another clue-mtl command ({holder or 'pid unknown'}); "
                          "wait for it to end, or choose another folder")


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s lock when another process does ("pid N on HOST"), else None; takes nothing."""
    if os.path.realpath(folder) in _HELD:
        return None
    return _holder(Path(folder) / LOCK_FILE)


def _is_current(path: Path, descriptor: int) -> bool:
    try:
        on_disk, opened = os.stat(path), os.fstat(descriptor)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _give_back(held: _Held) -> None:
    """Remove the lock file (while still locked, so no one takes the removed file), then unlock;
    remove the folder too when taking the lock created it and nothing was written there."""
    path = held.folder / LOCK_FILE
    try:
        if _is_current(path, held.descriptor):
            path.unlink()
            if held.created:
                with contextlib.suppress(OSError):  # not empty: something was written there after all
                    held.folder.rmdir()
    finally:
        os.close(held.descriptor)
