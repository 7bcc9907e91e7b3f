"""The GPU path, run for real in one prepared command: device tests, the main job, and what
the minutes left allow, recorded in benchmarks/results/gpu_check.{json,md}.

Prepared here, before any device minute is spent:

    python -m benchmarks.gpu_check pack --encoder artifacts/e5-small-trimmed   # .gpu/: data + bf16 encoder; prints the sizes
    python -m benchmarks.gpu_check run --smoke            # every stage on the CPU: tiny encoder, generated data (in the suite)

On the GPU, through the device tool with `carry: [".gpu"]` and `timeout_s: 540`:

    bash benchmarks/gpu_check.sh                          # = python3 -m benchmarks.gpu_check run --carry .gpu --out $OUT

then copy what comes back ($OUT/gpu_check.json, .md) into benchmarks/results/. The machine there
has torch, transformers, accelerate, pandas, scikit-learn and pytest, but not the kit (it runs
from the tree), jieba or the encoder packages: nothing on the path below imports them.

Stages, each recorded with its wall seconds, in the order they matter:
1. the environment: GPU, driver, CUDA, torch, transformers, accelerate; the bf16 matmul peak;
2. `pytest -m device tests/test_device.py` on the GPU (the TF-IDF baseline fits on the CPU meanwhile);
3. the main job (`clue-mtl run`, configs/gpu-e5-small.yaml) for `--minutes` of training: dev
   macro-F1 of the member alone and of the biased blend (cross-fitted), rows/s, peak GPU memory,
   model FLOP/s as a fraction of the bf16 peak, both zips validated;
4. while the deadline allows: `uncertainty`, `gradnorm` and `dwa` against `equal` at
   `--compare-minutes` each (trained side by side on the one GPU), with a paired bootstrap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from benchmarks import processes
from benchmarks.common import RESULTS, ROOT, machine, write_results

CARRY_LIMIT = 64 * 2**20          # what the device tool sends: the tree and the carried paths
SMOKE = ["data.max_length=32", "train.batch_size=9", "train.eval_every=4", "train.log_every=2",
         "model.heads={ocnli: {type: attention, heads: 2}, ocemotion: {type: attention, heads: 2}, "
         "tnews: {type: attention, heads: 2}}"]
METHODS = ("equal", "uncertainty", "gradnorm", "dwa")
DEVICE_TESTS_LIMIT = 180    # seconds: about 10 on 2 CPU cores
MAIN_JOB_RESERVE = 120      # seconds after training: the whole dev split, the blend, both zips
EVALUATION_RESERVE = 90     # seconds after the weighting methods' training: four dev evaluations
MIN_MINUTES = 0.1


# ----------------------------------------------------------------------------------- pack
def cmd_pack(args) -> int:
    """.gpu/: the competition files in one xz tarball and the encoder in bf16 safetensors."""
    from clue_mtl.tasks import TASKS

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tarfile.open(out / "data.tar.xz", "w:xz", preset=9) as tar:
        for task in TASKS.values():
            for name in (task.train_file, task.test_a_file, task.test_b_file):
                tar.add(Path(args.data_dir, name).resolve(), arcname=name)
    pack_encoder(args.encoder, out / "encoder")
    tree, carried = tree_bytes(), folder_bytes(out)
    sizes = {"tree_mib": tree / 2**20, "carry_mib": carried / 2**20, "total_mib": (tree + carried) / 2**20,
             "data_mib": (out / "data.tar.xz").stat().st_size / 2**20,
             "encoder_mib": folder_bytes(out / "encoder") / 2**20}
    print(json.dumps(sizes, indent=2))
    if tree + carried > CARRY_LIMIT:
        print(f"error: {out} and the tree come to {sizes['total_mib']:.1f} MiB, over the device's 64 MiB",
              file=sys.stderr)
        return 2
    carry = os.path.relpath(out.resolve(), ROOT)
    print(f"device call: run(command='bash benchmarks/gpu_check.sh', carry=['{carry}'], timeout_s=540)")
    return 0


def pack_encoder(source: str, out: Path) -> None:
    """The encoder and its tokenizer with the weights in bf16 (the kit loads them back in float32)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(source, dtype=torch.float32).to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def tree_bytes() -> int:
    """The bytes of what travels without being named: tracked files and untracked, unignored ones."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / os.fsdecode(name)).stat().st_size for name in names if name and (ROOT / os.fsdecode(name)).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ----------------------------------------------------------------------------------- run
class Stages:
    """The stages of one check, bounded by its deadline: each one's wall seconds, its failure
    (recorded, never fatal: what ran before still comes back), and the record saved after each."""

    def __init__(self, deadline_minutes: float, record: dict, save):
        self.started = time.monotonic()
        self.deadline = self.started + deadline_minutes * 60
        self.record, self.save = record, save
        self.seconds = record["stages_seconds"]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, work, *args, **kwargs):
        """`work(*args, **kwargs)`, or None with the failure's first lines recorded under `name`."""
        print(f"== {name} ({self.left() / 60:.1f} min left)", flush=True)
        started = time.monotonic()
        try:
            return work(*args, **kwargs)
        except Exception as error:  # any failure of one stage: the others still run and report
            self.record["failed"][name] = f"{type(error).__name__}: {error}"[:2000]
            return None
        finally:
            self.seconds[name] = round(time.monotonic() - started, 1)
            self.record["wall_seconds"] = round(time.monotonic() - self.started, 1)
            self.save()


