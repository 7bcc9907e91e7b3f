"""Dev macro-F1 of training variants at one fixed budget (configs/compare.yaml), over seeds.

Studies:
    weighting  every loss-weighting method                                        (issue 4)
    pretrain   e5-small with and without further pre-training on the competition  (issue 5)
    toolbox    single-task teachers, multi-task, distilled students (fixed mix and
               BAM annealing), EMA, FGM, a probability ensemble, averaged weights (issue 6)

A variant is a few `--set` overrides of configs/compare.yaml. Each (variant, seed) trains in its own
process (`clue-mtl train`) into runs/compare/<variant>-s<seed> and is scored at its last step on
the same 2,000 dev rows per task. A finished run is reused, not retrained, so studies share runs
(the `equal` runs are the multi-task baseline of all three) and a study can be run in parts.
Results accumulate in benchmarks/results/compare_<study>.json and .md.

    python -m benchmarks.dev_comparison weighting --seeds 1 2
    python -m benchmarks.dev_comparison toolbox --seeds 1 2 --variants equal ema
    python -m benchmarks.dev_comparison --smoke weighting --seeds 1 --variants equal   # the suite: 2 steps, tiny encoder
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import (RESULTS, ROOT, command_line, ensure_trimmed_encoder, parse_arguments, run_kit,
                               smoke_inputs, smoke_job_overrides, smoke_overrides, work_root, write_results)
from clue_mtl.tasks import TASK_NAMES as TASKS
from clue_mtl.runs.folder import RunFolder

CONFIG = "configs/compare.yaml"
RUNS = ROOT / "runs" / "compare"
PRETRAINED = "runs/pretrain-e5-small/encoder"
SOFT_LABELS = RUNS / "soft-labels-teachers.safetensors"
TEACHERS = [f"teacher-{task}" for task in TASKS]

LONGER = ["train.steps=600", "train.eval_every=600"]  # three times the budget, to see whether a gap closes
METHODS = ["equal", "uncertainty", "gradnorm", "dwa", "dtp", "pcgrad", "mgda", "famo"]
VARIANTS: dict[str, list[str]] = {
    **{method: [f"weighting.method={method}"] for method in METHODS},
    # the steps equal's 200 buy at their measured step times (benchmarks/results/weighting_overhead.md)
    "pcgrad-equal-time": ["weighting.method=pcgrad", "train.steps=107", "train.eval_every=107"],
    "mgda-equal-time": ["weighting.method=mgda", "train.steps=114", "train.eval_every=114"],
    "pretrained": [f"model.encoder={PRETRAINED}"],
    "equal-600": LONGER,
    "pretrained-600": [f"model.encoder={PRETRAINED}", *LONGER],
    **{f"teacher-{task}": [f"data.tasks=[{task}]"] for task in TASKS},
    "student-fixed": [f"distill.soft_labels={SOFT_LABELS.relative_to(ROOT)}", "distill.mode=fixed", "distill.mix=0.5"],
    "student-annealed": [f"distill.soft_labels={SOFT_LABELS.relative_to(ROOT)}", "distill.mode=annealed"],
    "ema": ["train.ema_decay=0.99"],
    "fgm": ["train.fgm_epsilon=1.0"],
}
DERIVED = {"ensemble-equal": "probabilities of the `equal` seeds averaged",
           "averaged-equal": "weights of the `equal` seeds averaged (`clue-mtl average-weights`)"}
STUDIES = {
    "weighting": [*METHODS, "pcgrad-equal-time", "mgda-equal-time"],
    "pretrain": ["equal", "pretrained", "equal-600", "pretrained-600"],
    "toolbox": [*TEACHERS, "equal", "student-fixed", "student-annealed", "ema", "fgm", "ensemble-equal",
                "averaged-equal"],
}


def run_dir(variant: str, seed: int) -> Path:
    return runs_folder() / f"{variant}-s{seed}"


def runs_folder() -> Path:
    """The comparison's run folders: runs/compare, or in a smoke run the same beside its inputs."""
    return work_root() / "runs" / "compare"


