"""Further pre-training against the same minutes of fine-tuning (issue 16).

Variants of masked-LM pre-training on the competition text (plain; a masked-LM head warm-up with
the encoder frozen; OCNLI's sentences kept as pairs; masked LM as a fourth task during
multi-task training), each fine-tuned with configs/quickstart.yaml at two budgets and two seeds,
against no pre-training at the same steps and against no pre-training given the variant's
pre-training minutes as extra fine-tuning steps.

    python -m benchmarks.further_pretraining speed            # alone: step times, 2 threads
    benchmarks/further_pretraining.sh &                        # two single-thread lanes side by side,
    benchmarks/further_pretraining.sh &                        # each claiming the next job (resumable;
                                                               # `--only m3e|diagnosis|auxiliary|variants`: a share)
    #   (the lanes also run the diagnosis: CKA per layer at snapshot steps, frozen OCNLI probes)
    python -m benchmarks.further_pretraining report           # the table, bootstrap, figure
    python -m benchmarks.further_pretraining --smoke speed --steps 2 --warmup 0   # the suite: tiny encoder

Every job is one process; a job's folder holds its result (`result.json`), so a killed lane loses
only its current job, and lanes never take the same job (an exclusive claim file). Lane wall times
are not timings: minutes come from `speed` (timed alone, 2 threads, bf16). Run folders are not
committed, so `report` carries the committed rows it cannot rebuild, marked `†`
(`--drop-missing` writes without them).

All fine-tuning starts from the trimmed e5-small (the vocabulary the pre-training keeps), so the
only difference between a variant and no pre-training is the encoder's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (RESULTS, ROOT, command_line, ensure_trimmed_encoder, equal_time_steps,
                               parse_arguments, smoke_inputs, train_and_predict, write_results, write_whole)
from clue_mtl.tasks import TASK_NAMES as TASKS

FINETUNE_CONFIG = "configs/quickstart.yaml"
PRETRAIN_CONFIG = "configs/pretrain-e5-small.yaml"
# m3e-small (a 4-layer Chinese BERT): its variants' names start with M3E and use its own configs
M3E = "m3e-small: "
M3E_FINETUNE_CONFIG = "configs/quickstart-m3e.yaml"
M3E_PRETRAIN_CONFIG = "configs/pretrain-m3e-small.yaml"
M3E_SHORT = 591  # quickstart-m3e's steps: the e5 quickstart's training time (encoder_choice.md)
RUNS = ROOT / "runs" / "further_pretraining"
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
    f"{M3E}none": None,
    f"{M3E}head warm-up, lr 5e-5": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100", *WARMUP],
    # the head warm-up with one setting changed: the encoder's rate, its lower layers' rates, masking
    "head warm-up, lr 2e-5": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100", *WARMUP, "train.lr=2e-5"],
    "head warm-up, lr 5e-5, layer decay 0.8": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100", *WARMUP,
                                               "train.layer_lr_decay=0.8"],
    "head warm-up, lr 5e-5, masking 0.30": [f"train.steps={PRETRAIN_STEPS}", "train.eval_every=100", *WARMUP,
                                            "masking.mlm_probability=0.3"],
}
FINETUNED = ("none", "head warm-up, lr 5e-5")  # the pre-trainings fine-tuned (the others: diagnosis only)
# fine-tuned at the short budget only, against no pre-training and against equal minutes; their
# equal-minute runs are named by their steps, so variants whose pre-training took the same
# minutes share them
SHORT_ONLY = ("head warm-up, lr 2e-5", "head warm-up, lr 5e-5, layer decay 0.8", "head warm-up, lr 5e-5, masking 0.30")
# fine-tuning variants that change the fine-tuning itself (no pre-training)
FINETUNING: dict[str, list[str]] = {
    "auxiliary MLM (8 texts a step, annealed)": ["auxiliary_mlm.batch_size=8", "auxiliary_mlm.anneal=linear"],
}


def is_m3e(name: str) -> bool:
    return name.startswith(M3E)


def finetune_config(name: str) -> str:
    return M3E_FINETUNE_CONFIG if is_m3e(name) else FINETUNE_CONFIG


def baseline_label(name: str) -> str:
    """The variant without pre-training that `name` is compared with."""
    return f"{M3E}none" if is_m3e(name) else "none"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# ----------------------------------------------------------------------------- jobs
def jobs() -> list[dict]:
    """Every job, in the order lanes take them: the longer budget first (no pre-training, the head
    warm-up's pre-training and fine-tuning, then no pre-training given the warm-up's minutes as
    extra steps), the frozen probes of both encoders, the same comparison at the short budget,
    m3e-small's, the auxiliary task at equal time, and the rest of the diagnosis (plain
    pre-training, pairs). A job whose steps depend on a result
    not there yet (equal minutes, equal time) joins the list once it is."""
    speed = json.loads(SPEED_FILE.read_text())["figures"] if SPEED_FILE.exists() else None
    out = [finetune_job("none", LONG, SEEDS[0]), pretrain_job(FINETUNED[1]), finetune_job(FINETUNED[1], LONG, SEEDS[0])]
    out += [finetune_job(name, LONG, seed) for seed in SEEDS[1:] for name in FINETUNED]
    out += equal_minute_jobs(FINETUNED[1], LONG, speed)
    out += [probe_job(name) for name in FINETUNED]
    out += [finetune_job(name, SHORT, seed) for seed in SEEDS for name in FINETUNED]
    out += equal_minute_jobs(FINETUNED[1], SHORT, speed)
    if speed is not None and f"{M3E}none" in speed["finetune"]:  # m3e-small's step, timed by `speed`
        m3e = (f"{M3E}none", f"{M3E}{FINETUNED[1]}")
        out += [finetune_job(m3e[0], M3E_SHORT, SEEDS[0]), pretrain_job(m3e[1])]
        out += [finetune_job(name, M3E_SHORT, seed) for seed in SEEDS for name in m3e
                if (name, seed) != (m3e[0], SEEDS[0])]
        out += equal_minute_jobs(m3e[1], M3E_SHORT, speed)
        out.append(probe_job(m3e[0]))  # the frozen probe of m3e-small as it ships, beside its warm-up's
    if speed is not None:  # the fine-tuning variants train the steps their speed buys in the baseline's time
        finetune = speed["finetune"]
        for name in FINETUNING:
            steps = min(SHORT, equal_time_steps(SHORT, 1 / finetune["none"]["samples_per_second"],
                                                1 / finetune[name]["samples_per_second"]))
            out += [finetune_job(name, steps, seed, budget=SHORT) for seed in SEEDS]
    out.append(pretrain_job("mlm"))
    out.append(probe_job("mlm"))
    out += [pretrain_job(name) for name, overrides in PRETRAINING.items()
            if overrides is not None and name not in (*FINETUNED, "mlm", *SHORT_ONLY) and not is_m3e(name)]
    out += [probe_job(name) for name in PRETRAINING if PRETRAINING[name] is not None
            and name not in (*FINETUNED, "mlm", *SHORT_ONLY)]
    for name in SHORT_ONLY:
        out += [pretrain_job(name), probe_job(name), *(finetune_job(name, SHORT, seed) for seed in SEEDS)]
        out += [job for job in equal_minute_jobs(name, SHORT, speed) if job["dir"] not in {j["dir"] for j in out}]
    return out


# The fine-tuning settings the study's finished runs and step times were taken with, before the
# kit's defaults moved (#13): torch's attention kernel, one encoder pass per task.
AS_THE_STUDY_RAN = ["train.attention_kernel=torch", "train.encoder_pass=per_task"]

# `next --only`: a share of the jobs for a session that cannot afford the list in order
ONLY = {
    "m3e": lambda job: is_m3e(job["name"]),
    # the pre-trainings that are diagnosed but not fine-tuned (plain masked LM, pairs), and their probes
    "diagnosis": lambda job: job["kind"] in ("pretrain", "probe") and job["name"] not in (*FINETUNED, *SHORT_ONLY)
    and not is_m3e(job["name"]),
    # the auxiliary masked-LM task at equal time, and the no-pre-training runs it is compared with
    "auxiliary": lambda job: job["kind"] == "finetune" and job["budget"] == SHORT and (
        job["name"] in FINETUNING or (job["label"] == "none" and job["steps"] == SHORT)),
    # the head warm-up's one-setting variants (SHORT_ONLY), their probes and equal-minute runs
    "variants": lambda job: job["name"] in SHORT_ONLY or job.get("label", "").endswith(SHARED_EQUAL_MINUTES),
}


def equal_minute_jobs(name: str, budget: int, speed: dict | None) -> list[dict]:
    """No pre-training, fine-tuned for `budget` steps plus the steps that pre-training `name`'s
    minutes buy at the baseline's step time: the honest alternative to pre-training."""
    record = RUNS / f"pretrain-{slug(name)}" / "result.json"
    if speed is None or not record.exists():
        return []
    baseline = baseline_label(name)
    minutes = pretraining_minutes(name, json.loads(record.read_text()), speed["pretrain"])
    steps = equal_minute_steps(name, budget, minutes, speed)
    return [finetune_job(baseline, steps, seed, label=equal_minutes_label(name, steps), budget=budget) for seed in SEEDS]