def environment() -> dict:
    import accelerate
    import torch
    import transformers

    from clue_mtl.hardware import matmul_peak

    figures = {**machine(), "transformers": transformers.__version__, "accelerate": accelerate.__version__,
               "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        figures["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
        figures["bf16_matmul_tflops"] = matmul_peak(torch.bfloat16, "cuda") / 1e12
    return figures


def prepare_inputs(args, work: Path) -> tuple[Path, Path]:
    """The data folder and the encoder: unpacked from the carried folder, or generated (--smoke)."""
    data = work / "data"
    if args.smoke:
        from clue_mtl.testing import build_tiny_encoder, write_tiny_competition_files

        return write_tiny_competition_files(data, rows=150), build_tiny_encoder(work / "encoder", kind="bert")
    carry = Path(args.carry)
    with tarfile.open(carry / "data.tar.xz") as tar:
        tar.extractall(data, filter="data")
    return data, carry / "encoder"


def child_environment() -> dict:
    """This tree first on the path (the kit is not installed there), and no hub: nothing to reach."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


def kit(*arguments: str, log: Path, fork: bool = False) -> subprocess.Popen | processes.ForkedModule:
    """`python -m clue_mtl ARGUMENTS` in its own process, its output into `log`; with `fork`, a fork
    of this one (`benchmarks.processes`)."""
    with open(log, "w") as output:
        return processes.start(processes.module_command("clue_mtl", *arguments), fork=fork, cwd=ROOT,
                               env=child_environment(), stdout=output, stderr=subprocess.STDOUT)


def finished(process: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        code = process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"{log.name}: still running at the deadline; stopped") from None
    if code != 0:
        raise RuntimeError(f"{log.name}: exit {code}: {log.read_text(errors='replace')[-1500:]}")


def device_tests(work: Path, select: str | None, timeout: float) -> dict:
    report = work / "device-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider",
               f"--junitxml={report}", str(ROOT / "tests" / "test_device.py"), *(["-k", select] if select else [])]
    try:
        result = subprocess.run(command, cwd=ROOT, env=child_environment(), capture_output=True, text=True,
                                timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the device tests ran past {timeout:.0f} s; stopped") from None
    if not report.exists():
        return {"collected": 0, "error": (result.stdout + result.stderr)[-1500:]}
    suite = ElementTree.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = {case.get("name"): (problem.get("message") or "")[:300]
              for case in suite.iter("testcase") for problem in (*case.findall("failure"), *case.findall("error"))}
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def training_figures(run_dir: Path) -> dict:
    """Rows/s, model FLOP/s, fraction of peak and peak memory over the training records; steps,
    epochs and how the budget's minutes were spent."""
    from clue_mtl.runs.folder import RunFolder

    records = [m for m in RunFolder(run_dir).metrics() if m["kind"] == "train"]
    timed = [m for m in records if "samples_per_second" in m]
    figures = {"steps": records[-1]["step"], "epochs": records[-1]["epochs"]}
    for key in ("samples_per_second", "model_flops_per_second", "fraction_of_peak"):
        values = [m[key] for m in timed if key in m]
        if values:
            figures[key] = sum(values) / len(values)
    memory = [m["peak_memory_gib"] for m in records if "peak_memory_gib" in m]
    if memory:
        figures["peak_memory_gib"] = max(memory)
    budget = run_dir / "budget.json"
    if budget.is_file():
        figures["budget"] = json.loads(budget.read_text())
    return figures


def blend_figures(blend_dir: Path) -> dict:
    """Whole-dev macro-F1 per task and mean: each member alone, the biased blend cross-fitted."""
    from clue_mtl.tasks import TASK_NAMES

    tasks = json.loads((blend_dir / "blend.json").read_text())["tasks"]
    names = list(tasks[TASK_NAMES[0]]["dev"]["members"])
    figures = {name: {task: tasks[task]["dev"]["members"][name] for task in TASK_NAMES} for name in names}
    figures["biased_blend_cross_fitted"] = {task: tasks[task]["dev"]["biased"]["cross_fitted"] for task in TASK_NAMES}
    for per_task in figures.values():
        per_task["mean"] = sum(per_task[task] for task in TASK_NAMES) / len(TASK_NAMES)
    return figures


def validated_zips(folder: Path, data: Path) -> dict:
    """Each zip read back by the scorer's own reader, its rows counted against the test files'
    (as the kit's own check of them counts them)."""
    from clue_mtl.data.folder import checked_test_files
    from clue_mtl.predict.submission import read_submission
    from clue_mtl.tasks import TASK_NAMES

    zips = {}
    for path in sorted(folder.glob("*.zip")):
        split = "a" if path.stem.endswith("-a") else "b"
        rows = {task: len(frame) for task, frame in read_submission(path).items()}
        checked = checked_test_files(list(TASK_NAMES), split=split, data_dir=data)
        zips[path.name] = {"rows": rows, "validated": rows == {task: file.rows for task, file in checked.items()}}
    return zips


def main_job(args, work: Path, data: Path, encoder: Path, overrides: list[str], timeout: float) -> dict:
    log = work / "main-job.log"
    arguments = ["run", "--config", args.config, "--overwrite", "--run-dir", str(work / "runs" / "gpu"),
                 "--blend-dir", str(work / "blends" / "gpu"), "--out-dir", str(work / "submissions")]
    for override in overrides:
        arguments += ["--set", override]
    started = time.monotonic()
    finished(kit(*arguments, log=log), log, timeout)
    text = log.read_text(errors="replace")
    return {"command": "clue-mtl " + " ".join(arguments), "wall_seconds": round(time.monotonic() - started, 1),
            "baseline_reused": "baseline: using" in text, "training": training_figures(work / "runs" / "gpu"),
            "dev": blend_figures(work / "blends" / "gpu"), "zips": validated_zips(work / "submissions", data)}


def weighting_comparison(args, stages: Stages, work: Path, overrides: list[str]) -> dict:
    """The methods trained side by side on the one device for the same minutes, then each best
    model on the whole dev split; paired bootstrap of each against `equal`."""
    import numpy as np

    from clue_mtl.config import load_run_config
    from clue_mtl.data.folder import dev_frames, load_split_ids
    from clue_mtl.predict.evaluate import evaluate_run
    from clue_mtl.predict.metrics import paired_bootstrap
    from clue_mtl.runs.folder import RunFolder

    runs = {method: work / "runs" / f"weighting-{method}" for method in METHODS}
    children = {}
    for method, run_dir in runs.items():
        arguments = ["train", "--config", args.config, "--overwrite", "--run-dir", str(run_dir),
                     "--set", f"weighting.method={method}", "--set", f"name=weighting-{method}"]
        for override in overrides:
            arguments += ["--set", override]
        # forked in a smoke run: the baseline and the main job have started the kit as processes already
        children[method] = kit(*arguments, log=work / f"weighting-{method}.log", fork=args.smoke)
    try:
        for method, process in children.items():
            finished(process, work / f"weighting-{method}.log", stages.left() - EVALUATION_RESERVE)
    finally:
        for process in children.values():   # one past the deadline: the others stop with it
            if process.poll() is None:
                process.kill()
    predicted, scores = {}, {}
    for method, run_dir in runs.items():
        evaluation = evaluate_run(run_dir, plots=False)
        scores[method] = {task: report["macro_f1"] for task, report in evaluation["reports"].items()}
        scores[method]["mean"] = evaluation["mean_macro_f1"]
        predicted[method] = {task: p.argmax(-1) for task, p in evaluation["probabilities"].items()}
    folder = RunFolder(runs["equal"])
    frames = dev_frames(load_run_config(folder.config_file).data.data_dir, list(predicted["equal"]),
                        load_split_ids(folder.split_file), folder.split_file)
    labels = folder.read_labels()
    gold = {task: (np.array([labels[task].index(label) for label in frame["label"]]), len(labels[task]))
            for task, frame in frames.items()}
    return {"minutes_each": args.compare_minutes, "side_by_side": len(METHODS), "dev": scores,
            "against_equal": {method: paired_bootstrap([(predicted[method], predicted["equal"])], gold)
                              for method in METHODS if method != "equal"},
            "steps": {method: training_figures(run_dir)["steps"] for method, run_dir in runs.items()}}


def cmd_run(args) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"smoke": args.smoke, "stages_seconds": {}, "skipped": {}, "failed": {}, "environment": {}}
    out = Path(args.out) if args.out else None
    stages = Stages(args.deadline, record, lambda: write_record(record, Path(args.results), out, work))
    record["environment"] = stages.run("environment", environment) or {}
    inputs = stages.run("inputs", prepare_inputs, args, work)
    if inputs is None:
        return 1
    data, encoder = inputs
    overrides = [f"data.data_dir={data}", f"model.encoder={encoder}", f"output_dir={work / 'runs'}",
                 *(SMOKE if args.smoke else [])]
    baseline_log = work / "baseline.log"   # on the CPU beside the device tests; the main job refits it if it failed
    baseline = kit("baseline", "--data-dir", str(data), "--run-dir", str(work / "runs" / "baseline"),
                   "--out-dir", str(work / "baseline-submissions"), log=baseline_log)
    record["device_tests"] = stages.run("device tests", device_tests, work, args.device_tests,
                                        min(DEVICE_TESTS_LIMIT, stages.left() / 3)) or {}
    stages.run("baseline (beside the device tests)", finished, baseline, baseline_log, stages.left() / 2)
    # the main job's training shrinks to what the deadline leaves after its evaluation, blend and zips
    minutes = min(args.minutes, (stages.left() - MAIN_JOB_RESERVE) / 60)
    if minutes < MIN_MINUTES:
        record["skipped"]["main_job"] = f"{stages.left() / 60:.1f} minutes left"
    else:
        record["main_job"] = stages.run("main job", main_job, args, work, data, encoder,
                                        [*overrides, f"train.max_minutes={minutes:.3f}"], stages.left())
    needed = args.compare_minutes * 60 + EVALUATION_RESERVE
    if stages.left() < needed:
        record["skipped"]["weighting"] = f"{stages.left() / 60:.1f} minutes left, {needed / 60:.1f} needed"
    else:
        record["weighting"] = stages.run("weighting methods", weighting_comparison, args, stages, work,
                                         [*overrides, f"train.max_minutes={args.compare_minutes}"])
    stages.save()
    print(markdown(record))
    tests_passed = record["device_tests"].get("failures", 1) == record["device_tests"].get("errors", 1) == 0
    return 0 if not record["failed"] and tests_passed else 1


