"""e5-small against m3e-small at equal training time, and the ensemble of the two (issue 12).

Both encoders go through the same recipe: the quickstart (configs/quickstart.yaml and its m3e copy
configs/quickstart-m3e.yaml differ only in the encoder and its embedding freeze), each run as the
main job runs it (`benchmarks/main_job.py run`: baseline, training, blend with the baseline, both
zips; scored on the whole dev split).

    python -m benchmarks.encoder_choice speed                  # alone: each quickstart's step time
    python -m benchmarks.encoder_choice train --lane 0/2 &     # two single-thread lanes ...
    python -m benchmarks.encoder_choice train --lane 1/2 &     # ... each its share of the runs
    python -m benchmarks.encoder_choice report                 # table, ensembles, paired bootstraps
    python -m benchmarks.encoder_choice --smoke --steps 2 --warmup 0 speed --repeats 1   # the suite: tiny encoder

Equal training time: e5-small trains the quickstart's 450 steps (two seeds) and 1,500 steps (one
seed); m3e-small trains the steps its measured speed buys in the same training time. Training
minutes in the table are steps times the step time measured alone (`speed`); the lanes' own wall
times are not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from benchmarks.common import (RESULTS, ROOT, alternate_children, command_line, equal_time_steps, machine,
                               parse_arguments, time_training_steps, write_results, write_whole)
from clue_mtl.tasks import TASK_NAMES as TASKS

CONFIGS = {"e5-small": "configs/quickstart.yaml", "m3e-small": "configs/quickstart-m3e.yaml"}
SHORT_NAMES = {"e5-small": "e5", "m3e-small": "m3e"}  # in main_job.json's entry names
REFERENCE = "e5-small"  # its steps set each budget; the other encoder gets the same minutes
BUDGETS = {"quick": (450, (1, 2)), "long": (1500, (1,))}  # e5 steps, seeds
SPEED_FILE = RESULTS / "encoder_choice_speed.json"


# ----------------------------------------------------------------------------- speed
def cmd_child(args) -> None:
    """One encoder's quickstart steps timed in this fresh process; one JSON line."""
    overrides = [f"data.data_dir={ROOT / 'data'}", "train.eval_every=1000000"]
    result = time_training_steps(overrides, args.steps, args.warmup, config_path=ROOT / CONFIGS[args.child])
    print(json.dumps(result))


def cmd_speed(args) -> None:
    runs = alternate_children("benchmarks.encoder_choice", "--child", list(CONFIGS), ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                              args.repeats, lambda r: f"{r['step_seconds']:.3f} s/step, {r['samples_per_second']:.1f} samples/s")
    figures = {name: {"step_seconds": statistics.median(r["step_seconds"] for r in results),
                      "step_seconds_runs": [r["step_seconds"] for r in results],
                      "samples_per_second": statistics.median(r["samples_per_second"] for r in results),
                      "padded_tokens_per_step": statistics.median(r["padded_tokens_per_step"] for r in results),
                      "precision": results[0]["precision"], "threads": results[0]["torch_threads"]}
               for name, results in runs.items()}
    record = {"command": command_line(), "machine": machine(), "figures": figures}
    write_whole(SPEED_FILE, json.dumps(record, indent=2) + "\n")
    for name, steps in planned_steps().items():
        print(name, steps)


def planned_steps() -> dict[tuple[str, str], int]:
    """(encoder, budget) -> the steps that train for as long as the reference's steps do."""
    speed = json.loads(SPEED_FILE.read_text())["figures"]
    reference = speed[REFERENCE]["step_seconds"]
    return {(encoder, budget): equal_time_steps(steps, reference, speed[encoder]["step_seconds"])
            for encoder in CONFIGS for budget, (steps, _) in BUDGETS.items()}


# ----------------------------------------------------------------------------- training
def entry_name(encoder: str, budget: str, seed: int) -> str:
    return f"{SHORT_NAMES[encoder]}-{budget}-s{seed}"


def jobs() -> list[tuple[str, str, int]]:
    """(encoder, budget, seed), ordered so that two lanes taking turns get equal minutes."""
    return [(encoder, budget, seed) for budget, (_, seeds) in BUDGETS.items() for seed in seeds for encoder in CONFIGS]


