"""Metrics: per-task macro-F1 reports, the leaderboard score, a printable table, confusion plots.

The leaderboard score is the mean over the three tasks of each task's macro-F1, where macro-F1 is
averaged over *all* classes of the task (`Task.labels`): a class that is never predicted counts
with F1 0, a class absent from the gold labels counts too (F1 0), as scikit-learn's
`f1_score(average="macro", labels=task.labels, zero_division=0)` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from .tasks import Task, get_task


def _as_task(task: Task | str) -> Task:
    return task if isinstance(task, Task) else get_task(task)


def _as_labels(task: Task, values: Sequence[Any], what: str) -> list[str]:
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
    task = _as_task(task)
    gold = _as_labels(task, gold_labels, "gold")
    pred = _as_labels(task, predicted_labels, "predicted")
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


def plot_confusion(task: Task | str, gold: Sequence[Any], pred: Sequence[Any], path: str | Path) -> Path:
    """Write a PNG confusion matrix, rows normalised to sum to 1, class names on both axes."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    task = _as_task(task)
    gold_labels = _as_labels(task, gold, "gold")
    pred_labels = _as_labels(task, pred, "predicted")
    size = max(4.0, 0.55 * task.num_labels + 2.0)
    fig = Figure(figsize=(size, size))  # no pyplot: leaves a notebook's backend and figures alone
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        gold_labels, pred_labels, labels=list(task.labels), normalize="true",
        values_format=".2f", cmap="Blues", colorbar=False, ax=ax, xticks_rotation=45)
    ax.set_title(f"{task.name}: confusion (rows: gold, normalised)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- runs
def evaluate_run(run_dir: str | Path, *, data_dir: str | Path | None = None, plots: bool = True) -> dict:
    """Score a run's best model on its saved dev split; write `evaluation/` in the run folder.

    Writes `evaluation/report.json`, `evaluation/report.txt`, one confusion-matrix PNG per task
    and `evaluation/training.png` (losses, task weights and dev macro-F1 over steps).
    Returns {"reports", "mean_macro_f1", "probabilities": {task: [dev rows, labels]}}.
    """
    import json

    from .data import load_dev_rows, load_split_ids
    from .inference import LoadedRun

    run = LoadedRun(run_dir)
    dev_ids = load_split_ids(run.run_dir / "split.json")
    out_dir = run.run_dir / "evaluation"
    out_dir.mkdir(exist_ok=True)
    reports, probabilities = {}, {}
    for task in run.tasks:
        dev = load_dev_rows(data_dir or run.config.data.data_dir, task, dev_ids[task], run.run_dir / "split.json")
        labels = run.labels[task]
        probabilities[task] = run.probabilities(task, dev)
        predicted = [labels[i] for i in probabilities[task].argmax(-1)]
        reports[task] = task_report(task, dev["label"].tolist(), predicted)
        if plots:
            plot_confusion(task, dev["label"].tolist(), predicted, out_dir / f"confusion_{task}.png")
    result = {"reports": reports, "mean_macro_f1": leaderboard_score(reports)}
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.txt").write_text(format_report(reports) + "\n", encoding="utf-8")
    if plots and (run.run_dir / "metrics.jsonl").exists():
        plot_training(run.run_dir / "metrics.jsonl", out_dir / "training.png")
    return {**result, "probabilities": probabilities}


def read_metrics(path: str | Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training(metrics_path: str | Path, path: str | Path) -> Path:
    """Three panels over steps: per-task training loss, per-task loss weight, dev macro-F1."""
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    if train:
        steps = [r["step"] for r in train]
        for task in train[0]["loss"]:
            axes[0].plot(steps, [r["loss"][task] for r in train], label=task)
            axes[1].plot(steps, [r["weights"][task] for r in train], label=task)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="task loss weight", xlabel="step")
    if evals:
        steps = [r["step"] for r in evals]
        for task in evals[0]["macro_f1"]:
            axes[2].plot(steps, [r["macro_f1"][task] for r in evals], marker="o", label=task)
        axes[2].plot(steps, [r["mean_macro_f1"] for r in evals], marker="s", color="black", label="mean")
    axes[2].set(title="dev macro-F1", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
