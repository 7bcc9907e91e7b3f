"""Blends: several members' class probabilities combined per task, then biased toward macro-F1.

A member is anything with `tasks`, `labels` and `probabilities(task, frame)`: a trained run
(`inference.LoadedRun`, itself possibly an ensemble's average) or the TF-IDF baseline
(`baseline.BaselineRun`). Per task, the blend scores each row as

    s = sum_m w_m * log p_m + b        and decides argmax(s)

- the weights w >= 0 minimise the dev log-loss of softmax(s) with b = 0 (a logarithmic opinion
  pool; since the weights are free in scale they also set each member's temperature, so a
  member's own calibration matters little). Convex, fitted with L-BFGS-B.
- the log-biases b, one per class, maximise the task's macro-F1 by coordinate ascent over a grid,
  bounded to |b| <= `bias_bound` and paying `bias_penalty * b**2` each, so a rare class (OCEMOTION
  fear: 52 dev rows) moves only when macro-F1 gains clearly.

Both are fitted on the dev split the members share (never on training rows, where a neural member
is overconfident). The dev score of parameters tuned on those same rows flatters them, so each
figure is reported twice: in-sample, and cross-fitted (stratified folds; each row is decided by
weights and biases fitted on the other folds). The parameters a blend keeps for the test files
are fitted on the whole dev split. Cross-fitting removes the blend's own optimism, not its
members': a run's `best/` was chosen by dev macro-F1 on a sample of the same rows, and the
baseline's settings were chosen on this split.

A blend folder holds `blend.json` (members with their fingerprints, weights, biases, dev scores)
and `dev.safetensors` (the members' dev probabilities, gold labels, cross-fitted decisions), so it
can be evaluated again without the members' models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize

from clue_mtl.atomic import recover_folder, replace_folder
from clue_mtl.errors import BlendError
from clue_mtl.predict.metrics import macro_f1
from clue_mtl.runs.folder import RunFolder
from clue_mtl.tasks import TASK_NAMES, get_task
from clue_mtl.untrusted import LARGE_LIMIT, checked_size, open_regular, read_json

if TYPE_CHECKING:
    from clue_mtl.data.task_files import CheckedFile

BLEND_FILE = "blend.json"
DEV_FILE = "dev.safetensors"
FORMAT = 1
_FLOOR = 1e-6  # probabilities are clipped here before the log: a confident member's zero is not -inf


# ----------------------------------------------------------------------------- the math
def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities, _FLOOR, 1.0))


def blend_scores(member_log_probs: np.ndarray, weights: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """[rows, labels] scores of members' log-probabilities [members, rows, labels]."""
    scores = np.tensordot(weights, member_log_probs, axes=1)
    return scores if bias is None else scores + bias


def fit_weights(member_log_probs: np.ndarray, gold: np.ndarray, *, l2: float = 1e-4) -> np.ndarray:
    """Non-negative weights minimising the mean log-loss of softmax(sum_m w_m log p_m) (+ l2 |w|^2)."""
    rows = np.arange(len(gold))
    gold_terms = member_log_probs[:, rows, gold].mean(axis=1)       # [members]

    def loss_and_gradient(weights: np.ndarray) -> tuple[float, np.ndarray]:
        scores = blend_scores(member_log_probs, weights)
        scores = scores - scores.max(axis=1, keepdims=True)
        log_normaliser = np.log(np.exp(scores).sum(axis=1))
        probabilities = np.exp(scores - log_normaliser[:, None])
        loss = float(np.mean(log_normaliser - scores[rows, gold])) + l2 * float(weights @ weights)
        expected = np.einsum("nc,mnc->m", probabilities, member_log_probs) / len(gold)
        return loss, expected - gold_terms + 2 * l2 * weights

    start = np.full(len(member_log_probs), 1.0 / len(member_log_probs))
    result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None)] * len(member_log_probs))
    return np.asarray(result.x, dtype=np.float64)


