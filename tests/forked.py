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


def run_ranks(module: str, arguments: list[str], *, port: int, cwd: Path, timeout: float,
              world_size: int = 2) -> subprocess.CompletedProcess:
    """What `torchrun --nproc_per_node WORLD_SIZE -m module ARGUMENTS` gives (every rank's output, the
    first failing rank's status), from forks of this process: one per rank, each with the
    environment torchrun sets (rank, world size, the rendezvous on this machine at `port`). Unlike
    torchrun, a failing rank does not stop the others: each must end by itself within `timeout`."""
    warm_up()
    command = processes.module_command(module, *arguments)
    ranks, outputs = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        outputs.append((tempfile.TemporaryFile(), tempfile.TemporaryFile()))
        ranks.append(processes.start(command, fork=True, cwd=cwd, env=env, stdout=outputs[-1][0],
                                     stderr=outputs[-1][1]))
    try:
        codes = [rank.wait(timeout) for rank in ranks]
    except subprocess.TimeoutExpired:
        for rank in ranks:
            rank.kill()
            rank.wait()
        raise
    stdout = "".join(read(out) for out, _ in outputs)
    stderr = "".join(read(err) for _, err in outputs)
    for out, err in outputs:
        out.close()
        err.close()
    return subprocess.CompletedProcess(command, next((code for code in codes if code), 0), stdout, stderr)


def warm_up() -> None:
    import matplotlib

    matplotlib.use("Agg")
    for name in WARM_MODULES:
        __import__(name)


def read(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")
