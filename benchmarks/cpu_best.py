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

Wall time. The lanes' minutes are read from their run folders: from the first lane's claim of its
folder (its `config.yaml` written) to the last lane's last metrics record (its final evaluation),
so lanes started by hand and lanes started here are timed alike; a resumed lane's pause counts.
The baseline, the blend and the zips are timed here. Interpreter start and imports before a
lane's claim (seconds) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, parse_arguments, smoke_job_overrides, work_root, write_results

MEMBERS = {"e5": "configs/cpu-best-e5.yaml", "m3e": "configs/cpu-best-m3e.yaml"}
SPLITS = ("a", "b")


def member_config(name: str, args):
    """A member's config, with the smoke inputs in a smoke run (two tiny steps)."""
    from clue_mtl.config import load_config

    return load_config(str(ROOT / MEMBERS[name]), [*smoke_job_overrides(), *args.set])


def finished(config, run_dir: Path) -> bool:
    """The run folder holds this config's run trained to its last step, with its best model."""
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "best").is_dir() or not metrics.exists():
        return False
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0) >= config.train.steps


def train_lanes(configs: dict, run_root: Path, args) -> None:
    """Every unfinished member trained (or resumed) in its own single-thread lane, all at once."""
    lanes = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, config in configs.items():
        run_dir = run_root / name
        if finished(config, run_dir):
            print(f"{name}: trained already ({run_dir})", flush=True)
            continue
        command = [sys.executable, "-m", "clue_mtl", "train", "--config", str(ROOT / MEMBERS[name]),
                   "--run-dir", str(run_dir), "--set", "train.num_threads=1",
                   *[f"--set={override}" for override in [*smoke_job_overrides(), *args.set]],
                   *(["--resume"] if (run_dir / "config.yaml").exists() else [])]
        log = run_root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{name}: training in a lane (log {log})", flush=True)
        lanes[name] = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log.open("w"),
                                       stderr=subprocess.STDOUT)
    failed = [name for name, lane in lanes.items() if lane.wait() != 0]
    if failed:
        raise SystemExit(f"error: lane {', '.join(failed)} failed; see {run_root / 'logs'}")


def lane_minutes(run_dirs: list[Path]) -> float:
    """From the first lane's claim (its config.yaml) to the last lane's last metrics record."""
    started = min((run_dir / "config.yaml").stat().st_mtime for run_dir in run_dirs)
    ended = max((run_dir / "metrics.jsonl").stat().st_mtime for run_dir in run_dirs)
    return (ended - started) / 60


def timed(minutes: dict, stage: str, work):
    """`work()`, its wall minutes recorded under `stage`."""
    started = time.perf_counter()
    result = work()
    minutes[stage] = (time.perf_counter() - started) / 60
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", help="where the members, baseline, blend and zips go (default runs/cpu-best)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for both members")
    args = parse_arguments(parser, argv)
    from clue_mtl.predict.baseline import fitted_baseline
    from clue_mtl.predict.blend import build_blend, predict_blend_submission
    from clue_mtl.predict.submission import read_submission

    run_root = Path(args.run_root) if args.run_root else work_root() / "runs" / "cpu-best"
    configs = {name: member_config(name, args) for name in MEMBERS}
    data = next(iter(configs.values())).data
    minutes: dict[str, float] = {}
    train_lanes(configs, run_root, args)
    run_dirs = [run_root / name for name in configs]
    minutes["lanes"] = lane_minutes(run_dirs)
    baseline = timed(minutes, "baseline", lambda: fitted_baseline(data, run_root / "baseline"))
    blend = timed(minutes, "blend", lambda: build_blend([*run_dirs, baseline], run_root / "blend",
                                                       data_dir=data.data_dir, progress=False))
    zips = timed(minutes, "zips", lambda: {split: predict_blend_submission(
        run_root / "blend", run_root / f"cpu-best-test-{split}.zip", split=split, progress=False) for split in SPLITS})
    rows = {split: sum(len(frame) for frame in read_submission(path).values()) for split, path in zips.items()}

    members = {member["name"]: member["path"] for member in blend.members}
    alone = {name: {task: blend.scores[task]["members"][name] for task in blend.tasks} for name in members}
    for scores in alone.values():
        scores["mean"] = sum(scores.values()) / len(blend.tasks)
    biased = {task: blend.scores[task]["biased"]["cross_fitted"] for task in blend.tasks}
    biased["mean"] = blend.mean("biased")
    figures = {
        "biased_blend_cross_fitted": biased, "alone": alone,
        "wall_minutes": sum(minutes.values()), "stage_minutes": minutes,
        "steps": {name: config.train.steps for name, config in configs.items()},
        "zip_rows": rows, "members": members, "configs": MEMBERS,
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
    lines += ["", f"Zip rows read back: test A {rows['a']:,}, test B {rows['b']:,}."]
    write_results("cpu_best", figures, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
