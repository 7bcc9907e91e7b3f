"""Quality per CPU minute: whole-dev mean macro-F1 against training minutes, per variant of the
quickstart recipe, the member alone and blended with the TF-IDF baseline (biased, cross-fitted).

    python -m benchmarks.cpu_budget curve --variant default --minutes 10,20,30,45,60,90,120
    python -m benchmarks.cpu_budget curve --variant frozen8 --minutes ... --threads 1   # a lane
    python -m benchmarks.cpu_budget confirm --variant frozen8 --minutes 45 --threads 1   # its own schedule
    python -m benchmarks.cpu_budget report        # cpu_budget.{json,md,png} from every curve so far

A curve is one long run whose schedule does not depend on its length (`constant_with_warmup`
over the quickstart's 27 warm-up steps; the quickstart's other settings and its variant's).
The run trains by the clock only to keep the accounts (`train.max_minutes` far off): its
training seconds are counted apart from evaluation and checkpoints. At each of the given
training minutes it stops with a checkpoint. It then predicts the whole dev split with the
weights it has then, and blends them with the baseline's probabilities
(`blend.fit_task_blend`: the biased blend, cross-fitted). All of that is off the clock. Each
point goes to `benchmarks/results/cpu_budget_runs/VARIANT-sSEED.json` at once. A killed curve
goes on from its last checkpoint: run the same command again.

A curve's constant learning rate never decays, so its points understate what a run of that length
gives. `confirm` trains a variant at one budget with the recipe's own schedule (`train.max_minutes`
fixes the steps, the quickstart's linear decay ends on the last one) and reads one point the same
way, to `VARIANT-ownMINUTES-sSEED.json`; the report compares it with `default` at the same budget
and schedule. A confirmation saves no checkpoint before its end: a killed one starts again.

Lanes: two curves side by side with `--threads 1` each (and OMP_NUM_THREADS=1) do about 1.5x the
work of one two-thread process. Their minutes are lane minutes: compare curves from the same kind
of lane, and never read a lane's step time as the machine's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, machine, refuse, write_results, write_whole

RUNS = RESULTS / "cpu_budget_runs"
CONFIG = ROOT / "configs" / "quickstart.yaml"
# the curve's schedule: the quickstart's warm-up (6% of 450 steps), then its peak to the end;
# evaluation is the curve's own (never inside training); budget accounts only
CURVE = ["train.scheduler=constant_with_warmup", "train.warmup_steps=27", "train.max_minutes=100000",
         "train.eval_every=100000000", "data.max_dev_rows=null"]
VARIANTS = {
    "default": [],
    "no-heads": ["model.heads={}"],
    "frozen8": ["model.frozen_layers=8", "train.cache_frozen=true"],
    "frozen6": ["model.frozen_layers=6", "train.cache_frozen=true"],
}
CALIBRATION_STEPS = 20   # the first segment: the budget times steps 3-12, the rate is read after it
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"   # label indices as one character each


def encode_labels(indices) -> str:
    return "".join(DIGITS[int(i)] for i in indices)


def decode_labels(text: str) -> np.ndarray:
    return np.array([DIGITS.index(c) for c in text], dtype=np.int64)


# ----------------------------------------------------------------------------------- a curve
class Curve:
    """One variant's long run, stopped at given training minutes to read a point."""

    def __init__(self, args, schedule: list[str] = CURVE, label: str = ""):
        from clue_mtl.config import load_config

        self.name = f"{args.variant}{label}-s{args.seed}"
        self.record_path = Path(args.results) / "cpu_budget_runs" / f"{self.name}.json"
        self.run_dir = Path(args.run_root) / self.name
        overrides = [*schedule, *VARIANTS[args.variant], f"train.seed={args.seed}", f"name=cpu-budget-{self.name}",
                     *([f"train.num_threads={args.threads}"] if args.threads else []), *args.set]
        self.config = load_config(args.config, overrides)
        self.record = (json.loads(self.record_path.read_text()) if self.record_path.exists()
                       else {"variant": args.variant, "seed": args.seed, "overrides": overrides, "points": [],
                             "reference": f"default{label}-s{args.seed}"})
        self.trainer = None
        self.rate: float | None = None   # seconds a training step, over the last segment

    def start(self, baseline_dir: Path) -> None:
        from clue_mtl.data.folder import task_frames
        from clue_mtl.predict.baseline import BaselineRun
        from clue_mtl.recipes.multitask import Trainer

        resume = (self.run_dir / "config.yaml").exists() and bool(self.record["points"])
        self.trainer = Trainer(self.config, self.run_dir, resume=resume, overwrite=not resume, show_progress=False)
        if resume:   # the step and the accounts of the last point, before the first segment is planned
            self.trainer.load_checkpoint()
        baseline = BaselineRun.load(baseline_dir)
        self.gold, self.baseline = {}, {}
        for task, data in self.trainer.dev_data.items():
            dev_frame = task_frames(self.config.data, task)[1]
            self.gold[task] = np.asarray(data.labels, dtype=np.int64)
            self.baseline[task] = baseline.probabilities(task, dev_frame)
        # the dev rows' gold labels and the baseline's decisions, in the order of every point's
        # decisions: what a paired bootstrap between curves needs, and a check that rows line up
        rows = {task: {"gold": encode_labels(self.gold[task]), "baseline": encode_labels(self.baseline[task].argmax(-1))}
                for task in self.gold}
        if self.record.setdefault("dev_rows", rows) != rows:
            refuse(f"{self.record_path}: its points were read on other dev rows or another baseline")

    def train_until(self, minutes: float) -> None:
        """Segments of training until `minutes` of training seconds are spent; the rate of the
        last segment sets the next one's steps (a frozen cache speeds up once an epoch is cached)."""
        trainer = self.trainer
        while trainer.budget.spent["training"] < minutes * 60:
            step, spent = trainer.state.step, trainer.budget.spent["training"]
            steps = CALIBRATION_STEPS if self.rate is None else max(1, math.ceil((minutes * 60 - spent) / self.rate))
            trainer.train(until_step=step + steps)
            trainer.resume = True   # the next segment starts from the checkpoint just saved
            self.rate = (trainer.budget.spent["training"] - spent) / max(trainer.state.step - step, 1)
            print(f"{self.name}: steps {step}-{trainer.state.step}: {self.rate:.3g} s a step", flush=True)

    def point(self) -> dict:
        """The whole dev split predicted with the weights of now; the blend with the baseline."""
        from clue_mtl.predict.blend import fit_task_blend
        from clue_mtl.predict.inference import predict_logits, softmax

        trainer, started = self.trainer, time.perf_counter()
        alone, biased, decisions = {}, {}, {}
        baseline = {}
        for task, data in trainer.dev_data.items():
            logits = predict_logits(trainer.model, task, data, pad_id=trainer.tokenizer.pad_token_id,
                                    accelerator=trainer.accelerator)
            _, scores, crossed = fit_task_blend(task, ["member", "baseline"], [softmax(logits), self.baseline[task]],
                                                self.gold[task])
            alone[task], baseline[task] = scores["members"]["member"], scores["members"]["baseline"]
            biased[task] = scores["biased"]["cross_fitted"]
            decisions[task] = {"alone": encode_labels(logits.argmax(-1)), "biased": encode_labels(crossed["biased"])}
        mean = lambda scores: sum(scores.values()) / len(scores)  # noqa: E731
        spent = trainer.budget.spent
        return {"training_minutes": spent["training"] / 60, "step": trainer.state.step,
                "epochs": trainer.batches.epochs_seen(trainer.state.step * self.config.train.grad_accumulation),
                "alone": {**alone, "mean": mean(alone)}, "biased_blend_cross_fitted": {**biased, "mean": mean(biased)},
                "baseline": {**baseline, "mean": mean(baseline)},
                "evaluation_seconds": round(time.perf_counter() - started, 1),
                "checkpoint_minutes": spent["checkpoint"] / 60, "machine": machine(), "decisions": decisions}

    def save(self) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(self.record_path, json.dumps(self.record, indent=1, ensure_ascii=False) + "\n")


