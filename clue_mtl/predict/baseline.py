"""A CPU baseline: TF-IDF over character n-grams and logistic regression, one model per task.

Choices, measured on the dev split (`stratified_split(frame, 0.1, 42)`, macro-F1):
- character 1-3-grams, sublinear TF, min_df 2;
- jieba words (uni- and bigrams) beside the character n-grams did not pay: OCNLI 0.5669 against
  0.5721, OCEMOTION 0.4962 against 0.4994, TNEWS 0.5579 against 0.5572, at twice the time;
- one-vs-rest logistic regression (liblinear, C=1) with class_weight="balanced": better macro-F1
  than the multinomial lbfgs model (TNEWS 0.557 vs 0.524, OCEMOTION 0.499 vs 0.466) and several
  times faster; without balancing, TNEWS drops to 0.501;
- OCNLI: the hypothesis' n-grams, split into those absent from the premise and those shared with
  it (one vectoriser fitted on both sentences). 0.573, against 0.37 for the concatenation
  "premise ||| hypothesis" and 0.48 for two stacked per-sentence vectorisers; the premise's own
  n-grams hurt.

Class probabilities are the one-vs-rest sigmoids normalised to sum to one (as scikit-learn's
`OneVsRestClassifier.predict_proba`); a blend (`clue_mtl.predict.blend`) learns how far to trust them.

A fitted baseline is a folder, written without pickle: `baseline.json` (settings, dev scores),
`split.json` and `labels.json` as in a run folder, and per task `TASK.json` (the vocabulary in
column order) with `TASK.safetensors` (idf, coefficients, intercepts).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from clue_mtl.atomic import recover_folder, replace_folder
from clue_mtl.data.folder import (
    DataError,
    check_training_files,
    checked_test_files,
    load_split,
    save_split,
    stratified_split,
)
from clue_mtl.predict.metrics import format_report, leaderboard_score, task_report
from clue_mtl.predict.submission import write_streamed_submission
from clue_mtl.runs.folder import RunFolder
from clue_mtl.tasks import TASK_NAMES, TASKS, Task, get_task
from clue_mtl.untrusted import LARGE_LIMIT, first_line, read_json, safetensors_shapes

BASELINE_FILE = "baseline.json"
FORMAT = 1
_NGRAMS = (1, 3)
_ABSENT_CLASS_INTERCEPT = -20.0  # sigmoid about 2e-9


def _vectorizer(vocabulary: list[str] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char", ngram_range=_NGRAMS, sublinear_tf=True, min_df=2,
                           vocabulary=vocabulary, dtype=np.float32)


class BaselineModel:
    """TF-IDF character n-grams + one-vs-rest balanced logistic regression for one task.

    `coef` and `intercept` are kept in the task's label order (`Task.labels`), so `probabilities`
    columns line up with a neural run's heads.
    """

    def __init__(self, task: Task | str, *, C: float = 1.0):
        self.task = task if isinstance(task, Task) else get_task(task)
        self.C = C
        self.vectorizer = _vectorizer()
        self.coef: np.ndarray | None = None       # [labels, features]
        self.intercept: np.ndarray | None = None  # [labels]

    def _features(self, frame: pd.DataFrame) -> sp.csr_matrix:
        if self.task.text_columns == 1:
            return self.vectorizer.transform(frame["text_a"])
        premise = self.vectorizer.transform(frame["text_a"])
        hypothesis = self.vectorizer.transform(frame["text_b"])
        shared = hypothesis.multiply(premise > 0)
        return sp.hstack([hypothesis - shared, shared]).tocsr()

    def fit(self, frame: pd.DataFrame) -> "BaselineModel":
        texts = frame["text_a"]
        if self.task.text_columns == 2:
            texts = pd.concat([frame["text_a"], frame["text_b"]], ignore_index=True)
        self.vectorizer.fit(texts)
        classifier = OneVsRestClassifier(
            LogisticRegression(C=self.C, solver="liblinear", dual=True, class_weight="balanced"))
        gold = frame["label"].astype(str).to_numpy()
        classifier.fit(self._features(frame), gold)
        # Label order; a class absent from the training rows (a small sample) is never predicted.
        known = list(classifier.classes_)
        features = classifier.estimators_[0].coef_.shape[1]
        self.coef = np.zeros((self.task.num_labels, features), dtype=np.float32)
        self.intercept = np.full(self.task.num_labels, _ABSENT_CLASS_INTERCEPT, dtype=np.float32)
        for row, label in enumerate(self.task.labels):
            if label in known:
                estimator = classifier.estimators_[known.index(label)]
                self.coef[row], self.intercept[row] = estimator.coef_[0], estimator.intercept_[0]
        return self

    def probabilities(self, frame: pd.DataFrame) -> np.ndarray:
        """[rows, labels]: each class's sigmoid, normalised over the classes."""
        if self.coef is None:
            raise RuntimeError("fit or load the baseline first")
        scores = np.asarray(self._features(frame) @ self.coef.T, dtype=np.float64) + self.intercept
        sigmoid = 1.0 / (1.0 + np.exp(-scores))
        return sigmoid / sigmoid.sum(axis=1, keepdims=True)

    def predict(self, frame: pd.DataFrame) -> list[str]:
        return [self.task.labels[i] for i in self.probabilities(frame).argmax(axis=1)]

    # ----------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        vocabulary = self.vectorizer.vocabulary_
        terms = sorted(vocabulary, key=vocabulary.__getitem__)
        meta = {"task": self.task.name, "C": self.C, "ngram_range": list(_NGRAMS), "terms": terms}
        (directory / f"{self.task.name}.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        save_file({"idf": self.vectorizer.idf_.astype(np.float32), "coef": self.coef, "intercept": self.intercept},
                  str(directory / f"{self.task.name}.safetensors"))

    @classmethod
    def load(cls, directory: str | Path, task: Task | str) -> "BaselineModel":
        """A task's fitted baseline from `TASK.json` and `TASK.safetensors`, which may come from
        anywhere: files that are not a baseline's are one `DataError` line naming them."""
        task = task if isinstance(task, Task) else get_task(task)
        directory = Path(directory)
        meta_file, tensors_file = directory / f"{task.name}.json", directory / f"{task.name}.safetensors"
        meta = read_json(meta_file, limit=LARGE_LIMIT, what=f"{task.name} baseline's vocabulary", error=DataError)
        terms, C = (meta.get("terms"), meta.get("C", 1.0)) if isinstance(meta, dict) else (None, None)
        shapes = safetensors_shapes(tensors_file, what=f"{task.name} baseline's weights", error=DataError)
        well_formed = (isinstance(terms, list) and terms and all(isinstance(t, str) for t in terms)
                       and len(set(terms)) == len(terms) and type(C) in (int, float) and C > 0
                       # read from the header: a file whose tensors do not fit is refused before it is loaded
                       and shapes == {"idf": (len(terms),), "coef": (task.num_labels, len(terms) * task.text_columns),
                                      "intercept": (task.num_labels,)})
        if not well_formed:
            raise DataError(f"{directory}: the {task.name} baseline files do not fit together")
        try:
            tensors = load_file(str(tensors_file))
        except (OSError, ValueError, SafetensorError) as error:
            raise DataError(f"{tensors_file}: cannot read the {task.name} baseline ({first_line(error)})") from None
        model = cls(task, C=float(C))
        model.vectorizer = _vectorizer(terms)
        model.vectorizer.idf_ = tensors["idf"]
        model.coef, model.intercept = tensors["coef"], tensors["intercept"]
        return model


