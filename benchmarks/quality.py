"""Dev macro-F1 of whole runs next to the TF-IDF baseline's, with their wall time.

Each config runs as the main job does (`clue-mtl run`: train, evaluate on the whole dev split,
write both zips), timed from the outside. Results accumulate in benchmarks/results/quality.json,
one entry per config, so configs can be measured in separate invocations.

    python benchmarks/quality.py --config configs/quickstart.yaml
    python benchmarks/quality.py --config configs/cpu-long.yaml
    python benchmarks/quality.py --existing runs/quickstart --seconds 777 --how "time make run"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_results  # noqa: E402
from clue_mtl.tasks import TASK_NAMES as TASKS  # noqa: E402
from clue_mtl.runs.folder import RunFolder  # noqa: E402


def run_config(config: str) -> tuple[Path, float]:
    from clue_mtl.config import load_config

    loaded = load_config(ROOT / config)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clue_mtl", "run", "--config", config, "--overwrite"], cwd=ROOT, check=True)
    return ROOT / loaded.output_dir / loaded.name, time.perf_counter() - started


def baseline_entry() -> dict:
    import tempfile

    from clue_mtl.predict.baseline import run_baseline

    with tempfile.TemporaryDirectory() as out_dir:
        result = run_baseline(ROOT / "data", out_dir=out_dir, progress=False)
    return {"macro_f1": {t: result["reports"][t]["macro_f1"] for t in TASKS}, "mean": result["mean"],
            "seconds": result["seconds"], "how": "clue-mtl baseline (run_baseline)"}


def run_entry(run_dir: Path, seconds: float, how: str) -> dict:
    folder = RunFolder(run_dir)
    report = json.loads((folder.evaluation_dir / "report.json").read_text())
    config = folder.config_file.read_text()
    return {"macro_f1": {t: report["reports"][t]["macro_f1"] for t in TASKS}, "mean": report["mean_macro_f1"],
            "seconds": seconds, "how": how, "run_dir": str(run_dir.relative_to(ROOT)), "config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a config to run with `clue-mtl run`")
    parser.add_argument("--existing", help="record a finished run folder instead")
    parser.add_argument("--seconds", type=float, help="its measured wall time (with --existing)")
    parser.add_argument("--how", default="", help="how that time was measured (with --existing)")
    args = parser.parse_args()

    path = RESULTS / "quality.json"
    entries = json.loads(path.read_text())["figures"] if path.exists() else {}
    entries["baseline"] = baseline_entry()
    if args.config:
        run_dir, seconds = run_config(args.config)
        entries[run_dir.name] = run_entry(run_dir, seconds, f"python benchmarks/quality.py --config {args.config}")
    elif args.existing:
        entries[Path(args.existing).name] = run_entry(ROOT / args.existing, args.seconds, args.how)

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
