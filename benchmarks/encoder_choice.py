"""e5-small against m3e-small at equal wall time, and the ensemble of the two (issue 12).

Both encoders go through the same recipe: the quickstart (configs/quickstart.yaml and its m3e copy
configs/quickstart-m3e.yaml differ only in the encoder and its embedding freeze), each run as the
main job runs it (`benchmarks/main_job.py run`: baseline, training, blend with the baseline, both
zips; scored on the whole dev split).

    python benchmarks/encoder_choice.py speed                  # alone: each quickstart's step time
    python benchmarks/encoder_choice.py train --lane 0/2 &     # two single-thread lanes ...
    python benchmarks/encoder_choice.py train --lane 1/2 &     # ... each its share of the runs
    python benchmarks/encoder_choice.py report                 # table, ensembles, paired bootstraps

Equal wall time: e5-small trains the quickstart's 450 steps (two seeds) and 1,500 steps (one
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, alternate_children, time_training_steps, write_results, write_whole  # noqa: E402

CONFIGS = {"e5-small": "configs/quickstart.yaml", "m3e-small": "configs/quickstart-m3e.yaml"}
REFERENCE = "e5-small"  # its steps set each budget; the other encoder gets the same minutes
BUDGETS = {"quick": (450, (1, 2)), "long": (1500, (1,))}  # e5 steps, seeds
SPEED_FILE = RESULTS / "encoder_choice_speed.json"
TASKS = ("ocnli", "ocemotion", "tnews")


# ----------------------------------------------------------------------------- speed
def cmd_child(args) -> None:
    """One encoder's quickstart steps timed in this fresh process; one JSON line."""
    overrides = [f"data.data_dir={ROOT / 'data'}", "train.eval_every=1000000"]
    result = time_training_steps(overrides, args.steps, args.warmup, config_path=ROOT / CONFIGS[args.child])
    print(json.dumps(result))


def cmd_speed(args) -> None:
    runs = alternate_children(__file__, "--child", list(CONFIGS), ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                              args.repeats, lambda r: f"{r['step_seconds']:.3f} s/step, {r['samples_per_second']:.1f} samples/s")
    figures = {name: {"step_seconds": statistics.median(r["step_seconds"] for r in results),
                      "step_seconds_runs": [r["step_seconds"] for r in results],
                      "samples_per_second": statistics.median(r["samples_per_second"] for r in results),
                      "padded_tokens_per_step": statistics.median(r["padded_tokens_per_step"] for r in results),
                      "precision": results[0]["precision"], "threads": results[0]["torch_threads"]}
               for name, results in runs.items()}
    from common import machine

    record = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "figures": figures}
    write_whole(SPEED_FILE, json.dumps(record, indent=2) + "\n")
    for name, steps in equal_time_steps().items():
        print(name, steps)


def equal_time_steps() -> dict[tuple[str, str], int]:
    """(encoder, budget) -> the steps that train for as long as the reference's steps do."""
    speed = json.loads(SPEED_FILE.read_text())["figures"]
    reference = speed[REFERENCE]["step_seconds"]
    return {(encoder, budget): round(steps * reference / speed[encoder]["step_seconds"])
            for encoder in CONFIGS for budget, (steps, _) in BUDGETS.items()}


# ----------------------------------------------------------------------------- training
def entry_name(encoder: str, budget: str, seed: int) -> str:
    return f"{encoder.split('-')[0]}-{budget}-s{seed}"


def jobs() -> list[tuple[str, str, int]]:
    """(encoder, budget, seed), ordered so that two lanes taking turns get equal minutes."""
    return [(encoder, budget, seed) for budget, (_, seeds) in BUDGETS.items() for seed in seeds for encoder in CONFIGS]


def cmd_train(args) -> None:
    from main_job import load_entries

    index, count = (int(part) for part in args.lane.split("/"))
    steps = equal_time_steps()
    for encoder, budget, seed in jobs()[index::count]:
        name = entry_name(encoder, budget, seed)
        if name in load_entries():
            print(f"{name}: done before", flush=True)
            continue
        command = [sys.executable, str(ROOT / "benchmarks" / "main_job.py"), "run", "--config", CONFIGS[encoder],
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


def argmax(probabilities: dict) -> dict:
    return {t: (gold, p.argmax(1)) for t, (gold, p) in probabilities.items()}


def macro_f1s(decided: dict) -> dict[str, float]:
    from clue_mtl.blend import macro_f1
    from clue_mtl.tasks import get_task

    return {t: float(macro_f1(gold, pred, get_task(t).num_labels)) for t, (gold, pred) in decided.items()}


def ensure_ensemble(budget: str, seed: int) -> str:
    """The blend of both encoders' runs with the baseline (main_job.py ensemble), made once."""
    from main_job import load_entries

    name = f"e5+m3e-{budget}-s{seed}"
    if f"ensemble-{name}" not in load_entries():
        entries = load_entries()
        runs = [entries[entry_name(encoder, budget, seed)]["run_dir"] for encoder in CONFIGS]
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "main_job.py"), "ensemble", "--name", name,
                        *[arg for run in runs for arg in ("--run", run)]], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return f"ensemble-{name}"


