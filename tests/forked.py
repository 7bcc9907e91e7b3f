"""`python -m MODULE ARGS` for the tests without importing torch again: the test process forks and
the child becomes the module (`benchmarks.processes`), which saves about 6 CPU-seconds a command.
The test process runs torch on one thread (conftest.py), so a fork is safe."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from benchmarks import processes

# imported once in the test process rather than in every fork (a second or more each)
WARM_MODULES = ("clue_mtl.pipeline", "clue_mtl.recipes.pretrain", "clue_mtl.predict.evaluate",
                "sklearn.linear_model", "sklearn.feature_extraction.text", "matplotlib.pyplot")


def run_module(module: str, arguments: list[str], *, cwd: Path, env: dict[str, str] | None = None,
               timeout: float) -> subprocess.CompletedProcess:
    """What `subprocess.run([python, "-m", module, *arguments], cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)` gives, from a fork of this process."""
    warm_up()
    command = processes.module_command(module, *arguments)
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        child = processes.start(command, fork=True, cwd=cwd, env=dict(os.environ) if env is None else env,
                                stdout=stdout, stderr=stderr)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        return subprocess.CompletedProcess(command, code, read(stdout), read(stderr))


def warm_up() -> None:
    import matplotlib

    matplotlib.use("Agg")
    for name in WARM_MODULES:
        __import__(name)


def read(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")
