"""Changes to the training step tried against the kit with one encoder pass per task
(train_throughput.py's math-kernel settings, the kit after until the joint pass was built): each
variant patches a fresh Trainer, then is timed in its own process, variants taking turns over
repeats. A variant that pays here is a lever to build (benchmarks/README.md, "Speed against this machine's own
peak"), not a setting. The joint pass it first measured as a patch is now built
(`train.encoder_pass=joint`), and its variant is that setting.

    python -m benchmarks.step_experiments            # about 20 minutes on 2 cores, alone
    python -m benchmarks.step_experiments --smoke --steps 2 --warmup 0 --repeats 1   # the suite's, without compiling

Variants: attention dropout 0 on torch's kernel (profiled too: why the kit pins the math kernel);
attention dropout 0.1 under either attention kernel; one autocast region around the
three task passes (so autocast's weight casts are cached across them); one encoder pass over all
tasks' rows instead of one per task; torch.compile of the encoder; float32 under either kernel;
and the weights kept in bf16 with the cost of a float32 master copy added (the model cast to bf16,
no autocast, and after each step the trained weights copied to float32 and back: the two casts a
master-weights optimiser would make; the update itself runs on the bf16 weights, so this times
the idea and does not train it properly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

from benchmarks.common import (parse_arguments, run_child, time_training_steps, time_variants, timing_arguments,
                               write_results)
from benchmarks.train_throughput import BASE, FUSED, MATH_KERNEL, NO_ATTENTION_DROPOUT, profile

PROFILED_STEPS = 5
KIT_AFTER = "kit after (no attention dropout, math kernel)"
FLOAT32_MATH = [*MATH_KERNEL, "train.mixed_precision=no", "train.attention_kernel=math"]  # auto would leave float32 to torch
VARIANTS = {  # name: (overrides on BASE, patch)
    KIT_AFTER: (MATH_KERNEL, None),
    "attention dropout 0, torch's kernel (the fused flash kernel)": (NO_ATTENTION_DROPOUT, None),
    "attention dropout 0.1, torch's kernel": (FUSED, None),
    "attention dropout 0.1, math kernel": ([*FUSED, "train.attention_kernel=math"], None),
    "one autocast region around the three task passes": (MATH_KERNEL, "outer_autocast"),
    "one encoder pass over all tasks' rows": ([*MATH_KERNEL, "train.encoder_pass=joint"], None),
    "torch.compile of the encoder (dynamic shapes)": (MATH_KERNEL, "compile"),
    "float32, torch's kernel": ([*NO_ATTENTION_DROPOUT, "train.mixed_precision=no"], None),
    "float32, math kernel": (FLOAT32_MATH, None),
    "bf16 weights with a float32 master copy's casts (simulated)": (FLOAT32_MATH, "bf16_weights"),
}


def outer_autocast(trainer) -> None:
    step = trainer.train_step

    def train_step():
        with trainer.accelerator.autocast():
            return step()
    trainer.train_step = train_step


def compile_encoder(trainer) -> None:
    import torch

    trainer.unwrapped.encoder = torch.compile(trainer.unwrapped.encoder, dynamic=True)


def bf16_weights(trainer) -> None:
    import torch

    parameters = list(trainer.unwrapped.parameters())
    trained = [p for p in parameters if p.requires_grad]
    with torch.no_grad():
        for p in parameters:
            p.data = p.data.to(torch.bfloat16)
    masters = [p.detach().float() for p in trained]
    step = trainer.train_step

    def train_step():
        result = step()
        with torch.no_grad():
            torch._foreach_copy_(masters, [p.data for p in trained])
            torch._foreach_copy_([p.data for p in trained], masters)
        return result
    trainer.train_step = train_step


PATCHES = {"outer_autocast": outer_autocast, "compile": compile_encoder,
           "bf16_weights": bf16_weights}


def measure(name: str, steps: int, warmup: int) -> dict:
    overrides, patch = VARIANTS[name]
    with contextlib.redirect_stdout(sys.stderr):
        result = time_training_steps([*BASE, *overrides], steps, warmup,
                                     prepare=PATCHES[patch] if patch else None)
    return {"variant": name, **result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_arguments(parser, steps=30)
    parser.add_argument("--profile-flash", action="store_true", help=argparse.SUPPRESS)
    args = parse_arguments(parser, argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return
    if args.profile_flash:
        with contextlib.redirect_stdout(sys.stderr):
            profiled = profile(args.steps, args.warmup, NO_ATTENTION_DROPOUT)
        print(json.dumps(profiled))
        return
    variants = [name for name, (_, patch) in VARIANTS.items() if not (args.smoke and patch == "compile")]
    runs = time_variants("benchmarks.step_experiments", variants, args)  # a smoke run compiles nothing
    figures = {name: {"samples_per_second": statistics.median(r["samples_per_second"] for r in results),
                      "samples_per_second_runs": [r["samples_per_second"] for r in results],
                      "padded_tokens_per_step": results[0]["padded_tokens_per_step"]}
               for name, results in runs.items()}
    profiled_steps = min(PROFILED_STEPS, args.steps)   # fewer in a smoke run: parsing a profile takes seconds
    flash = run_child(["-m", "benchmarks.step_experiments", "--profile-flash", "--warmup", str(args.warmup),
                       "--steps", str(profiled_steps)])
    reference = figures[KIT_AFTER]["samples_per_second"]
    lines = ["# Training-step changes tried against the kit after (e5-small, 24 rows per step, max length 128, CPU)",
             "", "| variant | samples/s (median) | each run | x kit after |", "|---|---|---|---|"]
    for name, f in figures.items():
        each = ", ".join(f"{r:.1f}" for r in f["samples_per_second_runs"])
        lines.append(f"| {name} | {f['samples_per_second']:.1f} | {each} | {f['samples_per_second'] / reference:.2f} |")
    lines += ["", f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} runs, each in a "
              "fresh process, variants taking turns. The settings are train_throughput.py's (BASE); "
              "see this script's docstring for what each variant changes.",
              "", f"Why the math kernel: torch.profiler over {profiled_steps} steps of attention dropout 0 on torch's kernel, "
              f"{flash['step_seconds_profiled']:.2f} s per profiled step; top operators by self time (seconds per "
              "step): " + ", ".join(f"`{name}` {seconds:.3f}" for name, seconds in flash["top_operators"][:6]) + "."]
    write_results("step_experiments", {"variants": figures, "flash_profile": flash}, "\n".join(lines))


if __name__ == "__main__":
    main()
