"""Prediction's forward pass, one change at a time (issue 13): test rows/s and what each change does
to the argmax and to dev macro-F1 against the kit's path before it (float32 weights under bf16
autocast, batches of 64, torch's attention kernel). The kit now casts the weights to bf16 once.

Times only `predict_logits` over the three test files, already tokenised (the whole path from files
to a zip is `predict_throughput.py`); each variant twice, alternating, median. A change is worth
building only if the argmax agrees on at least 99.5% of test rows and dev macro-F1 moves less than
0.2 points (the bar issue 13 sets for int8 and ONNX paths).

    python -m benchmarks.predict_experiments RUN_DIR [--split a] [--repeats 2] [--try-compile]   # alone

--try-compile adds the bf16 model under torch.compile (inductor, dynamic shapes, weights frozen
into the graph); its first pass, which compiles, is timed apart from the rows/s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

from benchmarks.common import parse_arguments, write_results

BASE = "kit before: float32 weights, bf16 autocast, 64 rows a batch"
COMPILED = "bf16 weights, torch.compile with frozen weights, no autocast"


def variants(model, kit_model, encoder_model, bf16_model) -> dict[str, tuple]:
    """name -> (model, autocast, batch size, math attention kernel)."""
    return {
        BASE: (model, True, 64, False),
        "32 rows a batch": (model, True, 32, False),
        "128 rows a batch": (model, True, 128, False),
        "math attention kernel": (model, True, 64, True),
        "weights cast to bf16 once, autocast (the kit now)": (kit_model, True, 64, False),
        "the encoder alone cast to bf16 once, autocast": (encoder_model, True, 64, False),
        "every weight cast to bf16 once, no autocast": (bf16_model, False, 64, False),
    }


def compiled(bf16_model):
    """The bf16 model with its forward compiled: weights frozen as constants (inductor's `freezing`,
    which lets oneDNN pre-pack them), dynamic shapes so batch widths do not recompile."""
    import torch
    import torch._inductor.config as inductor

    inductor.freezing = True
    model = copy.deepcopy(bf16_model)
    model.forward = torch.compile(model.forward, dynamic=True)
    return model


def logits_of(model, autocast: bool, batch_size: int, math_kernel: bool, datas: dict, pad_id: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from clue_mtl.predict.inference import predict_logits

    kernel = sdpa_kernel(SDPBackend.MATH) if math_kernel else contextlib.nullcontext()
    with kernel, torch.inference_mode():
        return {task: predict_logits(model, task, data, pad_id=pad_id, batch_size=batch_size, bf16=autocast)
                for task, data in datas.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="a")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--try-compile", action="store_true", help="add the compiled bf16 model")
    args = parse_arguments(parser, argv)

    import numpy as np
    import torch

    from clue_mtl.data.batching import encode_frame
    from clue_mtl.data.folder import load_split, task_frames
    from clue_mtl.predict.inference import LoadedRun, bf16_weights, float32_modules
    from clue_mtl.predict.metrics import task_report

    run = LoadedRun(args.run_dir, show_progress=False, float32_weights=True)
    length, pad_id = run.config.data.max_length, run.tokenizer.pad_token_id
    tests = {t: encode_frame(run.tokenizer, load_split(run.config.data.data_dir, t, args.split), t, max_length=length)
             for t in run.tasks}
    dev_frames = {t: task_frames(run.config.data, t).dev for t in run.tasks}
    devs = {t: encode_frame(run.tokenizer, frame, t, max_length=length) for t, frame in dev_frames.items()}
    rows = sum(len(data) for data in tests.values())
    bf16_model = copy.deepcopy(run.model).to(torch.bfloat16)
    encoder_model = copy.deepcopy(run.model)
    encoder_model.encoder.to(torch.bfloat16)
    chosen = variants(run.model, bf16_weights(copy.deepcopy(run.model)), encoder_model, bf16_model)
    float32_heads = bool(float32_modules(run.model))
    if float32_heads:  # a SAN or BiLSTM head would meet bf16 activations with nothing to cast them
        print("this run has a head that runs in float32: the variants without autocast are left out", file=sys.stderr)
        chosen = {name: setting for name, setting in chosen.items() if setting[1]}
    first_pass = {}
    if args.try_compile and not float32_heads:
        chosen[COMPILED] = (compiled(bf16_model), False, 64, False)
        started = time.perf_counter()
        logits_of(*chosen[COMPILED], tests, pad_id)
        first_pass[COMPILED] = time.perf_counter() - started
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in range(args.repeats):
        for name, setting in chosen.items():
            started = time.perf_counter()
            logits_of(*setting, tests, pad_id)
            seconds[name].append(time.perf_counter() - started)

    outputs = {name: (logits_of(*setting, tests, pad_id), logits_of(*setting, devs, pad_id))
               for name, setting in chosen.items()}
    base_test, base_dev = outputs[BASE]

    def dev_f1(logits: dict) -> dict:
        return {t: task_report(t, dev_frames[t]["label"], [run.labels[t][i] for i in logits[t].argmax(-1)])["macro_f1"]
                for t in run.tasks}

    base_f1 = dev_f1(base_dev)
    figures = {}
    for name, (test, dev) in outputs.items():
        figures[name] = {
            "rows_per_second": rows / statistics.median(seconds[name]),
            "rows_per_second_runs": [rows / s for s in seconds[name]],
            "test_argmax_agreement": {t: float(np.mean(test[t].argmax(-1) == base_test[t].argmax(-1))) for t in test},
            "dev_macro_f1": dev_f1(dev), "dev_macro_f1_base": base_f1}
        if name in first_pass:
            figures[name]["first_pass_seconds"] = first_pass[name]
    write_results("predict_experiments", figures, summarise(figures, rows, args))


def summarise(figures: dict, rows: int, args) -> str:
    base = figures[BASE]["rows_per_second"]
    lines = [f"# Prediction's forward pass, one change at a time ({args.run_dir}, test {args.split.upper()}, "
             f"{rows:,} rows, CPU)", "",
             "| variant | rows/s (median) | each run | x kit before | lowest test argmax agreement | dev mean macro-F1 "
             "| change | the bar |", "|---|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        agreement = min(f["test_argmax_agreement"].values())
        mean, base_mean = (statistics.mean(f[key].values()) for key in ("dev_macro_f1", "dev_macro_f1_base"))
        moved = max(abs(f["dev_macro_f1"][t] - f["dev_macro_f1_base"][t]) for t in f["dev_macro_f1"])
        passes = agreement >= 0.995 and moved < 0.002
        runs = ", ".join(f"{r:.0f}" for r in f["rows_per_second_runs"])
        lines.append(f"| {name} | {f['rows_per_second']:.0f} | {runs} | {f['rows_per_second'] / base:.2f} "
                     f"| {agreement:.2%} | {mean:.4f} | {mean - base_mean:+.4f} (largest task: {moved:.4f}) "
                     f"| {'-' if name == BASE else ('passes the bar' if passes else 'fails the bar')} |")
    lines += ["", "Forward passes only (tokenised test files), bf16 on this CPU; the bar: argmax agreement >= 99.5% "
              "on every task's test rows and no task's dev macro-F1 moving 0.2 points or more."]
    for name, f in figures.items():
        if "first_pass_seconds" in f:
            lines.append(f"{name}: its first pass over the test rows, which compiles, took "
                         f"{f['first_pass_seconds']:.0f} s ({f['first_pass_seconds'] * f['rows_per_second']:,.0f} "
                         f"rows' worth of its own speed).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
