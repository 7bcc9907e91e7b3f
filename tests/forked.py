"""`python -m MODULE ARGS` for the tests without importing torch again: the test process forks and
the child becomes the module (`benchmarks.processes`), which saves about 6 CPU-seconds a command.
The test process runs torch on one thread (conftest.py), so a fork is safe."""

from __future__ import annotations

import contextlib
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
    return run_forks(module, arguments, [dict(os.environ) if env is None else env], cwd=cwd, timeout=timeout)


def run_ranks(module: str, arguments: list[str], *, port: int, cwd: Path, timeout: float,
              world_size: int = 2) -> subprocess.CompletedProcess:
    """What `torchrun --nproc_per_node WORLD_SIZE -m module ARGUMENTS` gives (every rank's output, the
    first failing rank's status), from forks of this process: one per rank, each with the
    environment torchrun sets (rank, world size, the rendezvous on this machine at `port`). Unlike
    torchrun, a failing rank does not stop the others: each must end by itself within `timeout`."""
    environments = [{**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                     "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "OMP_NUM_THREADS": "1"} for rank in range(world_size)]
    return run_forks(module, arguments, environments, cwd=cwd, timeout=timeout)


def run_forks(module: str, arguments: list[str], environments: list[dict[str, str]], *, cwd: Path,
              timeout: float) -> subprocess.CompletedProcess:
    """One fork running the module per environment, all at once; their outputs joined in order and
    the first failing one's status. Past `timeout` every fork is killed and TimeoutExpired raised."""
    warm_up()
    command = processes.module_command(module, *arguments)
    with contextlib.ExitStack() as files:
        outputs = [(files.enter_context(tempfile.TemporaryFile()), files.enter_context(tempfile.TemporaryFile()))
                   for _ in environments]
        children = [processes.start(command, fork=True, cwd=cwd, env=env, stdout=out, stderr=err)
                    for env, (out, err) in zip(environments, outputs)]
        try:
            codes = [child.wait(timeout) for child in children]
        except subprocess.TimeoutExpired:
            for child in children:
                child.kill()
                child.wait()
            raise
        return subprocess.CompletedProcess(command, next((code for code in codes if code), 0),
                                           "".join(read(out) for out, _ in outputs),
                                           "".join(read(err) for _, err in outputs))


def warm_up() -> None:
    import matplotlib

    matplotlib.use("Agg")
    for name in WARM_MODULES:
        __import__(name)


def read(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")
