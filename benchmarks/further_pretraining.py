"""Further pre-training against the same minutes of fine-tuning (issue 16).

Variants of masked-LM pre-training on the competition text (plain; a masked-LM head warm-up with
the encoder frozen; OCNLI's sentences kept as pairs; masked LM as a fourth task during
multi-task training), each fine-tuned with configs/quickstart.yaml at two budgets and two seeds,
against no pre-training at the same steps and against no pre-training given the variant's
pre-training minutes as extra fine-tuning steps.

    python benchmarks/further_pretraining.py speed            # alone: step times, 2 threads
    benchmarks/further_pretraining.sh &                        # two single-thread lanes side by side,
    benchmarks/further_pretraining.sh &                        # each claiming the next job (resumable)
    python benchmarks/further_pretraining.py diagnose         # CKA per layer, frozen OCNLI probe
    python benchmarks/further_pretraining.py report           # the table, bootstrap, figure

Every job is one process; a job's folder holds its result (`result.json`), so a killed lane loses
only its current job, and lanes never take the same job (an exclusive claim file). Lane wall times
are not timings: minutes come from `speed` (timed alone, 2 threads, bf16).

All fine-tuning starts from the trimmed e5-small (the vocabulary the pre-training keeps), so the
only difference between a variant and no pre-training is the encoder's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, ensure_trimmed_encoder, write_results  # noqa: E402

FINETUNE_CONFIG = "configs/quickstart.yaml"
PRETRAIN_CONFIG = "configs/pretrain-e5-small.yaml"
RUNS = ROOT / "runs" / "further_pretraining"
TASKS = ("ocnli", "ocemotion", "tnews")
DEV_ROWS = 2000
SEEDS = (1, 2)
SHORT, LONG = 450, 1500
PRETRAIN_STEPS = 500
SPEED_FILE = RESULTS / "further_pretraining_speed.json"

# pre-training variants: overrides of configs/pretrain-e5-small.yaml (None: no pre-training)
WARMUP = ["train.head_warmup_steps=300", "train.head_warmup_eval_every=50", "train.head_warmup_min_gain=0.05",
          "train.head_warmup_lr=1e-3", "train.lr=5e-5"]
PRETRAINING: dict[str, list[str] | None] = {
    "none": None,
    "mlm": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100"],
    "head warm-up, lr 5e-5": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100", *WARMUP],
    "head warm-up, lr 5e-5, pairs": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100", *WARMUP,
                                     "data.pairs=true"],
}
FINETUNED = ("none", "head warm-up, lr 5e-5")  # the pre-trainings fine-tuned (the others: diagnosis only)
# fine-tuning variants that change the fine-tuning itself (no pre-training)
FINETUNING: dict[str, list[str]] = {
    "auxiliary MLM (8 texts a step, annealed)": ["auxiliary_mlm.batch_size=8", "auxiliary_mlm.anneal=linear"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# ----------------------------------------------------------------------------- jobs
def jobs() -> list[dict]:
    """Every job, in the order lanes take them: the baselines; the head warm-up's pre-training and
    the auxiliary task (no pre-training) side by side; their fine-tunings; the diagnosis-only
    pre-trainings; the frozen probes."""
    out = [finetune_job("none", SHORT, seed) for seed in SEEDS]
    out.append(pretrain_job(FINETUNED[1]))
    if SPEED_FILE.exists():  # the fine-tuning variants train the steps their speed buys in the baseline's time
        speed = json.loads(SPEED_FILE.read_text())["figures"]["finetune"]
        for name in FINETUNING:
            steps = round(SHORT * min(1.0, speed[name]["samples_per_second"] / speed["none"]["samples_per_second"]))
            out += [finetune_job(name, steps, seed) for seed in SEEDS]
    out += [finetune_job(FINETUNED[1], SHORT, seed) for seed in SEEDS]
    out += [pretrain_job(name) for name, overrides in PRETRAINING.items()
            if overrides is not None and name not in FINETUNED]
    out += [probe_job(name) for name in PRETRAINING]
    return out


def pretrain_job(name: str) -> dict:
    return {"kind": "pretrain", "name": name, "dir": RUNS / f"pretrain-{slug(name)}"}


def probe_job(name: str) -> dict:
    return {"kind": "probe", "name": name, "dir": RUNS / f"probe-{slug(name)}"}


def finetune_job(name: str, steps: int, seed: int, *, label: str | None = None) -> dict:
    label = label or name
    return {"kind": "finetune", "name": name, "label": label, "steps": steps, "seed": seed,
            "dir": RUNS / f"{slug(label)}-{steps}-s{seed}"}


def encoder_for(name: str) -> Path | None:
    """The encoder a fine-tuning variant starts from; None while its pre-training is not done."""
    if PRETRAINING.get(name) is None:
        return ensure_trimmed_encoder()
    encoder = RUNS / f"pretrain-{slug(name)}" / "encoder"
    return encoder if (encoder / "pretraining.json").exists() else None


def claim(job: dict) -> bool:
    job["dir"].parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(job["dir"].with_name(job["dir"].name + ".claim"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


SNAPSHOTS = (25, 50, 100, 200, 300, 400)  # pre-training steps at which the layers are compared with the start
CKA_TEXTS = 512


def run_pretrain(job: dict) -> None:
    """The pre-training, in this process, stopping at each snapshot step to compare every layer's
    pooled states on held-out texts with the starting encoder's (linear CKA)."""
    from clue_mtl.config import load_pretrain_config
    from clue_mtl.pretrain import Pretrainer
    from clue_mtl.probe import layer_cka, layer_vectors

    overrides = ["train.num_threads=1", f"name={job['dir'].name}", *PRETRAINING[job["name"]]]
    config = load_pretrain_config(ROOT / PRETRAIN_CONFIG, [f"data.data_dir={ROOT / 'data'}", *overrides])
    started = time.perf_counter()
    pretrainer = Pretrainer(config, job["dir"], overwrite=True, cache_dir=ROOT / "artifacts" / "cache")
    texts = pretrainer.held_out_texts[:CKA_TEXTS]

    def vectors():
        return layer_vectors(pretrainer.masked_lm.base_model, pretrainer.tokenizer, texts, max_length=96)

    start, trajectory = vectors(), []
    for until in [s for s in SNAPSHOTS if s < config.train.steps] + [config.train.steps]:
        pretrainer.train(until_step=until)
        pretrainer.resume = True
        trajectory.append({"step": until, "cka": layer_cka(start, vectors())})
        print(f"step {until}: CKA with the start by layer {[round(c, 3) for c in trajectory[-1]['cka']]}", flush=True)
    record = {"lane_seconds": time.perf_counter() - started, "overrides": overrides, "trajectory": trajectory,
              "history": pretrainer.state.history, "encoder_unfrozen_at": pretrainer.state.encoder_unfrozen_at}
    (job["dir"] / "result.json").write_text(json.dumps(record) + "\n")


