"""Prediction throughput: test rows per second from the three test files to a validated zip.

Trains nothing: a run folder is made from e5-small with fresh heads (the speed of prediction does
not depend on the weights), then `predict_submission` reads the test files, tokenises, predicts
in length-sorted batches and writes the zip, which `read_submission` validates. Two ways, taking
turns: the kit's (the weights cast to bf16 once where prediction runs in bf16) and float32 weights
cast by autocast in every forward pass (the kit before issue 13); then the parts of one
prediction, timed apart.

    python -m benchmarks.predict_throughput [--split a] [--repeats 3]
    python -m benchmarks.predict_throughput --smoke --repeats 1   # the suite: tiny encoder, generated files
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, parse_arguments, peak_rss_mb, smoke_overrides, write_results
from clue_mtl.runs.folder import MODEL_META_FILE, RunFolder


# name -> predict_submission's float32_weights
BEFORE = "kit before: float32 weights cast in each forward pass (bf16 autocast)"
VARIANTS = {BEFORE: True, "kit: weights cast to bf16 once as the run loads": False}


def make_run(run_dir: Path) -> None:
    from clue_mtl.config import load_config, save_config
    from clue_mtl.model.encoders import ensure_encoder, load_encoder
    from clue_mtl.model.multitask import build_model
    from clue_mtl.tasks import TASKS

    config = load_config(ROOT / "configs/quickstart.yaml", smoke_overrides())
    encoder_dir = ensure_encoder(ROOT / config.model.encoder)
    encoder, tokenizer = load_encoder(encoder_dir)
    run_dir.mkdir(parents=True)
    folder = RunFolder(run_dir)
    build_model(encoder, config.data.tasks, pooling=config.model.pooling).save(folder.best_dir)
    tokenizer.save_pretrained(folder.tokenizer_dir)
    save_config(config, folder.config_file)
    folder.write_labels({t: list(TASKS[t].labels) for t in config.data.tasks})


def phases(run_dir: Path, split: str) -> dict:
    """Seconds of each part of one prediction with the kit's settings, timed apart: loading the
    tokenizer, loading the model (and, for comparison, the random draw of the encoder's weights that
    loading skips), reading and tokenising the test files, the forward passes."""
    import json

    from transformers import AutoTokenizer

    from clue_mtl.data.batching import encode_frame
    from clue_mtl.data.folder import load_split
    from clue_mtl.predict.inference import LoadedRun, predict_logits
    from clue_mtl.model.multitask import MultiTaskModel, encoder_from_config, saved_encoder_config

    folder = RunFolder(run_dir)
    seconds = {}
    started = time.perf_counter()
    AutoTokenizer.from_pretrained(folder.tokenizer_dir)
    seconds["tokenizer load"] = time.perf_counter() - started
    started = time.perf_counter()
    MultiTaskModel.load(folder.best_dir)
    seconds["model load"] = time.perf_counter() - started
    config = saved_encoder_config(json.loads((folder.best_dir / MODEL_META_FILE).read_text(encoding="utf-8")))
    started = time.perf_counter()
    encoder_from_config(config)
    seconds["(the random draw of the encoder's weights, skipped)"] = time.perf_counter() - started
    run = LoadedRun(run_dir, show_progress=False)
    started = time.perf_counter()
    tests = {task: encode_frame(run.tokenizer, load_split(run.config.data.data_dir, task, split), task,
                                max_length=run.config.data.max_length) for task in run.tasks}
    seconds["reading and tokenising"] = time.perf_counter() - started
    started = time.perf_counter()
    for task, data in tests.items():
        predict_logits(run.model, task, data, pad_id=run.tokenizer.pad_token_id, bf16=run.bf16)
    seconds["forward passes"] = time.perf_counter() - started
    return seconds


def int8_check(run_dir: Path, split: str) -> dict:
    """Dynamic int8 quantisation of the Linear layers (torch.ao), tried on a trained run: test rows/s
    against float32 on the same rows, and on the run's dev rows the argmax agreement and macro-F1."""
    import copy
    import warnings

    import numpy as np
    import torch

    from clue_mtl.data.batching import encode_frame
    from clue_mtl.predict.metrics import macro_f1
    from clue_mtl.data.folder import load_dev_rows, load_split, load_split_ids
    from clue_mtl.predict.inference import LoadedRun, predict_logits

    run = LoadedRun(run_dir, float32_weights=True)
    quantised = copy.deepcopy(run.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        # the encoder's Linear layers only: a self-attention head's nn.TransformerEncoderLayer
        # reads its projections' weights directly, which a quantised Linear does not have
        quantised.encoder = torch.ao.quantization.quantize_dynamic(quantised.encoder, {torch.nn.Linear},
                                                                   dtype=torch.qint8)
    models = {"float32": run.model, "int8": quantised}
    split_file = RunFolder(run_dir).split_file
    dev_ids = load_split_ids(split_file)
    figures = {"run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir), "tasks": {}}
    for task in run.tasks:
        def encoded(frame):
            return encode_frame(run.tokenizer, frame, task, max_length=run.config.data.max_length)

        test = encoded(load_split(ROOT / "data", task, split))
        dev_frame = load_dev_rows(ROOT / "data", task, dev_ids[task], split_file)
        dev = encoded(dev_frame)
        gold = np.array([run.labels[task].index(str(label)) for label in dev_frame["label"]])
        row = {}
        for name, model in models.items():
            started = time.perf_counter()
            predict_logits(model, task, test, pad_id=run.tokenizer.pad_token_id)
            row[f"{name}_rows_per_second"] = len(test) / (time.perf_counter() - started)
            row[f"{name}_dev"] = predict_logits(model, task, dev, pad_id=run.tokenizer.pad_token_id).argmax(1)
        row["dev_agreement"] = float((row["float32_dev"] == row["int8_dev"]).mean())
        for name in models:
            row[f"{name}_dev_macro_f1"] = macro_f1(gold, row.pop(f"{name}_dev"), len(run.labels[task]))
        figures["tasks"][task] = row
    return figures


def int8_lines(check: dict) -> list[str]:
    lines = ["", f"## Tried: dynamic int8 (torch.ao) on a trained run ({check['run']}; not kept)", "",
             "| task | float32 rows/s | int8 rows/s | dev argmax agreement | dev macro-F1 float32 | int8 |",
             "|---|---|---|---|---|---|"]
    for task, row in check["tasks"].items():
        lines.append(f"| {task} | {row['float32_rows_per_second']:.0f} | {row['int8_rows_per_second']:.0f} | "
                     f"{row['dev_agreement']:.1%} | {row['float32_dev_macro_f1']:.4f} | {row['int8_dev_macro_f1']:.4f} |")
    return lines + ["", "Kept only if the argmax agreed on at least 99.5% of rows and dev macro-F1 moved less "
                        "than 0.2 points."]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="a", choices=["a", "b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-check", metavar="RUN", help="a trained run folder to try int8 quantisation on")
    args = parse_arguments(parser, argv)

    import torch

    from clue_mtl.hardware import count_flops, matmul_peak
    from clue_mtl.predict.inference import LoadedRun, predict_submission
    from clue_mtl.predict.submission import read_submission

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        make_run(run_dir)
        loaded = LoadedRun(run_dir)
        precision, data_dir = "bf16" if loaded.bf16 else "float32", Path(loaded.config.data.data_dir)
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):
            for name, float32_weights in VARIANTS.items():  # taking turns, so drift hits both
                out = Path(scratch) / f"sub-{repeat}-{int(float32_weights)}.zip"
                started = time.perf_counter()
                predict_submission([run_dir], out, split=args.split, data_dir=data_dir,
                                   float32_weights=float32_weights)
                seconds[name].append(time.perf_counter() - started)
                rows = sum(len(frame) for frame in read_submission(out).values())
        _, flops = count_flops(lambda: predict_submission([run_dir], Path(scratch) / "counted.zip", split=args.split,
                                                       data_dir=data_dir))
        parts = phases(run_dir, args.split)
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32,
                       size=256 if args.smoke else 4096 if precision == "float32" else None,
                       seconds=0.05 if args.smoke else 1.0)
    figures = {"rows": rows, "precision": precision, "peak_rss_mb": peak_rss_mb(), "model_flops": flops,
               "matmul_peak_flops_per_second": peak, "variants": {}, "phases": parts}
    for name, runs in seconds.items():
        median = statistics.median(runs)
        figures["variants"][name] = {"seconds_runs": runs, "seconds": median, "rows_per_second": rows / median,
                                     "model_flops_per_second": flops / median}
    before = figures["variants"][BEFORE]["rows_per_second"]
    lines = [
        f"# Prediction throughput (e5-small, test {args.split.upper()}, {precision} as `auto` picks here, CPU)", "",
        f"{rows:,} rows. Matrix-product peak {peak / 1e9:.0f} GFLOP/s ({precision}, large square, same run); "
        f"peak RSS {figures['peak_rss_mb']:.0f} MB.", "",
        "| variant | seconds (median) | each run | rows/s | x before | model GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in figures["variants"].items():
        runs = ", ".join(f"{r:.1f}" for r in f["seconds_runs"])
        lines.append(f"| {name} | {f['seconds']:.1f} | {runs} | {f['rows_per_second']:.0f} | "
                     f"{f['rows_per_second'] / before:.2f} | {f['model_flops_per_second'] / 1e9:.0f} | "
                     f"{f['model_flops_per_second'] / peak:.0%} |")
    lines += ["", "| part of one prediction (kit, timed apart) | seconds |", "|---|---|"]
    lines += [f"| {part} | {value:.2f} |" for part, value in figures["phases"].items()]
    lines += ["", f"From the test files to a validated zip: load the run, read, tokenise, predict, write; "
                  f"median of {args.repeats}, the variants taking turns. Model FLOPs counted with "
                  f"`torch.utils.flop_counter` over one more prediction of the same files; the peak is a large "
                  f"square product in the same precision. Where `auto` picks float32 the two variants are one path."]
    if args.int8_check:
        figures["int8"] = int8_check(ROOT / args.int8_check, args.split)
        lines += int8_lines(figures["int8"])
    write_results("predict_throughput", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