def cmd_curve(args) -> int:
    if args.smoke:
        smoke_inputs(args)
    curve = Curve(args)
    done = [point["target_minutes"] for point in curve.record["points"]]
    targets = sorted(minutes for minutes in args.minutes if minutes not in done)
    if not targets:
        print(f"{curve.name}: every point is there ({curve.record_path})")
        return 0
    from clue_mtl.predict.baseline import fitted_baseline

    curve.start(fitted_baseline(curve.config.data, Path(args.run_root) / "baseline"))
    for minutes in targets:
        reached = max((point["training_minutes"] for point in curve.record["points"]), default=0.0)
        if minutes < reached:
            print(f"{curve.name}: {minutes} training minutes are behind the run ({reached:.1f}); not read")
            continue
        curve.train_until(minutes)
        point = {"target_minutes": minutes, **curve.point()}
        curve.record["points"].append(point)
        curve.save()
        print(f"{curve.name}: {point['training_minutes']:.1f} training minutes, step {point['step']}: alone "
              f"{point['alone']['mean']:.4f}, biased blend {point['biased_blend_cross_fitted']['mean']:.4f} "
              f"(baseline {point['baseline']['mean']:.4f})", flush=True)
    return 0


def cmd_confirm(args) -> int:
    """One variant at `--minutes` with its own schedule: trained to the end, then read as a point."""
    if len(args.minutes) != 1:
        refuse(f"confirm trains at one budget; --minutes {','.join(f'{m:g}' for m in args.minutes)} names "
               f"{len(args.minutes)}")
    if args.smoke:
        smoke_inputs(args)
    minutes = args.minutes[0]
    own = [f"train.max_minutes={minutes:g}", "train.eval_every=100000000", "data.max_dev_rows=null"]
    curve = Curve(args, schedule=own, label=f"-own{minutes:g}")
    if curve.record["points"]:
        print(f"{curve.name}: already read ({curve.record_path})")
        return 0
    from clue_mtl.predict.baseline import fitted_baseline

    curve.start(fitted_baseline(curve.config.data, Path(args.run_root) / "baseline"))
    curve.trainer.train()
    point = {"target_minutes": minutes, **curve.point()}
    curve.record["points"].append(point)
    curve.save()
    print(f"{curve.name}: {point['training_minutes']:.1f} training minutes, step {point['step']} of its own schedule: "
          f"alone {point['alone']['mean']:.4f}, biased blend {point['biased_blend_cross_fitted']['mean']:.4f}", flush=True)
    return 0


