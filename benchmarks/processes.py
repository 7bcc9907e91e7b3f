"""Starting `python -m MODULE ARGS` as a process of its own: a fresh interpreter, or a fork of this
one where the start-up is most of the work (the suite's smoke runs, whose steps take less time
than importing torch and transformers again: about 6 CPU-seconds a process on 2 cores).

A fork runs the module as `-m` would (`runpy`, `__main__`, `sys.argv`) with its own environment,
working folder, output and exit status, in a process group of its own, so stopping it stops its
children too. It inherits what this process has imported, less the `benchmarks` package, whose
modules read their environment at import and are imported afresh. Its own children (lanes,
`clue-mtl` commands) are real processes. Forking is safe where torch runs on one thread, as it
does in the suite and in smoke runs: there is no OpenMP team for the child to lose. What the
benchmarks time is never forked."""

from __future__ import annotations

import io
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path


def module_command(module: str, *arguments: str) -> list[str]:
    """The command line `python -m MODULE ARGUMENTS`, this interpreter's python."""
    return [sys.executable, "-m", module, *arguments]


def start(command: list[str], *, fork: bool, cwd: Path, env: dict[str, str] | None = None,
          stdout=None, stderr=None) -> subprocess.Popen | ForkedModule:
    """`subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)`, or with `fork` a
    `ForkedModule` running it (`command` is then `module_command`'s). `stdout` and `stderr`: None
    (this process's), an open file, or for `stderr` subprocess.STDOUT."""
    if not fork or not hasattr(os, "fork"):
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
    if command[:2] != [sys.executable, "-m"]:
        raise ValueError(f"only `python -m MODULE` forks: {command[:3]}")
    return ForkedModule(command, cwd, dict(os.environ) if env is None else env, stdout, stderr)


def run(command: list[str], *, fork: bool, cwd: Path, env: dict[str, str] | None = None) -> None:
    """`start` and wait; a failure raises `subprocess.CalledProcessError`, as `run(check=True)` does."""
    code = start(command, fork=fork, cwd=cwd, env=env).wait()
    if code != 0:
        raise subprocess.CalledProcessError(code, command)


class ForkedModule:
    """A fork running `python -m MODULE ARGS`, with the part of `subprocess.Popen` the benchmarks
    use: `args`, `pid`, `returncode`, `poll()`, `wait(timeout)`, `kill()`."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], stdout, stderr):
        self.args, self.returncode = command, None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            outputs = (descriptor(stdout, 1), descriptor(stderr, 2, stdout=stdout))
            run_forked(command[2], command[3:], cwd, env, *outputs)   # never returns

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)


def descriptor(stream, default: int, *, stdout=None) -> int:
    """The file descriptor a child's stream goes to."""
    if stream is None:
        return default
    if stream is subprocess.STDOUT:
        return descriptor(stdout, 1)
    return stream.fileno()


def run_forked(module: str, arguments: list[str], cwd: Path, env: dict[str, str], stdout: int, stderr: int):
    """In the fork: become `python -m module arguments`, then exit with its status."""
    status = 1
    try:
        os.setpgid(0, 0)
        with open(os.devnull, "rb") as null:
            os.dup2(null.fileno(), 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", line_buffering=True)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        for name in [name for name in sys.modules if name == "benchmarks" or name.startswith("benchmarks.")]:
            del sys.modules[name]
        sys.argv = [module, *arguments]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as end:
            if end.code is None or isinstance(end.code, int):
                status = end.code or 0
            else:
                print(end.code, file=sys.stderr)
    except BaseException:  # reported as an interpreter would; the fork never returns to its caller
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
