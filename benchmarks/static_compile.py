"""torch.compile of the encoder with static shapes (issue 13): every batch width padded to a multiple
of 32, so a 128-token step compiles at most four widths, against the kit after as it ships and
the same padding without compiling (what the padding alone costs).

train_throughput.py's kit after (one encoder pass over every task's rows, math attention kernel);
each variant in a fresh process, variants taking turns; the warm-up steps, which compile, are
timed apart from the steps that count. Inductor keeps compiled kernels on disk between processes
(its pickled graph caches are off: common.py): point TORCHINDUCTOR_CACHE_DIR at an empty folder to
time a first compilation.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.static_compile [--steps 30] [--warmup 15] [--repeats 1]
    python -m benchmarks.static_compile --smoke --steps 2 --warmup 0   # the suite: the padding only, nothing compiled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from benchmarks.common import parse_arguments, time_training_steps, time_variants, timing_arguments, write_results
from benchmarks.train_throughput import AFTER

KIT = "kit after"
VARIANTS = {  # name: (pad widths to a multiple of, compile)
    KIT: (None, False),
    "widths padded to a multiple of 32": (32, False),
    "widths padded to a multiple of 32, encoder compiled with static shapes": (32, True),
}


def measure(name: str, steps: int, warmup: int) -> dict:
    import contextlib

    import torch

    multiple, compiled = VARIANTS[name]

    def prepare(trainer) -> None:
        trainer.batches.pad_to_multiple_of = multiple
        if compiled:
            trainer.unwrapped.encoder = torch.compile(trainer.unwrapped.encoder, dynamic=False)

    with contextlib.redirect_stdout(sys.stderr):
        return {"variant": name, **time_training_steps(AFTER, steps, warmup, prepare=prepare)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_arguments(parser, steps=30, warmup=15, repeats=1)
    args = parse_arguments(parser, argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return
    variants = [name for name, (_, compiled) in VARIANTS.items() if not (args.smoke and compiled)]
    runs = time_variants("benchmarks.static_compile", variants, args)  # a smoke run compiles nothing
    figures = {name: {"samples_per_second": statistics.median(r["samples_per_second"] for r in results),
                      "samples_per_second_runs": [r["samples_per_second"] for r in results],
                      "warmup_seconds": [r["warmup_seconds"] for r in results],
                      "padded_tokens_per_step": results[0]["padded_tokens_per_step"]}
               for name, results in runs.items()}
    reference = figures[KIT]["samples_per_second"]
    lines = ["# torch.compile with static shapes against the kit after (e5-small, 24 rows a step, max length 128, "
             "CPU)", "", "| variant | samples/s (median) | each run | x kit after | padded tokens/step "
             "| warm-up seconds |", "|---|---|---|---|---|---|"]
    for name, f in figures.items():
        each = ", ".join(f"{r:.1f}" for r in f["samples_per_second_runs"])
        warmup = ", ".join(f"{s:.0f}" for s in f["warmup_seconds"])
        lines.append(f"| {name} | {f['samples_per_second']:.1f} | {each} | {f['samples_per_second'] / reference:.2f} "
                     f"| {f['padded_tokens_per_step']:.0f} | {warmup} |")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "inductor's default folder, as found")
    lines += ["", f"{args.steps} timed steps after {args.warmup} warm-up steps (which compile), "
              f"{args.repeats} run(s) of each in a fresh process, variants taking turns; train_throughput.py's "
              f"settings (AFTER). Inductor's cache: {cache}."]
    write_results("static_compile", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
