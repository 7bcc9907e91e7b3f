"""Step-time overhead of each loss-weighting method relative to `equal`.

Same encoder (e5-small as in configs/quickstart.yaml), same seed, so the same batches; each method
runs in a fresh process, methods alternate over repeats so all see the same machine load.

    python -m benchmarks.weighting_overhead [--steps 15] [--repeats 2] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.common import ROOT, alternate_children, parse_arguments, time_training_steps, write_results

METHODS = ["equal", "uncertainty", "dwa", "dtp", "gradnorm", "pcgrad", "mgda", "famo"]
GOALS = {"uncertainty": 0.05, "dwa": 0.05, "dtp": 0.05, "gradnorm": 0.30}


def overrides(method: str) -> list[str]:
    return [f"data.data_dir={ROOT / 'data'}", f"model.encoder={ROOT / 'artifacts/e5-small'}",
            "data.max_train_rows=3000", "data.max_dev_rows=100", "train.eval_every=1000000",
            "train.batch_size=24", "data.max_length=96", "train.mixed_precision=bf16",
            "model.freeze_word_embeddings=true", f"weighting.method={method}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    args = parse_arguments(parser, argv)
    if args.method:
        import json

        print(json.dumps(time_training_steps(overrides(args.method), args.steps, args.warmup)))
        return

    from clue_mtl.model.encoders import ensure_encoder

    if not args.smoke:
        ensure_encoder(ROOT / "artifacts/e5-small")
    children = alternate_children("benchmarks.weighting_overhead", "--method", METHODS, ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                                  args.repeats, lambda result: f"{result['step_seconds']:.3f} s/step")
    runs = {m: [result["step_seconds"] for result in results] for m, results in children.items()}
    step = {m: statistics.median(v) for m, v in runs.items()}
    figures = {m: {"step_seconds": step[m], "step_seconds_runs": runs[m], "overhead": step[m] / step["equal"] - 1}
               for m in METHODS}
    lines = ["# Loss-weighting overhead (e5-small, bf16, 24 rows per step, max length 96, CPU)", "",
             "| method | s/step (median) | overhead vs equal | goal |", "|---|---|---|---|"]
    for m in METHODS:
        goal = f"within {GOALS[m]:.0%}" if m in GOALS else ""
        lines.append(f"| {m} | {step[m]:.3f} | {figures[m]['overhead']:+.1%} | {goal} |")
    lines += ["", f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} runs per method."]
    write_results("weighting_overhead", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
