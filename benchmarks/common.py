"""Helpers shared by the benchmark scripts: machine description, result files, timing children,
and the smoke runs of the suite.

Each script runs from the repository root as `python -m benchmarks.NAME ...`. Two environment
variables reach every child a script starts: `BENCHMARK_RESULTS`, the folder the results go to
(default `benchmarks/results`), and `BENCHMARK_SMOKE`, set by `--smoke`: a folder holding a tiny
random encoder and generated competition files that replace e5-small and the data in every
timed step (`tests/test_benchmarks.py`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import processes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS") or ROOT / "benchmarks" / "results")
SMOKE = "BENCHMARK_SMOKE"

# torch.compile's on-disk graph caches store pickles: off in every benchmark and in the children they
# start (the environment is inherited), before torch is imported. Compiled kernels are still cached.
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(name: str, figures: dict, markdown: str, results: Path = RESULTS, *,
                  described_machine: dict | None = None, echo: bool = True) -> None:
    """`NAME.json` (the figures with the command, date and machine) and `NAME.md` in `results`;
    described_machine: the machine the figures were measured on, where it is not this process's
    (`machine()`); echo: print the markdown."""
    results.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name, "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine() if described_machine is None else described_machine, "figures": figures,
    }
    # default=float: numpy scalars among the figures are written as numbers
    write_whole(results / f"{name}.json", json.dumps(record, indent=2, ensure_ascii=False, default=float) + "\n")
    write_whole(results / f"{name}.md", markdown.rstrip() + "\n")
    if echo:
        print(markdown)


def command_line() -> str:
    """This process's command as it was typed: `python -m benchmarks.NAME ARGS` for a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *program, *sys.argv[1:]])


