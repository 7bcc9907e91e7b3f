"""Training throughput against the machine's own peak: naive loop, the kit before and after.

In one run: the matrix-product peak of this machine (float32 and bf16, at a large square shape
and at the model's own shapes); then each variant in a fresh process, variants taking turns over
repeats so they see the same machine load, timed over the same steps, with the model FLOPs of a
step counted by torch's FLOP counter; achieved FLOP/s as a fraction of the peak of the precision
the variant runs in; and where the kit's step spends its time (`torch.profiler`).

The naive reference runs three classification forward passes per step (one per task) padded to
the maximum length, in float32, with every parameter trained, rows in random order. "Kit before"
is the kit as it was (dynamic padding, length grouping, `auto` precision, fixed word embeddings,
AdamW's per-tensor loop, attention dropout 0.1, one encoder pass per task); then one change at
a time, the last one encoder pass over every task's rows (`train.encoder_pass`).

    python -m benchmarks.train_throughput                        # about 10 minutes on 2 cores
    python -m benchmarks.train_throughput --try-compile          # also torch.compile (minutes to compile)
    python -m benchmarks.train_throughput --render --quality A B # add main_job.json's equal-steps dev check
                                                                 # (A, B: ENTRY@MEMBER, seeds joined by +)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import (RESULTS, ROOT, parse_arguments, run_child, smoke_overrides, time_training_steps,
                               time_variants, timing_arguments, write_results, write_whole)
from clue_mtl.runs.folder import RunFolder

BASE = [
    f"data.data_dir={ROOT / 'data'}", f"model.encoder={ROOT / 'artifacts/e5-small'}", "data.max_length=128", "train.batch_size=24",
    "data.max_train_rows=4000", "data.max_dev_rows=1000", "train.eval_every=1000000", "train.lr=5e-5",
    "train.head_lr=2e-3", "train.class_weighting=true",
]
TORCH_KERNEL = "train.attention_kernel=torch"  # torch picks the attention kernel, as the kit did
PER_TASK = "train.encoder_pass=per_task"       # one encoder pass per task, as the kit did
NAIVE = ["train.mixed_precision=no", "model.freeze_word_embeddings=false", "train.length_grouping=false",
         "train.fused_optimizer=false", TORCH_KERNEL, PER_TASK]
KIT_BEFORE = ["train.mixed_precision=auto", "model.freeze_word_embeddings=true", "train.fused_optimizer=false",
              TORCH_KERNEL, PER_TASK]
FUSED = ["train.mixed_precision=auto", "model.freeze_word_embeddings=true", "train.fused_optimizer=true",
         TORCH_KERNEL, PER_TASK]
NO_ATTENTION_DROPOUT = [*FUSED, "model.attention_dropout=0.0"]
MATH_KERNEL = [*NO_ATTENTION_DROPOUT, "train.attention_kernel=auto"]
AFTER = [*MATH_KERNEL, "train.encoder_pass=auto"]  # the last setting of a key wins
NAIVE_NAME = "naive (pad to max, fp32, per-tensor AdamW)"
BEFORE_NAME = "kit before (attention dropout 0.1, per-tensor AdamW)"
PREVIOUS_NAME = "+ no attention dropout"
MATH_KERNEL_NAME = "+ math attention kernel where bf16 runs on a CPU"
AFTER_NAME = "+ one encoder pass over every task's rows (kit after)"
VARIANTS = {  # name: (overrides, pad to max length, compile the encoder)
    NAIVE_NAME: (NAIVE, True, False),
    BEFORE_NAME: (KIT_BEFORE, False, False),
    "+ fused AdamW": (FUSED, False, False),
    PREVIOUS_NAME: (NO_ATTENTION_DROPOUT, False, False),
    MATH_KERNEL_NAME: (MATH_KERNEL, False, False),
    AFTER_NAME: (AFTER, False, False),
}
COMPILED = "kit after + torch.compile (dynamic shapes)"
HIDDEN, INTERMEDIATE = 384, 1536  # e5-small
PRECISION_NAMES = {"no": "float32", "bf16": "bf16", "fp16": "fp16"}

# profiler operator names by where the time goes
CATEGORIES = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention (softmax, fused attention)": ("softmax", "scaled_dot_product", "flash_attention"),
    "layer norms and GELU": ("layer_norm", "gelu"),
    "dropout (random masks)": ("bernoulli", "dropout", "uniform_"),
    "optimiser and clipping": ("adam", "_foreach", "norm", "lerp", "addcdiv", "sqrt"),
}


def peaks(tokens_per_pass: int, tokens_per_step: int, seconds: float = 1.0, square: int | None = None) -> dict:
    """Matmul FLOP/s of this machine: large square, and the model's shapes (rows x 384 x 1536...),
    each timed for about `seconds` (the shapes half that); `square` sets the square's size (a
    smoke run's small one)."""
    import torch

    from clue_mtl.hardware import matmul_flops_per_second, matmul_peak

    figures = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        figures[name] = {"square": matmul_peak(dtype, size=square or (4096 if name == "float32" else None),
                                                seconds=seconds)}
        if figures[name]["square"] < 10e9:  # emulated: the model's shapes would take minutes
            continue
        for tokens in (tokens_per_pass, tokens_per_step):
            for k, n in ((HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN), (HIDDEN, HIDDEN)):
                figures[name][f"{tokens}x{k}x{n}"] = matmul_flops_per_second(tokens, k, n, dtype=dtype,
                                                                               seconds=seconds / 2)
    return figures


