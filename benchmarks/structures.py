"""Model structures at equal wall time (issue 15): hard sharing against shared-private (top layers,
LoRA), per-task features (scalar mix), attention pooling, BiLSTM and SAN heads for OCNLI, and one
self-attention head per task.

Three stages, each resumable (finished runs are reused):

    python -m benchmarks.structures speed              # alone: each variant's training speed, 2 threads
    python -m benchmarks.structures train --lane 0/2   # two single-thread lanes side by side ...
    python -m benchmarks.structures train --lane 1/2   # ... each training its share of (variant, seed)
    python -m benchmarks.structures report             # dev scores, paired bootstrap, figure
    python -m benchmarks.structures --smoke speed --steps 2 --warmup 0   # the suite: the speed stage, tiny encoder

Equal wall time: the default trains the quickstart's 450 steps; every other variant trains the
steps its measured speed buys in the default's time (`speed`, timed alone in fresh processes,
variants taking turns). Runs use configs/quickstart.yaml with one evaluation, at the end, on 2,000
stratified dev rows per task (the same rows for every run); their predictions on those rows feed
the paired bootstrap against the default (seeds pooled: each seed paired with its own default).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import (RESULTS, ROOT, alternate_children, command_line, equal_time_steps, parse_arguments,
                               smoke_inputs, time_training_steps, train_and_predict, write_results)
from clue_mtl.predict.metrics import macro_f1, paired_bootstrap
from clue_mtl.tasks import TASK_NAMES as TASKS

CONFIG = "configs/quickstart.yaml"
RUNS = ROOT / "runs" / "structures"
DEFAULT_STEPS = 450
DEV_ROWS = 2000
EVERY = "{ocnli: %s, ocemotion: %s, tnews: %s}"


def every(spec: str) -> str:
    return EVERY % (spec, spec, spec)


VARIANTS: dict[str, list[str]] = {
    "default": [],
    "private top-2 layers": [f"model.private={every('{type: layers, layers: 2}')}"],
    "private LoRA r8": [f"model.private={every('{type: lora, rank: 8}')}"],
    "scalar mix": [f"model.heads={every('{features: scalar_mix}')}"],
    "attention pooling": ["model.pooling=attention"],
    "BiLSTM head (OCNLI)": ["model.heads={ocnli: {type: bilstm, pooling: max}}"],
    "SAN head (OCNLI)": ["model.heads={ocnli: {type: san, steps: 5}}"],
    "attention head per task": [f"model.heads={every('{type: attention}')}"],
}
SPEED_FILE = RESULTS / "structures_speed.json"


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant.lower()).strip("-")


# ----------------------------------------------------------------------------- speed
def measure(variant: str, steps: int, warmup: int) -> dict:
    from clue_mtl.config import load_config

    quickstart = load_config(ROOT / CONFIG)
    base = [f"data.data_dir={ROOT / 'data'}", f"model.encoder={ROOT / quickstart.model.encoder}",
            f"data.max_length={quickstart.data.max_length}", f"train.batch_size={quickstart.train.batch_size}",
            "model.freeze_word_embeddings=true", f"train.mixed_precision={quickstart.train.mixed_precision}",
            "train.eval_every=1000000", "data.max_train_rows=4000"]
    result = time_training_steps([*base, *VARIANTS[variant]], steps, warmup)
    from clue_mtl.model.multitask import build_model  # parameter counts of the structure on the real encoder
    from clue_mtl.model.encoders import load_encoder

    inputs = smoke_inputs()
    encoder = inputs["encoder"] if inputs else ROOT / quickstart.model.encoder
    config = load_config(overrides=[f"model.encoder={encoder}", *VARIANTS[variant]])
    encoder, tokenizer = load_encoder(config.model.encoder)
    model = build_model(encoder, list(TASKS), config.model, sep_token_id=tokenizer.sep_token_id)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["task_parameters"] = sum(p.numel() for p in model.task_parameters())
    return result


def cmd_speed(args) -> None:
    runs = alternate_children("benchmarks.structures", "--variant", VARIANTS, ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                              args.repeats, lambda r: f"{r['samples_per_second']:.2f} samples/s")
    speed = {name: {"samples_per_second": statistics.median(r["samples_per_second"] for r in results),
                    "samples_per_second_runs": [r["samples_per_second"] for r in results],
                    "parameters": results[0]["parameters"], "task_parameters": results[0]["task_parameters"],
                    "threads": results[0]["torch_threads"], "precision": results[0]["precision"]}
             for name, results in runs.items()}
    SPEED_FILE.write_text(json.dumps({"command": command_line(), "figures": speed}, indent=2) + "\n")
    cmd_steps(args)


def cmd_steps(args) -> None:
    """Each variant's equal-time steps from the measured speeds. Every variant does the default's
    work and more, so a variant measured faster than the default is timing noise: it gets the
    default's steps, never more."""
    record = json.loads(SPEED_FILE.read_text())
    speed = record["figures"]
    base = speed["default"]["samples_per_second"]
    for name, entry in speed.items():
        seconds_per_row = 1 / entry["samples_per_second"]
        entry["equal_time_steps"] = min(DEFAULT_STEPS, equal_time_steps(DEFAULT_STEPS, 1 / base, seconds_per_row))
    SPEED_FILE.write_text(json.dumps({**record, "figures": speed}, indent=2) + "\n")
    for name, entry in speed.items():
        print(f"{name}: {entry['samples_per_second']:.2f} samples/s -> {entry['equal_time_steps']} steps")


