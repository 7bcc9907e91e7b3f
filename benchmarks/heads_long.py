"""Per-task attention heads against none at the 3-hour recipe's budget (issue 36): the e5-small
member (`configs/cpu-best-e5.yaml`, 3,200 steps, no heads) and the same with the quickstart's
`heads: attention` for every task, two seeds each, whole-dev macro-F1 alone and in the biased
blend with the TF-IDF baseline (cross-fitted), heads minus none by paired bootstrap.

    python -m benchmarks.heads_long        # the missing runs in lanes, then heads_long.{json,md}

The heads won +2.4 points at 450 steps (structures.md) and the long run with them lost to the one
without on another machine; this settles it at the budget the recipe ships. Every unfinished run
trains at once, one thread each (`benchmarks/lanes.py`); a finished run folder is not trained
again, so a run of the recipe (`runs/cpu-best/e5`, seed 42) may stand in for `none-s42` (a link).
Equal steps, with each run's step time beside it: where the heads are slower, they had more
minutes than the runs without. Step times compare only between runs trained in one batch of lanes
(the report names, per run, this study's runs that trained at the same time; lanes of other work,
such as the recipe's m3e-small lane beside its e5-small, are not listed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import machine, parse_arguments, refuse, work_root, write_results
from benchmarks.lanes import Lane, lane_minutes, lane_window, seconds_a_step, train_lanes

CONFIG = "configs/cpu-best-e5.yaml"
HEADS = [f"model.heads.{task}.type=attention" for task in ("ocnli", "ocemotion", "tnews")]
VARIANTS = {"heads": HEADS, "none": []}
SEEDS = (42, 43)


def lanes() -> list[Lane]:
    return [Lane(f"{variant}-s{seed}", CONFIG, [*overrides, f"train.seed={seed}"])
            for variant, overrides in VARIANTS.items() for seed in SEEDS]


def evaluated(run_dir: Path, baseline: Path, out: Path) -> dict:
    """The run's best model on the whole dev split, alone and in the biased blend with the baseline
    (cross-fitted), with the rows' gold labels and both decisions (from the blend's `dev.safetensors`)."""
    from safetensors.numpy import load_file

    from clue_mtl.predict.blend import Blend, build_blend, member_fingerprint

    members = [run_dir.resolve(), baseline.resolve()]
    blend = Blend.load(out) if (out / "blend.json").exists() else None
    if blend is None or [(Path(m["path"]).resolve(), m["fingerprint"]) for m in blend.members] != [
            (path, member_fingerprint(path)) for path in members]:   # none yet, or of other runs: fitted now
        blend = build_blend([run_dir, baseline], out, progress=False)
    member = blend.members[0]["name"]
    arrays = load_file(out / "dev.safetensors")
    alone = {task: blend.scores[task]["members"][member] for task in blend.tasks}
    biased = {task: blend.scores[task]["biased"]["cross_fitted"] for task in blend.tasks}
    return {
        "split": blend.split,
        "alone": {**alone, "mean": float(np.mean(list(alone.values())))},
        "biased_blend_cross_fitted": {**biased, "mean": blend.mean("biased")},
        "gold": {task: arrays[f"{task}/gold"].astype(np.int64) for task in blend.tasks},
        "decisions": {"alone": {task: arrays[f"{task}/member/{member}"].argmax(-1) for task in blend.tasks},
                      "biased": {task: arrays[f"{task}/cross_fitted/biased"].astype(np.int64) for task in blend.tasks}},
    }


def overlapping(run_dir: Path, other: Path) -> bool:
    """The two runs trained at the same time (`lane_window`)."""
    (start, end), (other_start, other_end) = lane_window(run_dir), lane_window(other)
    return start < other_end and other_start < end


def heads_minus_none(results: dict[str, dict]) -> dict:
    """Heads minus none per seed and over both seeds (one resample shared by the pairs), alone and
    in the biased blend; the runs must have been read on the same dev rows (their split's digest)."""
    from clue_mtl.predict.metrics import paired_bootstrap
    from clue_mtl.tasks import get_task

    first = next(iter(results.values()))
    for name, result in results.items():
        if result["split"] != first["split"]:
            refuse(f"{name}: its dev split is not the other runs'")
    gold = {task: (labels, get_task(task).num_labels) for task, labels in first["gold"].items()}
    comparisons = {}
    for key in ("alone", "biased"):
        pairs = {seed: (results[f"heads-s{seed}"]["decisions"][key], results[f"none-s{seed}"]["decisions"][key])
                 for seed in SEEDS}
        comparisons[key] = {**{f"s{seed}": paired_bootstrap([pair], gold) for seed, pair in pairs.items()},
                            "both seeds": paired_bootstrap(list(pairs.values()), gold)}
    return comparisons


def report(figures: dict, cpu: str) -> str:
    runs, comparisons = figures["runs"], figures["heads_minus_none"]
    lines = ["# Attention heads against none at the 3-hour recipe's budget (issue 36)", "",
             f"`{CONFIG}`, {figures['steps']:,} steps, with and without `heads: attention` for every task, "
             f"single-thread lanes on {cpu}; whole dev split, each run's best model.", "",
             "| run | trained beside | s a step (to the first evaluation) | lane minutes | alone "
             "| biased blend (cross-fitted) |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(f"| {name} | {', '.join(run['trained_beside']) or '(no run of this study)'} "
                     f"| {run['seconds_a_step']:.2f} | {run['lane_minutes']:.1f} | {run['alone']['mean']:.4f} "
                     f"| {run['biased_blend_cross_fitted']['mean']:.4f} |")
    lines += ["", "Heads minus none (paired bootstrap over the same dev rows, 95%):", "",
              "| | " + " | ".join(comparisons["alone"]) + " |", "|---|" + "---|" * len(comparisons["alone"])]
    for key, label in (("alone", "alone"), ("biased", "biased blend")):
        lines.append(f"| {label} | " + " | ".join(f"{c['difference'] * 100:+.2f} ({c['low'] * 100:+.2f}, "
                                                   f"{c['high'] * 100:+.2f})" for c in comparisons[key].values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", help="where the runs, the baseline and the blends go (default runs/heads-long)")
    args = parse_arguments(parser, argv)
    from safetensors import SafetensorError

    from clue_mtl.errors import BlendError, ConfigError, DataError, RunFolderError

    try:
        return compare(Path(args.run_root) if args.run_root else work_root() / "runs" / "heads-long")
    except (BlendError, ConfigError, DataError, RunFolderError, SafetensorError, OSError) as error:
        refuse(str(error))   # a broken run folder or blend: one line, no traceback


def compare(run_root: Path) -> int:
    from clue_mtl.predict.baseline import fitted_baseline

    study = lanes()
    configs = {lane.name: lane.loaded() for lane in study}
    train_lanes(study, run_root)
    baseline = fitted_baseline(next(iter(configs.values())).data, run_root / "baseline")
    results, runs = {}, {}
    for lane in study:
        run_dir = run_root / lane.name
        results[lane.name] = evaluated(run_dir, baseline, run_root / "blends" / lane.name)
        runs[lane.name] = {key: results[lane.name][key] for key in ("alone", "biased_blend_cross_fitted")}
        runs[lane.name].update(seconds_a_step=seconds_a_step(run_dir), lane_minutes=lane_minutes([run_dir]),
                               run_dir=str(run_dir.resolve()))
    for name, run in runs.items():
        run["trained_beside"] = [other for other in runs if other != name and overlapping(run_root / name, run_root / other)]
    steps = {config.train.steps for config in configs.values()}
    figures = {"config": CONFIG, "steps": steps.pop(), "runs": runs, "heads_minus_none": heads_minus_none(results)}
    write_results("heads_long", figures, report(figures, machine()["cpu"]))   # the record holds the machine
    return 0


if __name__ == "__main__":
    sys.exit(main())