def equal_minute_steps(name: str, budget: int, minutes: float, speed: dict) -> int:
    """`budget` plus the fine-tuning steps that `minutes` of pre-training buy at the baseline's step time."""
    return budget + round(minutes * 60 / speed["finetune"][baseline_label(name)]["step_seconds"])


SHARED_EQUAL_MINUTES = "steps, a pre-training's minutes"


def equal_minutes_label(name: str, steps: int) -> str:
    if name in SHORT_ONLY:
        return f"{baseline_label(name)}, {steps} {SHARED_EQUAL_MINUTES}"
    return f"{baseline_label(name)}, {name.removeprefix(M3E)}'s minutes as steps"


def pretrain_job(name: str) -> dict:
    return {"kind": "pretrain", "name": name, "dir": RUNS / f"pretrain-{slug(name)}"}


def probe_job(name: str) -> dict:
    return {"kind": "probe", "name": name, "dir": RUNS / f"probe-{slug(name)}"}


def finetune_job(name: str, steps: int, seed: int, *, label: str | None = None, budget: int | None = None) -> dict:
    """`budget`: the steps of the baseline this run is compared with (its own steps unless it
    trains an equal-time or equal-minute count)."""
    label = label or name
    return {"kind": "finetune", "name": name, "label": label, "steps": steps, "seed": seed, "budget": budget or steps,
            "dir": RUNS / f"{slug(label)}-{steps}-s{seed}"}


