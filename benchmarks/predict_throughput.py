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


def make_run(run_dir: Path) -> None:
    import json

    from clue_mtl.config import load_config, save_config
    from clue_mtl.encoders import ensure_encoder, load_encoder
    from clue_mtl.model import build_model
    from clue_mtl.tasks import TASKS

    config = load_config(ROOT / "configs/quickstart.yaml")
    encoder_dir = ensure_encoder(ROOT / config.model.encoder)
    encoder, tokenizer = load_encoder(encoder_dir)
    run_dir.mkdir(parents=True)
    build_model(encoder, config.data.tasks, pooling=config.model.pooling).save(run_dir / "best")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    save_config(config, run_dir / "config.yaml")
    (run_dir / "labels.json").write_text(json.dumps({t: list(TASKS[t].labels) for t in config.data.tasks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="a", choices=["a", "b"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from clue_mtl.inference import predict_submission
    from clue_mtl.submission import read_submission

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        make_run(run_dir)
        seconds = []
        for repeat in range(args.repeats):
            out = Path(scratch) / f"sub-{repeat}.zip"
            started = time.perf_counter()
            predict_submission([run_dir], out, split=args.split, data_dir=ROOT / "data")
            seconds.append(time.perf_counter() - started)
            rows = sum(len(frame) for frame in read_submission(out).values())
    figures = {"rows": rows, "seconds_runs": seconds, "seconds": statistics.median(seconds),
               "rows_per_second": rows / statistics.median(seconds), "peak_rss_mb": peak_rss_mb()}
    markdown = "\n".join([
        f"# Prediction throughput (e5-small, test {args.split.upper()}, bf16 as in quickstart, CPU)", "",
        "| rows | seconds (median) | rows/s | peak RSS (MB) |", "|---|---|---|---|",
        f"| {rows} | {figures['seconds']:.1f} | {figures['rows_per_second']:.0f} | {figures['peak_rss_mb']:.0f} |",
        "", f"From the test files to a validated zip: load the run, read, tokenise, predict, write; "
            f"median of {args.repeats}.",
    ])
    write_results("predict_throughput", figures, markdown)


if __name__ == "__main__":
    main()
