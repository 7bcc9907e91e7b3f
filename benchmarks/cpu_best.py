"""The 3-hour CPU recipe (issue 36): two members trained side by side in single-thread lanes, the
TF-IDF baseline, their three-way blend and both test zips, with the whole job's wall time.

    python -m benchmarks.cpu_best            # lanes, baseline, blend, zips -> cpu_best.{json,md}
    python -m benchmarks.cpu_budget report   # folds cpu_best.json into cpu_budget.json ("cpu_best")

The members are `configs/cpu-best-e5.yaml` and `configs/cpu-best-m3e.yaml`, each trained by
`python -m clue_mtl train --config C --run-dir RUN_ROOT/NAME` with one torch thread
(OMP_NUM_THREADS=1), both at once: on 2 cores two lanes do about 1.5x the work of one two-thread
process. A lane whose run folder holds its finished run is not trained again; an unfinished one is
resumed from its last checkpoint. Then, with both cores: the baseline on the same split
(`RUN_ROOT/baseline`), the blend of the three (`clue-mtl blend`'s fit: per-task member weights
and macro-F1 class biases, scored cross-fitted on the whole dev split) and a zip per test split,
read back as the leaderboard reads it.

Wall time. The lanes' minutes are read from their run folders when they finish: from the first
lane's `config.yaml` (written once its data and model are set up, about 20 s in) to the last
lane's last metrics record (its final evaluation), so lanes started by hand and lanes started here
are timed alike; a resumed lane's pause counts. The baseline, the blend and the zips are timed
here. Each stage's minutes go to `RUN_ROOT/stages.json` as it ends. A second run skips a stage
whose output and minutes are there and reports the minutes it took, unless a stage before it ran
again (a retrained lane refits the blend and writes the zips again).

Where the blend's points come from: from the members' dev probabilities the blend stored
(`dev.safetensors`), the blend is fitted again on each pair of members, and the three-way biased
blend is compared with each pair and each member alone (paired bootstrap over the same dev rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, parse_arguments, work_root, write_results, write_whole
from benchmarks.lanes import Lane, lane_minutes, train_lanes

MEMBERS = {"e5": "configs/cpu-best-e5.yaml", "m3e": "configs/cpu-best-m3e.yaml"}
SPLITS = ("a", "b")


class Stages:
    """The wall minutes of each stage, kept in `RUN_ROOT/stages.json` as each ends."""

    def __init__(self, run_root: Path):
        self.path = run_root / "stages.json"
        self.minutes: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.redone = False   # a stage ran in this call: every later one runs again on its new output

    def run(self, stage: str, done: bool, work) -> None:
        """`work()` unless `done` (its output is there), its minutes are recorded and no stage
        before it ran again."""
        if done and stage in self.minutes and not self.redone:
            print(f"{stage}: done already ({self.minutes[stage]:.1f} min when it ran)", flush=True)
            return
        started = time.perf_counter()
        work()
        self.record(stage, (time.perf_counter() - started) / 60)

    def record(self, stage: str, minutes: float) -> None:
        self.redone = True
        self.minutes[stage] = minutes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(self.path, json.dumps(self.minutes, indent=1) + "\n")


def pairs_and_members(blend_dir: Path, names: list[str]) -> dict:
    """From the blend's stored dev probabilities: the biased blend of every pair of members refitted
    (cross-fitted), and the three-way biased blend minus each pair and each member alone, paired
    bootstrap over the same dev rows."""
    from itertools import combinations

    from safetensors.numpy import load_file

    from clue_mtl.predict.blend import fit_task_blend
    from clue_mtl.predict.metrics import paired_bootstrap
    from clue_mtl.tasks import get_task

    arrays = load_file(blend_dir / "dev.safetensors")
    tasks = sorted({key.split("/")[0] for key in arrays})
    gold = {task: (arrays[f"{task}/gold"].astype(np.int64), get_task(task).num_labels) for task in tasks}
    everyone = {task: arrays[f"{task}/cross_fitted/biased"].astype(np.int64) for task in tasks}
    figures = {}
    for pair in combinations(names, 2):
        decided, scores = {}, {}
        for task in tasks:
            _, task_scores, crossed = fit_task_blend(task, list(pair), [arrays[f"{task}/member/{n}"] for n in pair],
                                                     gold[task][0])
            decided[task], scores[task] = crossed["biased"], task_scores["biased"]["cross_fitted"]
        scores["mean"] = float(np.mean([scores[task] for task in tasks]))
        figures[" + ".join(pair)] = {"biased_blend_cross_fitted": scores,
                                     "all_three_minus_this": paired_bootstrap([(everyone, decided)], gold)}
    for name in names:
        alone = {task: arrays[f"{task}/member/{name}"].argmax(-1) for task in tasks}
        figures[f"{name} alone"] = {"all_three_minus_this": paired_bootstrap([(everyone, alone)], gold)}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", help="where the members, baseline, blend and zips go (default runs/cpu-best)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for both members")
    args = parse_arguments(parser, argv)
    from clue_mtl.errors import BlendError, ConfigError, DataError, RunFolderError, SubmissionError

    try:
        return run_recipe(args)
    except (BlendError, ConfigError, DataError, RunFolderError, SubmissionError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)   # one line: a broken input is no traceback
        return 2


def run_recipe(args) -> int:
    """The lanes, the baseline, the blend, the zips and the report (see the module)."""
    from clue_mtl.predict.baseline import fitted_baseline
    from clue_mtl.predict.blend import Blend, build_blend, predict_blend_submission
    from clue_mtl.predict.submission import read_submission

    run_root = Path(args.run_root) if args.run_root else work_root() / "runs" / "cpu-best"
    lanes = [Lane(name, config, args.set) for name, config in MEMBERS.items()]
    configs = {lane.name: lane.loaded() for lane in lanes}
    data = next(iter(configs.values())).data
    stages = Stages(run_root)
    run_dirs = [run_root / name for name in configs]
    if train_lanes(lanes, run_root) or "lanes" not in stages.minutes:
        stages.record("lanes", lane_minutes(run_dirs))
    baseline, blend_dir = run_root / "baseline", run_root / "blend"
    zips = {split: run_root / f"cpu-best-test-{split}.zip" for split in SPLITS}
    stages.run("baseline", (baseline / "baseline.json").exists(), lambda: fitted_baseline(data, baseline))
    stages.run("blend", (blend_dir / "blend.json").exists(), lambda: build_blend(
        [*run_dirs, baseline], blend_dir, data_dir=data.data_dir, progress=False))
    stages.run("zips", all(path.exists() for path in zips.values()), lambda: [predict_blend_submission(
        blend_dir, path, split=split, progress=False) for split, path in zips.items()])
    minutes = stages.minutes
    blend = Blend.load(blend_dir)
    rows = {split: sum(len(frame) for frame in read_submission(path).values()) for split, path in zips.items()}
    names = [member["name"] for member in blend.members]

    members = {member["name"]: member["path"] for member in blend.members}
    alone = {name: {task: blend.scores[task]["members"][name] for task in blend.tasks} for name in names}
    for scores in alone.values():
        scores["mean"] = sum(scores.values()) / len(blend.tasks)
    biased = {task: blend.scores[task]["biased"]["cross_fitted"] for task in blend.tasks}
    biased["mean"] = blend.mean("biased")
    figures = {
        "biased_blend_cross_fitted": biased, "alone": alone,
        "wall_minutes": sum(minutes.values()), "stage_minutes": minutes,
        "steps": {name: config.train.steps for name, config in configs.items()},
        "zip_rows": rows, "members": members, "configs": MEMBERS,
        "pairs_and_members": pairs_and_members(blend_dir, names),
    }
    lines = ["# The 3-hour CPU recipe (issue 36)", "",
             f"Two lanes (`{MEMBERS['e5']}`, `{MEMBERS['m3e']}`, one thread each), the TF-IDF baseline, their blend "
             f"and both zips on {machine()['cpu']}: **{figures['wall_minutes']:.1f} wall minutes** "
             f"({', '.join(f'{stage} {value:.1f}' for stage, value in minutes.items())}).", "",
             "| | " + " | ".join(blend.tasks) + " | mean |", "|---|" + "---|" * (len(blend.tasks) + 1)]
    for name, scores in alone.items():
        lines.append(f"| {name} alone | " + " | ".join(f"{scores[task]:.4f}" for task in blend.tasks)
                     + f" | {scores['mean']:.4f} |")
    lines.append("| **biased blend (cross-fitted)** | " + " | ".join(f"{biased[task]:.4f}" for task in blend.tasks)
                 + f" | **{biased['mean']:.4f}** |")
    lines += ["", f"Zip rows read back: test A {rows['a']:,}, test B {rows['b']:,}.", "",
              "Where the blend's points come from (pairs refitted on the stored dev probabilities; the three-way "
              "biased blend minus each, paired bootstrap, 95%):", "", "| instead of all three | its score | all three minus it |",
              "|---|---|---|"]
    for name, entry in figures["pairs_and_members"].items():
        difference = entry["all_three_minus_this"]
        score = entry.get("biased_blend_cross_fitted", {}).get("mean")
        lines.append(f"| {name} | {'' if score is None else f'{score:.4f}'} | {difference['difference']:+.4f} "
                     f"({difference['low']:+.4f}, {difference['high']:+.4f}) |")
    write_results("cpu_best", figures, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