def final_eval(directory: Path) -> dict | None:
    evals = [record for record in RunFolder(directory).metrics() if record["kind"] == "eval"]
    return evals[-1] if evals else None


def train_variant(variant: str, seed: int, threads: int) -> dict:
    """Train one (variant, seed) unless it is finished; its final dev scores and wall time."""
    directory = run_dir(variant, seed)
    timing = directory / "wall_seconds.json"
    if not (timing.exists() and final_eval(directory)):
        overrides = [*VARIANTS[variant], f"train.seed={seed}", f"train.num_threads={threads}",
                     *smoke_job_overrides(), *(["train.log_every=1"] if smoke_inputs() else [])]
        command = [sys.executable, "-m", "clue_mtl", "train", "--config", CONFIG, "--run-dir", str(directory),
                   "--overwrite"]  # an unfinished run starts again
        for override in overrides:
            command += ["--set", override]
        started = time.perf_counter()
        run_kit(command)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - started, "threads": threads,
                                      "how": command_line()}))
    scores = final_eval(directory)
    return {"mean": scores["mean_macro_f1"], "macro_f1": scores["macro_f1"], "step": scores["step"],
            "how": command_line(), **json.loads(timing.read_text()),  # the trained run's own
            "weights": weight_trajectory(directory, every=1 if smoke_inputs() else 20)}


def weight_trajectory(directory: Path, every: int = 20) -> dict:
    """Each task's loss weight and training loss every `every` steps, for the notebook's pictures."""
    records = [record for record in RunFolder(directory).metrics() if record["kind"] == "train"]
    records = [r for r in records if r["step"] % every == 0]
    return {"step": [r["step"] for r in records],
            "weights": {t: [round(r["weights"][t], 4) for r in records] for t in records[0]["weights"]},
            "loss": {t: [round(r["loss"][t], 4) for r in records] for t in records[0]["loss"]}}


def dev_frames(config_path: str) -> dict:
    """The dev rows every run of the comparison is scored on (`Trainer` samples them the same way)."""
    from clue_mtl.config import load_config
    from clue_mtl.data.folder import task_frames

    config = load_config(ROOT / config_path, [f"data.data_dir={ROOT / 'data'}", *smoke_overrides()])
    return {task: task_frames(config.data, task).dev for task in TASKS}


def score_ensemble(directories: list[Path]) -> dict:
    from clue_mtl.predict.metrics import leaderboard_score, task_report
    from clue_mtl.predict.inference import LoadedRun, ensemble_probabilities

    runs = [LoadedRun(directory) for directory in directories]
    reports = {}
    for task, frame in dev_frames(CONFIG).items():
        predicted = [runs[0].labels[task][i] for i in ensemble_probabilities(runs, task, frame).argmax(-1)]
        reports[task] = task_report(task, frame["label"].tolist(), predicted)
    return {"mean": leaderboard_score(reports), "macro_f1": {t: r["macro_f1"] for t, r in reports.items()}}


def derived_variant(variant: str, seeds: list[int]) -> dict:
    members = [run_dir("equal", seed) for seed in seeds]
    if variant == "ensemble-equal":
        return score_ensemble(members)
    from clue_mtl.predict.averaging import average_weights

    averaged = runs_folder() / variant
    if not RunFolder(averaged).has_model():
        average_weights(members, averaged)
    return score_ensemble([averaged])


def ensure_inputs(variants: list[str], seeds: list[int], threads: int, results: dict) -> None:
    """The trimmed encoder (not in a smoke run), and the teachers' soft labels before any student."""
    if smoke_inputs() is None:
        ensure_trimmed_encoder()
    if any(v.startswith("student") for v in variants) and not SOFT_LABELS.exists():
        for teacher in TEACHERS:
            results.setdefault(teacher, {})[str(seeds[0])] = train_variant(teacher, seeds[0], threads)
        command = [sys.executable, "-m", "clue_mtl", "distill-labels", "--out", str(SOFT_LABELS)]
        for teacher in TEACHERS:
            command += ["--run", str(run_dir(teacher, seeds[0]))]
        started = time.perf_counter()
        run_kit(command)
        results["_soft_labels_seconds"] = time.perf_counter() - started


