"""Vocabulary trimming: parameters, peak memory and training speed of e5-small before and after.

`clue-mtl trim-vocab` keeps the 16,663 of e5-small's 250,037 token rows that the competition text
uses. Each variant trains in a fresh process (peak memory is per process) with the quickstart's
step (24 rows, max length 96, bf16); variants alternate over repeats so all see the same load.

    python -m benchmarks.trim_vocab [--steps 20] [--repeats 2]
    python -m benchmarks.trim_vocab --smoke --steps 2 --warmup 0 --repeats 1   # the suite: a tiny XLM-R
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import (ROOT, ensure_trimmed_encoder, parse_arguments, smoke_inputs, time_training_steps,
                               time_variants, timing_arguments, write_results)
from clue_mtl.model.encoders import ensure_encoder

VARIANTS = {
    "full vocabulary, embeddings trained": ("full", False),
    "full vocabulary, embeddings fixed (quickstart)": ("full", True),
    "trimmed vocabulary, embeddings trained": ("trimmed", False),
}


def encoders() -> dict[str, Path]:
    """The full and the trimmed encoder: e5-small's (the trimmed one built once), or in a smoke run
    a tiny XLM-R with e5's tokenizer and its trim to the generated text."""
    inputs = smoke_inputs()
    if inputs is None:
        return {"full": Path(ensure_encoder(ROOT / "artifacts/e5-small")), "trimmed": ensure_trimmed_encoder()}
    from clue_mtl.model.vocab import corpus_texts, trim_vocabulary
    from clue_mtl.testing import build_tiny_encoder

    full, trimmed = inputs["encoder"].parent / "xlmr", inputs["encoder"].parent / "xlmr-trimmed"
    if not (full / "config.json").exists():
        build_tiny_encoder(full, kind="xlmr")
    if not (trimmed / "config.json").exists():
        trim_vocabulary(full, trimmed, corpus_texts(inputs["data"]))
    return {"full": full, "trimmed": trimmed}


def measure(variant: str, steps: int, warmup: int) -> dict:
    which, frozen = VARIANTS[variant]
    encoder_dir = encoders()[which]
    overrides = [f"data.data_dir={ROOT / 'data'}", f"model.encoder={encoder_dir}", "data.max_train_rows=3000",
                 "data.max_dev_rows=100", "train.eval_every=1000000", "train.batch_size=24", "data.max_length=96",
                 "train.mixed_precision=bf16", f"model.freeze_word_embeddings={str(frozen).lower()}"]
    sizes = {}

    def count(trainer) -> None:   # read off the trainer's encoder: no second load of a 250k-piece tokenizer
        sizes["parameters"] = sum(p.numel() for p in trainer.unwrapped.encoder.parameters())
        sizes["vocabulary"] = len(trainer.tokenizer)

    timed = time_training_steps(overrides, steps, warmup, prepare=count, smoke_encoder=False)
    return {**sizes, **timed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_arguments(parser, steps=20)
    args = parse_arguments(parser, argv)
    if args.variant:
        import json

        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return

    encoders()
    runs = time_variants("benchmarks.trim_vocab", VARIANTS, args)
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