def encoder_for(name: str) -> Path | None:
    """The encoder a fine-tuning variant starts from; None while its pre-training is not done."""
    if PRETRAINING.get(name) is None:
        return m3e_encoder() if is_m3e(name) else ensure_trimmed_encoder()
    encoder = RUNS / f"pretrain-{slug(name)}" / "encoder"
    return encoder if (encoder / "pretraining.json").exists() else None


def m3e_encoder() -> Path:
    from clue_mtl.model.encoders import ensure_encoder

    return Path(ensure_encoder(ROOT / "artifacts" / "m3e-small"))


def write_result(directory: Path, record: dict) -> None:
    """`result.json`, the mark of a finished job, written whole (a killed job leaves none)."""
    write_whole(directory / "result.json", json.dumps(record) + "\n")


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
    from clue_mtl.recipes.pretrain import Pretrainer
    from clue_mtl.recipes.probe import layer_cka, layer_vectors

    overrides = ["train.num_threads=1", f"name={job['dir'].name}", *PRETRAINING[job["name"]]]
    config = load_pretrain_config(ROOT / (M3E_PRETRAIN_CONFIG if is_m3e(job["name"]) else PRETRAIN_CONFIG),
                                  [f"data.data_dir={ROOT / 'data'}", *overrides])
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
    write_result(job["dir"], record)


PROBE_TRAIN_ROWS = 4000