# ----------------------------------------------------------------------------- training
def run_dir(variant: str, seed: int) -> Path:
    return RUNS / f"{slug(variant)}-s{seed}"


def dev_frames() -> dict:
    from clue_mtl.config import load_config
    from clue_mtl.data.folder import task_frames

    config = load_config(ROOT / CONFIG, [f"data.data_dir={ROOT / 'data'}", f"data.max_dev_rows={DEV_ROWS}"])
    return {task: task_frames(config.data, task).dev for task in TASKS}


def train_one(variant: str, seed: int, steps: int) -> None:
    directory = run_dir(variant, seed)
    predictions = directory / "dev_predictions.json"
    if predictions.exists():
        return
    overrides = [*VARIANTS[variant], f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}",
                 f"data.max_dev_rows={DEV_ROWS}", "train.num_threads=1", f"name={directory.name}"]
    record = {"variant": variant, "seed": seed, "steps": steps,
              **train_and_predict(CONFIG, directory, overrides, dev_frames())}
    predictions.write_text(json.dumps(record) + "\n")


def cmd_train(args) -> None:
    speed = json.loads(SPEED_FILE.read_text())["figures"]
    jobs = [(variant, seed) for seed in args.seeds for variant in VARIANTS]
    index, lanes = (int(x) for x in args.lane.split("/"))
    for variant, seed in jobs[index::lanes]:
        print(f"lane {args.lane}: {variant} seed {seed}", flush=True)
        train_one(variant, seed, speed[variant]["equal_time_steps"])


# ----------------------------------------------------------------------------- report
def gold_and_labels() -> dict:
    from clue_mtl.tasks import get_task

    return {task: (frame["label"].tolist(), list(get_task(task).labels)) for task, frame in dev_frames().items()}


def task_f1(gold: np.ndarray, predicted: np.ndarray, labels: int) -> float:
    return macro_f1(gold, predicted, labels)