# ----------------------------------------------------------------------------- the baseline as a run
@dataclass
class BaselineRun:
    """A fitted baseline folder, with the same face as `inference.LoadedRun` for blending."""

    run_dir: Path
    models: dict[str, BaselineModel]
    info: dict

    @classmethod
    def load(cls, run_dir: str | Path) -> "BaselineRun":
        run_dir = Path(run_dir)
        recover_folder(run_dir)  # a kill in the middle of `save_baseline`'s swap left it aside
        path = run_dir / BASELINE_FILE
        if not os.path.lexists(path):
            raise DataError(f"{run_dir} holds no baseline (expected {BASELINE_FILE}); "
                            f"fit one with `clue-mtl baseline --run-dir {run_dir}`")
        info = read_json(path, what="baseline description", error=DataError)
        tasks = info.get("tasks") if isinstance(info, dict) else None
        if (not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(tasks, list) or not tasks
                or not all(isinstance(t, str) and t in TASKS for t in tasks)):
            raise DataError(f"{path}: not a baseline of format {FORMAT}")
        return cls(run_dir, {task: BaselineModel.load(run_dir, task) for task in tasks}, info)

    @property
    def tasks(self) -> list[str]:
        return list(self.models)

    @property
    def labels(self) -> dict[str, list[str]]:
        return {task: list(get_task(task).labels) for task in self.models}

    def probabilities(self, task: str, frame: pd.DataFrame) -> np.ndarray:
        return self.models[task].probabilities(frame)