def run_probe(job: dict, encoder_path: Path) -> None:
    """OCNLI macro-F1 of a logistic regression on each frozen layer's pooled `tokenizer(a, b)`
    states: 4,000 training rows, the fine-tuning runs' 2,000 dev rows."""
    from clue_mtl.config import load_config
    from clue_mtl.data.folder import task_frames
    from clue_mtl.model.encoders import load_encoder
    from clue_mtl.recipes.probe import layer_vectors, probe_scores
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
    write_result(job["dir"], record)
    print(f"probe {job['name']}: OCNLI macro-F1 by layer {[round(x, 3) for x in scores]}", flush=True)


def run_finetune(job: dict, encoder: Path) -> None:
    directory = job["dir"]
    overrides = [*FINETUNING.get(job["name"], []), f"model.encoder={encoder}", f"train.seed={job['seed']}",
                 f"train.steps={job['steps']}", f"train.eval_every={job['steps']}", f"data.max_dev_rows={DEV_ROWS}",
                 "train.num_threads=1", f"name={directory.name}", *AS_THE_STUDY_RAN]
    record = {"name": job["name"], "label": job["label"], "seed": job["seed"], "steps": job["steps"],
              "budget": job["budget"],
              **train_and_predict(finetune_config(job["name"]), directory, overrides, dev_frames())}
    write_result(directory, record)


def cmd_next(args) -> None:
    """Claim and run one job; exit 3 once none is left. A job waiting on a pre-training that
    another lane runs is taken once that is done. One job a process, so that a lane started as
    `while python -m benchmarks.further_pretraining next; do :; done` picks up new jobs."""
    while True:
        pending = [job for job in jobs() if not (job["dir"] / "result.json").exists()
                   and (args.only is None or ONLY[args.only](job))]
        ready = [job for job in pending if job["kind"] == "pretrain" or encoder_for(job["name"]) is not None]
        started = next((job for job in ready if claim(job)), None)
        if started is None:
            if not any(not job["dir"].with_name(job["dir"].name + ".claim").exists() for job in pending):
                if args.only == "m3e" and not any(is_m3e(job["name"]) for job in jobs()):
                    print("no m3e-small jobs: time its steps first (`speed --only m3e`)", file=sys.stderr)
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
def finetune_overrides(name: str, extra: list[str]) -> list[str]:
    """The fine-tuning config of `name` as overrides of the defaults (for `time_training_steps`)."""
    from clue_mtl.config import load_config

    quickstart = load_config(ROOT / finetune_config(name))
    encoder = speed_encoder(name)
    return [f"data.data_dir={ROOT / 'data'}", f"model.encoder={encoder}",
            f"data.max_length={quickstart.data.max_length}", f"train.batch_size={quickstart.train.batch_size}",
            f"model.freeze_word_embeddings={str(quickstart.model.freeze_word_embeddings).lower()}",
            f"train.mixed_precision={quickstart.train.mixed_precision}",
            "model.heads={ocnli: {type: attention}, ocemotion: {type: attention}, tnews: {type: attention}}",
            "train.eval_every=1000000", "data.max_train_rows=4000", *AS_THE_STUDY_RAN, *extra]


def speed_encoder(name: str) -> Path:
    """The encoder `speed` times for variant `name`: m3e-small or e5-small-trimmed, or in a smoke
    run the tiny one."""
    inputs = smoke_inputs()
    if inputs is not None:
        return inputs["encoder"]
    return m3e_encoder() if is_m3e(name) else ensure_trimmed_encoder()


def time_pretraining(config_path: str, encoder: Path, overrides: list[str], steps: int, warmup: int,
                     frozen: bool) -> dict:
    """Seconds a pre-training step (encoder frozen or not) and a held-out evaluation take here."""
    import tempfile

    from clue_mtl.config import load_pretrain_config
    from clue_mtl.recipes.pretrain import Pretrainer

    inputs = smoke_inputs()
    smoke = [] if inputs is None else [f"data.data_dir={inputs['data']}", "data.max_length=32", "data.max_texts=300",
                                       "train.batch_size=9", "train.eval_batch_size=32"]
    config = load_pretrain_config(ROOT / config_path, [
        f"data.data_dir={ROOT / 'data'}", f"model.encoder={encoder}", "model.trim_vocab=false",
        "train.log_every=1000000", *overrides, *smoke])
    with tempfile.TemporaryDirectory() as run_dir:
        pretrainer = Pretrainer(config, run_dir, show_progress=False, cache_dir=ROOT / "artifacts" / "cache")
        pretrainer.state.encoder_frozen = frozen
        for _ in range(warmup):
            pretrainer.train_step()
        started = time.perf_counter()
        for _ in range(steps):
            pretrainer.train_step()
        step_seconds = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        pretrainer.evaluate()
        return {"step_seconds": step_seconds, "eval_seconds": time.perf_counter() - started}


