"""Training throughput: the kit against a naive multi-task loop, same encoder, same data.

The naive reference runs three classification forward passes per step (one per task) padded to
the maximum length, in fp32, with every parameter trained, rows in random order. The kit pads
each task's batch to its own longest row, groups rows of similar length, runs bf16 autocast
(AMX on this CPU) and keeps e5-small's 250k-row word embedding fixed. Between the two, each
step of the way is measured on its own. Every variant runs in a fresh process (peak memory is
per process); variants alternate over repeats so both see the same machine load.

    python benchmarks/train_throughput.py                       # speed, about 10 minutes on 2 cores
    python benchmarks/train_throughput.py --quality-steps 300   # also dev macro-F1 at equal steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, alternate_children, run_child, time_training_steps, write_results  # noqa: E402

BASE = [
    f"data.data_dir={ROOT / 'data'}", f"model.encoder={ROOT / 'artifacts/e5-small'}", "data.max_length=128", "train.batch_size=24",
    "data.max_train_rows=4000", "data.max_dev_rows=1000", "train.eval_every=1000000", "train.lr=5e-5",
    "train.head_lr=2e-3", "train.class_weighting=true",
]
NAIVE = ["train.mixed_precision=no", "model.freeze_word_embeddings=false", "train.length_grouping=false"]
VARIANTS = {
    "naive (pad to max, fp32)": (NAIVE, True),
    "+ dynamic padding": (NAIVE, False),
    "+ length grouping": (["train.mixed_precision=no", "model.freeze_word_embeddings=false"], False),
    "+ bf16 autocast": (["train.mixed_precision=bf16", "model.freeze_word_embeddings=false"], False),
    "kit (+ fixed word embeddings)": (["train.mixed_precision=bf16", "model.freeze_word_embeddings=true"], False),
}


def measure(variant: str, steps: int, warmup: int, quality_steps: int) -> dict:
    overrides, pad_to_max = VARIANTS[variant]
    result = time_training_steps([*BASE, *overrides], steps, warmup, pad_to_max=pad_to_max,
                                 quality_steps=quality_steps)
    return {"variant": variant, **result}


def add_quality(args, figures: dict, lines: list[str]) -> None:
    """Train the naive loop and the kit for the same steps, score both on dev, write the results."""
    quality = {}
    for name in ("naive (pad to max, fp32)", "kit (+ fixed word embeddings)"):
        child = [__file__, "--variant", name, "--steps", "1", "--warmup", "0",
                 "--quality-steps", str(args.quality_steps)]
        quality[name] = run_child(child)
        print(f"{name}: dev mean macro-F1 {quality[name]['dev_mean_macro_f1']:.4f}", flush=True)
    figures["quality"] = {name: {"steps": args.quality_steps, "dev_mean_macro_f1": q["dev_mean_macro_f1"],
                                 "dev_macro_f1": q["dev_macro_f1"]} for name, q in quality.items()}
    lines += ["", f"## Dev macro-F1 after {args.quality_steps} steps (1,000 dev rows per task)", "",
              "| variant | OCNLI | OCEMOTION | TNEWS | mean |", "|---|---|---|---|---|"]
    for name, q in quality.items():
        per = q["dev_macro_f1"]
        lines.append(f"| {name} | {per['ocnli']:.4f} | {per['ocemotion']:.4f} | {per['tnews']:.4f} | "
                     f"{q['dev_mean_macro_f1']:.4f} |")
    write_results("train_throughput", figures, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quality-steps", type=int, default=0, help="train kit and naive this far and score dev")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        import json

        print(json.dumps(measure(args.variant, args.steps, args.warmup, args.quality_steps)))
        return

    from clue_mtl.encoders import ensure_encoder

    ensure_encoder(ROOT / "artifacts/e5-small")
    if args.repeats == 0:  # quality only: keep the speed figures already measured
        import json

        from common import RESULTS

        previous = json.loads((RESULTS / "train_throughput.json").read_text())
        figures = previous["figures"]
        figures.setdefault("speed_command", previous["command"])  # the speed rows came from that run
        lines = (RESULTS / "train_throughput.md").read_text().split("\n## Dev macro-F1")[0].rstrip().splitlines()
        add_quality(args, figures, lines)
        return
    runs = alternate_children(__file__, "--variant", VARIANTS, ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                              args.repeats, lambda result: f"{result['samples_per_second']:.1f} samples/s")
    figures = {}
    for name, results in runs.items():
        figures[name] = {
            "samples_per_second": statistics.median(r["samples_per_second"] for r in results),
            "samples_per_second_runs": [r["samples_per_second"] for r in results],
            "padded_tokens_per_step": results[0]["padded_tokens_per_step"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        }
    naive, kit = figures["naive (pad to max, fp32)"], figures["kit (+ fixed word embeddings)"]
    figures["speedup_kit_over_naive"] = kit["samples_per_second"] / naive["samples_per_second"]

    lines = ["# Training throughput (e5-small, 3 tasks, 24 rows per step, max length 128, CPU)", "",
             "| variant | samples/s (median) | padded tokens/step | peak RSS (MB) |", "|---|---|---|---|"]
    for name in VARIANTS:
        f = figures[name]
        lines.append(f"| {name} | {f['samples_per_second']:.1f} | {f['padded_tokens_per_step']:.0f} | {f['peak_rss_mb']:.0f} |")
    lines += ["", f"Kit over naive: **{figures['speedup_kit_over_naive']:.2f}x** samples/s "
              f"({args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} runs)."]

    if args.quality_steps:
        add_quality(args, figures, lines)
        return
    write_results("train_throughput", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