def cmd_train(args) -> None:
    from benchmarks.main_job import load_entries

    index, count = (int(part) for part in args.lane.split("/"))
    steps = planned_steps()
    for encoder, budget, seed in jobs()[index::count]:
        name = entry_name(encoder, budget, seed)
        if name in load_entries():
            print(f"{name}: done before", flush=True)
            continue
        command = [sys.executable, "-m", "benchmarks.main_job", "run", "--config", CONFIGS[encoder],
                   "--seed", str(seed), "--name", name, "--lane",
                   "--set", f"train.steps={steps[encoder, budget]}", "--set", "train.num_threads=1"]
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------- report
def member_probabilities(entry: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Task -> (gold, the neural member's dev probabilities) from the run's blend folder."""
    from safetensors.numpy import load_file

    arrays = load_file(str(ROOT / entry["blend_dir"] / "dev.safetensors"))
    member = next(name for name in entry["members"] if name != "baseline")
    return {t: (arrays[f"{t}/gold"], arrays[f"{t}/member/{member}"]) for t in TASKS}


def averaged(first: dict, second: dict) -> dict:
    """The probability ensemble of two members scored on the same dev rows."""
    for task in TASKS:
        if not np.array_equal(first[task][0], second[task][0]):
            raise ValueError(f"{task}: the two runs were scored on different dev rows")
    return {t: (first[t][0], (first[t][1] + second[t][1]) / 2) for t in TASKS}


def argmax(probabilities: dict) -> dict:
    return {t: (gold, p.argmax(1)) for t, (gold, p) in probabilities.items()}


def macro_f1s(decided: dict) -> dict[str, float]:
    from clue_mtl.predict.metrics import macro_f1
    from clue_mtl.tasks import get_task

    return {t: float(macro_f1(gold, pred, get_task(t).num_labels)) for t, (gold, pred) in decided.items()}


def ensure_ensemble(budget: str, seed: int) -> str:
    """The blend of both encoders' runs with the baseline (main_job.py ensemble), made once."""
    from benchmarks.main_job import load_entries

    name = f"e5+m3e-{budget}-s{seed}"
    entries = load_entries()
    if f"ensemble-{name}" not in entries:
        runs = [entries[entry_name(encoder, budget, seed)]["run_dir"] for encoder in CONFIGS]
        subprocess.run([sys.executable, "-m", "benchmarks.main_job", "ensemble", "--name", name,
                        *[arg for run in runs for arg in ("--run", run)]], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return f"ensemble-{name}"


def finished_runs(step_seconds: dict) -> tuple[dict, list[dict]]:
    """(decisions, rows): per (variant, budget, seed) the dev decisions of each encoder alone, of
    their probability ensemble, and of each blended with the baseline; and the table's rows. A
    run trained with other steps than the speed file gives now is an error, not a silent row."""
    from benchmarks.main_job import decisions, load_entries

    planned = planned_steps()
    decided, rows = {}, []
    for budget, (_, seeds) in BUDGETS.items():
        for seed in seeds:
            names = {encoder: entry_name(encoder, budget, seed) for encoder in CONFIGS}
            if not set(names.values()) <= load_entries().keys():
                print(f"{budget} seed {seed}: not all runs have finished; skipped")
                continue
            ensemble = ensure_ensemble(budget, seed)
            entries = load_entries()
            steps = {encoder: entries[name]["steps"] for encoder, name in names.items()}
            for encoder in CONFIGS:
                if steps[encoder] != planned[encoder, budget]:
                    raise SystemExit(f"{names[encoder]} trained {steps[encoder]} steps, but the speed file now gives "
                                     f"{planned[encoder, budget]}: rerun it or the speed measurement")
            probabilities = {encoder: member_probabilities(entries[name]) for encoder, name in names.items()}
            for encoder, name in names.items():
                decided[encoder, budget, seed] = argmax(probabilities[encoder])
                decided[f"{encoder} biased blend", budget, seed] = decisions(entries[name])
            decided["ensemble", budget, seed] = argmax(averaged(*probabilities.values()))
            decided["ensemble biased blend", budget, seed] = decisions(entries[ensemble])
            minutes = {encoder: steps[encoder] * step_seconds[encoder] / 60 for encoder in CONFIGS}
            minutes["ensemble"] = sum(minutes.values())
            for variant in (*CONFIGS, "ensemble"):
                rows.append({"variant": variant, "budget": budget, "seed": seed, "steps": steps.get(variant),
                             "training_minutes": minutes[variant], "member": macro_f1s(decided[variant, budget, seed]),
                             "biased_blend": macro_f1s(decided[f"{variant} biased blend", budget, seed])})
    return decided, rows


PAIRS = (("e5-small", "m3e-small"), ("e5-small", "ensemble"), ("m3e-small", "ensemble"),
         ("e5-small biased blend", "m3e-small biased blend"), ("e5-small biased blend", "ensemble biased blend"))


def comparisons(decided: dict) -> dict[str, dict]:
    """Paired bootstraps of each of PAIRS per budget, the budget's seeds averaged."""
    from benchmarks.main_job import bootstrap_decisions

    out = {}
    for budget, (_, seeds) in BUDGETS.items():
        seeds = [s for s in seeds if ("ensemble", budget, s) in decided]
        for left, right in PAIRS if seeds else ():
            out[f"{right} - {left}, {budget} (seeds {', '.join(map(str, seeds))})"] = bootstrap_decisions(
                [decided[left, budget, s] for s in seeds], [decided[right, budget, s] for s in seeds])
    return out


def cmd_report(args) -> None:
    from benchmarks.main_job import mean

    speed = json.loads(SPEED_FILE.read_text())
    step_seconds = {encoder: figures["step_seconds"] for encoder, figures in speed["figures"].items()}
    decided, rows = finished_runs(step_seconds)
    compared = comparisons(decided)
    threads = ", ".join(sorted({str(s["threads"]) for s in speed["figures"].values()}))
    lines = ["# e5-small against m3e-small at equal training time, and their ensemble", "",
             f"Machine: {speed['machine']['cpu']}, {speed['machine']['cores']} cores; step times measured alone, "
             f"{threads} threads, median of the runs ({speed['command']}).", "",
             "| encoder | precision | s/step | each run | samples/s | padded tokens/step |", "|---|---|---|---|---|---|"]
    for encoder, s in speed["figures"].items():
        each = ", ".join(f"{x:.3f}" for x in s["step_seconds_runs"])
        lines.append(f"| {encoder} | {s['precision']} | {s['step_seconds']:.3f} | {each} | {s['samples_per_second']:.1f} | "
                     f"{s['padded_tokens_per_step']:.0f} |")
    lines += ["", "Dev macro-F1 on the whole dev split (member: the run alone; biased blend: with the TF-IDF baseline, "
              "cross-fitted). The ensemble averages the two runs' probabilities; its minutes are both runs'. "
              "Training minutes: steps times the step time measured alone.", "",
              "| variant | budget | seed | steps | training min | OCNLI | OCEMOTION | TNEWS | mean | biased blend mean |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        member = row["member"]
        lines.append(f"| {row['variant']} | {row['budget']} | {row['seed']} | {row['steps'] or ''} | "
                     f"{row['training_minutes']:.1f} | {member['ocnli']:.4f} | {member['ocemotion']:.4f} | "
                     f"{member['tnews']:.4f} | **{mean(member):.4f}** | {mean(row['biased_blend']):.4f} |")
    lines += ["", "Paired bootstrap over the same dev rows (2,000 resamples, 95%; seeds averaged), in points. The "
              "interval resamples dev rows for fixed runs: it leaves out the spread between seeds.", "",
              "| difference | points | interval | verdict |", "|---|---|---|---|"]
    for label, result in compared.items():
        verdict = "no difference" if result["low"] <= 0 <= result["high"] else "a difference"
        lines.append(f"| {label} | {100 * result['difference']:+.2f} | "
                     f"[{100 * result['low']:+.2f}, {100 * result['high']:+.2f}] | {verdict} |")
    lines += ["", "Commands: `python -m benchmarks.encoder_choice speed`, two lanes of `train --lane i/2` "
              "(`OMP_NUM_THREADS=1`), then `report`; each run's command is in main_job.json."]
    write_results("encoder_choice", {"speed": speed["figures"], "runs": rows, "comparisons": compared}, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("speed").add_argument("--repeats", type=int, default=2)
    commands.add_parser("train").add_argument("--lane", default="0/1", help="INDEX/COUNT: this lane's share of the runs")
    commands.add_parser("report")
    args = parse_arguments(parser, argv)
    if args.child:
        cmd_child(args)
    elif args.command is None:
        parser.error("a command is required")
    else:
        {"speed": cmd_speed, "train": cmd_train, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