def write_whole(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a killed benchmark leaves the old results whole."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def refuse(message: str):
    """End the script on an input it cannot use: `error: MESSAGE` on one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser`'s arguments with `--smoke` added: a tiny encoder and generated data in place of
    e5-small and the competition files, for the suite. A smoke run writes only where
    `BENCHMARK_RESULTS` names."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny encoder and generated data (the suite); needs BENCHMARK_RESULTS")
    args = parser.parse_args(argv)
    if args.smoke:
        if not os.environ.get("BENCHMARK_RESULTS"):
            parser.error("--smoke writes its results where BENCHMARK_RESULTS names; set it")
        os.environ[SMOKE] = str(RESULTS / "smoke-inputs")
    return args


def smoke_inputs() -> dict[str, Path] | None:
    """In a smoke run, the tiny encoder (12 layers of 32) and the generated data folder (built once,
    shared by the children); otherwise None."""
    if not os.environ.get(SMOKE):
        return None
    from clue_mtl.testing import build_tiny_encoder, write_tiny_competition_files

    work = Path(os.environ[SMOKE])
    data, encoder = work / "data", work / "encoder"
    if not (data / "TNEWS_train1128.csv").exists():
        write_tiny_competition_files(data, rows=150)   # enough dev rows for a cross-fitted blend
    if not (encoder / "config.json").exists():
        build_tiny_encoder(encoder, kind="bert", layers=12, seed=0)   # e5-small's depth, for settings that name layers
    return {"data": data, "encoder": encoder}


def smoke_overrides(*, encoder: bool = True) -> list[str]:
    """Config overrides that put the smoke inputs in place of the real ones (none outside a smoke
    run); without `encoder`, the encoder is left to the caller (one it built for the smoke run)."""
    inputs = smoke_inputs()
    if inputs is None:
        return []
    return [f"data.data_dir={inputs['data']}", *([f"model.encoder={inputs['encoder']}"] if encoder else []),
            "data.max_length=32", "train.batch_size=9", "data.max_train_rows=60"]


def smoke_job_overrides() -> list[str]:
    """`smoke_overrides` for a whole job (`clue-mtl run`, `train`, `pretrain`): two steps, its runs
    under `work_root()` (none outside a smoke run)."""
    inputs = smoke_overrides()
    if not inputs:
        return []
    return [*inputs, "train.steps=2", "train.eval_every=2", "train.warmup_steps=1", f"output_dir={work_root() / 'runs'}"]


def smoke_run() -> bool:
    """Whether this is a smoke run (`--smoke`, here or in the script that started this one)."""
    return bool(os.environ.get(SMOKE))


def run_kit(command: list[str]) -> None:
    """`python -m clue_mtl ...` (`command`) from the repository root, to its end; a failure raises
    `subprocess.CalledProcessError`. In a smoke run the process is a fork of this one
    (`benchmarks.processes`): the same command, without importing torch again."""
    processes.run(command, fork=smoke_run(), cwd=ROOT)


def work_root() -> Path:
    """Where a script's runs, blends and zips go: the repository root, or in a smoke run a folder
    beside the smoke inputs."""
    return Path(os.environ[SMOKE]).parent / "smoke-work" if os.environ.get(SMOKE) else ROOT


def run_child(args: list[str]) -> dict:
    """Run this interpreter on `args` (`-m benchmarks.NAME ...`) in a fresh process, from the
    repository root; it prints one JSON line last. In a smoke run a benchmark module's child runs
    in this process instead (`main(argv)`): the tiny steps take less than starting torch again."""
    if os.environ.get(SMOKE) and args[:1] == ["-m"] and args[1].startswith("benchmarks."):
        import contextlib
        import importlib
        import io

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            importlib.import_module(args[1]).main(args[2:])
        return json.loads(printed.getvalue().strip().splitlines()[-1])
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate_children(module: str, flag: str, names, extra: list[str], repeats: int,
                       describe) -> dict[str, list[dict]]:
    """Run `python -m module flag NAME *extra` in a fresh process per name, `repeats` times, names taking
    turns so every one sees the same machine load; each child's JSON result, by name.
    `describe(result)` is the progress line's figure."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            runs[name].append(run_child(["-m", module, flag, name, *extra]))
            print(f"repeat {repeat + 1}: {name}: {describe(runs[name][-1])}", flush=True)
    return runs


def timing_arguments(parser: argparse.ArgumentParser, *, steps: int, warmup: int = 3,
                     repeats: int = 2) -> argparse.ArgumentParser:
    """The arguments of a script that times variants of a training step, each in a fresh process:
    --steps, --warmup and --repeats, and the hidden --variant of the child that times one."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode: time this one, print its JSON
    return parser


def time_variants(module: str, variants, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every variant timed by `python -m module --variant NAME` in a fresh process, taking turns
    (`alternate_children`), with `timing_arguments`' steps, warm-up and repeats."""
    return alternate_children(module, "--variant", variants, ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                              args.repeats, lambda result: f"{result['samples_per_second']:.1f} samples/s")


def equal_time_steps(steps: int, reference_seconds: float, seconds: float) -> int:
    """The steps that train as long as `steps` of a reference do, from the time each takes per
    step (or per row, for equal batches)."""
    return round(steps * reference_seconds / seconds)


TRIMMED_ENCODER = ROOT / "artifacts" / "e5-small-trimmed"


def train_and_predict(config: str, run_dir: Path, overrides: list[str], frames: dict) -> dict:
    """`clue-mtl train` in a fresh process, then the best model's predicted label index for every
    row of `frames` (task -> dev frame): {"command", "lane_seconds", "predicted"}."""
    command = [sys.executable, "-m", "clue_mtl", "train", "--config", config, "--run-dir", str(run_dir), "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    run_kit(command)
    seconds = time.perf_counter() - started

    from clue_mtl.predict.inference import LoadedRun

    # float32 weights: the studies' cached predictions were made so, and a resumed study compares with them
    run = LoadedRun(run_dir, show_progress=False, float32_weights=True)
    predicted = {task: run.probabilities(task, frame).argmax(-1).tolist() for task, frame in frames.items()}
    return {"command": " ".join(command), "lane_seconds": seconds, "predicted": predicted}


def ensure_trimmed_encoder() -> Path:
    """e5-small with its vocabulary trimmed to the corpus (`clue-mtl trim-vocab`), built once."""
    from clue_mtl.model.encoders import ensure_encoder

    full = ensure_encoder(ROOT / "artifacts" / "e5-small")
    if not (TRIMMED_ENCODER / "config.json").exists():
        subprocess.run([sys.executable, "-m", "clue_mtl", "trim-vocab", "--encoder", str(full),
                        "--out", str(TRIMMED_ENCODER)], cwd=ROOT, check=True)
    return TRIMMED_ENCODER


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_training_steps(overrides: list[str], steps: int, warmup: int, *, pad_to_max: bool = False,
                        quality_steps: int = 0, count_flops: bool = False, prepare=None,
                        config_path: str | Path | None = None, smoke_encoder: bool = True) -> dict:
    """Build a Trainer, run `warmup` steps, then time `steps` optimiser steps (in this process).

    The config is `config_path` (a YAML file, e.g. a shipped config) or the defaults, with
    `overrides` on top (and in a smoke run the tiny encoder and generated data on top of those;
    the overrides' own encoder with `smoke_encoder=False`).

    With `count_flops`, one more step runs under torch's FLOP counter (model FLOPs per step and
    per second). `prepare(trainer)` runs before the warm-up (e.g. to compile the encoder). With
    `quality_steps`, keep training to that step and add the dev scores.
    """
    import tempfile

    import torch

    from clue_mtl.config import load_config
    from clue_mtl.recipes.multitask import Trainer

    config = load_config(config_path, [*overrides, *smoke_overrides(encoder=smoke_encoder), f"train.steps={max(warmup + steps, quality_steps)}"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, show_progress=False)
        if pad_to_max:
            trainer.batches.pad_to_multiple_of = config.data.max_length
        rows_per_step = sum(trainer.batch_sizes.values())
        if prepare is not None:
            prepare(trainer)
        started = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step()
        warmup_seconds = time.perf_counter() - started
        tokens = 0
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
            tokens += trainer.step_tokens
        seconds = time.perf_counter() - started
        result = {
            "steps": steps, "rows_per_step": rows_per_step, "seconds": seconds,
            "samples_per_second": rows_per_step * steps / seconds, "step_seconds": seconds / steps,
            "padded_tokens_per_step": tokens / steps, "peak_rss_mb": peak_rss_mb(),
            "torch_threads": torch.get_num_threads(), "precision": trainer.accelerator.mixed_precision,
            "warmup_seconds": warmup_seconds,
        }
        if count_flops:  # one more step, counted: FLOPs per padded token, times the timed steps' tokens
            from clue_mtl.hardware import count_flops as counted

            _, flops = counted(trainer.train_step)
            result["model_flops_per_step"] = flops / trainer.step_tokens * tokens / steps
            result["model_flops_per_second"] = result["model_flops_per_step"] / result["step_seconds"]
        if quality_steps:
            while trainer.state.step < quality_steps:
                trainer.train_step()
            scores = trainer.evaluate()
            result["quality_steps"] = quality_steps
            result["dev_mean_macro_f1"] = scores["mean_macro_f1"]
            result["dev_macro_f1"] = {t: r["macro_f1"] for t, r in scores["reports"].items()}
    return result