def _locking_run_dir(function):
    """`function` run holding the lock of its `run_dir` keyword (when given), taken before the fit:
    a second command into the folder is refused at once, not after minutes of fitting."""
    @functools.wraps(function)
    def locked(*args, run_dir: str | Path | None = None, **kwargs):
        if run_dir is None:
            return function(*args, **kwargs)
        with RunFolder(run_dir).lock():
            return function(*args, run_dir=run_dir, **kwargs)
    return locked


@_locking_run_dir
def run_baseline(data_dir: str | Path, out_dir: str | Path | None = "submissions", dev_fraction: float = 0.1,
                 seed: int = 42, progress: bool = True, *, max_rows: int | None = None,
                 id_mode: str = "file", C: float = 1.0, run_dir: str | Path | None = None,
                 tasks: list[str] | None = None, training_files_checked: bool = False) -> dict:
    """Fit the baseline per task on the train part of `stratified_split(frame, dev_fraction, seed)`
    (the split every neural run with the same `data` settings uses), report dev macro-F1, and
    write test A and B zips to `out_dir` (None: no zips) and the fitted models to `run_dir`
    (None: not saved).

    max_rows: train on a stratified sample of at most this many rows per task (quick runs, tests).
    training_files_checked: the caller checked the training files already (the main job does).
    With progress, prints one line per task, then the dev report table and the paths.
    Returns {"reports": {task: report}, "mean": float, "zips": {"a": Path, "b": Path} (or {}),
    "run_dir": Path | None, "seconds": float, "task_seconds": {task: float}}.
    """
    start = time.perf_counter()
    say = print if progress else (lambda *args, **kwargs: None)
    tasks = list(tasks or TASK_NAMES)
    if not training_files_checked:  # every file before any fit: a fault in the last costs seconds
        check_training_files(data_dir, tasks)
    test_files = ({split: checked_test_files(tasks, split=split, data_dir=data_dir, id_mode=id_mode)
                   for split in ("a", "b")} if out_dir is not None else {})
    reports, task_seconds, models, dev_ids = {}, {}, {}, {}
    for number, name in enumerate(tasks, start=1):
        task_start = time.perf_counter()
        task = TASKS[name]
        train, dev = stratified_split(load_split(data_dir, task, "train"), dev_fraction, seed)
        dev_ids[name] = dev["id"].tolist()
        if max_rows is not None and max_rows < len(train):
            _, train = stratified_split(train, max_rows / len(train), seed)
        models[name] = model = BaselineModel(task, C=C).fit(train)
        reports[name] = task_report(task, dev["label"], model.predict(dev))
        task_seconds[name] = time.perf_counter() - task_start
        say(f"[baseline {number}/{len(tasks)}] {name}: train {len(train):,} rows, dev "
            f"{len(dev):,} rows, dev macro-F1 {reports[name]['macro_f1']:.4f} "
            f"({task_seconds[name]:.1f} s)", flush=True)
    mean = leaderboard_score(reports)
    say(format_report(reports))
    zips = {}
    if out_dir is not None:
        zips = {split: write_streamed_submission(test_files[split], lambda name, frame: models[name].predict(frame),
                                                 Path(out_dir) / f"baseline_test_{split}.zip", id_mode=id_mode,
                                                 allow_partial=len(tasks) < 3, progress=False)
                for split in ("a", "b")}
        say(f"wrote {zips['a']} and {zips['b']} (id_mode {id_mode})", flush=True)
    if run_dir is not None:
        settings = {"data_dir": str(data_dir), "dev_fraction": dev_fraction, "split_seed": seed,
                    "max_rows": max_rows, "C": C}
        save_baseline(run_dir, models, dev_ids, settings, reports)
        say(f"baseline saved to {run_dir}", flush=True)
    seconds = time.perf_counter() - start
    say(f"baseline done in {seconds:.1f} s", flush=True)
    return {"reports": reports, "mean": mean, "zips": zips, "run_dir": Path(run_dir) if run_dir else None,
            "seconds": seconds, "task_seconds": task_seconds}


