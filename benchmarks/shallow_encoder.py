"""A shallower encoder at equal time: e5-small cut to its bottom 6 layers (`model.num_layers: 6`)
against all 12, trained for the same minutes.

Speed: both variants timed in fresh processes, taking turns (the quickstart's settings with
`model.attention_dropout: 0`). Quality: runs trained beforehand (`clue-mtl train`, then
`benchmarks/main_job.py ensemble` to score them on the whole dev split and blend each with the
baseline); their entries are read from benchmarks/results/main_job.json, with the paired
bootstrap between them.

    python -m benchmarks.shallow_encoder --full ensemble-q13-after-s1@q13-after-s1 \\
        --shallow ensemble-q13-6l-s1@q13-6l-s1 ensemble-q13-6l-s2@q13-6l-s2
    python -m benchmarks.shallow_encoder --smoke --full ENTRY@MEMBER --shallow ENTRY@MEMBER --steps 2   # the suite
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.common import (RESULTS, ROOT, alternate_children, parse_arguments, time_training_steps, work_root,
                               write_results)
from clue_mtl.runs.folder import RunFolder

BASE = [f"data.data_dir={ROOT / 'data'}", f"model.encoder={ROOT / 'artifacts/e5-small'}", "data.max_train_rows=4000",
        "train.eval_every=1000000", "model.attention_dropout=0.0"]
VARIANTS = {"12 layers": [], "bottom 6 layers": ["model.num_layers=6"]}


def measure(variant: str, steps: int, warmup: int) -> dict:
    from clue_mtl.config import load_config

    overrides = [*BASE, *VARIANTS[variant]]
    quickstart = ROOT / "configs/quickstart.yaml"
    config_overrides = [f"{key}={value}" for key, value in _quickstart_train_keys(load_config(quickstart))]
    return time_training_steps([*config_overrides, *overrides], steps, warmup)


def _quickstart_train_keys(config) -> list[tuple[str, object]]:
    """The quickstart's batch, length and precision, so the timing is of the main job's step."""
    return [("data.max_length", config.data.max_length), ("train.batch_size", config.train.batch_size),
            ("model.freeze_word_embeddings", str(config.model.freeze_word_embeddings).lower()),
            ("train.mixed_precision", config.train.mixed_precision), ("model.pooling", config.model.pooling)]


def member_row(record: dict, name: str) -> tuple:
    from clue_mtl.config import load_config

    entry, _, member = name.partition("@")
    f1 = record[entry]["members"][member]
    config = load_config(RunFolder(work_root() / record[entry]["runs"][0]).config_file)
    return member, f1, config.train.steps, config.train.seed, record[entry]["biased_cross_fitted"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", nargs="+", required=True, help="main_job.json ENTRY@MEMBER of 12-layer runs")
    parser.add_argument("--shallow", nargs="+", required=True, help="main_job.json ENTRY@MEMBER of 6-layer runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parse_arguments(parser, argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return

    from benchmarks.main_job import paired_bootstrap, variant

    runs = alternate_children("benchmarks.shallow_encoder", "--variant", VARIANTS,
                              ["--full", "x", "--shallow", "x", "--steps", str(args.steps), "--warmup", str(args.warmup)],
                              args.repeats, lambda result: f"{result['samples_per_second']:.1f} samples/s")
    speed = {name: {"samples_per_second": statistics.median(r["samples_per_second"] for r in results),
                    "samples_per_second_runs": [r["samples_per_second"] for r in results]}
             for name, results in runs.items()}
    ratio = speed["bottom 6 layers"]["samples_per_second"] / speed["12 layers"]["samples_per_second"]
    record = json.loads((RESULTS / "main_job.json").read_text())["figures"]
    rows = {"12 layers": [member_row(record, n) for n in args.full],
            "bottom 6 layers": [member_row(record, n) for n in args.shallow]}
    comparisons = {f"{s} - {f}": paired_bootstrap(variant(record, f), variant(record, s))
                   for f, s in zip(args.full, args.shallow)}
    comparisons.update({f"{s.split('@')[0]} - {f.split('@')[0]} (biased blends)":
                        paired_bootstrap(variant(record, f.split("@")[0]), variant(record, s.split("@")[0]))
                        for f, s in zip(args.full, args.shallow)})
    lines = ["# A shallower encoder at equal time (e5-small, bottom 6 of 12 layers)", "",
             "| encoder | samples/s (median) | each run |", "|---|---|---|"]
    for name, figures in speed.items():
        lines.append(f"| {name} | {figures['samples_per_second']:.1f} | "
                     f"{', '.join(f'{r:.1f}' for r in figures['samples_per_second_runs'])} |")
    lines += ["", f"6 layers run **{ratio:.2f}x** the samples/s of 12 ({args.steps} timed steps after "
                  f"{args.warmup} warm-up, median of {args.repeats}, variants alternating).", "",
              "## Dev macro-F1 (whole dev split): each run alone, and its biased blend with the baseline "
              "(cross-fitted)", "",
              "| encoder | run | steps | seed | OCNLI | OCEMOTION | TNEWS | mean | biased blend |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, members in rows.items():
        for member, f1, steps, seed, blend in members:
            lines.append(f"| {name} | {member} | {steps} | {seed} | {f1['ocnli']:.4f} | {f1['ocemotion']:.4f} | "
                         f"{f1['tnews']:.4f} | **{statistics.mean(f1.values()):.4f}** | "
                         f"{statistics.mean(blend.values()):.4f} |")
    lines += ["", "Paired bootstrap over the same dev rows (2,000 resamples, 95%):", "",
              "| difference | mean macro-F1 | interval |", "|---|---|---|"]
    for label, c in comparisons.items():
        verdict = "no difference" if c["low"] <= 0 <= c["high"] else "a difference"
        lines.append(f"| {label} | {c['difference']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}]: {verdict} |")
    lines += ["", "The runs trained side by side in single-thread lanes; their wall times are not timings."]
    figures = {"speed": speed, "ratio": ratio, "runs": {k: [r[:4] for r in v] for k, v in rows.items()},
               "comparisons": comparisons}
    write_results("shallow_encoder", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
