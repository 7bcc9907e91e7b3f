"""Frozen lower layers (`model.frozen_layers`), and their output stored once per row (`train.cache_frozen`).

Freezing k fixes the encoder's embeddings and its bottom k transformer layers: they take no
gradient, the optimiser holds none of them, and they run without dropout (eval mode, put back
after every `model.train()`). Nothing in them requires a gradient, so autograd keeps no graph
there and the backward pass stops at layer k. FGM (it perturbs the frozen word embeddings) is
refused, and so are a task's private layers or LoRA adapters below k (`check_frozen`).

Frozen layers give a row the same states at every visit, so `train.cache_frozen` computes them
once. The first step that meets a row runs the frozen layers over it (one pass over every row of
the step the cache lacks, `FrozenStates.for_batches`), and stores the row's layer-k states
(tokens x hidden, bf16, without padding); every later visit reads them back and runs the top
layers alone (`running_from`). An epoch after the first costs the layers above k only.

    RUN/cache/frozen-KEY/     KEY: a digest of everything the states depend on (`cache_key`): the
                              frozen weights, the encoder's config, k, the tokenizer, the max
                              length, every training row's tokens, precision, attention kernel, torch
        key.json              what the key covers
        states-R.bin          process R's stored rows, raw bf16, appended as they are met
        index-R.bin           one int64 record (task, row, offset, tokens) per stored row
        commits-R.json        [step, records, bytes] per checkpoint: what a resume from it keeps

No pickle: raw bytes and JSON, the JSON read within a bound, every record checked against the
run's rows before a byte of states is read (`StateCache`).

Precision: the top layers always start from the states rounded to bf16, whether just computed or
read back, so a visit that reads the cache gives the logits of one that computed them, bit for
bit (the tests check both against the whole encoder with layer k's output rounded). Under bf16
autocast the next layer's products round their input to bf16 anyway, and only its residual sum
sees the rounding; in float32 the rounding (at most 2^-9 relative) is the one difference from
running every layer. Evaluation and prediction run the whole encoder, unrounded: the saved model
is a plain one.

Exact resume with the cache half built: a row's states can depend in their last bits on the rows
of the pass that computed them (a wider pass may split the kernels' sums otherwise), so a resumed
run must read what the uninterrupted one read. Each checkpoint commits the cache (files flushed, sizes
recorded); a resume cuts the files back to the commit of its checkpoint's step, so the steps
after it find the same rows missing as the uninterrupted run did and compute them in the same
passes. A changed key starts an empty cache in a new folder and removes the old one.

Bound: the states file holds at most `train.cache_max_gb` (default 8); rows past it are not
stored, and run the frozen layers at every visit. e5-small stores 768 bytes a token: every
training row of the three tasks at max length 128 (96,000 rows, 2.5M tokens) is 1.8 GB. The file
is read back with `pread`: the operating system's page cache keeps it in memory where memory
allows. It lives on disk, not in the process, because a resume must find what was stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from clue_mtl.atomic import remove_tree, write_text_atomic
from clue_mtl.data.batching import EncodedTask, joint_batch
from clue_mtl.errors import ConfigError, RunFolderError
from clue_mtl.model.encoders import encoder_layers, layer_slot
from clue_mtl.model.private import is_adapter
from clue_mtl.untrusted import JSON_LIMIT, read_json

FORMAT = 1
# encoders whose forward is embeddings, then the layer list and nothing between the layers (checked
# against transformers 5): DeBERTa-v2, for one, runs a convolution inside its layer loop
SPLIT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
STATE_DTYPE = torch.bfloat16
RECORD_FIELDS = 4                     # task, row, offset, tokens
RECORD_BYTES = RECORD_FIELDS * 8


# ----------------------------------------------------------------------------- freezing
def freeze_bottom(encoder: nn.Module, layers: int) -> list[nn.Module]:
    """Fix the embeddings and the bottom `layers` transformer layers (no gradient, eval mode);
    returns those modules, for `hold_eval` after each `model.train()`."""
    stack = encoder_layers(encoder)
    if not 1 <= layers <= len(stack) - 1:
        raise ConfigError(f"model.frozen_layers is {layers}, but the encoder has {len(stack) - 1} layers")
    frozen = stack[:layers + 1]
    for module in frozen:
        module.requires_grad_(False)
    hold_eval(frozen)
    return frozen


def hold_eval(modules: list[nn.Module]) -> None:
    """The frozen modules back in eval mode (no dropout), whatever mode the model was put in."""
    for module in modules:
        module.eval()


def check_frozen(model: nn.Module, layers: int, *, cached: bool) -> None:
    """Refuse, with one line, what cannot hold with `layers` frozen layers (a `MultiTaskModel`):
    a task's private layers or adapters below them; with the cache, a head reading states below
    layer k, or an encoder without an embeddings module to stand in for."""
    stack = encoder_layers(model.encoder)
    if model.private is not None:
        for task, copies in model.private.copies.items():
            if model.private.full_depth - len(copies) < layers:
                raise ConfigError(f"model.private.{task}: copies of the top {len(copies)} layers reach below "
                                  f"model.frozen_layers ({layers}) of {model.private.full_depth}")
    below = [name for module in stack[:layers + 1] for name, _ in module.named_parameters() if is_adapter(name)]
    if below:
        raise ConfigError(f"model.private: LoRA adapters in layers that model.frozen_layers ({layers}) freezes "
                          f"({below[0]}); name modules above them in targets")
    if not cached:
        return
    model_type = getattr(model.encoder.config, "model_type", None)
    if model_type not in SPLIT_MODEL_TYPES or not isinstance(getattr(_base(model.encoder), "embeddings", None),
                                                             nn.Module):
        raise ConfigError(f"train.cache_frozen: {type(model.encoder).__name__} ({model_type}) is not an encoder whose "
                          f"layers are known to start from stored states ({', '.join(SPLIT_MODEL_TYPES)})")
    depth = model.private.full_depth if model.private is not None else len(stack) - 1
    states_above = depth - layers + 1  # layer k and every layer above it
    for task, head in model.heads.items():
        if head.features.needs_all_layers and (head.features.kind != "concat" or head.features.layers > states_above):
            raise ConfigError(f"model.heads.{task}: features {head.features.kind} read layers below layer {layers}, "
                              f"which train.cache_frozen does not store (concat at most {states_above})")


def _base(encoder: nn.Module) -> nn.Module:
    return getattr(encoder, "base_model", encoder)


# ----------------------------------------------------------------------------- the split forward
@torch.no_grad()
def bottom_states(encoder: nn.Module, layers: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Layer `layers`' token states (rows x tokens x hidden), as the whole encoder computes them,
    from a pass through the embeddings and the bottom layers alone."""
    owner, name = layer_slot(_base(encoder))
    stack = getattr(owner, name)
    captured: list[torch.Tensor] = []
    hook = stack[layers - 1].register_forward_hook(
        lambda _module, _inputs, out: captured.append(out[0] if isinstance(out, tuple) else out))
    owner._modules[name] = stack[:layers]  # not setattr: the slice is no registered child of the model
    try:
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        encoder(input_ids=input_ids, attention_mask=attention_mask, **segments)
    finally:
        owner._modules[name] = stack
        hook.remove()
    return captured[-1]


