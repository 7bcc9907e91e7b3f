"""Metrics: per-task macro-F1 reports, the leaderboard score and a printable table (no torch).

The leaderboard score is the mean over the three tasks of each task's macro-F1, where macro-F1 is
averaged over *all* classes of the task (`Task.labels`): a class that is never predicted counts
with F1 0, a class absent from the gold labels counts too (F1 0), as scikit-learn's
`f1_score(average="macro", labels=task.labels, zero_division=0)` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from clue_mtl.tasks import Task, as_task


def checked_labels(task: Task, values: Sequence[Any], what: str) -> list[str]:
    labels = [str(value) for value in values]
    known = set(task.labels)
    unknown = sorted({label for label in labels if label not in known})
    if unknown:
        shown = ", ".join(repr(label) for label in unknown[:5])
        raise ValueError(f"{task.name}: {what} labels not in the task's label set: {shown}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return labels


def task_report(task: Task | str, gold_labels: Sequence[Any], predicted_labels: Sequence[Any]) -> dict:
    """Macro-F1 over all of the task's classes, accuracy, and per-class precision/recall/F1/support.

    Labels are compared as strings; a label outside the task's label set raises `ValueError`.
    Returns {"task", "n", "macro_f1", "accuracy", "per_class": {label: {precision, recall, f1,
    support}}} with plain Python numbers, in the task's label order.
    """
    task = as_task(task)
    gold = checked_labels(task, gold_labels, "gold")
    pred = checked_labels(task, predicted_labels, "predicted")
    if len(gold) != len(pred):
        raise ValueError(f"{task.name}: {len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError(f"{task.name}: no rows to score")
    labels = list(task.labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred, labels=labels, average=None, zero_division=0)
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    macro = f1_score(gold, pred, labels=labels, average="macro", zero_division=0)
    return {
        "task": task.name,
        "n": len(gold),
        "macro_f1": float(macro),
        "accuracy": float(accuracy_score(gold, pred)),
        "per_class": per_class,
    }


def _report_list(reports: Mapping[str, dict] | Iterable[dict]) -> list[dict]:
    return list(reports.values()) if isinstance(reports, Mapping) else list(reports)


def leaderboard_score(reports: Mapping[str, dict] | Iterable[dict]) -> float:
    """The mean of the tasks' macro-F1 (a mapping task -> report, or a list of reports)."""
    items = _report_list(reports)
    if not items:
        raise ValueError("no task reports to average")
    return float(np.mean([report["macro_f1"] for report in items]))


def format_report(reports: Mapping[str, dict] | Iterable[dict]) -> str:
    """A plain-text table: per task its macro-F1, accuracy and per-class F1; the mean last."""
    items = _report_list(reports)
    lines: list[str] = []
    for report in items:
        lines.append(f"{report['task']:<10} macro-F1 {report['macro_f1']:.4f}   "
                     f"accuracy {report['accuracy']:.4f}   n {report['n']}")
        lines.append(f"  {'class':<10} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}")
        for label, row in report["per_class"].items():
            lines.append(f"  {label:<10} {row['precision']:>9.4f} {row['recall']:>7.4f} "
                         f"{row['f1']:>7.4f} {row['support']:>8d}")
    if items:
        lines.append(f"{'mean':<10} macro-F1 {leaderboard_score(items):.4f}   "
                     f"({len(items)} task{'s' if len(items) != 1 else ''})")
    return "\n".join(lines)


def macro_f1(gold: np.ndarray, predicted: np.ndarray, num_labels: int) -> float:
    """Macro-F1 of label indices over all `num_labels` classes (absent or never predicted ones
    count as 0), as `task_report`; fast enough to call thousands of times (the blend's bias
    search, the bootstrap)."""
    confusion = np.bincount(gold * num_labels + predicted, minlength=num_labels * num_labels)
    confusion = confusion.reshape(num_labels, num_labels)
    true_positive = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(num_labels), where=denominator > 0)
    return float(f1.mean())


def paired_bootstrap(pairs: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
                     gold: Mapping[str, tuple[np.ndarray, int]], samples: int = 1000, seed: int = 0) -> dict:
    """The mean over tasks of a variant's macro-F1 minus a default's, averaged over `pairs` (one
    (variant, default) pair of predicted label indices per task, a pair per seed), with a 95%
    interval from resampling each task's rows; one resample is shared by every pair, so the
    interval is of the paired difference. `gold`: task -> (label indices, number of labels)."""
    rng = np.random.default_rng(seed)
    point, draws = 0.0, np.zeros(samples)
    share = 1 / len(gold) / len(pairs)
    for task, (truth, num_labels) in gold.items():
        truth = np.asarray(truth)
        resamples = [rng.integers(0, len(truth), len(truth)) for _ in range(samples)]
        for variant, default in pairs:
            right, left = np.asarray(variant[task]), np.asarray(default[task])
            point += (macro_f1(truth, right, num_labels) - macro_f1(truth, left, num_labels)) * share
            for i, rows in enumerate(resamples):
                draws[i] += (macro_f1(truth[rows], right[rows], num_labels)
                             - macro_f1(truth[rows], left[rows], num_labels)) * share
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"difference": point, "low": float(low), "high": float(high), "samples": samples}