def fit_bias(scores: np.ndarray, gold: np.ndarray, *, bound: float = 2.0, step: float = 0.1,
             penalty: float = 0.002, sweeps: int = 4) -> np.ndarray:
    """Per-class additive biases maximising macro-F1(argmax(scores + b)) - penalty * |b|^2.

    Coordinate ascent: each sweep tries, for every class in turn, each value of a grid over
    [-bound, bound] with the other biases held, and keeps the best; it stops when a sweep changes
    nothing. Starting from 0, a class moves only where the gain outweighs the penalty.
    """
    num_labels = scores.shape[1]
    grid = np.round(np.arange(-bound, bound + step / 2, step), 10)
    bias = np.zeros(num_labels)

    def objective(candidate: np.ndarray) -> float:
        return macro_f1(gold, (scores + candidate).argmax(axis=1), num_labels) - penalty * float(candidate @ candidate)

    best = objective(bias)
    for _ in range(sweeps):
        changed = False
        for label in range(num_labels):
            for value in grid:
                if value == bias[label]:
                    continue
                candidate = bias.copy()
                candidate[label] = value
                score = objective(candidate)
                if score > best + 1e-12:
                    best, bias, changed = score, candidate, True
        if not changed:
            break
    return bias


def stratified_folds(gold: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per row: each class's rows shuffled and dealt round-robin over the folds."""
    assignment = np.empty(len(gold), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for label in np.unique(gold):
        positions = rng.permutation(np.flatnonzero(gold == label))
        assignment[positions] = (np.arange(len(positions)) + offset) % folds
        offset += len(positions)  # classes smaller than `folds` do not all land in fold 0
    return assignment


@dataclass
class TaskBlend:
    """One task's fitted blend: a weight per member, a log-bias per class."""

    task: str
    members: list[str]
    weights: np.ndarray
    bias: np.ndarray

    def scores(self, member_probabilities: Sequence[np.ndarray], *, biased: bool = True) -> np.ndarray:
        stacked = log_probabilities(np.stack(member_probabilities))
        return blend_scores(stacked, self.weights, self.bias if biased else None)

    def decide(self, member_probabilities: Sequence[np.ndarray], *, biased: bool = True) -> np.ndarray:
        return self.scores(member_probabilities, biased=biased).argmax(axis=1)


@dataclass
class FitSettings:
    folds: int = 5
    seed: int = 0
    bias_bound: float = 2.0
    bias_penalty: float = 0.002
    l2: float = 1e-4

    def __post_init__(self):
        if not (isinstance(self.folds, int) and self.folds >= 2 and self.bias_bound > 0
                and self.bias_penalty >= 0 and self.l2 >= 0):
            raise BlendError(f"blend settings out of range: {self.__dict__} (folds >= 2, bias_bound > 0, "
                             "bias_penalty and l2 >= 0)")


def _fit(member_log_probs: np.ndarray, gold: np.ndarray, settings: FitSettings) -> tuple[np.ndarray, np.ndarray]:
    weights = fit_weights(member_log_probs, gold, l2=settings.l2)
    bias = fit_bias(blend_scores(member_log_probs, weights), gold, bound=settings.bias_bound,
                    penalty=settings.bias_penalty)
    return weights, bias


def fit_task_blend(task: str, members: list[str], member_probabilities: Sequence[np.ndarray], gold: np.ndarray,
                   settings: FitSettings = FitSettings()) -> tuple[TaskBlend, dict, dict[str, np.ndarray]]:
    """Fit one task's blend on all rows, and score it in-sample and cross-fitted.

    Returns (blend, scores, decisions): scores holds macro-F1 for each member alone and for the
    blend and the biased blend, in-sample and cross-fitted; decisions the cross-fitted label
    indices of the blend and the biased blend (each row decided by parameters fitted without it).
    """
    num_labels = get_task(task).num_labels
    gold = np.asarray(gold, dtype=np.int64)
    stacked = log_probabilities(np.stack(member_probabilities))
    weights, bias = _fit(stacked, gold, settings)
    fold_of = stratified_folds(gold, settings.folds, settings.seed)
    crossed = {"blend": np.empty(len(gold), dtype=np.int64), "biased": np.empty(len(gold), dtype=np.int64)}
    for fold in range(settings.folds):
        held_out = fold_of == fold
        if not held_out.any():
            continue
        fold_weights, fold_bias = _fit(stacked[:, ~held_out], gold[~held_out], settings)
        fold_scores = blend_scores(stacked[:, held_out], fold_weights)
        crossed["blend"][held_out] = fold_scores.argmax(axis=1)
        crossed["biased"][held_out] = (fold_scores + fold_bias).argmax(axis=1)
    in_sample = blend_scores(stacked, weights)
    scores = {
        "members": {name: macro_f1(gold, p.argmax(axis=1), num_labels) for name, p in zip(members, member_probabilities)},
        "blend": {"in_sample": macro_f1(gold, in_sample.argmax(axis=1), num_labels),
                  "cross_fitted": macro_f1(gold, crossed["blend"], num_labels)},
        "biased": {"in_sample": macro_f1(gold, (in_sample + bias).argmax(axis=1), num_labels),
                   "cross_fitted": macro_f1(gold, crossed["biased"], num_labels)},
        "rows": int(len(gold)),
    }
    return TaskBlend(task, list(members), weights, bias), scores, crossed


# ----------------------------------------------------------------------------- members and folders
def load_member(path: str | Path, *, show_progress: bool = True):
    """A baseline folder (`baseline.json`) or a trained run folder (`best/`; `show_progress`: a bar
    over each of its predictions)."""
    from clue_mtl.predict.baseline import BASELINE_FILE, BaselineRun

    path = Path(path)
    recover_folder(path)  # a baseline whose save a kill cut between its two renames
    if not path.is_dir():
        raise BlendError(f"member {path} is not a folder")
    if (path / BASELINE_FILE).exists():
        return BaselineRun.load(path)
    from clue_mtl.predict.inference import LoadedRun

    return LoadedRun(path, show_progress=show_progress)


def split_fingerprints(run_dir: str | Path) -> dict[str, str]:
    """Per task, a digest of a member's dev ids (its `split.json`), to refuse mixing splits."""
    from clue_mtl.data.folder import load_split_ids

    ids = load_split_ids(RunFolder(run_dir).split_file)
    return {task: hashlib.sha256(json.dumps(ids[task], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
            for task in sorted(ids)}


def member_fingerprint(run_dir: str | Path) -> str:
    """A digest of the files a member predicts with (weights, tokenizer, config, labels, split),
    so a blend notices a retrained member. Each is read only as a regular file, weights of any size
    and the others within `LARGE_LIMIT` (a link to /dev/zero would be digested forever, a FIFO
    waited on): anything else there is one `BlendError` line naming it."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    files = sorted(run_dir.glob("*.safetensors")) + sorted(run_dir.glob("*.json"))
    files += [folder.config_file] if folder.config_file.exists() else []  # a baseline folder has none
    for directory in (folder.best_dir, folder.tokenizer_dir):  # the weights, and what turns text into their inputs
        files += sorted(p for p in directory.glob("*") if not p.is_dir())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\x00")
        limit = None if path.suffix == ".safetensors" else LARGE_LIMIT
        with open_regular(path, limit=limit, what="blend member's files", error=BlendError) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _member_data_dir(member) -> str:
    config = getattr(member, "config", None)
    if config is not None:
        return config.data.data_dir
    return member.info.get("settings", {}).get("data_dir", "data")


def _unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name, number = path.name or "member", 2
        while name in names:
            name, number = f"{path.name}-{number}", number + 1
        names.append(name)
    return names


@dataclass
class Blend:
    """A fitted blend: its members, one `TaskBlend` per task, and the dev scores."""

    members: list[dict]             # name, kind, path, fingerprint
    split: dict[str, str]           # per task, the digest of the dev ids its members share
    tasks: dict[str, TaskBlend]
    scores: dict[str, dict]         # per task, as `fit_task_blend` returns them
    settings: FitSettings

    def mean(self, which: str, how: str = "cross_fitted") -> float:
        return float(np.mean([self.scores[t][which][how] for t in self.tasks]))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "split": self.split, "members": self.members,
            "settings": self.settings.__dict__,
            "tasks": {task: {"labels": list(get_task(task).labels), "members": b.members,
                             "weights": b.weights.tolist(), "bias": b.bias.tolist(), "dev": self.scores[task]}
                      for task, b in self.tasks.items()},
            "dev_mean": {which: {how: self.mean(which, how) for how in ("in_sample", "cross_fitted")}
                         for which in ("blend", "biased")},
        }

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "Blend":
        try:
            if values["format"] != FORMAT:
                raise BlendError(f"{where}: blend format {values['format']!r}, expected {FORMAT}")
            members = [{k: str(m[k]) for k in ("name", "kind", "path", "fingerprint")} for m in values["members"]]
            names = {m["name"] for m in members}
            tasks, scores = {}, {}
            for task, entry in values["tasks"].items():
                spec = get_task(task)
                weights = np.asarray(entry["weights"], dtype=np.float64)
                bias = np.asarray(entry["bias"], dtype=np.float64)
                dev = entry["dev"]
                scored = all(isinstance(dev[which][how], (int, float)) for which in ("blend", "biased")
                             for how in ("in_sample", "cross_fitted")) and isinstance(dev["members"], dict)
                if (not scored or not entry["members"] or list(entry["labels"]) != list(spec.labels)
                        or bias.shape != (spec.num_labels,)
                        or weights.shape != (len(entry["members"]),) or not set(entry["members"]) <= names
                        or not np.isfinite(weights).all() or not np.isfinite(bias).all()):
                    raise BlendError(f"{where}: the {task} entry does not fit the task or the members")
                tasks[task] = TaskBlend(task, [str(m) for m in entry["members"]], weights, bias)
                scores[task] = entry["dev"]
            if not tasks:
                raise BlendError(f"{where}: the blend has no tasks")
            settings = FitSettings(**values["settings"])
            split = {str(task): str(digest) for task, digest in values["split"].items()}
            return cls(members, split, tasks, scores, settings)
        except BlendError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise BlendError(f"{where}: not a blend file ({type(error).__name__}: {error})") from None

    def save(self, directory: str | Path, dev_arrays: dict[str, np.ndarray]) -> Path:
        """Write `dev.safetensors` and `blend.json` into a new folder swapped in whole for `directory`
        (`atomic.replace_folder`): wherever a kill lands, the previous blend stays readable. Holds
        the folder's lock meanwhile (already held when called by `build_blend`)."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        with RunFolder(directory).lock(), replace_folder(directory) as staging:
            save_file(dev_arrays, str(staging / DEV_FILE))
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
            (staging / BLEND_FILE).write_text(text, encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Blend":
        recover_folder(directory)  # a kill in the middle of `save`'s swap left it aside
        path = Path(directory) / BLEND_FILE
        if not os.path.lexists(path):
            raise BlendError(f"{directory} holds no blend (expected {BLEND_FILE}); fit one with `clue-mtl blend`")
        values = read_json(path, what="blend", error=BlendError)
        if not isinstance(values, dict):
            raise BlendError(f"{path}: not a blend file")
        return cls.from_dict(values, str(path))


def build_blend(member_dirs: Sequence[str | Path], out: str | Path, *, data_dir: str | Path | None = None,
                settings: FitSettings = FitSettings(), progress: bool = True,
                dev_probabilities: dict[str, dict[str, np.ndarray]] | None = None) -> Blend:
    """Fit a blend of the members on their shared dev split and write it to `out`.

    dev_probabilities: member folder -> task -> probabilities already computed on the dev rows
    (e.g. by the main job), so they are not predicted twice.
    """
    # `out` is locked before the fit: a second command writing it is refused at once, not after the fit
    with RunFolder(out).lock():
        result, arrays = _fit_blend(member_dirs, data_dir=data_dir, settings=settings, progress=progress,
                                    dev_probabilities=dev_probabilities)
        result.save(out, arrays)
    return result


def _fit_blend(member_dirs: Sequence[str | Path], *, data_dir: str | Path | None, settings: FitSettings,
               progress: bool, dev_probabilities: dict[str, dict[str, np.ndarray]] | None
               ) -> tuple[Blend, dict[str, np.ndarray]]:
    """The fitted blend and the arrays of its `dev.safetensors` (see `build_blend`)."""
    from tqdm.auto import tqdm

    paths = [Path(p) for p in member_dirs]
    if not paths:
        raise BlendError("name at least one member (--run or --baseline)")
    members = [load_member(p) for p in paths]
    names = _unique_names(paths)
    from clue_mtl.data.folder import DataError, load_dev_rows, load_split_ids

    data_dir = data_dir or _member_data_dir(members[0])
    tasks = [t for t in TASK_NAMES if any(t in m.tasks for m in members)]
    splits = [split_fingerprints(p) for p in paths]
    shared: dict[str, str] = {}
    for task in tasks:
        holders = [i for i, m in enumerate(members) if task in m.tasks]
        for i in holders:
            if task not in splits[i]:
                raise BlendError(f"{paths[i]}: its split.json has no {task} dev ids")
            if splits[i][task] != splits[holders[0]][task]:
                raise BlendError(f"{paths[i]} was trained on another {task} dev split than {paths[holders[0]]} "
                                 "(their split.json ids differ): blend members must share data.dev_fraction, "
                                 "data.split_seed and the data")
        shared[task] = splits[holders[0]][task]
    arrays: dict[str, np.ndarray] = {}
    blends, scores = {}, {}
    work = tqdm(total=sum(len(m.tasks) for m in members), desc="blend", disable=not progress, dynamic_ncols=True)
    frames, problems = {}, []  # every task's dev rows before the first member predicts
    for task in tasks:
        chosen = [i for i, m in enumerate(members) if task in m.tasks]
        for i in chosen:
            if list(members[i].labels[task]) != list(get_task(task).labels):
                raise BlendError(f"{paths[i]}: its {task} labels are not in the task's order")
        split_file = RunFolder(paths[chosen[0]]).split_file
        try:
            frames[task] = load_dev_rows(data_dir, task, load_split_ids(split_file)[task], split_file)
        except DataError as error:
            problems.extend(error.problems)
    if problems:
        raise DataError(problems)
    for task, frame in frames.items():
        chosen = [i for i, m in enumerate(members) if task in m.tasks]
        gold = frame["label"].map(get_task(task).label_index()).to_numpy(dtype=np.int64)
        probabilities = []
        for i in chosen:
            work.set_postfix_str(f"{task} {names[i]}")
            given = (dev_probabilities or {}).get(str(paths[i]), {}).get(task)
            probabilities.append(given if given is not None else members[i].probabilities(task, frame))
            work.update(1)
        blend, scores[task], crossed = fit_task_blend(task, [names[i] for i in chosen], probabilities, gold, settings)
        blends[task] = blend
        arrays[f"{task}/gold"] = gold
        arrays[f"{task}/cross_fitted/blend"] = crossed["blend"]
        arrays[f"{task}/cross_fitted/biased"] = crossed["biased"]
        for i, p in zip(chosen, probabilities):
            arrays[f"{task}/member/{names[i]}"] = np.asarray(p, dtype=np.float32)
    work.close()
    from clue_mtl.predict.baseline import BaselineRun

    described = [{"name": n, "kind": "baseline" if isinstance(m, BaselineRun) else "run", "path": str(p.resolve()),
                  "fingerprint": member_fingerprint(p)} for n, m, p in zip(names, members, paths)]
    return Blend(described, shared, blends, scores, settings), arrays


def load_blend_members(blend: Blend, where: str | Path, *, show_progress: bool = True) -> dict[str, object]:
    """The blend's members, loaded from their recorded paths; refused if one has changed since."""
    loaded = {}
    for member in blend.members:
        path = Path(member["path"])
        if not path.is_dir():
            raise BlendError(f"{where}: member {member['name']} is missing ({path})")
        if member_fingerprint(path) != member["fingerprint"]:
            raise BlendError(f"{where}: member {member['name']} ({path}) has changed since the blend was "
                             "fitted; fit the blend again")
        loaded[member["name"]] = load_member(path, show_progress=show_progress)
    return loaded


def predict_blend_submission(blend_dir: str | Path, out: str | Path, *, split: str = "a",
                             data_dir: str | Path | None = None, test_files: dict[str, str | Path] | None = None,
                             id_mode: str | None = None, progress: bool = True,
                             checked: dict[str, CheckedFile] | None = None) -> Path:
    """Predict every task's test file with a fitted blend and write the submission zip: every file
    checked before the first model pass, then predicted in chunks (`write_streamed_submission`).

    checked: test files the caller has checked already (`data.folder.checked_test_files`, as the main job
    does before its training), read as they are; the blend's other tasks' files are checked here.
    """
    from clue_mtl.data.folder import checked_test_files
    from clue_mtl.predict.submission import write_streamed_submission

    blend = Blend.load(blend_dir)
    members = load_blend_members(blend, blend_dir, show_progress=False)  # one bar over every file's rows instead
    first = next(iter(members.values()))
    config = next((m.config for m in members.values() if getattr(m, "config", None) is not None), None)
    id_mode = id_mode or (config.data.id_mode if config is not None else "file")
    checked = checked or {}
    unchecked = [task for task in blend.tasks if task not in checked]
    fresh = checked_test_files(unchecked, split=split, data_dir=data_dir or _member_data_dir(first),
                               test_files=test_files, id_mode=id_mode) if unchecked else {}
    files = {task: checked[task] if task in checked else fresh[task] for task in blend.tasks}

    def decide(task: str, frame) -> list[str]:
        task_blend = blend.tasks[task]
        probabilities = [members[name].probabilities(task, frame) for name in task_blend.members]
        labels = get_task(task).labels
        return [labels[i] for i in task_blend.decide(probabilities)]

    return write_streamed_submission(files, decide, out, id_mode=id_mode, allow_partial=len(blend.tasks) < 3,
                                     progress=progress)


# ----------------------------------------------------------------------------- evaluation
def format_blend_report(blend: Blend) -> str:
    """Per task and mean: each member, the blend and the biased blend (cross-fitted, in-sample)."""
    names = [m["name"] for m in blend.members]
    width = max(len("biased blend (cross-fitted)"), *(len(n) for n in names))
    head = f"{'dev macro-F1':<{width}} " + " ".join(f"{t:>10}" for t in blend.tasks) + f" {'mean':>8}"
    lines = [head]

    def row(label: str, values: list[float | None]) -> str:
        shown = [f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in values]
        known = [v for v in values if v is not None]
        mean = f"{np.mean(known):>8.4f}" if len(known) == len(values) else f"{'-':>8}"
        return f"{label:<{width}} " + " ".join(shown) + f" {mean}"

    for name in names:
        lines.append(row(name, [blend.scores[t]["members"].get(name) for t in blend.tasks]))
    for which, label in (("blend", "blend"), ("biased", "biased blend")):
        for how in ("cross_fitted", "in_sample"):
            lines.append(row(f"{label} ({how.replace('_', '-')})", [blend.scores[t][which][how] for t in blend.tasks]))
    return "\n".join(lines)


def evaluate_blend(blend_dir: str | Path, *, plots: bool = True) -> dict:
    """Report a blend from its folder alone; write `evaluation/` there (report, figures).

    Confusion matrices are of the final decision (the biased blend), cross-fitted: each dev row as
    parameters fitted without it decided it.
    """
    from safetensors.numpy import load_file

    from clue_mtl.predict.evaluate import plot_confusion

    blend_dir = Path(blend_dir)
    blend = Blend.load(blend_dir)
    report = format_blend_report(blend)
    out_dir = blend_dir / "evaluation"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "report.txt").write_text(report + "\n", encoding="utf-8")
    if plots:
        from safetensors import SafetensorError

        checked_size(blend_dir / DEV_FILE, limit=None, what="blend's dev predictions", error=BlendError)  # no FIFO
        try:
            arrays = load_file(str(blend_dir / DEV_FILE))
        except (OSError, ValueError, SafetensorError) as error:
            raise BlendError(f"{blend_dir / DEV_FILE}: cannot read ({error})") from None
        needed = [f"{task}/{key}" for task in blend.tasks for key in ("gold", "cross_fitted/biased")]
        if any(key not in arrays for key in needed):
            raise BlendError(f"{blend_dir / DEV_FILE}: does not hold this blend's dev decisions")
        for task in blend.tasks:
            labels = get_task(task).labels
            gold = [labels[i] for i in arrays[f"{task}/gold"]]
            decided = [labels[i] for i in arrays[f"{task}/cross_fitted/biased"]]
            plot_confusion(task, gold, decided, out_dir / f"confusion_{task}.png")
        plot_blend(blend, out_dir / "blend.png")
    return {"blend": blend, "report": report}


def plot_blend(blend: Blend, path: str | Path) -> Path:
    """Grouped bars per task (and mean): each member, the blend and the biased blend, cross-fitted."""
    from matplotlib.figure import Figure

    names = [m["name"] for m in blend.members]
    groups = list(blend.tasks) + ["mean"]
    series = {name: [blend.scores[t]["members"].get(name, np.nan) for t in blend.tasks] for name in names}
    series["blend"] = [blend.scores[t]["blend"]["cross_fitted"] for t in blend.tasks]
    series["biased blend"] = [blend.scores[t]["biased"]["cross_fitted"] for t in blend.tasks]
    fig = Figure(figsize=(2.2 * len(groups) + 2, 4))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        values = values + [float(np.mean(values))]
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(x, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("dev macro-F1 (blends cross-fitted)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
