"""Further pre-training on the competition text: held-out masked-LM loss and accuracy over steps.

The held-out texts and their masks are fixed (`clue-mtl pretrain` draws them once), so every
evaluation of a run, the one at step 0 included, scores the same masked tokens. Writes
benchmarks/results/pretrain_mlm.{json,md,png}.

    python -m benchmarks.pretrain_mlm --config configs/pretrain-e5-small.yaml [--set train.num_threads=1]
    python -m benchmarks.pretrain_mlm --existing runs/pretrain-e5-small --seconds 3600 --how "..."
    python -m benchmarks.pretrain_mlm --smoke --config configs/pretrain-e5-small.yaml   # the suite: tiny encoder, 2 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, parse_arguments, run_kit, smoke_inputs, work_root, write_results
from clue_mtl.runs.folder import RunFolder


def run_pretraining(config: str, overrides: list[str]) -> tuple[Path, float]:
    from clue_mtl.config import load_pretrain_config

    inputs = smoke_inputs()
    if inputs is not None:   # a smoke run: the tiny encoder and generated texts, two steps
        overrides = [*overrides, f"data.data_dir={inputs['data']}", f"model.encoder={inputs['encoder']}",
                     "data.max_length=32", "data.max_texts=300", "train.batch_size=9", "train.steps=2",
                     "train.eval_every=2", "train.warmup_steps=1", f"output_dir={work_root() / 'runs'}"]
    loaded = load_pretrain_config(ROOT / config, overrides)
    command = [sys.executable, "-m", "clue_mtl", "pretrain", "--config", config, "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    run_kit(command)
    return work_root() / loaded.output_dir / loaded.name, time.perf_counter() - started


def plot(evals: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    loss_axis, accuracy_axis = fig.subplots(1, 2)
    steps = [e["step"] for e in evals]
    loss_axis.plot(steps, [e["loss"] for e in evals], marker="o")
    accuracy_axis.plot(steps, [e["accuracy"] for e in evals], marker="o", color="tab:green")
    loss_axis.set(title="held-out masked-LM loss", xlabel="step")
    accuracy_axis.set(title="held-out masked-token accuracy", xlabel="step")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a pre-training config to run with `clue-mtl pretrain`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--existing", help="record a finished pre-training run folder instead")
    parser.add_argument("--seconds", type=float, help="its measured wall time (with --existing)")
    parser.add_argument("--how", default="", help="how it was run and timed (with --existing)")
    args = parse_arguments(parser, argv)
    if bool(args.config) == bool(args.existing):
        parser.error("give --config or --existing")

    if args.config:
        run_dir, seconds = run_pretraining(args.config, args.set)
        how = " ".join(["clue-mtl pretrain --config", args.config, *(f"--set {s}" for s in args.set)])
    else:
        run_dir, seconds, how = work_root() / args.existing, args.seconds, args.how
    records = RunFolder(run_dir).metrics()
    evals = [r for r in records if r["kind"] == "eval"]
    speeds = [r["steps_per_second"] for r in records if r["kind"] == "train"]
    config = RunFolder(run_dir).config_file.read_text()
    figures = {"before": evals[0], "after": evals[-1], "evaluations": evals, "seconds": seconds,
               "steps_per_second": speeds[-1] if speeds else None, "how": how, "run_dir": str(run_dir.relative_to(work_root())),
               "config": config}
    lines = ["# Further pre-training of e5-small (trimmed vocabulary) on the competition text", "",
             f"Held-out masked tokens: {evals[0]['tokens']:,} (fixed masks over the held-out texts).", "",
             "| step | held-out MLM loss | perplexity | masked-token accuracy |", "|---|---|---|---|"]
    lines += [f"| {e['step']} | {e['loss']:.4f} | {e['perplexity']:.1f} | {e['accuracy']:.4f} |" for e in evals]
    lines += ["", f"Wall time {seconds / 60:.1f} min ({how})."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(evals, RESULTS / "pretrain_mlm.png")
    write_results("pretrain_mlm", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