def cmd_report(args) -> None:
    speed = json.loads(SPEED_FILE.read_text())
    gold = {}
    for task, (truth, labels) in gold_and_labels().items():
        index = {label: i for i, label in enumerate(labels)}
        gold[task] = (np.asarray([index[label] for label in truth]), len(labels))
    runs: dict[str, dict[int, dict]] = {}
    for variant in VARIANTS:
        for path in sorted(RUNS.glob(f"{slug(variant)}-s*/dev_predictions.json")):
            record = json.loads(path.read_text())
            runs.setdefault(variant, {})[record["seed"]] = record
    figures = {"speed": speed["figures"], "speed_command": speed["command"], "variants": {}}
    for variant, by_seed in runs.items():
        scores = {seed: {t: task_f1(gold[t][0], np.asarray(r["predicted"][t]), gold[t][1]) for t in TASKS}
                  for seed, r in by_seed.items()}
        entry = {"seeds": sorted(by_seed), "steps": next(iter(by_seed.values()))["steps"],
                 "macro_f1": {t: statistics.mean(s[t] for s in scores.values()) for t in TASKS},
                 "per_seed_mean": {seed: statistics.mean(s.values()) for seed, s in scores.items()}}
        entry["mean"] = statistics.mean(entry["macro_f1"].values())
        paired = [(r["predicted"], runs["default"][seed]["predicted"]) for seed, r in by_seed.items()
                  if variant != "default" and seed in runs.get("default", {})]
        if paired:
            entry["vs_default"] = paired_bootstrap(paired, gold)
        figures["variants"][variant] = entry
    write_results("structures", figures, summarise(figures))
    plot(figures, RESULTS / "structures.png")


def summarise(figures: dict) -> str:
    speed = figures["speed"]
    lines = [f"# Model structures at equal wall time ({CONFIG}, e5-small, {speed['default']['precision']}, CPU)", "",
             f"The default trains {DEFAULT_STEPS} steps; each variant the steps its speed buys in the same time. "
             f"Macro-F1 on {DEV_ROWS:,} stratified dev rows per task at the last step, averaged over seeds; "
             "the interval is the paired bootstrap (95%, dev rows resampled) of the variant minus the default, "
             "each seed against the default of that seed.", "",
             "| variant | steps | OCNLI | OCEMOTION | TNEWS | mean | per seed | vs default [95%] | samples/s | parameters (task-own) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, entry in figures["variants"].items():
        f1 = entry["macro_f1"]
        seeds = ", ".join(f"{v:.4f}" for v in entry["per_seed_mean"].values())
        c = entry.get("vs_default")
        versus = "" if c is None else (f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
                                       + ("" if c["low"] <= 0 <= c["high"] else " *"))
        s = speed[variant]
        lines.append(f"| {variant} | {entry['steps']} | {f1['ocnli']:.4f} | {f1['ocemotion']:.4f} | {f1['tnews']:.4f} "
                     f"| **{entry['mean']:.4f}** | {seeds} | {versus} | {s['samples_per_second']:.1f} "
                     f"| {s['parameters'] / 1e6:.2f} M ({s['task_parameters'] / 1e6:.3f} M) |")
    lines += ["", "`*`: the interval excludes 0 (a difference); otherwise no difference at this budget.",
              f"samples/s: training, timed alone, {speed['default']['threads']} threads, "
              f"{speed['default']['precision']} (`{figures['speed_command']}`). Runs trained in two single-thread "
              "lanes (`python -m benchmarks.structures train --lane i/2`); their wall times are not timings.",
              "Parameters include the 250k-row word embedding (frozen in these runs)."]
    return "\n".join(lines)


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in figures["variants"] if "vs_default" in figures["variants"][v]]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    for row, name in enumerate(names):
        c = figures["variants"][name]["vs_default"]
        color = "tab:grey" if c["low"] <= 0 <= c["high"] else "tab:green" if c["low"] > 0 else "tab:red"
        ax.errorbar(c["difference"], row, xerr=[[c["difference"] - c["low"]], [c["high"] - c["difference"]]],
                    fmt="o", color=color, capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_title("against hard sharing at equal wall time (2 seeds, 95% paired bootstrap)", fontsize=10)
    ax.set_xlabel("dev mean macro-F1, variant minus default")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", choices=["speed", "steps", "train", "report"])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lane", default="0/1", help="i/n: train every n-th job from the i-th")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parse_arguments(parser, argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return
    {"speed": cmd_speed, "steps": cmd_steps, "train": cmd_train, "report": cmd_report}[args.stage](args)


if __name__ == "__main__":
    main()