def summarise(study: str, results: dict) -> str:
    from clue_mtl.config import load_config

    train = load_config(ROOT / CONFIG).train
    lines = [f"# Dev comparison: {study} ({CONFIG}: e5-small, trimmed vocabulary, {train.steps} steps x "
             f"{train.batch_size} rows, bf16, CPU)", "",
             "Macro-F1 on 2,000 stratified dev rows per task at the last step, averaged over seeds; "
             "`per seed` lists each seed's mean macro-F1.", "",
             "| variant | OCNLI | OCEMOTION | TNEWS | mean | per seed | minutes per run |",
             "|---|---|---|---|---|---|---|"]
    for variant in STUDIES[study]:
        runs = results.get(variant)
        if not runs:
            continue
        runs = list(runs.values())
        f1 = {t: statistics.mean(r["macro_f1"][t] for r in runs if t in r["macro_f1"]) if
              any(t in r["macro_f1"] for r in runs) else None for t in TASKS}
        cells = [f"{f1[t]:.4f}" if f1[t] is not None else "" for t in TASKS]
        seeds = ", ".join(f"{r['mean']:.4f}" for r in runs)
        minutes = "" if "seconds" not in runs[0] else f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f}"
        mean = statistics.mean(r["mean"] for r in runs)
        label = variant if variant not in DERIVED else f"{variant} ({DERIVED[variant]})"
        lines.append(f"| {label} | {' | '.join(cells)} | **{mean:.4f}** | {seeds} | {minutes} |")
    if study == "toolbox":
        lines += ["", "A single-task teacher's mean is its one task's macro-F1."]
    if study == "weighting":
        lines += ["", "Every method trains 200 steps; PCGrad and MGDA take about 1.8x as long per step. The "
                  "`-equal-time` variants train the steps equal's 200 buy at their step times (107 and 114)."]
    if study == "pretrain":
        lines += ["", "The `-600` variants train three times as long (600 steps), one seed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", help="a subset of the study's variants, in this order")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json; train nothing")
    args = parse_arguments(parser, argv)
    if args.report_only:
        figures = json.loads((RESULTS / f"compare_{args.study}.json").read_text())["figures"]
        (RESULTS / f"compare_{args.study}.md").write_text(summarise(args.study, figures) + "\n")
        return

    variants = args.variants or STUDIES[args.study]
    unknown = sorted(set(variants) - set(STUDIES[args.study]))
    if unknown:
        parser.error(f"not variants of {args.study}: {', '.join(unknown)}")
    results: dict = {}
    ensure_inputs(variants, args.seeds, args.threads, results)
    for variant in variants:
        if variant in DERIVED:
            results[variant] = {"all": derived_variant(variant, args.seeds)}
        else:
            for seed in args.seeds:
                results.setdefault(variant, {})[str(seed)] = train_variant(variant, seed, args.threads)
                print(f"{variant} seed {seed}: dev mean {results[variant][str(seed)]['mean']:.4f}", flush=True)
        save(args.study, results)


def save(study: str, results: dict) -> None:
    """Merge this invocation's results into the study's file (another invocation may share it)."""
    path = RESULTS / f"compare_{study}.json"
    merged = json.loads(path.read_text())["figures"] if path.exists() else {}
    for variant, runs in results.items():
        if isinstance(runs, dict):
            merged.setdefault(variant, {}).update(runs)
        else:
            merged[variant] = runs
    write_results(f"compare_{study}", merged, summarise(study, merged))


if __name__ == "__main__":
    main()
