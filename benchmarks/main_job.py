"""The main job's figures: baseline, neural member, blend and biased blend, per config and seed.

Each variant runs the main job (`clue_mtl.pipeline.main_job`, what `clue-mtl run` runs: baseline,
training, blend with the baseline, both zips), timed around the call, and its dev figures are read
from the blend folder (whole dev split: blends cross-fitted, members as they are). `--ensemble`
then blends the finished runs of several variants with the baseline. `--compare A B` adds
paired-bootstrap intervals of B minus A over the same dev rows (the decisions of each variant's
final zip, the biased blend, cross-fitted).

    python -m benchmarks.main_job run --config configs/quickstart.yaml --seed 1 [--set KEY=VALUE ...]
    python -m benchmarks.main_job ensemble --name e5+m3e --run runs/main-quickstart-s1 --run runs/main-quickstart-m3e-s1
    python -m benchmarks.main_job report --compare quickstart-s1 quickstart-m3e-s1
    python -m benchmarks.main_job report --compare a-s1+a-s2 b-s1+b-s2     # seeds paired in order, averaged
    python -m benchmarks.main_job existing --name make-run --blend blends/quickstart --seconds 1234 --how "time make run"
    python -m benchmarks.main_job --smoke run --config configs/quickstart.yaml   # the suite: tiny encoder, 2 steps

Results accumulate in benchmarks/results/main_job.json, so variants can run in separate calls
(or side by side in single-thread lanes, whose wall times are then marked as not comparable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (RESULTS, ROOT, command_line, parse_arguments, smoke_job_overrides, work_root,
                               write_results)
from clue_mtl.tasks import TASK_NAMES as TASKS
from clue_mtl.runs.folder import RunFolder

RECORD = RESULTS / "main_job.json"


def load_entries() -> dict:
    entries = json.loads(RECORD.read_text())["figures"] if RECORD.exists() else {}
    entries.pop("_comparisons", None)
    return entries


def load_comparisons() -> dict:
    return json.loads(RECORD.read_text())["figures"].get("_comparisons", {}) if RECORD.exists() else {}


def blend_entry(blend_dir: Path) -> dict:
    blend = json.loads((blend_dir / "blend.json").read_text())
    tasks = blend["tasks"]
    members = {m["name"]: m["kind"] for m in blend["members"]}
    entry = {"blend_dir": str(blend_dir.relative_to(work_root())), "members": {}}
    for name in members:
        entry["members"][name] = {t: tasks[t]["dev"]["members"][name] for t in TASKS}
    for which in ("blend", "biased"):
        for how in ("cross_fitted", "in_sample"):
            entry[f"{which}_{how}"] = {t: tasks[t]["dev"][which][how] for t in TASKS}
    entry["weights"] = {t: dict(zip(tasks[t]["members"], tasks[t]["weights"])) for t in TASKS}
    entry["bias"] = {t: dict(zip(tasks[t]["labels"], tasks[t]["bias"])) for t in TASKS}
    return entry


def cmd_run(args) -> None:
    from clue_mtl.config import load_config
    from clue_mtl.pipeline import main_job

    name = recorded_name(args)
    overrides = [f"name=main-{name}", f"train.seed={args.seed}", *(args.set or []), *smoke_job_overrides()]
    os.chdir(ROOT)  # the config's relative paths (data/, runs/, artifacts/) as the command line reads them
    config = load_config(ROOT / args.config, overrides)
    started = time.perf_counter()
    job = main_job(config, blend_dir=work_root() / "blends" / config.name,
                   out_dir=work_root() / "submissions" / "benchmarks", overwrite=True)
    seconds = time.perf_counter() - started
    run_dir = ROOT / job.run_dir
    entry = blend_entry(job.blend_dir)
    entry.update({
        "config": args.config, "overrides": overrides, "run_dir": str(run_dir.relative_to(work_root())),
        "seconds": seconds, "steps": config.train.steps, "batch_size": config.train.batch_size,
        "samples_per_second": training_speed(run_dir),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "lane": args.lane, "command": command_line(),
    })
    record_entry(name, entry, args.compare or [])


def training_speed(run_dir: Path) -> float | None:
    """Training rows/s of a run as its metrics last logged it: over the whole run, its evaluations included."""
    from clue_mtl.config import load_config

    folder = RunFolder(run_dir)
    speeds = [r["steps_per_second"] for r in folder.metrics() if r["kind"] == "train"]
    return speeds[-1] * load_config(folder.config_file).train.batch_size if speeds else None


def record_entry(name: str, entry: dict, compare: list[str]) -> None:
    """Add one variant to main_job.json and rewrite the report."""
    with entries_locked() as entries:
        entries[name] = entry
        report(entries, compare)


@contextlib.contextmanager
def entries_locked():
    """The entries of main_job.json, held under an exclusive lock until the report is rewritten:
    lanes finishing together take turns, so neither loses the other's entry."""
    import fcntl

    (work_root() / "runs").mkdir(parents=True, exist_ok=True)
    with open(work_root() / "runs" / ".main_job.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield load_entries()


def cmd_ensemble(args) -> None:
    from clue_mtl.predict.blend import build_blend

    members = [work_root() / r for r in args.run] + [work_root() / args.baseline]
    blend_dir = work_root() / "blends" / f"ensemble-{args.name}"
    build_blend(members, blend_dir, progress=False)
    entry = blend_entry(blend_dir)
    entry.update({"runs": args.run, "command": command_line(),
                  "seconds": None})
    record_entry(f"ensemble-{args.name}", entry, args.compare or [])


def cmd_existing(args) -> None:
    """Record a main job that ran elsewhere (e.g. `time make run`), with its measured wall time."""
    entry = blend_entry(work_root() / args.blend)
    entry.update({"seconds": args.seconds, "how": args.how, "command": args.how})
    if args.run:
        entry["samples_per_second"] = training_speed(work_root() / args.run)
    record_entry(args.name, entry, args.compare or [])


def decisions(entry: dict, member: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task (gold, decisions) of a variant: its biased blend's cross-fitted decisions, or one
    member's own argmax (`VARIANT@MEMBER` on the command line, e.g. make-run@baseline)."""
    from safetensors.numpy import load_file

    arrays = load_file(str(work_root() / entry["blend_dir"] / "dev.safetensors"))
    key = "cross_fitted/biased" if member is None else f"member/{member}"
    return {t: (arrays[f"{t}/gold"], arrays[f"{t}/{key}"] if member is None else arrays[f"{t}/{key}"].argmax(1))
            for t in TASKS}


def variant(entries: dict, name: str) -> tuple[dict, str | None]:
    base, _, member = name.partition("@")
    return entries[base], member or None


def paired_bootstrap(first: tuple[dict, str | None], second: tuple[dict, str | None], samples: int = 2000,
                     seed: int = 0) -> dict:
    """Mean macro-F1 of `second` minus `first` on the same dev rows, with a 95% interval from
    resampling each task's rows (the same resample for both variants)."""
    return bootstrap_decisions([decisions(*first)], [decisions(*second)], samples, seed)


def bootstrap_decisions(firsts: list[dict], seconds: list[dict], samples: int = 2000, seed: int = 0) -> dict:
    """Mean macro-F1 of the `seconds` minus the `firsts` (each a task -> (gold, decisions) dict;
    several pairs, e.g. one per seed, are averaged), with a 95% interval from resampling each
    task's dev rows, the same resample for every variant (`clue_mtl.predict.metrics.paired_bootstrap`)."""
    from clue_mtl.predict.metrics import paired_bootstrap as bootstrap
    from clue_mtl.tasks import get_task

    gold = {t: (firsts[0][t][0], get_task(t).num_labels) for t in TASKS}
    for variant in (*firsts, *seconds):
        for task in TASKS:
            if not np.array_equal(gold[task][0], variant[task][0]):
                raise ValueError(f"{task}: the variants were scored on different dev rows")
    pairs = [({t: b[t][1] for t in TASKS}, {t: a[t][1] for t in TASKS}) for a, b in zip(firsts, seconds, strict=True)]
    return bootstrap(pairs, gold, samples, seed)


def mean(values: dict) -> float:
    return float(np.mean([values[t] for t in TASKS]))


def report(entries: dict, compare: list[str]) -> None:
    comparisons = load_comparisons()
    for pair in zip(compare[::2], compare[1::2]):
        comparisons[f"{pair[1]} - {pair[0]}"] = bootstrap_decisions(
            [decisions(*variant(entries, name)) for name in pair[0].split("+")],
            [decisions(*variant(entries, name)) for name in pair[1].split("+")])
    lines = ["# The main job's dev figures (whole dev split; blends cross-fitted unless marked)", "",
             "| variant | member / decision | OCNLI | OCEMOTION | TNEWS | mean | wall time | samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        minutes = f"{entry['seconds'] / 60:.1f} min" if entry.get("seconds") else "-"
        if entry.get("lane"):
            minutes += " (lane)"
        speed = f"{entry['samples_per_second']:.1f}" if entry.get("samples_per_second") else "-"
        rows = [(member, f1) for member, f1 in entry["members"].items()]
        rows += [("blend", entry["blend_cross_fitted"]), ("biased blend", entry["biased_cross_fitted"]),
                 ("biased blend, in-sample", entry["biased_in_sample"])]
        for i, (label, f1) in enumerate(rows):
            lines.append(f"| {name if i == 0 else ''} | {label} | {f1['ocnli']:.4f} | {f1['ocemotion']:.4f} | "
                         f"{f1['tnews']:.4f} | **{mean(f1):.4f}** | {minutes if i == 0 else ''} | {speed if i == 0 else ''} |")
    if comparisons:
        lines += ["", "Paired bootstrap over the same dev rows (the final decisions; 2,000 resamples, 95%):", "",
                  "| difference | mean macro-F1 | interval |", "|---|---|---|"]
        for label, c in comparisons.items():
            verdict = "" if c["low"] <= 0 <= c["high"] else " (outside: a difference)"
            lines.append(f"| {label} | {c['difference']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}]{verdict} |")
    lines += ["", "Wall time covers the whole main job (`pipeline.main_job`, what `clue-mtl run` runs; entries "
              "recorded before it timed the `clue-mtl run` process, its start-up included): baseline (or reusing "
              "a saved one), training, evaluation, blend, both zips. '(lane)': run beside another single-thread "
              "job; not a timing.",
              "", "Commands: see `command` of each entry in main_job.json."]
    figures = {name: entry for name, entry in entries.items()}
    figures["_comparisons"] = comparisons
    write_results("main_job", figures, "\n".join(lines))


def recorded_name(args) -> str | None:
    """The entry a command adds to main_job.json (None for `report`)."""
    if args.command == "run":
        return args.name or f"{Path(args.config).stem}-s{args.seed}"
    if args.command == "ensemble":
        return f"ensemble-{args.name}"
    return getattr(args, "name", None)


def compare_problem(compare: list[str], adding: str | None) -> str | None:
    """Why `--compare` cannot be computed once `adding` is recorded (checked before any work, so a
    finished run is never lost to a comparison that fails at the end), or None."""
    if not compare:
        return None
    if len(compare) % 2:
        return "--compare takes pairs: A B [A B ...]"
    entries = load_entries()
    for joined in compare:
        for name in joined.split("+"):
            base, _, member = name.partition("@")
            if base == adding:
                continue
            if base not in entries:
                return f"--compare: no entry {base!r} in {RECORD.name}"
            if member and member not in entries[base]["members"]:
                return f"--compare: {base!r} has no member {member!r} (it has {', '.join(entries[base]['members'])})"
            if not (work_root() / entries[base]["blend_dir"] / "dev.safetensors").exists():
                return (f"--compare: {base!r} has no {entries[base]['blend_dir']}/dev.safetensors here "
                        "(blend folders are not committed; compare runs made on this machine)")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("--config", required=True)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--name")
    run.add_argument("--set", action="append")
    run.add_argument("--lane", action="store_true", help="run beside another job: wall time is not a timing")
    run.add_argument("--compare", nargs="*")
    ensemble = commands.add_parser("ensemble")
    ensemble.add_argument("--name", required=True)
    ensemble.add_argument("--run", action="append", required=True)
    ensemble.add_argument("--baseline", default="runs/baseline")
    ensemble.add_argument("--compare", nargs="*")
    existing = commands.add_parser("existing")
    existing.add_argument("--name", required=True)
    existing.add_argument("--blend", required=True, help="the blend folder the job wrote")
    existing.add_argument("--seconds", type=float, required=True)
    existing.add_argument("--how", required=True, help="how the time was measured")
    existing.add_argument("--run", help="its run folder, for the training rows/s")
    existing.add_argument("--compare", nargs="*")
    rep = commands.add_parser("report")
    rep.add_argument("--compare", nargs="*")
    args = parse_arguments(parser, argv)
    problem = compare_problem(args.compare or [], recorded_name(args))
    if problem:
        parser.error(problem)
    if args.command == "run":
        cmd_run(args)
    elif args.command == "ensemble":
        cmd_ensemble(args)
    elif args.command == "existing":
        cmd_existing(args)
    else:
        with entries_locked() as entries:
            report(entries, args.compare or [])


if __name__ == "__main__":
    main()
