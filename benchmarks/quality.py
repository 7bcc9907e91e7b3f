"""Dev macro-F1 of whole runs next to the TF-IDF baseline's, with their wall time.

Each config runs as the main job does (`clue-mtl run`: train, evaluate on the whole dev split,
write both zips), timed from the outside. Results accumulate in benchmarks/results/quality.json,
one entry per config, so configs can be measured in separate invocations.

    python -m benchmarks.quality --config configs/quickstart.yaml
    python -m benchmarks.quality --config configs/cpu-long.yaml
    python -m benchmarks.quality --existing runs/quickstart --seconds 777 --how "time make run"
    python -m benchmarks.quality --smoke --config configs/quickstart.yaml   # the suite: tiny encoder, 2 steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import (RESULTS, ROOT, parse_arguments, run_kit, smoke_inputs, smoke_job_overrides,
                               work_root, write_results)
from clue_mtl.tasks import TASK_NAMES as TASKS
from clue_mtl.runs.folder import RunFolder


def run_config(config: str) -> tuple[Path, float]:
    from clue_mtl.config import load_config

    overrides = smoke_job_overrides()
    loaded = load_config(ROOT / config, overrides)
    command = [sys.executable, "-m", "clue_mtl", "run", "--config", config, "--overwrite"]
    if overrides:   # a smoke run: its blend and zips beside its runs
        command += ["--blend-dir", str(work_root() / "blends" / loaded.name), "--out-dir", str(work_root() / "submissions")]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    run_kit(command)
    return work_root() / loaded.output_dir / loaded.name, time.perf_counter() - started


def baseline_entry() -> dict:
    import tempfile

    from clue_mtl.predict.baseline import run_baseline

    with tempfile.TemporaryDirectory() as out_dir:
        inputs = smoke_inputs()
        result = run_baseline(inputs["data"] if inputs else ROOT / "data", out_dir=out_dir, progress=False)
    return {"macro_f1": {t: result["reports"][t]["macro_f1"] for t in TASKS}, "mean": result["mean"],
            "seconds": result["seconds"], "how": "clue-mtl baseline (run_baseline)"}


def run_entry(run_dir: Path, seconds: float, how: str) -> dict:
    folder = RunFolder(run_dir)
    report = json.loads((folder.evaluation_dir / "report.json").read_text())
    config = folder.config_file.read_text()
    return {"macro_f1": {t: report["reports"][t]["macro_f1"] for t in TASKS}, "mean": report["mean_macro_f1"],
            "seconds": seconds, "how": how, "run_dir": str(run_dir.relative_to(work_root())), "config": config}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a config to run with `clue-mtl run`")
    parser.add_argument("--existing", help="record a finished run folder instead")
    parser.add_argument("--seconds", type=float, help="its measured wall time (with --existing)")
    parser.add_argument("--how", default="", help="how that time was measured (with --existing)")
    args = parse_arguments(parser, argv)

    path = RESULTS / "quality.json"
    entries = json.loads(path.read_text())["figures"] if path.exists() else {}
    entries["baseline"] = baseline_entry()
    if args.config:
        run_dir, seconds = run_config(args.config)
        entries[run_dir.name] = run_entry(run_dir, seconds, f"python -m benchmarks.quality --config {args.config}")
    elif args.existing:
        entries[Path(args.existing).name] = run_entry(work_root() / args.existing, args.seconds, args.how)

    lines = ["# Dev macro-F1 (whole dev split: 10% of each training file, seed 42), CPU, 2 cores", "",
             "| run | OCNLI | OCEMOTION | TNEWS | mean | wall time |", "|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        f1 = entry["macro_f1"]
        lines.append(f"| {name} | {f1['ocnli']:.4f} | {f1['ocemotion']:.4f} | {f1['tnews']:.4f} | "
                     f"**{entry['mean']:.4f}** | {entry['seconds'] / 60:.1f} min |")
    lines += ["", "Wall time of a run covers training, the final evaluation and writing both test zips."]
    write_results("quality", entries, "\n".join(lines))


if __name__ == "__main__":
    main()
