"""Tokenised task data and the multi-task batch stream.

Every optimiser step draws one batch from every task, so per-task losses exist at each step. A
task's batch size follows a sampling rule over dataset sizes (proportional, |D|^alpha, uniform).
The stream is a pure function of (seed, step): resuming at step k rebuilds exactly the batches an
uninterrupted run would have seen, and process r of w takes rows r, r+w, ... of each global batch.

Segment ids: where the tokenizer makes `token_type_ids` (BERT-style: 0 for text A, 1 for text B
of a pair), they are kept beside the input ids and every batch carries them; where it makes none
(XLM-R, e5), batches hold input ids and attention mask only, as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from clue_mtl.atomic import replace_file
from clue_mtl.tasks import get_task

LENGTH_GROUP_SPAN = 50  # batches per length-sorted chunk: long enough to group, short enough to stay random


@dataclass
class EncodedTask:
    """One task's rows, tokenised once: token ids without padding, labels as indices."""

    task: str
    ids: list[str]
    input_ids: list[np.ndarray]
    labels: np.ndarray | None  # label indices, None for unlabelled test rows
    soft_labels: np.ndarray | None = None  # teachers' class probabilities per row, for distillation
    token_type_ids: list[np.ndarray] | None = None  # segment ids per row; None: the tokenizer makes none

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(row) for row in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def makes_token_type_ids(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer returns segment ids (BERT: yes; XLM-R and e5: no)."""
    return "token_type_ids" in tokenizer.model_input_names


def encode_frame(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, task: str, *, max_length: int,
                 cache_dir: str | Path | None = None, fingerprint: str | None = None) -> EncodedTask:
    """Tokenise a task's frame (columns id, text_a, text_b, optional label); pairs as tokenizer(a, b).

    With `cache_dir`, the result is stored under a key of the tokenizer, max length, the fields
    kept and the texts, and later calls with the same inputs load it instead of tokenising again.
    """
    spec = get_task(task)
    texts_a = frame["text_a"].tolist()
    texts_b = frame["text_b"].tolist() if spec.text_columns == 2 else None
    labels = None
    if "label" in frame.columns:
        index = spec.label_index()
        labels = np.array([index[label] for label in frame["label"]], dtype=np.int64)
    ids = frame["id"].astype(str).tolist()
    segments = makes_token_type_ids(tokenizer)

    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha1()
        digest.update((fingerprint or tokenizer_fingerprint(tokenizer)).encode())
        digest.update(f"{task}|{max_length}".encode())
        if segments:  # the key of a tokenizer without segment ids stays as it was
            digest.update(b"|token_type_ids")
        for text in texts_a + (texts_b or []):
            digest.update(text.encode("utf-8") + b"\x00")
        cache_file = Path(cache_dir) / f"{task}-{digest.hexdigest()[:20]}.npz"
        if cache_file.exists():
            stored = np.load(cache_file)
            ends = stored["offsets"][1:-1]
            token_types = np.split(stored["token_type_flat"], ends) if segments else None
            return EncodedTask(task, ids, np.split(stored["flat"], ends), labels, token_type_ids=token_types)

    encoded = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length,
                        return_token_type_ids=segments, return_attention_mask=False)
    input_ids = [np.asarray(row, dtype=np.int32) for row in encoded["input_ids"]]
    token_types = [np.asarray(row, dtype=np.int8) for row in encoded["token_type_ids"]] if segments else None
    if cache_file is not None:
        arrays = {"flat": np.concatenate(input_ids),
                  "offsets": np.concatenate([[0], np.cumsum([len(row) for row in input_ids])])}
        if segments:
            arrays["token_type_flat"] = np.concatenate(token_types)
        replace_file(cache_file, lambda temporary: np.savez(temporary, **arrays))  # processes may race to write
    return EncodedTask(task, ids, input_ids, labels, token_type_ids=token_types)


def task_batch_sizes(sizes: dict[str, int], total: int, rule: str = "power", alpha: float = 0.75) -> dict[str, int]:
    """Split `total` rows per step over tasks: proportional to |D|, to |D|^alpha, or uniform.

    Largest-remainder rounding; every task gets at least one row.
    """
    exponent = {"proportional": 1.0, "power": alpha, "uniform": 0.0}[rule]
    if total < len(sizes):
        raise ValueError(f"batch size {total} cannot give each of {len(sizes)} tasks a row")
    shares = np.array([sizes[t] ** exponent for t in sizes], dtype=np.float64)
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    while (counts == 0).any():  # a tiny task still gets a row, taken from the largest
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return {task: int(count) for task, count in zip(sizes, counts)}


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  length_grouping: bool) -> list[np.ndarray]:
    """One epoch's batches of row indices; with grouping, rows of similar length share a batch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batch_size = min(batch_size, len(lengths))
    if length_grouping:
        span = batch_size * LENGTH_GROUP_SPAN
        chunks = [order[i:i + span] for i in range(0, len(order), span)]
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in chunks])
    full = len(order) // batch_size * batch_size
    batches = [order[i:i + batch_size] for i in range(0, full, batch_size)]
    if length_grouping:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_batch(rows: list[np.ndarray], pad_id: int, pad_to_multiple_of: int | None = None,
              token_types: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`; `token_type_ids` too (padded with 0) when
    `token_types` are given."""
    width = max(len(row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if token_types is not None:
        token_type_ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(token_types):
            token_type_ids[i, :len(row)] = row
        batch["token_type_ids"] = torch.from_numpy(token_type_ids)
    return batch


def pad_rows(data: EncodedTask, rows: np.ndarray, pad_id: int,
             pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """`pad_batch` of the given rows of `data`, with their segment ids where `data` has them."""
    token_types = None if data.token_type_ids is None else [data.token_type_ids[i] for i in rows]
    return pad_batch([data.input_ids[i] for i in rows], pad_id, pad_to_multiple_of, token_types)


@dataclass(frozen=True)
class TaskRows:
    """Where one task's batch lies in a joint batch: its rows, and its own padded width."""
    task: str
    rows: slice
    width: int


def joint_batch(batches: dict[str, dict[str, torch.Tensor]], pad_id: int
                ) -> tuple[tuple[TaskRows, ...], dict[str, torch.Tensor]]:
    """The tasks' batches stacked into one, right-padded to the widest (`pad_id`, attention mask 0,
    segment 0): one encoder pass for every task. Segment ids are zeros for a task without them
    (what the encoder assumes when given none), and absent when no task has them. `pad_id` is the
    tokenizer's, so the added padding is what a task's own batch would have held."""
    width = max(batch["input_ids"].shape[1] for batch in batches.values())
    with_segments = any("token_type_ids" in batch for batch in batches.values())
    parts, columns, start = [], {"input_ids": [], "attention_mask": [], "token_type_ids": []}, 0
    for task, batch in batches.items():
        rows, own_width = batch["input_ids"].shape
        parts.append(TaskRows(task, slice(start, start + rows), own_width))
        start += rows
        extra = (0, width - own_width)
        columns["input_ids"].append(torch.nn.functional.pad(batch["input_ids"], extra, value=pad_id))
        columns["attention_mask"].append(torch.nn.functional.pad(batch["attention_mask"], extra, value=0))
        if with_segments:
            segments = batch.get("token_type_ids", torch.zeros_like(batch["input_ids"]))
            columns["token_type_ids"].append(torch.nn.functional.pad(segments, extra, value=0))
    joint = {key: torch.cat(values) for key, values in columns.items() if values}
    return tuple(parts), joint


class TaskStream:
    """An endless, seeded sequence of one task's batches, addressable by step."""

    def __init__(self, data: EncodedTask, batch_size: int, seed: int, length_grouping: bool):
        self.data, self.batch_size, self.seed, self.length_grouping = data, batch_size, seed, length_grouping
        self.lengths = data.lengths
        self._epoch, self._batches = -1, []
        self.batches_per_epoch = max(1, len(data) // batch_size)

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.length_grouping)
        return self._batches[position]


class MultiTaskBatches:
    """The batch of every task for a given step, as this process's share of the global batch;
    `with_rows`: each batch also carries its rows' indices in the task's data (`rows`)."""

    def __init__(self, encoded: dict[str, EncodedTask], batch_sizes: dict[str, int], *, seed: int,
                 pad_id: int, length_grouping: bool = True, pad_to_multiple_of: int | None = None,
                 process_index: int = 0, num_processes: int = 1, with_rows: bool = False):
        self.pad_id, self.pad_to_multiple_of, self.with_rows = pad_id, pad_to_multiple_of, with_rows
        self.process_index, self.num_processes = process_index, num_processes
        self.streams = {
            task: TaskStream(data, batch_sizes[task] * num_processes, seed + 1000 * i, length_grouping)
            for i, (task, data) in enumerate(encoded.items())
        }

    def __getitem__(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        batches = {}
        for task, stream in self.streams.items():
            rows = stream.indices(step)[self.process_index::self.num_processes]
            batch = pad_rows(stream.data, rows, self.pad_id, self.pad_to_multiple_of)
            batch["labels"] = torch.from_numpy(stream.data.labels[rows])
            if stream.data.soft_labels is not None:
                batch["teacher_probs"] = torch.from_numpy(stream.data.soft_labels[rows])
            if self.with_rows:
                batch["rows"] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
            batches[task] = batch
        return batches

    def epochs_seen(self, step: int) -> dict[str, float]:
        return {task: step / stream.batches_per_epoch for task, stream in self.streams.items()}


def inference_batches(data: EncodedTask, batch_size: int, pad_id: int,
                      pad_to_multiple_of: int | None = None) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Batches in length order (little padding); yields the row indices with each batch."""
    order = np.argsort(data.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, pad_rows(data, rows, pad_id, pad_to_multiple_of)