def cmd_speed(args) -> None:
    """Alone, 2 threads: fine-tuning rows/s of the baselines (e5-small, m3e-small) and each
    fine-tuning variant; seconds a pre-training step takes (plain, encoder frozen, pairs; m3e-small
    plain and frozen) and a held-out evaluation. `--only m3e` retimes m3e-small alone and keeps
    the rest of the file."""
    from benchmarks.common import machine, time_training_steps

    figures, commands = {"finetune": {}, "pretrain": {}}, []
    if args.only == "m3e":
        kept = json.loads(SPEED_FILE.read_text())
        figures, commands = kept["figures"], kept["command"].split(" && ")
    finetune = {} if args.only == "m3e" else {"none": [], **FINETUNING}
    for name, extra in {**finetune, f"{M3E}none": []}.items():
        result = time_training_steps(finetune_overrides(name, extra), args.steps, args.warmup)
        figures["finetune"][name] = {"samples_per_second": result["samples_per_second"],
                                     "step_seconds": result["step_seconds"], "precision": result["precision"]}
        print(name, figures["finetune"][name], flush=True)
    e5 = (PRETRAIN_CONFIG, speed_encoder("plain"))
    m3e = (M3E_PRETRAIN_CONFIG, speed_encoder(f"{M3E}plain"))
    pretrainings = {} if args.only == "m3e" else {"plain": (*e5, [], False), "encoder frozen": (*e5, [], True),
                                                   "pairs": (*e5, ["data.pairs=true"], False)}
    pretrainings |= {f"{M3E}plain": (*m3e, [], False), f"{M3E}encoder frozen": (*m3e, [], True)}
    for name, (config_path, encoder, overrides, frozen) in pretrainings.items():
        figures["pretrain"][name] = time_pretraining(config_path, encoder, overrides, args.steps, args.warmup, frozen)
        print(name, figures["pretrain"][name], flush=True)
    command = " && ".join([*commands, command_line()])
    record = {"command": command, "machine": machine(), "figures": figures}
    write_whole(SPEED_FILE, json.dumps(record, indent=2) + "\n")  # jobs() reads it: never half-written


# ----------------------------------------------------------------------------- scoring
def dev_frames() -> dict:
    from clue_mtl.config import load_config
    from clue_mtl.data.folder import task_frames

    config = load_config(ROOT / FINETUNE_CONFIG, [f"data.data_dir={ROOT / 'data'}", f"data.max_dev_rows={DEV_ROWS}"])
    return {task: task_frames(config.data, task).dev for task in TASKS}


def pretraining_minutes(name: str, record: dict, speed: dict) -> float:
    """Minutes the pre-training takes alone on 2 threads: its steps at the measured step time
    (frozen steps at the frozen rate), plus the head warm-up's held-out looks (the method needs
    them; the other evaluations only monitor)."""
    steps = next(int(o.split("=")[1]) for o in PRETRAINING[name] if o.startswith("train.steps="))
    prefix = M3E if is_m3e(name) else ""
    kind = prefix + ("pairs" if "data.pairs=true" in PRETRAINING[name] else "plain")
    frozen = record.get("encoder_unfrozen_at") or 0
    looks = sum(1 for e in record["history"] if e.get("phase") == "head warm-up")
    seconds = (frozen * speed[f"{prefix}encoder frozen"]["step_seconds"]
               + (steps - frozen) * speed[kind]["step_seconds"] + looks * speed[kind]["eval_seconds"])
    return seconds / 60