PROBE_TRAIN_ROWS = 4000


def run_probe(job: dict, encoder_path: Path) -> None:
    """OCNLI macro-F1 of a logistic regression on each frozen layer's pooled `tokenizer(a, b)`
    states: 4,000 training rows, the fine-tuning runs' 2,000 dev rows."""
    from clue_mtl.config import load_config
    from clue_mtl.data import task_frames
    from clue_mtl.encoders import load_encoder
    from clue_mtl.probe import layer_vectors, probe_scores
    from clue_mtl.tasks import get_task

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    config = load_config(ROOT / FINETUNE_CONFIG, [f"data.data_dir={ROOT / 'data'}", f"data.max_dev_rows={DEV_ROWS}",
                                                  f"data.max_train_rows={PROBE_TRAIN_ROWS}"])
    frames = task_frames(config.data, "ocnli")
    encoder, tokenizer = load_encoder(str(encoder_path))
    labels = {label: i for i, label in enumerate(get_task("ocnli").labels)}
    vectors = {part: layer_vectors(encoder, tokenizer, list(zip(frame["text_a"], frame["text_b"])),
                                   max_length=config.data.max_length, show_progress=True)
               for part, frame in (("train", frames.train), ("dev", frames.dev))}
    scores = probe_scores(vectors["train"], frames.train["label"].map(labels).tolist(),
                          vectors["dev"], frames.dev["label"].map(labels).tolist())
    record = {"name": job["name"], "encoder": str(encoder_path), "probe_macro_f1": scores,
              "train_rows": len(frames.train), "dev_rows": len(frames.dev), "lane_seconds": time.perf_counter() - started}
    job["dir"].mkdir(parents=True, exist_ok=True)
    (job["dir"] / "result.json").write_text(json.dumps(record) + "\n")
    print(f"probe {job['name']}: OCNLI macro-F1 by layer {[round(x, 3) for x in scores]}", flush=True)


