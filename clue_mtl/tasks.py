"""The three competition tasks: files, columns, labels and text normalisation.

This module is the single source of truth: every reader, model head, submission writer and scorer
takes its file names, label order and normalisation from here.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable

# Zero-width and direction marks, soft hyphens and stray BOMs occur in train and test text alike
# and carry nothing a model can use; NFKC keeps them, so they are dropped explicitly.
_INVISIBLE = dict.fromkeys([0x00AD, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C,
                            0x202D, 0x202E, 0x2060, 0xFEFF])
# Full-width ASCII forms U+FF01..U+FF5E map to U+0021..U+007E; the ideographic space to a space.
_FULLWIDTH_TO_ASCII = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20} | _INVISIBLE


def fullwidth_to_ascii(text: str) -> str:
    """What the organisers did to OCNLI: full-width ASCII forms become ASCII (and invisibles go)."""
    return text.translate(_FULLWIDTH_TO_ASCII)


def nfkc_lower(text: str) -> str:
    """What the organisers did to OCEMOTION and TNEWS training text: Unicode NFKC, then lower case
    (and invisibles go)."""
    return unicodedata.normalize("NFKC", text).lower().translate(_INVISIBLE)


@dataclass(frozen=True)
class Task:
    name: str                      # short lower-case name used in configs, runs and the CLI
    train_file: str                # labelled training file, competition format
    test_a_file: str
    test_b_file: str
    text_columns: int              # 1 for single texts, 2 for sentence pairs
    labels: tuple[str, ...]        # fixed order: index i of a head's logits is labels[i]
    normalize: Callable[[str], str]
    submission_member: str         # file name inside the submission zip

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def columns(self) -> int:
        """Columns of a training row: id, the texts, the label."""
        return self.text_columns + 2

    def test_file(self, split: str) -> str:
        if split not in ("a", "b"):
            raise ValueError(f"test split must be 'a' or 'b', not {split!r}")
        return self.test_a_file if split == "a" else self.test_b_file

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


OCNLI = Task(
    name="ocnli",
    train_file="OCNLI_train1128.csv",
    test_a_file="OCNLI_a.csv",
    test_b_file="ocnli_test_B.csv",
    text_columns=2,
    labels=("0", "1", "2"),  # entailment, neutral, contradiction
    normalize=fullwidth_to_ascii,
    submission_member="ocnli_predict.json",
)

OCEMOTION = Task(
    name="ocemotion",
    train_file="OCEMOTION_train1128.csv",
    test_a_file="OCEMOTION_a.csv",
    test_b_file="ocemotion_test_B.csv",
    text_columns=1,
    labels=("sadness", "happiness", "disgust", "like", "anger", "surprise", "fear"),
    normalize=nfkc_lower,
    submission_member="ocemotion_predict.json",
)

TNEWS = Task(
    name="tnews",
    train_file="TNEWS_train1128.csv",
    test_a_file="TNEWS_a.csv",
    test_b_file="tnews_test_B.csv",
    text_columns=1,
    labels=tuple(str(code) for code in range(100, 117) if code not in (105, 111)),
    normalize=nfkc_lower,
    submission_member="tnews_predict.json",
)

TASKS: dict[str, Task] = {task.name: task for task in (OCNLI, OCEMOTION, TNEWS)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


MLM_TASK = "mlm"  # the auxiliary masked-LM task's name in losses, weights and logs (`auxiliary_mlm:`)


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}") from None


def as_task(task: Task | str) -> Task:
    """A task given by itself or by name."""
    return task if isinstance(task, Task) else get_task(task)