def cmd_report(args) -> None:
    from clue_mtl.predict.metrics import paired_bootstrap
    from benchmarks.structures import task_f1

    from clue_mtl.tasks import get_task

    speed = json.loads(SPEED_FILE.read_text())
    gold = {}
    for task, frame in dev_frames().items():
        labels = list(get_task(task).labels)
        index = {label: i for i, label in enumerate(labels)}
        gold[task] = (np.asarray([index[label] for label in frame["label"]]), len(labels))
    results = {path.parent.name: json.loads(path.read_text()) for path in RUNS.glob("*/result.json")}
    runs: dict[tuple[str, int], dict[int, dict]] = {}  # (label, budget) -> seed -> record
    for record in results.values():
        if "predicted" in record:
            runs.setdefault((record["label"], record["budget"]), {})[record["seed"]] = record
    step_seconds = {name: entry["step_seconds"] for name, entry in speed["figures"]["finetune"].items()}
    figures = {"speed": speed, "finetune": {}, "pretrain": {}, "probe": {}}
    # by budget; no pre-training first, then its equal-minute runs, then the variants
    for (label, budget), by_seed in sorted(runs.items(), key=lambda item: row_order(*item[0])):
        by_seed = dict(sorted(by_seed.items()))
        steps = next(iter(by_seed.values()))["steps"]
        scores = {seed: {t: task_f1(gold[t][0], np.asarray(r["predicted"][t]), gold[t][1]) for t in TASKS}
                  for seed, r in by_seed.items()}
        entry = {"label": label, "steps": steps, "budget": budget, "seeds": sorted(by_seed),
                 "macro_f1": {t: statistics.mean(s[t] for s in scores.values()) for t in TASKS},
                 "per_seed_mean": {seed: statistics.mean(s.values()) for seed, s in scores.items()},
                 "finetune_minutes": steps * step_seconds.get(label, step_seconds[baseline_label(label)]) / 60}
        entry["mean"] = statistics.mean(entry["macro_f1"].values())
        pretrained = results.get(f"pretrain-{slug(label)}")
        entry["pretrain_minutes"] = (pretraining_minutes(label, pretrained, speed["figures"]["pretrain"])
                                     if pretrained else 0.0)
        equal_steps = equal_minute_steps(label, budget, entry["pretrain_minutes"], speed["figures"])
        for key, other_label in (("vs_none", baseline_label(label)),
                                 ("vs_equal_minutes", equal_minutes_label(label, equal_steps))):
            other = runs.get((other_label, budget), {}) if other_label != label else {}
            pairs = [(r["predicted"], other[seed]["predicted"]) for seed, r in by_seed.items() if seed in other]
            if pairs:
                entry[key] = paired_bootstrap(pairs, gold)
        figures["finetune"][f"{label} @ {steps}"] = entry
    for name in PRETRAINING:
        record = results.get(f"pretrain-{slug(name)}")
        if record:
            final = record["history"][-1]
            figures["pretrain"][name] = {
                "minutes": pretraining_minutes(name, record, speed["figures"]["pretrain"]),
                "held_out_loss": final["loss"], "held_out_accuracy": final["accuracy"],
                "start_loss": record["history"][0]["loss"], "encoder_unfrozen_at": record["encoder_unfrozen_at"],
                "trajectory": record["trajectory"], "history": record["history"], "overrides": record["overrides"]}
        probe = results.get(f"probe-{slug(name)}")
        if probe:
            figures["probe"][name] = probe["probe_macro_f1"]
    figures["carried"] = {part: [] for part in ("finetune", "pretrain", "probe")}
    if not args.drop_missing:
        figures["carried"] = carry_committed_rows(figures)
        count = sum(map(len, figures["carried"].values()))
        if count:
            print(f"{count} rows carried from the committed report (their runs are not under {RUNS})")
    write_results("further_pretraining", figures, summarise(figures))
    plot(figures, RESULTS / "further_pretraining.png")


def row_order(label: str, budget: int) -> tuple:
    """e5-small before m3e-small, by budget; in each, no pre-training, its equal-minute runs, the rest."""
    baseline = baseline_label(label)
    return is_m3e(label), budget, label != baseline, not label.startswith(baseline), label