def compile_encoder(trainer) -> None:
    import torch

    trainer.unwrapped.encoder = torch.compile(trainer.unwrapped.encoder, dynamic=True)


def measure(variant: str, steps: int, warmup: int) -> dict:
    overrides, pad_to_max, compiled = VARIANTS.get(variant) or (AFTER, False, True)
    result = time_training_steps([*BASE, *overrides], steps, warmup, pad_to_max=pad_to_max, count_flops=True,
                                 prepare=compile_encoder if compiled else None)
    return {"variant": variant, **result}


def profile(steps: int, warmup: int, overrides: list[str] | None = None) -> dict:
    """Seconds per step by category for the kit after (or `overrides` on BASE), from torch.profiler's
    operator self times; what the operators do not cover is Python and framework overhead; data is
    timed on its own."""
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from clue_mtl.config import load_config
    from clue_mtl.recipes.multitask import Trainer

    variant = AFTER if overrides is None else overrides
    config = load_config(overrides=[*BASE, *variant, *smoke_overrides(), f"train.steps={warmup + steps + 1}"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, show_progress=False)
        for _ in range(warmup):
            trainer.train_step()
        started = time.perf_counter()
        for step in range(trainer.state.step, trainer.state.step + steps):
            trainer.batches[step]
        data_seconds = (time.perf_counter() - started) / steps
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            wall = (time.perf_counter() - started) / steps
    seconds = {name: 0.0 for name in CATEGORIES}
    seconds["other operators"] = 0.0
    operators = sorted(((event.key, event.self_cpu_time_total / 1e6 / steps) for event in prof.key_averages()
                        if event.key.startswith("aten::")), key=lambda item: -item[1])
    for event in prof.key_averages():
        name = event.key.lower()
        if not name.startswith("aten::"):
            continue
        category = next((c for c, keys in CATEGORIES.items() if any(k in name for k in keys)), "other operators")
        seconds[category] += event.self_cpu_time_total / 1e6 / steps
    # padding a step's batches, timed apart; its few operators also sit in "other operators"
    seconds["data (padding the step's batches)"] = data_seconds
    seconds["Python and framework (the rest of the step)"] = max(wall - sum(seconds.values()), 0.0)
    return {"step_seconds_profiled": wall, "seconds": seconds, "top_operators": operators[:12]}


def quality_rows(names: list[str]) -> list[str]:
    """Equal-steps dev macro-F1 from benchmarks/main_job.json (whole dev split, each run's own
    argmax) and the paired bootstrap of the second against the first. A name may join seeds with
    "+" (ENTRY@MEMBER+ENTRY@MEMBER), as `main_job.py report --compare` pairs them."""
    record = json.loads((RESULTS / "main_job.json").read_text())["figures"]
    lines = ["", "## Equal steps, dev macro-F1 (whole dev split)", "",
             "| run | steps | seed | attention dropout | attention kernel | encoder pass | OCNLI | OCEMOTION | TNEWS | mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    from clue_mtl.config import load_run_config

    for name in (part for joined in names for part in joined.split("+")):
        entry, _, member = name.partition("@")
        f1 = record[entry]["members"][member]
        mean = sum(f1.values()) / len(f1)
        config = load_run_config(RunFolder(ROOT / record[entry]["runs"][0]).config_file)
        dropout = "encoder's" if config.model.attention_dropout is None else config.model.attention_dropout
        lines.append(f"| {member} | {config.train.steps} | {config.train.seed} | {dropout} | "
                     f"{config.train.attention_kernel} | {config.train.encoder_pass} | {f1['ocnli']:.4f} | {f1['ocemotion']:.4f} | {f1['tnews']:.4f} | {mean:.4f} |")
    for label, c in record.get("_comparisons", {}).items():
        if all(name in label for name in names):
            verdict = "no difference" if c["low"] <= 0 <= c["high"] else "a difference"
            seeds = " (seeds paired in order, averaged)" if "+" in label else ""
            lines.append(f"\nPaired bootstrap, {label}{seeds}: {c['difference']:+.4f} "
                         f"[{c['low']:+.4f}, {c['high']:+.4f}] (95%, {c['samples']:,} resamples): {verdict}.")
    return lines


def speed_table(figures: dict, names: list[str], peak_of: dict) -> list[str]:
    naive = figures[NAIVE_NAME]["samples_per_second"]
    lines = ["| variant | precision | samples/s (median) | each run | x naive | padded tokens/step | "
             "model GFLOP/step | GFLOP/s | of peak | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        f = figures[name]
        runs = ", ".join(f"{r:.1f}" for r in f.get("samples_per_second_runs") or [f["samples_per_second"]])
        lines.append(f"| {name} | {PRECISION_NAMES[f['precision']]} | {f['samples_per_second']:.1f} | {runs} | "
                     f"{f['samples_per_second'] / naive:.2f} | {f['padded_tokens_per_step']:.0f} | "
                     f"{f['model_flops_per_step'] / 1e9:.1f} | {f['model_flops_per_second'] / 1e9:.1f} | "
                     f"{f['model_flops_per_second'] / peak_of[f['precision']]:.0%} | {f['peak_rss_mb']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_arguments(parser, steps=20)
    parser.add_argument("--try-compile", action="store_true", help="also time torch.compile of the encoder (once)")
    parser.add_argument("--quality", nargs=2, metavar="ENTRY@MEMBER",
                        help="main_job.json entries of the before and after runs at equal steps")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the .md from the measured .json (e.g. with --quality), measuring nothing")
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parse_arguments(parser, argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.warmup)))
        return
    if args.profile:
        print(json.dumps(profile(args.steps, args.warmup)))
        return

    if args.render:
        render(args)
        return

    from clue_mtl.model.encoders import ensure_encoder

    if not args.smoke:
        ensure_encoder(ROOT / "artifacts/e5-small")
    runs = time_variants("benchmarks.train_throughput", VARIANTS, args)
    figures = {"variants": {}}
    for name, results in runs.items():
        figures["variants"][name] = {
            **{k: v for k, v in results[0].items() if k not in ("variant", "samples_per_second", "seconds", "step_seconds")},
            "samples_per_second": statistics.median(r["samples_per_second"] for r in results),
            "samples_per_second_runs": [r["samples_per_second"] for r in results],
            "model_flops_per_second": statistics.median(r["model_flops_per_second"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        }
    names = list(VARIANTS)
    if args.try_compile:
        compiled = run_child(["-m", "benchmarks.train_throughput", "--variant", COMPILED, "--steps", str(args.steps), "--warmup", str(args.warmup)])
        figures["variants"][COMPILED] = compiled
        names.append(COMPILED)
        print(f"{COMPILED}: {compiled['samples_per_second']:.1f} samples/s", flush=True)
    figures["profile"] = run_child(["-m", "benchmarks.train_throughput", "--profile", "--steps", "5", "--warmup", str(args.warmup)])
    variants = figures["variants"]
    tokens_per_step = round(variants[AFTER_NAME]["padded_tokens_per_step"])
    figures["peak"] = peaks(tokens_per_step // 3, tokens_per_step, *((0.05, 256) if args.smoke else ()))
    peak_of = {"no": figures["peak"]["float32"]["square"], "bf16": figures["peak"]["bf16"]["square"]}
    figures["speedup_after_over_before"] = (variants[AFTER_NAME]["samples_per_second"]
                                            / variants[BEFORE_NAME]["samples_per_second"])
    figures["speedup_after_over_previous"] = (variants[AFTER_NAME]["samples_per_second"]
                                              / variants[PREVIOUS_NAME]["samples_per_second"])
    figures["speedup_after_over_per_task"] = (variants[AFTER_NAME]["samples_per_second"]
                                              / variants[MATH_KERNEL_NAME]["samples_per_second"])
    figures["speedup_after_over_naive"] = (variants[AFTER_NAME]["samples_per_second"]
                                           / variants[NAIVE_NAME]["samples_per_second"])
    write_report(args, figures, names, peak_of)


def render(args) -> None:
    """The report again from train_throughput.json, keeping its command, steps and repeats."""
    record = json.loads((RESULTS / "train_throughput.json").read_text())
    figures = record["figures"]
    measured = argparse.Namespace(**{**figures.get("settings", {}), "quality": args.quality})
    if args.quality:
        figures["quality"] = args.quality
    names = list(figures["variants"])
    peak_of = {"no": figures["peak"]["float32"]["square"], "bf16": figures["peak"]["bf16"]["square"]}
    lines = report_lines(measured, figures, names, peak_of)
    write_whole(RESULTS / "train_throughput.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    write_whole(RESULTS / "train_throughput.md", "\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))


def write_report(args, figures: dict, names: list[str], peak_of: dict) -> None:
    figures["settings"] = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    write_results("train_throughput", figures, "\n".join(report_lines(args, figures, names, peak_of)))


def report_lines(args, figures: dict, names: list[str], peak_of: dict) -> list[str]:
    peak = figures["peak"]
    lines = ["# Training throughput against this machine's peak (e5-small, 3 tasks, 24 rows per step, "
             "max length 128, CPU)", "", "## The machine's matrix-product peak (same run)", "",
             "| shape (m x k x n) | float32 GFLOP/s | bf16 GFLOP/s |", "|---|---|---|"]
    for shape in peak["float32"]:
        bf16 = peak["bf16"].get(shape)
        label = "large square (4096 float32; 2048 bf16, or 256 where bf16 is emulated)" if shape == "square" else shape
        lines.append(f"| {label} | {peak['float32'][shape] / 1e9:.0f} | {bf16 / 1e9:.1f} |" if bf16 else
                     f"| {label} | {peak['float32'][shape] / 1e9:.0f} | - |")
    lines += ["", "## Variants (one change at a time)", "", *speed_table(figures["variants"], names, peak_of), "",
              f"Kit after over kit before: **{figures['speedup_after_over_before']:.2f}x** samples/s; over "
              f"attention dropout 0 on torch's kernel {figures['speedup_after_over_previous']:.2f}x; over the same "
              f"with one encoder pass per task {figures.get('speedup_after_over_per_task', float('nan')):.2f}x; over naive "
              f"{figures['speedup_after_over_naive']:.2f}x ({args.steps} timed steps after {args.warmup} warm-up, "
              f"median of {args.repeats} runs, variants alternating). Model FLOPs counted with "
              f"`torch.utils.flop_counter` (matrix products and attention), per padded token, on one step; "
              f"'of peak': achieved model FLOP/s over the large-square peak of the variant's precision."]
    profiled = figures["profile"]
    lines += ["", f"## Where the kit's step goes (kit after, torch.profiler, "
                  f"{profiled['step_seconds_profiled']:.2f} s per profiled step)", "",
              "| part | seconds per step | share |", "|---|---|---|"]
    total = sum(profiled["seconds"].values())
    for part, seconds in sorted(profiled["seconds"].items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {seconds:.3f} | {seconds / total:.0%} |")
    lines += ["", "Top operators by self time (seconds per step): " + ", ".join(
        f"`{name}` {seconds:.3f}" for name, seconds in profiled["top_operators"]) + "."]
    if args.quality:
        lines += quality_rows(args.quality)
    return lines


if __name__ == "__main__":
    main()