# ----------------------------------------------------------------------------------- results
def write_record(record: dict, results: Path, out: Path | None, work: Path) -> None:
    write_results("gpu_check", record, markdown(record), results, described_machine=record["environment"], echo=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_check.json", "gpu_check.md"):
            shutil.copy(results / name, out / name)
        for log in ("main-job.log", "device-tests.xml"):
            if (work / log).exists():
                shutil.copy(work / log, out / log)


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# GPU check{' (smoke, on the CPU)' if record['smoke'] else ''}", "",
             f"{env.get('gpu') or env.get('cpu')}; {env.get('nvidia_smi', 'no GPU')}; torch {env.get('torch')} (CUDA "
             f"{env.get('cuda')}), transformers {env.get('transformers')}, accelerate {env.get('accelerate')}; "
             f"wall {record.get('wall_seconds', 0):.0f} s", ""]
    if "bf16_matmul_tflops" in env:
        lines += [f"bf16 matmul peak measured: {env['bf16_matmul_tflops']:.0f} TFLOP/s", ""]
    tests = record.get("device_tests")
    if tests is not None:
        lines += [f"Device tests: {tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, "
                  f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped", ""]
        lines += [f"- FAILED {name}: {message}" for name, message in tests.get("failed", {}).items()]
    job = record.get("main_job")
    if job:
        training = job["training"]
        lines += ["", "## Main job", "", f"`{job['command']}`: {job['wall_seconds']:.0f} s in all, "
                  f"{training['steps']} steps, epochs {', '.join(f'{t} {e:.2f}' for t, e in training['epochs'].items())}",
                  "", "| dev macro-F1 (whole split) | ocnli | ocemotion | tnews | mean |", "|---|---|---|---|---|"]
        for name, scores in job["dev"].items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.4f}" for t in ("ocnli", "ocemotion", "tnews", "mean")) + " |")
        speed = [f"{training['samples_per_second']:.0f} rows/s"] if "samples_per_second" in training else []
        if "fraction_of_peak" in training:
            speed.append(f"{training['model_flops_per_second'] / 1e12:.1f} TFLOP/s, {training['fraction_of_peak']:.1%} of peak")
        if "peak_memory_gib" in training:
            speed.append(f"peak memory {training['peak_memory_gib']:.2f} GiB")
        lines += ["", "Training: " + ", ".join(speed), "",
                  "Zips: " + ", ".join(f"{name} {'validated' if z['validated'] else 'NOT VALID'} ({sum(z['rows'].values())} rows)"
                                      for name, z in job["zips"].items())]
    weighting = record.get("weighting")
    if weighting:
        lines += ["", f"## Weighting methods, {weighting['minutes_each']} minutes each, {weighting['side_by_side']} "
                  "side by side on the one device (one seed)", "", "| method | steps | dev mean | minus equal (95% interval) |",
                  "|---|---|---|---|"]
        for method, scores in weighting["dev"].items():
            against = weighting["against_equal"].get(method)
            interval = (f"{against['difference']:+.4f} ({against['low']:+.4f}, {against['high']:+.4f})"
                        if against else "")
            lines.append(f"| {method} | {weighting['steps'][method]} | {scores['mean']:.4f} | {interval} |")
    for what, why in {**record["skipped"], **record["failed"]}.items():
        lines += ["", f"{what}: {why.splitlines()[0] if why else ''}"]
    lines += ["", "Stages (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in record["stages_seconds"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="the carried folder: data tarball and bf16 encoder")
    pack.add_argument("--encoder", default=str(ROOT / "artifacts" / "e5-small-trimmed"))
    pack.add_argument("--data-dir", default=str(ROOT / "data"))
    pack.add_argument("--out", default=str(ROOT / ".gpu"))
    run = commands.add_parser("run", help="the check itself (on the GPU, or --smoke on the CPU)")
    run.add_argument("--smoke", action="store_true", help="tiny encoder, generated data, seconds of training")
    run.add_argument("--config", default=str(ROOT / "configs" / "gpu-e5-small.yaml"), help="the recipe to train")
    run.add_argument("--carry", default=str(ROOT / ".gpu"), help="the folder `pack` wrote")
    run.add_argument("--minutes", type=float, default=4.0, help="the main job's training minutes")
    run.add_argument("--compare-minutes", type=float, default=1.0, help="each weighting method's training minutes")
    run.add_argument("--deadline", type=float, default=8.0, help="minutes from the start after which nothing new starts")
    run.add_argument("--device-tests", help="pytest -k expression to run only some device tests")
    run.add_argument("--work", help="the working folder (default: a new temporary one)")
    run.add_argument("--results", default=str(RESULTS))
    run.add_argument("--out", help="also copy the results and logs here (the device's $OUT)")
    args = parser.parse_args(argv)
    return cmd_pack(args) if args.command == "pack" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