class _Given(nn.Module):
    """Stands in for the embeddings module: hands the layers above the states it holds."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.states


@contextlib.contextmanager
def running_from(encoder: nn.Module, layers: int, states: torch.Tensor):
    """Inside the block the encoder's forward starts at layer `layers` from `states` (rows x tokens
    x hidden, the dtype of the encoder's own states): its embeddings module stands in for them and
    its layer list is the layers above. The encoder still builds the attention mask from the
    `attention_mask` it is called with, as for a whole pass; the token ids set only its shapes."""
    base = _base(encoder)
    owner, name = layer_slot(base)
    stack, embeddings = getattr(owner, name), base._modules["embeddings"]
    base._modules["embeddings"] = _Given(states)
    owner._modules[name] = stack[layers:]
    try:
        yield
    finally:
        owner._modules[name] = stack
        base._modules["embeddings"] = embeddings


# ----------------------------------------------------------------------------- the key
def cache_key(encoder: nn.Module, layers: int, rows: dict[str, EncodedTask], **settings) -> dict:
    """What a row's layer-k states depend on, each part a digest, and `digest` over them all:
    the frozen modules' tensors, the encoder's config (dropout aside: the frozen layers run
    without it), k, every row's token and segment ids (the tokenizer and max length through them,
    and named too in `settings`), and `settings` (precision, attention kernel, device), torch's
    version and the byte order."""
    weights = hashlib.sha256()
    for index, module in enumerate(encoder_layers(encoder)[:layers + 1]):
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            weights.update(f"{index}.{name}|{tensor.dtype}|{tensor.numel()}|".encode())
            weights.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    config = {key: value for key, value in encoder.config.to_dict().items() if "dropout" not in key}
    config["attn_implementation"] = getattr(encoder.config, "_attn_implementation", None)
    tokens = hashlib.sha256()
    for task, data in rows.items():
        tokens.update(f"{task}|{len(data)}|".encode())
        for i, ids in enumerate(data.input_ids):
            tokens.update(len(ids).to_bytes(4, "little") + np.asarray(ids, dtype=np.int64).tobytes())
            if data.token_type_ids is not None:
                tokens.update(np.asarray(data.token_type_ids[i], dtype=np.int64).tobytes())
    key = {"format": FORMAT, "frozen_layers": layers, "weights": weights.hexdigest(),
           "encoder_config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
           "rows": tokens.hexdigest(), "torch": torch.__version__, "byteorder": sys.byteorder,
           **settings}
    key["digest"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def cache_folder(root: str | Path, key: dict) -> Path:
    return Path(root) / f"frozen-{key['digest'][:16]}"


def prepare_cache_folder(root: str | Path, key: dict, *, fresh: bool) -> Path:
    """The key's folder under `root` (`RUN/cache`), with its `key.json`; other keys' folders are
    removed (a changed key rebuilds), and the key's own too when `fresh` or not what it should be.
    Run by the main process; each process then opens its own files (`StateCache.open`)."""
    root, folder = Path(root), cache_folder(root, key)
    if os.path.lexists(root) and not _real_folder(root):
        remove_tree(root)
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():
        if other.name.startswith("frozen-") and other != folder:
            remove_tree(other)
    if os.path.lexists(folder) and (fresh or not _real_folder(folder) or _saved_key(folder) != key):
        remove_tree(folder)
    folder.mkdir(exist_ok=True)
    write_text_atomic(folder / "key.json", json.dumps(key, indent=2, sort_keys=True) + "\n")
    return folder


def _real_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _saved_key(folder: Path) -> object:
    try:
        return read_json(folder / "key.json", what="frozen-layer cache's key", error=RunFolderError)
    except RunFolderError:
        return None  # missing or damaged: the folder is rebuilt


# ----------------------------------------------------------------------------- the store
class StateCache:
    """Rows' layer-k states in process `rank`'s files of a cache folder: looked up by (task, row),
    appended (up to `max_bytes`), committed at checkpoints. `lengths`: each task's token count per
    row, which every stored record must match."""

    def __init__(self, folder: str | Path, *, lengths: dict[str, np.ndarray], hidden: int, max_bytes: int,
                 rank: int = 0):
        self.folder = Path(folder)
        self.tasks, self.lengths = list(lengths), lengths
        self.hidden, self.max_bytes = hidden, max_bytes
        self.token_bytes = hidden * STATE_DTYPE.itemsize
        self.states_file = self.folder / f"states-{rank}.bin"
        self.index_file = self.folder / f"index-{rank}.bin"
        self.commits_file = self.folder / f"commits-{rank}.json"
        self.offsets = {task: np.full(len(counts), -1, dtype=np.int64) for task, counts in lengths.items()}
        self.records = self.size = 0
        self.commits: list[list[int]] = []
        self._states = self._index = -1

    def __len__(self) -> int:
        return self.records

    def open(self, step: int | None) -> "StateCache":
        """Fresh (`step` None): empty files. Resuming at `step`: the files cut back to the last
        commit at or before it, and later commits forgotten."""
        self.commits = [] if step is None or not os.path.lexists(self.commits_file) else [
            commit for commit in self._read_commits() if commit[0] <= step]
        _, records, size = self.commits[-1] if self.commits else (0, 0, 0)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._states, self._index = self._open(self.states_file), self._open(self.index_file)
        weakref.finalize(self, _close, self._states, self._index)
        if os.fstat(self._states).st_size < size or os.fstat(self._index).st_size < records * RECORD_BYTES:
            raise RunFolderError(f"{self.folder}: the cache is shorter than its commit for step {self.commits[-1][0]}; "
                                 "remove the folder to rebuild it")
        os.ftruncate(self._states, size)
        os.ftruncate(self._index, records * RECORD_BYTES)
        self._load_index(records, size)
        self._write_commits()
        return self

    def get(self, task: str, row: int) -> torch.Tensor | None:
        """The row's stored states (tokens x hidden, bf16), or None."""
        offset = int(self.offsets[task][row])
        if offset < 0:
            return None
        tokens = int(self.lengths[task][row])
        data = os.pread(self._states, tokens * self.token_bytes, offset)
        if len(data) != tokens * self.token_bytes:
            raise RunFolderError(f"{self.states_file}: shorter than its index says; remove {self.folder} to rebuild it")
        return torch.frombuffer(bytearray(data), dtype=STATE_DTYPE).view(tokens, self.hidden)

    def put(self, task: str, row: int, states: torch.Tensor) -> bool:
        """Store the row's states (tokens x hidden, bf16); False where it is stored already or
        would pass the bound."""
        tokens = int(self.lengths[task][row])
        if states.shape != (tokens, self.hidden) or states.dtype != STATE_DTYPE:
            raise ValueError(f"{task} row {row}: states of shape {tuple(states.shape)} ({states.dtype}), "
                             f"expected ({tokens}, {self.hidden}) in {STATE_DTYPE}")
        nbytes = tokens * self.token_bytes
        if self.offsets[task][row] >= 0 or self.size + nbytes > self.max_bytes:
            return False
        os.pwrite(self._states, states.contiguous().view(torch.int16).numpy().tobytes(), self.size)
        record = np.array([self.tasks.index(task), row, self.size, tokens], dtype=np.int64)
        os.pwrite(self._index, record.tobytes(), self.records * RECORD_BYTES)
        self.offsets[task][row] = self.size
        self.records, self.size = self.records + 1, self.size + nbytes
        return True

    def commit(self, step: int) -> None:
        """Flush the files and record what they hold as the state of `step`'s checkpoint."""
        os.fsync(self._states)
        os.fsync(self._index)
        self.commits = [commit for commit in self.commits if commit[0] < step] + [[step, self.records, self.size]]
        self._write_commits()

    # ------------------------------------------------------------------------- files
    def _open(self, path: Path) -> int:
        """A descriptor on `path` for reading and writing, created if missing; never through a
        link, a FIFO or a device (a run folder may come from anywhere)."""
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as failure:
            raise RunFolderError(f"{path}: cannot be opened as a cache file ({failure.strerror or failure}); "
                                 f"remove {self.folder} to rebuild it") from None
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:  # a hard link would write elsewhere too
            os.close(descriptor)
            what = "not a regular file" if not stat.S_ISREG(status.st_mode) else "a file with other links"
            raise RunFolderError(f"{path}: {what}; remove {self.folder} to rebuild it")
        return descriptor

    def _read_commits(self) -> list[list[int]]:
        saved = read_json(self.commits_file, limit=JSON_LIMIT, what="frozen-layer cache's commits",
                          error=RunFolderError)
        commits = saved.get("commits") if isinstance(saved, dict) and saved.get("format") == FORMAT else None
        if not (isinstance(commits, list) and all(
                isinstance(c, list) and len(c) == 3 and all(type(v) is int and v >= 0 for v in c) for c in commits)
                and [c[0] for c in commits] == sorted({c[0] for c in commits})):
            raise RunFolderError(f"{self.commits_file}: not a cache's commits; remove {self.folder} to rebuild it")
        return commits

    def _write_commits(self) -> None:
        write_text_atomic(self.commits_file, json.dumps({"format": FORMAT, "commits": self.commits}) + "\n")

    def _load_index(self, records: int, size: int) -> None:
        """The first `records` index records, each checked: a task and row of this run, its token
        count, right after the one before; together `size` bytes."""
        def damaged(problem: str) -> RunFolderError:
            return RunFolderError(f"{self.index_file}: {problem}; remove {self.folder} to rebuild it")

        if records > sum(len(counts) for counts in self.lengths.values()):
            raise damaged(f"its commit claims {records:,} rows, more than the run has")
        raw = os.pread(self._index, records * RECORD_BYTES, 0)
        if len(raw) != records * RECORD_BYTES:
            raise damaged("shorter than its commit")
        table = np.frombuffer(raw, dtype=np.int64).reshape(-1, RECORD_FIELDS)
        offset = 0
        for task_index, row, start, tokens in table.tolist():
            if not 0 <= task_index < len(self.tasks):
                raise damaged(f"a record names task {task_index}")
            task = self.tasks[task_index]
            if not (0 <= row < len(self.offsets[task]) and tokens == self.lengths[task][row] and start == offset):
                raise damaged(f"a record does not fit {task} row {row}")
            if self.offsets[task][row] >= 0:
                raise damaged(f"{task} row {row} is stored twice")
            self.offsets[task][row] = start
            offset += tokens * self.token_bytes
        if offset != size:
            raise damaged(f"its records cover {offset:,} bytes, its commit {size:,}")
        self.records, self.size = records, size


