"""Reading the files of folders a user may have downloaded: regular files only, of bounded size.

A run, baseline or blend folder is input like any other. A name in it may be a link to /dev/zero
(a read that never ends), a FIFO (an open that never returns), or a sparse file of 50 GB that
holds nothing; each is refused here with one line naming the file, before anything reads it.
The error class is the caller's (`RunFolderError`, `BlendError`, `DataError`), so each command's
errors stay its own. Nothing heavy is imported: the command line checks a folder before torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

JSON_LIMIT = 8 << 20    # labels.json, model.json, split.json, blend.json, baseline.json: kilobytes in practice
LARGE_LIMIT = 64 << 20  # a tokenizer's files (a real tokenizer.json: 17 MB), a baseline's vocabulary (3 MB)
METRICS_LIMIT = 256 << 20  # a metrics log: about 500 bytes a logged step

Error = Callable[[str], Exception]

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path, mode: int, what: str, error: Error) -> Exception:
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return error(f"{path}: not a regular file ({kind}); expected the {what}")


def checked_size(path: str | Path, *, limit: int | None, what: str, error: Error) -> int:
    """The size of `path` (a regular file, or a link to one), at most `limit` bytes (None: any)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        missing = "a dangling symbolic link" if os.path.islink(path) else "missing"
        raise error(f"{path}: {missing}; expected the {what}") from None
    except OSError as failure:  # a link loop (ELOOP), a component that is not a folder, no permission
        raise error(f"{path}: cannot be read ({failure.strerror or failure})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode, what, error)
    if limit is not None and info.st_size > limit:
        raise error(f"{path}: {info.st_size:,} bytes, more than the {limit:,} the {what} may hold")
    return info.st_size


@contextlib.contextmanager
def open_regular(path: str | Path, *, limit: int | None, what: str, error: Error) -> Iterator[BinaryIO]:
    """`path` opened for binary reading once it is known to be a regular file under `limit`.

    Checked before the open (opening a FIFO for reading waits for a writer, forever) and again on
    the open file: O_NONBLOCK makes that open return at once should the name have been swapped for
    a FIFO in between, and the second check refuses it.
    """
    path = Path(path)
    checked_size(path, limit=limit, what=what, error=error)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as failure:
        raise error(f"{path}: cannot be read ({failure.strerror or failure})") from None
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what, error)
        yield handle


def read_bytes(path: str | Path, *, limit: int, what: str, error: Error) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (one that grew past it is refused too)."""
    with open_regular(path, limit=limit, what=what, error=error) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as failure:
            raise error(f"{path}: cannot be read ({failure.strerror or failure})") from None
    if len(data) > limit:
        raise error(f"{path}: more than the {limit:,} bytes the {what} may hold")
    return data


def read_text(path: str | Path, *, limit: int, what: str, error: Error) -> str:
    """A UTF-8 text file read as `read_bytes` does."""
    data = read_bytes(path, limit=limit, what=what, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"{path}: not UTF-8 (byte 0x{data[failure.start]:02x}); expected the {what}") from None


def read_json(path: str | Path, *, limit: int = JSON_LIMIT, what: str, error: Error) -> Any:
    """A UTF-8 JSON file read as `read_bytes` does; anything else is one line naming the file."""
    text = read_text(path, limit=limit, what=what, error=error)
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply); expected the {what}") from None
    except ValueError as failure:  # JSONDecodeError, and integers of more than 4,300 digits
        raise error(f"{path}: not valid JSON ({first_line(failure)}); expected the {what}") from None


def safetensors_shapes(path: str | Path, *, what: str, error: Error) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, from its header alone (nothing is loaded): a
    caller compares them with what it expects before loading, so a header that promises a 50 GB
    tensor over a sparse file is refused rather than allocated."""
    from safetensors import SafetensorError, safe_open

    checked_size(path, limit=None, what=what, error=error)  # safe_open opens by name: never a FIFO
    try:
        with safe_open(str(path), framework="numpy") as tensors:
            return {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}
    except (SafetensorError, OSError, ValueError) as failure:
        raise error(f"{path}: not a safetensors file ({first_line(failure)}); expected the {what}") from None


def first_line(failure: BaseException, width: int = 200) -> str:
    """An exception's message cut to one line, for an error that must be one line."""
    lines = str(failure).strip().splitlines()
    return (lines[0] if lines else type(failure).__name__)[:width]
