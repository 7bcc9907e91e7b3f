"""Vocabulary trimming: parameters, peak memory and training speed of e5-small before and after.

`clue-mtl trim-vocab` keeps the 16,663 of e5-small's 250,037 token rows that the competition text
uses. Each variant trains in a fresh process (peak memory is per process) with the quickstart's
step (24 rows, max length 96, bf16); variants alternate over repeats so all see the same load.

    python benchmarks/trim_vocab.py [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, TRIMMED_ENCODER, ensure_trimmed_encoder, time_training_steps, time_variants,  # noqa: E402
                    timing_arguments, write_results)

FULL, TRIMMED = ROOT / "artifacts/e5-small", TRIMMED_ENCODER
VARIANTS = {
    "full vocabulary, embeddings trained": (FULL, False),
    "full vocabulary, embeddings fixed (quickstart)": (FULL, True),
    "trimmed vocabulary, embeddings trained": (TRIMMED, False),
}


def measure(variant: str, steps: int, warmup: int) -> dict:
    from clue_mtl.model.encoders import load_encoder

    encoder_dir, frozen = VARIANTS[variant]
    overrides = [f"data.data_dir={ROOT / 'data'}", f"model.encoder={encoder_dir}", "data.max_train_rows=3000",
                 "data.max_dev_rows=100", "train.eval_every=1000000", "train.batch_size=24", "data.max_length=96",
                 "train.mixed_precision=bf16", f"model.freeze_word_embeddings={str(frozen).lower()}"]
    encoder, tokenizer = load_encoder(str(encoder_dir))
    parameters = sum(p.numel() for p in encoder.parameters())
    del encoder
    return {"parameters": parameters, "vocabulary": len(tokenizer), **time_training_steps(overrides, steps, warmup)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_arguments(parser, steps=20)
    args = parser.parse_args()
    if args.variant:
        import json

        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return

    ensure_trimmed_encoder()
    runs = time_variants(__file__, VARIANTS, args)
    figures = {}
    for variant, results in runs.items():
        figures[variant] = {
            "parameters": results[0]["parameters"], "vocabulary": results[0]["vocabulary"],
            "samples_per_second": statistics.median(r["samples_per_second"] for r in results),
            "samples_per_second_runs": [r["samples_per_second"] for r in results],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "torch_threads": results[0]["torch_threads"],
        }
    lines = ["# Vocabulary trimming (e5-small, training step: 24 rows, max length 96, bf16, CPU)", "",
             "| encoder | tokenizer vocabulary | parameters | training samples/s (median) | peak memory |",
             "|---|---|---|---|---|"]
    for variant, f in figures.items():
        lines.append(f"| {variant} | {f['vocabulary']:,} | {f['parameters'] / 1e6:.1f}M | "
                     f"{f['samples_per_second']:.1f} | {f['peak_rss_mb'] / 1024:.2f} GB |")
    lines += ["", f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} runs; "
              "peak memory is the process's maximum resident set (model, optimiser, data)."]
    write_results("trim_vocab", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