def carry_committed_rows(figures: dict) -> dict[str, list[str]]:
    """Copy into `figures` the committed report's rows that it lacks; the keys carried, by table.
    Results live in run folders, which are not committed: without this, a report on a fresh
    machine would drop every row measured elsewhere. A carried row keeps the figures and intervals
    measured there (a new row can only be bootstrapped against runs whose predictions are here); a
    row rebuilt here replaces it, also where its equal-minute steps came out different."""
    record = RESULTS / "further_pretraining.json"
    committed = json.loads(record.read_text())["figures"] if record.exists() else {}
    carried: dict[str, list[str]] = {part: [] for part in ("finetune", "pretrain", "probe")}
    rebuilt = {(e["label"], e["budget"]) for e in figures["finetune"].values()}
    for key, entry in committed.get("finetune", {}).items():
        if key not in figures["finetune"] and (entry["label"], entry["budget"]) not in rebuilt:
            figures["finetune"][key] = {k: v for k, v in entry.items() if k != "carried"}
            carried["finetune"].append(key)
    figures["finetune"] = dict(sorted(figures["finetune"].items(),
                                      key=lambda item: row_order(item[1]["label"], item[1]["budget"])))
    for part in ("pretrain", "probe"):  # only names this script still knows (their colours, their rows)
        for name, entry in committed.get(part, {}).items():
            if name not in figures[part] and name in PRETRAINING:
                figures[part][name] = ({k: v for k, v in entry.items() if k != "carried"}
                                       if isinstance(entry, dict) else entry)
                carried[part].append(name)
    return carried


def dagger(figures: dict, part: str, key: str) -> str:
    return " †" if key in figures.get("carried", {}).get(part, ()) else ""


def _interval(c: dict | None) -> str:
    if c is None:
        return ""
    return f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" + ("" if c["low"] <= 0 <= c["high"] else " *")