def _close(*descriptors: int) -> None:
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            os.close(descriptor)


# ----------------------------------------------------------------------------- a step's states
class FrozenStates:
    """A step's rows at layer k: read from the cache, or computed through the frozen layers (one
    pass over every row of every task the cache lacks) and stored; then padded for the top layers."""

    def __init__(self, encoder: nn.Module, layers: int, cache: StateCache, *, pad_id: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.encoder, self.layers, self.cache = encoder, layers, cache
        self.pad_id, self.autocast = pad_id, autocast
        self.dtype = next(encoder.parameters()).dtype  # what the encoder's own states are
        self.computed = 0  # rows run through the frozen layers so far (cache misses)

    def for_batches(self, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """{task: each row's states (tokens x hidden, bf16)} for batches carrying their `rows`."""
        found, missing = {}, {}
        for task, batch in batches.items():
            found[task] = [self.cache.get(task, row) for row in batch["rows"].tolist()]
            absent = [i for i, states in enumerate(found[task]) if states is None]
            if absent:
                missing[task] = absent
        if missing:
            self._compute(batches, missing, found)
        return found

    def _compute(self, batches, missing: dict[str, list[int]], found: dict[str, list]) -> None:
        rows = {}
        for task, absent in missing.items():
            batch = batches[task]
            index = torch.tensor(absent, device=batch["input_ids"].device)
            width = int(batch["attention_mask"][index].sum(1).max())
            rows[task] = {key: batch[key][index, :width] for key in ("input_ids", "attention_mask", "token_type_ids")
                          if key in batch}
        parts, joint = joint_batch(rows, self.pad_id)
        with self.autocast():
            states = bottom_states(self.encoder, self.layers, joint["input_ids"], joint["attention_mask"],
                                   joint.get("token_type_ids"))
        states = states.to(STATE_DTYPE).cpu()
        lengths = joint["attention_mask"].sum(1).tolist()
        for part in parts:
            ids = batches[part.task]["rows"].tolist()
            for j, i in enumerate(missing[part.task]):
                position = part.rows.start + j
                row_states = states[position, :lengths[position]].clone()
                self.cache.put(part.task, ids[i], row_states)
                found[part.task][i] = row_states
        self.computed += len(lengths)

    def padded(self, states: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
        """The rows' states right-padded with zeros to `width`, in the encoder's dtype on `device`."""
        out = torch.zeros(len(states), width, self.cache.hidden, dtype=STATE_DTYPE)
        for i, row in enumerate(states):
            out[i, :len(row)] = row
        return out.to(device).to(self.dtype)