def smoke_inputs(args) -> None:
    """A tiny encoder and generated competition files under the run root (the suite's smoke run)."""
    from clue_mtl.testing import build_tiny_encoder, write_tiny_competition_files

    root = Path(args.run_root)
    data = write_tiny_competition_files(root / "data", rows=150)
    encoder = build_tiny_encoder(root / "encoder", kind="bert")
    args.set = [f"data.data_dir={data}", f"model.encoder={encoder}", "data.max_length=32", "train.batch_size=9",
                "train.warmup_steps=2", "model.heads={ocnli: {type: attention, heads: 2}, ocemotion: "
                "{type: attention, heads: 2}, tnews: {type: attention, heads: 2}}", *args.set]


# ----------------------------------------------------------------------------------- report
def crossing(points: list[dict], line: float, key: str = "alone") -> float | None:
    """The first training minute at which the curve reaches `line` (linear between points)."""
    previous = None
    for point in points:
        minutes, value = point["training_minutes"], point[key]["mean"]
        if value >= line:
            if previous is None:
                return minutes
            (m0, v0) = previous
            return m0 + (line - v0) * (minutes - m0) / (value - v0)
        previous = (minutes, value)
    return None


def cmd_report(args) -> int:
    folder = Path(args.results) / "cpu_budget_runs"
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    if not runs:
        print(f"error: no curves in {folder}; run `curve` first", file=sys.stderr)
        return 2
    baseline = next(iter(runs.values()))["points"][0]["baseline"]["mean"]
    figures = {"baseline": baseline, "curves": {}}
    lines = ["# Quality per CPU minute (issue 36)", "",
             f"Whole dev split, mean macro-F1; the baseline alone {baseline:.4f}. Minutes are training minutes "
             "(evaluation and checkpoints apart).", "",
             "| curve | CPU, threads | minutes | step | epochs (tnews) | alone | biased blend (cross-fitted) |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        points = sorted(run["points"], key=lambda p: p["training_minutes"])
        figures["curves"][name] = {
            "overrides": run["overrides"],
            "points": [{key: point[key] for key in ("training_minutes", "step", "epochs", "alone",
                                                    "biased_blend_cross_fitted")} for point in points],
            "alone_crosses_baseline_at_minute": crossing(points, baseline)}
        for point in points:
            cpu = f"{point['machine']['cpu']}, {point['machine']['torch_threads']}"
            lines.append(f"| {name} | {cpu} | {point['training_minutes']:.1f} | {point['step']} | "
                         f"{point['epochs'].get('tnews', 0):.2f} | {point['alone']['mean']:.4f} | "
                         f"{point['biased_blend_cross_fitted']['mean']:.4f} |")
    comparisons = compare_with_default(runs)
    figures["against_default"] = comparisons
    if comparisons:
        lines += ["", "Each curve minus `default` of its seed (and of its schedule: `-ownM` runs against `default-ownM`) "
                  "at the same target minute, paired bootstrap over the same dev rows (95% interval):", "",
                  "| curve | minute | alone | biased blend |", "|---|---|---|---|"]
        for name, at in comparisons.items():
            for minute, pair in at.items():
                cells = [f"{pair[key]['difference']:+.4f} ({pair[key]['low']:+.4f}, {pair[key]['high']:+.4f})"
                         for key in ("alone", "biased")]
                lines.append(f"| {name} | {minute} | {cells[0]} | {cells[1]} |")
    lines += ["", "Where each member alone reaches the baseline:", ""]
    for name, curve in figures["curves"].items():
        minute = curve["alone_crosses_baseline_at_minute"]
        last = curve["points"][-1]["training_minutes"]
        lines.append(f"- {name}: " + (f"at {minute:.1f} training minutes" if minute is not None
                                       else f"not within its {last:.0f} training minutes"))
    best = Path(args.results) / "cpu_best.json"
    if best.exists():   # the 3-hour recipe (benchmarks/cpu_best.py), beside the curves it was chosen from
        record = json.loads(best.read_text())
        figures["cpu_best"] = {key: record["figures"][key] for key in ("biased_blend_cross_fitted", "alone", "wall_minutes")}
        figures["cpu_best"].update(command=record["command"], lane_minutes=record["figures"]["stage_minutes"]["lanes"])
        lines += ["", f"The 3-hour recipe (`{record['command']}`, [cpu_best.md](cpu_best.md)): biased blend "
                  f"{figures['cpu_best']['biased_blend_cross_fitted']['mean']:.4f} cross-fitted, "
                  f"{figures['cpu_best']['wall_minutes']:.1f} wall minutes for the whole job."]
    plot(figures, Path(args.results) / "cpu_budget.png")
    write_results("cpu_budget", figures, "\n".join(lines) + "\n\n![curves](cpu_budget.png)", results=Path(args.results))
    return 0


def dev_gold(run: dict) -> dict[str, tuple[np.ndarray, int]]:
    """Per task, the dev rows' gold label indices and the number of labels, in the points' order:
    recorded with the curve, or read again from its config's split."""
    from clue_mtl.tasks import get_task

    if "dev_rows" in run:
        return {task: (decode_labels(rows["gold"]), get_task(task).num_labels) for task, rows in run["dev_rows"].items()}
    from clue_mtl.config import load_config
    from clue_mtl.data.folder import task_frames

    config = load_config(str(CONFIG), run["overrides"])
    gold = {}
    for task in config.data.tasks:
        index = get_task(task).label_index()
        gold[task] = (np.array([index[label] for label in task_frames(config.data, task)[1]["label"]]),
                      get_task(task).num_labels)
    return gold


def compare_with_default(runs: dict[str, dict]) -> dict:
    """Each curve against `default` of the same seed, at every target minute both read: the paired
    bootstrap of the member alone and of the biased blend."""
    from clue_mtl.predict.metrics import paired_bootstrap

    comparisons = {}
    for name, run in runs.items():
        reference = runs.get(run.get("reference", f"default-s{run['seed']}"))
        if run["variant"] == "default" or reference is None:
            continue
        gold = dev_gold(reference)
        theirs = {point["target_minutes"]: point["decisions"] for point in reference["points"]}
        comparisons[name] = {}
        for point in run["points"]:
            if point["target_minutes"] not in theirs:
                continue
            pair = {}
            for key in ("alone", "biased"):
                decided = [{task: decode_labels(d[task][key]) for task in gold}
                           for d in (point["decisions"], theirs[point["target_minutes"]])]
                pair[key] = paired_bootstrap([tuple(decided)], gold)
            comparisons[name][point["target_minutes"]] = pair
    return comparisons


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    for number, (name, curve) in enumerate(figures["curves"].items()):
        minutes = [p["training_minutes"] for p in curve["points"]]
        color = f"C{number}"
        axis.plot(minutes, [p["alone"]["mean"] for p in curve["points"]], "o-", color=color, label=f"{name} alone")
        axis.plot(minutes, [p["biased_blend_cross_fitted"]["mean"] for p in curve["points"]], "s--", color=color,
                  label=f"{name} + baseline (biased blend)")
    best = figures.get("cpu_best")
    if best is not None:   # the two lanes' wall minutes: each member trained about that long
        axis.plot([best["lane_minutes"]], [best["biased_blend_cross_fitted"]["mean"]], "*", markersize=14,
                  color="black", label="3-hour recipe: e5 + m3e + baseline, biased blend (lane minutes)")
        for marker, member in zip("^v", [name for name in best["alone"] if name != "baseline"]):
            axis.plot([best["lane_minutes"]], [best["alone"][member]["mean"]], marker, color="black", fillstyle="none",
                      label=f"3-hour recipe: {member} alone (its own decay)")
    axis.axhline(figures["baseline"], color="grey", linestyle=":", label="TF-IDF baseline")
    axis.set_xlabel("training minutes")
    axis.set_ylabel("dev mean macro-F1 (whole split)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the curves, not over them
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    curve = commands.add_parser("curve", help="train one variant's curve (or go on with it)")
    confirm = commands.add_parser("confirm", help="one variant at one budget with its own schedule")
    for sub in (curve, confirm):
        sub.add_argument("--variant", choices=sorted(VARIANTS), required=True)
        sub.add_argument("--minutes", type=lambda text: [float(m) for m in text.split(",")], required=True,
                         help="training minutes: the points of a curve (e.g. 10,20,30), or a confirmation's budget")
        sub.add_argument("--seed", type=int, default=42)
        sub.add_argument("--threads", type=int, help="torch threads (1 in a lane)")
        sub.add_argument("--config", default=str(CONFIG))
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--run-root", default=str(ROOT / "runs" / "cpu-budget"))
        sub.add_argument("--smoke", action="store_true", help="tiny encoder and generated data (the suite)")
    report = commands.add_parser("report", help="the table, the figure and the crossing minutes")
    for sub in (curve, confirm, report):
        sub.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    return {"curve": cmd_curve, "confirm": cmd_confirm, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
