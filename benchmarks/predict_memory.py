"""Prediction's memory on test files of any size: peak RSS and rows/s of `clue-mtl predict`.

Issue 34: a 300 MB TNEWS test file (4.45M rows) grew `predict` to 10 GB in 61 s before it had
predicted a batch; a million short rows (17 MB) peaked at 3.3 GB. Prediction now checks each file
in one pass that keeps 16 bytes a row (a hash of its id and its line), then reads, tokenises and
predicts 4,096 rows at a time, writing the zip's member as it goes.

The run is a TNEWS-only run folder of a tiny BERT (2 layers, hidden 32, a character vocabulary)
with fresh heads: beyond the model's own weights, prediction's memory does not depend on the
encoder, and a real one would take hours over 4.45M rows here (e5-small predicts about 400 rows/s
on these CPUs). Each case runs `clue-mtl predict --run RUN --test tnews=FILE` in a fresh process;
its peak RSS is that process's (`getrusage(RUSAGE_CHILDREN)` in a wrapper of its own). Every zip
is checked for one line per row, with the file's ids in order.

    python -m benchmarks.predict_memory [--rows 4450000] [--short-rows 1000000]
    python -m benchmarks.predict_memory --smoke --rows 300 --short-rows 300   # the suite: generated files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from benchmarks.common import ROOT, parse_arguments, smoke_inputs, write_results

SHARED_DATA = ROOT.parent / "shared" / "data" / "tianchi"
# Runs `argv` and prints its peak RSS in KiB: RUSAGE_CHILDREN of a process with one child.
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")


def make_run(run_dir: Path, data_dir: Path) -> None:
    from clue_mtl.config import load_config, save_config
    from clue_mtl.model.encoders import load_encoder
    from clue_mtl.model.multitask import build_model
    from clue_mtl.runs.folder import RunFolder
    from clue_mtl.tasks import TASKS
    from clue_mtl.testing import build_tiny_encoder

    texts = [line.split("\t")[1] for line in (data_dir / "TNEWS_train1128.csv").read_text("utf-8").splitlines()]
    encoder_dir = build_tiny_encoder(run_dir.parent / "tiny-bert", texts=texts[:20000])
    config = load_config(overrides=[f"data.data_dir={data_dir}", f"model.encoder={encoder_dir}",
                                    "data.tasks=[tnews]", "data.max_length=64"])
    encoder, tokenizer = load_encoder(encoder_dir)
    folder = RunFolder(run_dir)
    run_dir.mkdir(parents=True)
    build_model(encoder, config.data.tasks, pooling=config.model.pooling).save(folder.best_dir)
    tokenizer.save_pretrained(folder.tokenizer_dir)
    save_config(config, folder.config_file)
    folder.write_labels({"tnews": list(TASKS["tnews"].labels)})


def write_test_file(path: Path, rows: int, *, short: bool, data_dir: Path) -> int:
    """`rows` TNEWS test rows with ids 0..rows-1: test A's titles over and over, or one character."""
    titles = [line.split(b"\t")[1] for line in (data_dir / "TNEWS_a.csv").read_bytes().splitlines() if line]
    with open(path, "wb") as out:
        for start in range(0, rows, 10_000):
            out.write(b"".join(b"%d\t%s\r\n" % (i, "短".encode() if short else titles[i % len(titles)])
                               for i in range(start, min(rows, start + 10_000))))
    return path.stat().st_size


def predict(run_dir: Path, test_file: Path, out: Path) -> dict:
    argv = [sys.executable, "-c", MEASURE, sys.executable, "-m", "clue_mtl", "predict", "--run", str(run_dir),
            "--test", f"tnews={test_file}", "--out", str(out)]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    peak_kib, code = result.stdout.split()[-2:]
    if code != "0":
        raise RuntimeError(f"predict failed:\n{result.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": int(peak_kib) / 1024}


def zip_rows(path: Path) -> int:
    """Lines of the TNEWS member, each checked to carry the next id."""
    with zipfile.ZipFile(path) as archive, archive.open("tnews_predict.json") as member:
        for number, line in enumerate(member):
            if json.loads(line)["id"] != str(number):
                raise RuntimeError(f"{path}: line {number + 1} has id {json.loads(line)['id']}")
    return number + 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_450_000, help="rows of the large file (default: %(default)s)")
    parser.add_argument("--short-rows", type=int, default=1_000_000, help="rows of the short-row file")
    args = parse_arguments(parser, argv)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = tmp / "run"
        data_dir = smoke_inputs()["data"] if args.smoke else SHARED_DATA
        make_run(run_dir, data_dir)
        for name, rows, short in (("large file", args.rows, False), ("short rows", args.short_rows, True)):
            test_file = tmp / f"{name.replace(' ', '-')}.csv"
            size = write_test_file(test_file, rows, short=short, data_dir=data_dir)
            measured = predict(run_dir, test_file, tmp / "out.zip")
            if zip_rows(tmp / "out.zip") != rows:
                raise RuntimeError(f"{name}: the zip does not hold {rows} rows")
            figures[name] = {"rows": rows, "file_mb": size / 2**20, **measured, "rows_per_second": rows / measured["seconds"]}
            print(name, figures[name], flush=True)
            test_file.unlink()
    lines = ["# Prediction's memory on large test files", "",
             "`clue-mtl predict --run RUN --test tnews=FILE` in a fresh process, a tiny BERT run (see the script); "
             "the whole command, from start to a zip with one line per row.", "",
             "| test file | rows | MB | seconds | rows/s | peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['rows']:,} | {f['file_mb']:.0f} | {f['seconds']:.0f} | {f['rows_per_second']:,.0f} "
                     f"| {f['peak_rss_mb']:,.0f} |")
    write_results("predict_memory", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