def run_finetune(job: dict, encoder: Path) -> None:
    directory = job["dir"]
    overrides = [*FINETUNING.get(job["name"], []), f"model.encoder={encoder}", f"train.seed={job['seed']}",
                 f"train.steps={job['steps']}", f"train.eval_every={job['steps']}", f"data.max_dev_rows={DEV_ROWS}",
                 "train.num_threads=1", f"name={directory.name}"]
    command = [sys.executable, "-m", "clue_mtl", "train", "--config", FINETUNE_CONFIG, "--run-dir", str(directory),
               "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started

    from clue_mtl.inference import LoadedRun

    run = LoadedRun(directory, show_progress=False)
    predicted = {task: run.probabilities(task, frame).argmax(-1).tolist() for task, frame in dev_frames().items()}
    record = {"name": job["name"], "label": job["label"], "seed": job["seed"], "steps": job["steps"],
              "lane_seconds": seconds, "predicted": predicted, "command": " ".join(command)}
    (directory / "result.json").write_text(json.dumps(record) + "\n")


def cmd_next(args) -> None:
    """Claim and run one job; exit 3 once none is left. A job waiting on a pre-training that
    another lane runs is taken once that is done. One job a process, so that a lane started as
    `while python benchmarks/further_pretraining.py next; do :; done` picks up new jobs."""
    while True:
        pending = [job for job in jobs() if not (job["dir"] / "result.json").exists()]
        ready = [job for job in pending if job["kind"] == "pretrain" or encoder_for(job["name"]) is not None]
        started = next((job for job in ready if claim(job)), None)
        if started is None:
            if not any(not job["dir"].with_name(job["dir"].name + ".claim").exists() for job in pending):
                sys.exit(3)
            time.sleep(30)  # a job waits on a pre-training in the other lane
            continue
        print(f"lane {os.getpid()}: {started['kind']} {started['dir'].name}", flush=True)
        if started["kind"] == "pretrain":
            run_pretrain(started)
        elif started["kind"] == "probe":
            run_probe(started, encoder_for(started["name"]))
        else:
            run_finetune(started, encoder_for(started["name"]))
        return


# ----------------------------------------------------------------------------- speed
def finetune_overrides(extra: list[str]) -> list[str]:
    from clue_mtl.config import load_config

    quickstart = load_config(ROOT / FINETUNE_CONFIG)
    return [f"data.data_dir={ROOT / 'data'}", f"model.encoder={ensure_trimmed_encoder()}",
            f"data.max_length={quickstart.data.max_length}", f"train.batch_size={quickstart.train.batch_size}",
            "model.freeze_word_embeddings=true", f"train.mixed_precision={quickstart.train.mixed_precision}",
            "model.heads={ocnli: {type: attention}, ocemotion: {type: attention}, tnews: {type: attention}}",
            "train.eval_every=1000000", "data.max_train_rows=4000", *extra]


def time_pretraining(overrides: list[str], steps: int, warmup: int, frozen: bool) -> dict:
    """Seconds a pre-training step (encoder frozen or not) and a held-out evaluation take here."""
    import tempfile

    from tqdm.auto import tqdm

    from clue_mtl.config import load_pretrain_config
    from clue_mtl.pretrain import Pretrainer

    config = load_pretrain_config(ROOT / PRETRAIN_CONFIG, [
        f"data.data_dir={ROOT / 'data'}", f"model.encoder={ensure_trimmed_encoder()}", "model.trim_vocab=false",
        "train.log_every=1000000", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        pretrainer = Pretrainer(config, run_dir, show_progress=False, cache_dir=ROOT / "artifacts" / "cache")
        pretrainer._progress = tqdm(disable=True)
        pretrainer._start_or_resume()
        pretrainer.state.encoder_frozen = frozen
        for _ in range(warmup):
            pretrainer._optimizer_step()
        started = time.perf_counter()
        for _ in range(steps):
            pretrainer._optimizer_step()
        step_seconds = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        pretrainer.evaluate()
        return {"step_seconds": step_seconds, "eval_seconds": time.perf_counter() - started}


def cmd_speed(args) -> None:
    """Alone, 2 threads: fine-tuning rows/s of the baseline and each fine-tuning variant; seconds a
    pre-training step takes (plain, encoder frozen, pairs) and a held-out evaluation."""
    from common import machine, time_training_steps

    figures = {"finetune": {}, "pretrain": {}}
    for name, extra in {"none": [], **FINETUNING}.items():
        result = time_training_steps(finetune_overrides(extra), args.steps, args.warmup)
        figures["finetune"][name] = {"samples_per_second": result["samples_per_second"],
                                     "step_seconds": result["step_seconds"], "precision": result["precision"]}
        print(name, figures["finetune"][name], flush=True)
    for name, (overrides, frozen) in {"plain": ([], False), "encoder frozen": ([], True),
                                      "pairs": (["data.pairs=true"], False)}.items():
        figures["pretrain"][name] = time_pretraining(overrides, args.steps, args.warmup, frozen)
        print(name, figures["pretrain"][name], flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "figures": figures}
    SPEED_FILE.write_text(json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- scoring
def dev_frames() -> dict:
    from clue_mtl.config import load_config
    from clue_mtl.data import task_frames

    config = load_config(ROOT / FINETUNE_CONFIG, [f"data.data_dir={ROOT / 'data'}", f"data.max_dev_rows={DEV_ROWS}"])
    return {task: task_frames(config.data, task).dev for task in TASKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("next").set_defaults(run=cmd_next)
    speed = commands.add_parser("speed")
    speed.add_argument("--steps", type=int, default=15)
    speed.add_argument("--warmup", type=int, default=3)
    speed.set_defaults(run=cmd_speed)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
