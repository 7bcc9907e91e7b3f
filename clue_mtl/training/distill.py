"""Knowledge distillation: teachers' soft labels, the student's loss, BAM teacher annealing.

Soft labels are the class probabilities of one or more trained runs (teachers) over every row of
every task's training file, averaged over the runs that have the task. They live in one
safetensors file: a float32 matrix per task (rows in training-file order, columns in the task's
label order; where several teachers cover a task, also each teacher's own matrix, `task/k`) and, in the file's metadata under `clue_mtl.soft_labels`, a JSON object with the ids,
labels and row digests of each task and, per teacher, its run folder, resolved config and best dev
scores. The digests (8 bytes of BLAKE2b over each row's texts) let a student refuse soft labels
made from another training file whose ids happen to match.

The student's loss mixes the two targets:

    loss = mix * soft + (1 - mix) * cross_entropy(logits, gold)

- kind "kl":      soft = T^2 * KL(q_T || softmax(logits / T)), averaged over rows
- kind "soft_ce": soft = T^2 * -sum_c q_T[c] * log_softmax(logits / T)[c]  (= the KL plus the
                  teacher's entropy, a constant: the same gradients, a loss that never reaches 0;
                  refused with the weighting methods that read loss sizes, `config.LOSS_READERS`)

where q_T = softmax(log(q) / T) is the teacher's distribution q at temperature T (the teacher's
softmax(z / T) recovered from its probabilities, since log softmax(z) = z - const). With several
teachers, q_T is the mean of each teacher's tempered distribution (Hinton et al.'s ensemble
target), not the mean distribution tempered; at T = 1 the two are the same. Hinton et al.
(2015) scale the soft term by T^2 so its gradients keep their size as T changes. Class weights
apply to the hard term only.

BAM (Clark et al., 2019, "Born-Again Multi-Task Networks") anneals from the teacher to the gold
label: the target is lambda * gold + (1 - lambda) * teacher with lambda rising linearly from 0 to 1
over training, i.e. a teacher weight `mix = annealed_mix(step, total)` falling from 1 to 0. With
kind "soft_ce", T = 1 and no class weights, `distillation_loss(mix=m)` equals the cross-entropy
against `annealed_target` at the same point (cross-entropy is linear in its target).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clue_mtl.atomic import replace_file
from clue_mtl.config import read_yaml
from clue_mtl.errors import SoftLabelError
from clue_mtl.runs.folder import RunFolder
from clue_mtl.tasks import TASK_NAMES, get_task

METADATA_KEY = "clue_mtl.soft_labels"
FORMAT_VERSION = 1
SUM_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Soft labels: writing and reading


@dataclass
class SoftLabels:
    """Per task: the training rows' ids and their teacher probabilities; the teachers' records."""

    ids: dict[str, list[str]]
    probs: dict[str, np.ndarray]            # task -> float32 (rows, num_labels), rows as in `ids`
    # task -> float32 (teachers, rows, num_labels), for tasks that several teachers cover
    per_teacher: dict[str, np.ndarray] = field(default_factory=dict)
    teachers: list[dict] = field(default_factory=list)
    path: str = ""
    digests: dict[str, list[str]] = field(default_factory=dict)  # task -> row digests, as `ids` (may be absent)
    teacher_counts: dict[str, int] = field(default_factory=dict)  # task -> how many teachers cover it
    _index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.probs)

    def for_ids(self, task: str, ids: Iterable) -> np.ndarray:
        """The probability rows of `ids` (e.g. a training frame's id column), in that order."""
        return self.probs[task][self._rows(task, ids)]

    def for_frame(self, task: str, frame) -> np.ndarray:
        """Each teacher's probabilities for a training frame's rows (rows, teachers, labels), after
        checking that each row's texts are those the teachers predicted (the same id with another
        text is another row). A file with the mean alone gives it as one teacher."""
        rows = self._rows(task, frame["id"])
        if task in self.digests:
            for row, id_, digest in zip(rows, frame["id"].astype(str), row_digests(frame)):
                if self.digests[task][row] != digest:
                    raise SoftLabelError(f"{self.path or 'soft labels'}: {task} row {id_!r} has other text than "
                                         "the row the soft labels were made from (another training file?)")
        if task in self.per_teacher:
            return self.per_teacher[task][:, rows].transpose(1, 0, 2)
        return self.probs[task][rows][:, None, :]

    def _rows(self, task: str, ids: Iterable) -> list[int]:
        """The file's row of each id, in the order given; every id must be there."""
        if task not in self.probs:
            raise SoftLabelError(f"{self.path or 'soft labels'}: no soft labels for {task}; "
                                 f"they cover {', '.join(self.tasks) or 'no task'}")
        if task not in self._index:
            self._index[task] = {id_: row for row, id_ in enumerate(self.ids[task])}
        index = self._index[task]
        ids = [str(id_) for id_ in ids]
        missing = [id_ for id_ in ids if id_ not in index]
        if missing:
            raise SoftLabelError(f"{self.path or 'soft labels'}: {task} has no soft label for id {missing[0]!r} "
                                 f"({len(missing)} of {len(ids)} ids missing; were they made from another "
                                 f"training file?)")
        return [index[id_] for id_ in ids]

    def check_temperature(self, temperature: float) -> None:
        """Raise where T != 1 needs each teacher's distribution and the file has only their mean
        (a file written before it kept them): the target would be the mean tempered instead."""
        lacking = [t for t, n in self.teacher_counts.items() if n > 1 and t not in self.per_teacher]
        if temperature != 1.0 and lacking:
            raise SoftLabelError(f"{self.path or 'soft labels'}: {', '.join(lacking)} average several teachers but "
                                 f"keep only the mean; distill.temperature {temperature} needs each teacher's "
                                 "probabilities: write the file again with `clue-mtl distill-labels`")

    def check_split(self, dev_fraction: float, split_seed: int) -> None:
        """Raise unless every teacher held out the same dev rows as a student with this split.

        A teacher trained on the student's dev rows carries their labels into the soft labels of
        neighbouring training rows, which makes the student's dev score optimistic.
        """
        different = []
        for teacher in self.teachers:
            data = (teacher.get("config") or {}).get("data", {})
            if (data.get("dev_fraction"), data.get("split_seed")) != (dev_fraction, split_seed):
                different.append(f"{teacher['run_dir']} (dev_fraction {data.get('dev_fraction')}, "
                                 f"split_seed {data.get('split_seed')})")
        if different:
            raise SoftLabelError(f"teachers split the data differently from dev_fraction {dev_fraction}, "
                                 f"split_seed {split_seed}: {'; '.join(different)}")


def row_digests(frame) -> list[str]:
    """8 bytes of BLAKE2b over each row's texts (sentence pairs joined by a unit separator), hex."""
    second = frame["text_b"] if "text_b" in frame else [None] * len(frame)
    return [hashlib.blake2b(f"{a}\x1f{b or ''}".encode("utf-8"), digest_size=8).hexdigest()
            for a, b in zip(frame["text_a"], second)]


def write_soft_labels(run_dirs: Sequence[str | Path], out_path: str | Path, data_dir: str | Path | None = None,
                      *, tasks: Sequence[str] | None = None, max_rows: int | None = None,
                      batch_size: int = 256, device: str | torch.device | None = None) -> Path:
    """Average the runs' class probabilities over every row of each task's training file; save them.

    A task is covered by the runs that predict it (single- and multi-task runs may be mixed).
    `data_dir` defaults to the first run's. `tasks` restricts the tasks; `max_rows` keeps only the
    first rows of each file (for tests: soft labels for training must cover the whole file).
    """
    from clue_mtl.data.folder import load_split
    from clue_mtl.predict.inference import LoadedRun

    if not run_dirs:
        raise SoftLabelError("write_soft_labels needs at least one run folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    each: dict[str, list[np.ndarray]] = {}  # task -> every teacher's probabilities
    frames: dict = {}
    teachers = []
    for run_dir in run_dirs:
        run = LoadedRun(run_dir, device=device)
        data_dir = data_dir or run.config.data.data_dir
        covered = [task for task in run.tasks if tasks is None or task in tasks]
        for task in covered:
            if run.labels[task] != list(get_task(task).labels):
                raise SoftLabelError(f"{run.run_dir}: {task} labels {run.labels[task]} are not in the "
                                     f"task's order {list(get_task(task).labels)}")
            if task not in frames:
                frame = load_split(data_dir, task, "train")
                frames[task] = frame if max_rows is None else frame.head(max_rows)
            each.setdefault(task, []).append(run.probabilities(task, frames[task], batch_size=batch_size))
        if covered:
            teachers.append(_teacher_record(run.run_dir, covered))
        del run
    missing = [task for task in (tasks or []) if task not in each]
    if missing:
        raise SoftLabelError(f"no run predicts {', '.join(missing)}")

    ordered = [task for task in TASK_NAMES if task in each]
    counts = {task: len(each[task]) for task in ordered}
    tensors = {task: torch.from_numpy(np.mean(np.stack(each[task]).astype(np.float64), axis=0).astype(np.float32))
               for task in ordered}
    for task in ordered:
        if counts[task] > 1:  # each teacher's own, for the ensemble target at T != 1
            tensors |= {f"{task}/{k}": torch.from_numpy(np.asarray(p, dtype=np.float32))
                        for k, p in enumerate(each[task])}
    meta = {
        "format": FORMAT_VERSION,
        "data_dir": str(data_dir),
        "tasks": {task: {"ids": frames[task]["id"].astype(str).tolist(), "labels": list(get_task(task).labels),
                         "digests": row_digests(frames[task]), "teachers": counts[task]} for task in ordered},
        "teachers": teachers,
    }
    from safetensors.torch import save_file

    metadata = {METADATA_KEY: json.dumps(meta, ensure_ascii=False)}
    return replace_file(out_path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _teacher_record(run_dir: Path, tasks: list[str]) -> dict:
    """The run folder, its resolved config, its best dev evaluation, and its sources if averaged."""
    folder = RunFolder(run_dir)
    record = {
        "run_dir": str(folder.path.resolve()),
        "tasks": tasks,
        "config": read_yaml(folder.config_file),
        "best": folder.best_evaluation(),
    }
    if folder.averaged_from_file.exists():
        record["averaged_from"] = json.loads(folder.averaged_from_file.read_text(encoding="utf-8"))
    return record


def read_soft_labels(path: str | Path) -> SoftLabels:
    """Load and check a soft-label file: shapes match ids and label counts, rows sum to one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SoftLabelError(f"{path}: soft-label file not found")
    try:
        with safe_open(str(path), framework="numpy") as file:
            raw = (file.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise SoftLabelError(f"{path}: not a soft-label file (no {METADATA_KEY} metadata)")
            meta = json.loads(raw)
            probs = {task: file.get_tensor(task) for task in file.keys()}
    except SoftLabelError:
        raise
    except Exception as error:  # SafetensorError, JSON errors, RecursionError: not a file we wrote
        raise SoftLabelError(f"{path}: not a readable soft-label file ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SoftLabelError(f"{path}: format {found!r}, expected {FORMAT_VERSION}")
    well_formed = isinstance(meta.get("tasks"), dict) and all(
        task in TASK_NAMES and isinstance(entry, dict) and isinstance(entry.get("ids"), list)
        for task, entry in meta["tasks"].items()) and isinstance(meta.get("teachers", []), list) and all(
        isinstance(teacher, dict) for teacher in meta.get("teachers", []))
    if not well_formed:
        raise SoftLabelError(f"{path}: the {METADATA_KEY} metadata does not describe the tasks' ids")
    own_matrices = {key: probs.pop(key) for key in [k for k in probs if "/" in k]}  # `task/k`: each teacher's
    problems = []
    if set(probs) != set(meta["tasks"]):
        problems.append(f"matrices for {sorted(probs)} but ids for {sorted(meta['tasks'])}")
    strays = sorted(key for key in own_matrices if key.split("/")[0] not in probs)
    if strays:
        problems.append(f"teachers' matrices {strays[:3]} belong to no task of the file")
    ids, digests, per_teacher, counts = {}, {}, {}, {}
    for task, entry in meta["tasks"].items():
        if task not in probs:
            continue
        spec = get_task(task)
        ids[task] = [str(id_) for id_ in entry["ids"]]
        if entry.get("labels") != list(spec.labels):
            problems.append(f"{task}: labels {entry.get('labels')} differ from the task's {list(spec.labels)}")
        if len(set(ids[task])) != len(ids[task]):
            problems.append(f"{task}: duplicate ids")
        if "digests" in entry:
            digests[task] = entry["digests"]
            if not (isinstance(digests[task], list) and len(digests[task]) == len(ids[task])
                    and all(isinstance(d, str) for d in digests[task])):
                problems.append(f"{task}: the row digests do not match the ids")
        problems += _matrix_problems(task, probs[task], ids[task])
        count = entry.get("teachers", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
            problems.append(f"{task}: teachers must be a count, found {count!r:.40}")
            continue
        counts[task] = count
        own = {key: matrix for key, matrix in own_matrices.items() if key.split("/")[0] == task}
        if own:
            expected = [f"{task}/{k}" for k in range(count)]
            if sorted(own) != sorted(expected):
                problems.append(f"{task}: teachers' matrices {sorted(own)[:4]} for {count} teacher(s); expected {expected[:4]}")
                continue
            for key in expected:
                problems += _matrix_problems(key, own[key], ids[task])
            if not problems:
                per_teacher[task] = np.stack([own[key] for key in expected])
                difference = np.abs(per_teacher[task].astype(np.float64).mean(0) - probs[task])
                if not difference.max(initial=0.0) <= SUM_TOLERANCE:
                    problems.append(f"{task}: the teachers' own matrices do not average to the task's")
    if problems:
        raise SoftLabelError(f"{path}: " + "; ".join(problems))
    ordered = [task for task in TASK_NAMES if task in ids]
    return SoftLabels(ids={t: ids[t] for t in ordered}, probs={t: probs[t] for t in ordered},
                      teachers=meta.get("teachers", []), path=str(path), digests=digests, per_teacher=per_teacher,
                      teacher_counts=counts)


def _matrix_problems(name: str, matrix: np.ndarray, ids: list[str]) -> list[str]:
    """What is wrong with one probability matrix: dtype and shape, finiteness, rows summing to 1."""
    labels = get_task(name.split("/")[0]).num_labels
    if matrix.dtype != np.float32 or matrix.shape != (len(ids), labels):
        return [f"{name}: expected float32 of shape ({len(ids)}, {labels}), found {matrix.dtype} {matrix.shape}"]
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        return [f"{name}: negative or non-finite probabilities"]
    error = np.abs(matrix.astype(np.float64).sum(axis=1) - 1.0)
    if len(error) and error.max() > SUM_TOLERANCE:
        row = int(error.argmax())
        return [f"{name}: row {row} (id {ids[row]!r}) sums to {matrix[row].sum():.6f}, not 1"]
    return []


# ---------------------------------------------------------------------------------------------
# The student's loss


def tempered(teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's distribution at temperature T: softmax(log(p) / T), i.e. p^(1/T) renormalised."""
    if temperature == 1.0:
        return teacher_probs
    return torch.softmax(torch.log(teacher_probs.clamp_min(1e-12)) / temperature, dim=-1)


def distillation_loss(logits: torch.Tensor, gold: torch.Tensor, teacher_probs: torch.Tensor, *, mix: float,
                      temperature: float = 1.0, kind: str = "kl",
                      class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """mix * soft + (1 - mix) * cross_entropy(logits, gold, weight=class_weight); see the module doc.

    logits (rows, classes), gold (rows,) label indices, teacher_probs (rows, classes) or, for
    several teachers, (rows, teachers, classes), at T = 1: each is tempered, then averaged.
    The loss is computed in float32 and averaged over rows.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], not {mix}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    logits = logits.float()
    hard = F.cross_entropy(logits, gold, weight=class_weight)
    if mix == 0.0:
        return hard
    target = tempered(teacher_probs.float().to(logits.device), temperature)
    if target.dim() == 3:
        target = target.mean(1)
    log_student = F.log_softmax(logits / temperature, dim=-1)
    if kind == "kl":
        soft = F.kl_div(log_student, target, reduction="batchmean")
    elif kind == "soft_ce":
        soft = -(target * log_student).sum(-1).mean()
    else:
        raise ValueError(f"kind must be 'kl' or 'soft_ce', not {kind!r}")
    return mix * temperature ** 2 * soft + (1.0 - mix) * hard


def annealed_mix(step: int, total_steps: int, start: float = 1.0, end: float = 0.0) -> float:
    """The teacher's weight at `step` of `total_steps`, moving linearly from `start` to `end`.

    BAM: 1 - lambda with lambda = step / total_steps, so the first step learns from the teacher
    alone and the last almost from the gold labels alone.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, not {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * progress


def annealed_target(gold_onehot: torch.Tensor, teacher_probs: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """BAM's target lambda * gold + (1 - lambda) * teacher, lambda = step / total (clamped to [0, 1]).

    `gold_onehot` may also be a vector of label indices; `teacher_probs` is (rows, classes): one
    teacher, or the teachers' mean.
    """
    if gold_onehot.dim() == 1:
        gold_onehot = F.one_hot(gold_onehot, teacher_probs.shape[-1])
    teacher_weight = annealed_mix(step, total)
    return (1.0 - teacher_weight) * gold_onehot.to(teacher_probs.dtype) + teacher_weight * teacher_probs
