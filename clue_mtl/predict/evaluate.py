"""Run evaluation and its plots: a run's best model scored on its dev split, confusion matrices,
training curves. Metrics themselves are in `metrics.py`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clue_mtl.predict.metrics import checked_labels, format_report, leaderboard_score, task_report
from clue_mtl.tasks import Task, as_task


def plot_confusion(task: Task | str, gold: Sequence[Any], pred: Sequence[Any], path: str | Path) -> Path:
    """Write a PNG confusion matrix, rows normalised to sum to 1, class names on both axes."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    task = as_task(task)
    gold_labels = checked_labels(task, gold, "gold")
    pred_labels = checked_labels(task, pred, "predicted")
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
    from clue_mtl.data.folder import dev_frames, load_split_ids
    from clue_mtl.predict.inference import LoadedRun

    run = LoadedRun(run_dir)
    folder = run.folder
    dev_ids = load_split_ids(folder.split_file)
    out_dir = folder.evaluation_dir
    out_dir.mkdir(exist_ok=True)
    reports, probabilities = {}, {}
    devs = dev_frames(data_dir or run.config.data.data_dir, run.tasks, dev_ids, folder.split_file)
    for task, dev in devs.items():
        labels = run.labels[task]
        probabilities[task] = run.probabilities(task, dev)
        predicted = [labels[i] for i in probabilities[task].argmax(-1)]
        reports[task] = task_report(task, dev["label"].tolist(), predicted)
        if plots:
            plot_confusion(task, dev["label"].tolist(), predicted, out_dir / f"confusion_{task}.png")
    result = {"reports": reports, "mean_macro_f1": leaderboard_score(reports)}
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.txt").write_text(format_report(reports) + "\n", encoding="utf-8")
    if plots and folder.metrics_file.exists():
        plot_training(folder.metrics(), out_dir / "training.png")
    return {**result, "probabilities": probabilities}


def plot_training(records: list[dict], path: str | Path) -> Path:
    """Three panels over steps of a metrics log (`RunFolder.metrics()`): per-task training loss,
    per-task loss weight, dev macro-F1."""
    from matplotlib.figure import Figure

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