def save_baseline(run_dir: str | Path, models: dict[str, BaselineModel], dev_ids: dict[str, list[str]],
                  settings: dict, reports: dict) -> Path:
    """Write a baseline folder whole: its files go into a new folder beside it, swapped in when
    complete (`atomic.replace_folder`), so wherever a kill lands the previous baseline stays
    readable. Holds the folder's lock meanwhile (already held when called by `run_baseline`)."""
    run_dir = Path(run_dir)
    with RunFolder(run_dir).lock(), replace_folder(run_dir) as staging:
        for model in models.values():
            model.save(staging)
        folder = RunFolder(staging)
        save_split(dev_ids, folder.split_file)
        folder.write_labels({task: list(get_task(task).labels) for task in models})
        info = {"format": FORMAT, "kind": "tfidf-char-lr", "tasks": list(models), "settings": settings,
                "dev_macro_f1": {task: report["macro_f1"] for task, report in reports.items()},
                "dev_mean_macro_f1": leaderboard_score(reports)}
        (staging / BASELINE_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    return run_dir


def fitted_baseline(data, run_dir: str | Path, *, training_files_checked: bool = False) -> Path:
    """The baseline on the split and training rows of `data` (a config's `DataConfig`) in
    `run_dir`: the one saved there when it matches (same files, split and rows) and loads whole,
    else fitted now (`training_files_checked`: as `run_baseline` takes it)."""
    run_dir = Path(run_dir)
    wanted = {"data_dir": str(data.data_dir), "dev_fraction": data.dev_fraction, "split_seed": data.split_seed,
              "max_rows": data.max_train_rows}
    try:
        saved = read_json(run_dir / BASELINE_FILE, what="baseline record", error=DataError)
        settings = {key: saved["settings"][key] for key in wanted}
        if settings == wanted and set(data.tasks) <= set(saved["tasks"]):
            BaselineRun.load(run_dir)  # complete and readable, or fitted again below
            print(f"baseline: using {run_dir} (same data and split)")
            return run_dir
    except (OSError, ValueError, KeyError, TypeError, DataError):
        pass
    run_baseline(data.data_dir, out_dir=None, dev_fraction=data.dev_fraction, seed=data.split_seed,
                 run_dir=run_dir, tasks=list(data.tasks), max_rows=data.max_train_rows, id_mode=data.id_mode,
                 training_files_checked=training_files_checked)
    return run_dir