def cmd_report(args) -> None:
    from main_job import bootstrap_decisions, decisions, load_entries, mean

    speed = json.loads(SPEED_FILE.read_text())
    steps = equal_time_steps()
    rows, figures, comparisons = [], {"speed": speed["figures"], "runs": {}, "comparisons": {}}, []
    decided: dict[tuple[str, str, int], dict] = {}
    for budget, (_, seeds) in BUDGETS.items():
        for seed in seeds:
            names = {encoder: entry_name(encoder, budget, seed) for encoder in CONFIGS}
            entries = load_entries()
            if any(name not in entries for name in names.values()):
                print(f"{budget} seed {seed}: not all runs have finished; skipped")
                continue
            probabilities = {encoder: member_probabilities(entries[name]) for encoder, name in names.items()}
            averaged = {t: (probabilities[REFERENCE][t][0], np.mean([p[t][1] for p in probabilities.values()], 0))
                        for t in TASKS}
            ensemble = ensure_ensemble(budget, seed)
            entries = load_entries()
            for encoder, name in names.items():
                decided[encoder, budget, seed] = argmax(probabilities[encoder])
                decided[f"{encoder} biased blend", budget, seed] = decisions(entries[name])
            decided["ensemble", budget, seed] = argmax(averaged)
            decided["ensemble biased blend", budget, seed] = decisions(entries[ensemble])
            for variant in (*CONFIGS, "ensemble"):
                minutes = (sum(steps[encoder, budget] * speed["figures"][encoder]["step_seconds"]
                               for encoder in CONFIGS) if variant == "ensemble"
                           else steps[variant, budget] * speed["figures"][variant]["step_seconds"]) / 60
                member = macro_f1s(decided[variant, budget, seed])
                blended = macro_f1s(decided[f"{variant} biased blend", budget, seed])
                figures["runs"][f"{variant} {budget} s{seed}"] = {
                    "steps": None if variant == "ensemble" else steps[variant, budget],
                    "training_minutes": minutes, "member": member, "biased_blend": blended}
                rows.append((variant, budget, seed, minutes, member, blended))
    lines = ["# e5-small against m3e-small at equal training time, and their ensemble", "",
             f"Machine: {speed['machine']['cpu']}, {speed['machine']['cores']} cores; step times measured alone, "
             f"2 threads ({speed['command']}).", "",
             "| encoder | precision | s/step | samples/s | padded tokens/step |", "|---|---|---|---|---|"]
    for encoder, s in speed["figures"].items():
        lines.append(f"| {encoder} | {s['precision']} | {s['step_seconds']:.3f} | {s['samples_per_second']:.1f} | "
                     f"{s['padded_tokens_per_step']:.0f} |")
    lines += ["", "Dev macro-F1 on the whole dev split (member: the run alone; biased blend: with the TF-IDF baseline, "
              "cross-fitted). The ensemble averages the two runs' probabilities; its minutes are both runs'.", "",
              "| variant | budget | seed | steps | training min | OCNLI | OCEMOTION | TNEWS | mean | biased blend mean |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, budget, seed, minutes, member, blended in rows:
        step_count = "" if variant == "ensemble" else steps[variant, budget]
        lines.append(f"| {variant} | {budget} | {seed} | {step_count} | {minutes:.1f} | {member['ocnli']:.4f} | "
                     f"{member['ocemotion']:.4f} | {member['tnews']:.4f} | **{mean(member):.4f}** | {mean(blended):.4f} |")
    for budget, (_, seeds) in BUDGETS.items():
        seeds = [s for s in seeds if ("ensemble", budget, s) in decided]
        if not seeds:
            continue
        for left, right in (("e5-small", "m3e-small"), ("e5-small", "ensemble"), ("m3e-small", "ensemble"),
                            ("e5-small biased blend", "m3e-small biased blend"),
                            ("e5-small biased blend", "ensemble biased blend")):
            result = bootstrap_decisions([decided[left, budget, s] for s in seeds],
                                         [decided[right, budget, s] for s in seeds])
            label = f"{right} - {left}, {budget} (seeds {', '.join(map(str, seeds))})"
            figures["comparisons"][label] = result
            verdict = "a difference" if not result["low"] <= 0 <= result["high"] else "no difference"
            comparisons.append(f"| {label} | {100 * result['difference']:+.1f} | "
                               f"[{100 * result['low']:+.1f}, {100 * result['high']:+.1f}] | {verdict} |")
    lines += ["", "Paired bootstrap over the same dev rows (2,000 resamples, 95%; seeds averaged), in points:", "",
              "| difference | points | interval | verdict |", "|---|---|---|---|", *comparisons, "",
              "Commands: `python benchmarks/encoder_choice.py speed`, two lanes of `train --lane i/2` "
              "(`OMP_NUM_THREADS=1`), then `report`; each run's command is in main_job.json."]
    write_results("encoder_choice", figures, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    commands = parser.add_subparsers(dest="command")
    speed = commands.add_parser("speed")
    speed.add_argument("--repeats", type=int, default=2)
    train = commands.add_parser("train")
    train.add_argument("--lane", default="0/1", help="INDEX/COUNT: this lane's share of the runs")
    commands.add_parser("report")
    args = parser.parse_args()
    if args.child:
        cmd_child(args)
    elif args.command == "speed":
        cmd_speed(args)
    elif args.command == "train":
        cmd_train(args)
    elif args.command == "report":
        cmd_report(args)
    else:
        parser.error("a command is required")


if __name__ == "__main__":
    main()