def summarise(figures: dict) -> str:
    finetune, pretrain, probe = figures["finetune"], figures["pretrain"], figures["probe"]
    machine = figures["speed"]["machine"]
    lines = [f"# Further pre-training against fine-tuning ({FINETUNE_CONFIG} on the trimmed e5-small, CPU)", "",
             f"Fine-tuning: macro-F1 on {DEV_ROWS:,} stratified dev rows per task at the last step, averaged over "
             "seeds; the interval is the paired bootstrap (95%, dev rows resampled) against no pre-training at "
             "the same budget (and against no pre-training given the pre-training's minutes as extra steps), "
             "each seed against the baseline of that seed. Minutes: timed alone on "
             f"{machine['cores']} cores ({machine['cpu']}), 2 threads (`{figures['speed']['command']}`); "
             "runs trained in two single-thread lanes, whose wall times are not timings.", "",
             "| variant | steps | pre-training min | fine-tuning min | OCNLI | OCEMOTION | TNEWS | mean | per seed "
             "| vs none [95%] | vs equal minutes [95%] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in finetune.items():
        f1 = entry["macro_f1"]
        seeds = ", ".join(f"{v:.4f}" for v in entry["per_seed_mean"].values())
        lines.append(f"| {entry['label']}{dagger(figures, 'finetune', key)} | {entry['steps']} | {entry['pretrain_minutes']:.1f} "
                     f"| {entry['finetune_minutes']:.1f} | {f1['ocnli']:.4f} | {f1['ocemotion']:.4f} "
                     f"| {f1['tnews']:.4f} | **{entry['mean']:.4f}** | {seeds} | {_interval(entry.get('vs_none'))} "
                     f"| {_interval(entry.get('vs_equal_minutes'))} |")
    lines += ["", "`*`: the interval excludes 0 (a difference); otherwise no difference. `†`: carried from the "
              "committed report (measured on an earlier machine, whose run folders are not here).", "",
              "## The pre-trainings: held-out masked LM, how far the layers moved, what a frozen probe reads", "",
              f"CKA: linear CKA of each layer's mean-pooled states on {CKA_TEXTS} held-out texts, against the "
              f"starting encoder. Probe: OCNLI dev macro-F1 of a logistic regression on a frozen layer's pooled "
              f"`tokenizer(a, b)` states ({PROBE_TRAIN_ROWS:,} training rows, the {DEV_ROWS:,} dev rows above).", "",
              "| pre-training | minutes | head warm-up ended | held-out loss (start) | accuracy | CKA middle / top layer "
              "| probe top layer | probe best layer |", "|---|---|---|---|---|---|---|---|"]
    for name in PRETRAINING:
        scores = probe.get(name)
        probe_cells = "| - | -" if scores is None else (
            f"| {scores[-1]:.4f}{dagger(figures, 'probe', name)} | {max(scores):.4f} (layer {scores.index(max(scores))})")
        entry = pretrain.get(name)
        if entry is None:
            lines.append(f"| {name} | 0 | - | - | - | 1 / 1 {probe_cells} |" if PRETRAINING[name] is None
                         else f"| {name} | not run | | | | | | |")
            continue
        cka = entry["trajectory"][-1]["cka"]
        unfrozen = entry["encoder_unfrozen_at"]
        lines.append(f"| {name}{dagger(figures, 'pretrain', name)} | {entry['minutes']:.1f} "
                     f"| {'-' if unfrozen is None else f'step {unfrozen}'} "
                     f"| {entry['held_out_loss']:.4f} ({entry['start_loss']:.4f}) | {entry['held_out_accuracy']:.4f} "
                     f"| {cka[len(cka) // 2]:.3f} / {cka[-1]:.3f} {probe_cells} |")
    lines += ["", "`†`: carried from the committed report, as in the first table."]
    lines += ["", "CKA with the start, by pre-training step (layers from 0, the embeddings, to the top: 12 for e5-small, 4 for m3e-small):", ""]
    for name, entry in pretrain.items():
        lines.append(f"- {name}: " + "; ".join(
            f"step {t['step']}: " + " ".join(f"{c:.2f}" for c in t["cka"]) for t in entry["trajectory"]))
    return "\n".join(lines)


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cka_axis, probe_axis) = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(PRETRAINING, ["black", "tab:red", "tab:blue", "tab:green", "tab:gray", "tab:purple",
                                    "tab:orange", "tab:brown", "tab:olive"]))
    for name, entry in figures["pretrain"].items():
        for t in entry["trajectory"]:
            final = t is entry["trajectory"][-1]
            cka_axis.plot(t["cka"], color=colors[name], alpha=1.0 if final else 0.25, lw=2 if final else 1,
                          label=name if final else None)
    cka_axis.set(title="layers vs the start (linear CKA); faint: earlier steps", xlabel="layer (0 = embeddings)",
                 ylabel="CKA with the starting encoder", ylim=(0, 1.02))
    cka_axis.legend(fontsize=8)
    for name, scores in figures["probe"].items():
        probe_axis.plot(scores, marker="o", ms=3, color=colors[name], label=name)
    probe_axis.set(title="frozen-layer probe, OCNLI dev macro-F1", xlabel="layer (0 = embeddings)", ylabel="macro-F1")
    if figures["probe"]:
        probe_axis.legend(fontsize=8)
    else:
        probe_axis.text(0.5, 0.5, "no probe run yet", ha="center", va="center", transform=probe_axis.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    next_job = commands.add_parser("next")
    next_job.add_argument("--only", choices=list(ONLY),
                          help="m3e-small's jobs; the diagnosis (plain and pair pre-training, probes); the "
                               "auxiliary masked LM and its no-pre-training baselines; or the head warm-up's "
                               "one-setting variants")
    next_job.set_defaults(run=cmd_next)
    report = commands.add_parser("report")
    report.add_argument("--drop-missing", action="store_true",
                        help="leave out the committed rows whose run folders are not here")
    report.set_defaults(run=cmd_report)
    speed = commands.add_parser("speed")
    speed.add_argument("--steps", type=int, default=15)
    speed.add_argument("--warmup", type=int, default=3)
    speed.add_argument("--only", choices=["m3e"], help="retime m3e-small only, keeping the other figures")
    speed.set_defaults(run=cmd_speed)
    args = parse_arguments(parser, argv)
    args.run(args)


if __name__ == "__main__":
    main()
