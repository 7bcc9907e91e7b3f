"""Prediction throughput: test rows per second from the three test files to a validated zip.

Trains nothing: a run folder is made from e5-small with fresh heads (the speed of prediction does
not depend on the weights), then `predict_submission` reads the test files, tokenises, predicts
in length-sorted batches and writes the zip, which `read_submission` validates.

    python benchmarks/predict_throughput.py [--split a] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_mb, write_results  # noqa: E402
from clue_mtl.run_folder import RunFolder  # noqa: E402


def make_run(run_dir: Path) -> None:
    from clue_mtl.config import load_config, save_config
    from clue_mtl.encoders import ensure_encoder, load_encoder
    from clue_mtl.model import build_model
    from clue_mtl.tasks import TASKS

    config = load_config(ROOT / "configs/quickstart.yaml")
    encoder_dir = ensure_encoder(ROOT / config.model.encoder)
    encoder, tokenizer = load_encoder(encoder_dir)
    run_dir.mkdir(parents=True)
    folder = RunFolder(run_dir)
    build_model(encoder, config.data.tasks, pooling=config.model.pooling).save(folder.best_dir)
    tokenizer.save_pretrained(folder.tokenizer_dir)
    save_config(config, folder.config_file)
    folder.write_labels({t: list(TASKS[t].labels) for t in config.data.tasks})


def int8_check(run_dir: Path, split: str) -> dict:
    """Dynamic int8 quantisation of the Linear layers (torch.ao), tried on a trained run: test rows/s
    against float32 on the same rows, and on the run's dev rows the argmax agreement and macro-F1."""
    import copy
    import warnings

    import numpy as np
    import torch

    from clue_mtl.batching import encode_frame
    from clue_mtl.blend import macro_f1
    from clue_mtl.data import load_dev_rows, load_split, load_split_ids
    from clue_mtl.inference import LoadedRun, predict_logits

    run = LoadedRun(run_dir)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="a", choices=["a", "b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-check", metavar="RUN", help="a trained run folder to try int8 quantisation on")
    args = parser.parse_args()

    import torch

    from clue_mtl.hardware import count_flops, matmul_peak
    from clue_mtl.inference import LoadedRun, predict_submission
    from clue_mtl.submission import read_submission

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        make_run(run_dir)
        precision = "bf16" if LoadedRun(run_dir).bf16 else "float32"
        seconds = []
        for repeat in range(args.repeats):
            out = Path(scratch) / f"sub-{repeat}.zip"
            started = time.perf_counter()
            predict_submission([run_dir], out, split=args.split, data_dir=ROOT / "data")
            seconds.append(time.perf_counter() - started)
            rows = sum(len(frame) for frame in read_submission(out).values())
        _, flops = count_flops(lambda: predict_submission([run_dir], Path(scratch) / "counted.zip", split=args.split,
                                                       data_dir=ROOT / "data"))
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32,
                       size=4096 if precision == "float32" else None, seconds=1.0)
    median = statistics.median(seconds)
    figures = {"rows": rows, "precision": precision, "seconds_runs": seconds, "seconds": median,
               "rows_per_second": rows / median, "peak_rss_mb": peak_rss_mb(), "model_flops": flops,
               "model_flops_per_second": flops / median, "matmul_peak_flops_per_second": peak}
    lines = [
        f"# Prediction throughput (e5-small, test {args.split.upper()}, {precision} as `auto` picks here, CPU)", "",
        "| rows | seconds (median) | rows/s | model GFLOP/s | matmul peak GFLOP/s | of peak | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| {rows} | {median:.1f} | {figures['rows_per_second']:.0f} | {flops / median / 1e9:.0f} | {peak / 1e9:.0f} | "
        f"{flops / median / peak:.0%} | {figures['peak_rss_mb']:.0f} |",
        "", f"From the test files to a validated zip: load the run, read, tokenise, predict, write; "
            f"median of {args.repeats}. Model FLOPs counted with `torch.utils.flop_counter` over one more "
            f"prediction of the same files; the peak is a large square product in the same precision.",
    ]
    if args.int8_check:
        figures["int8"] = int8_check(ROOT / args.int8_check, args.split)
        lines += int8_lines(figures["int8"])
    write_results("predict_throughput", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
