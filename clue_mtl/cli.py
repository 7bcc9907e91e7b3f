"""The `clue-mtl` command line: thin wrappers over the Python API.

Bad input ends with a one-line `error: ...` and exit status 2, never a traceback; an internal fault
with a one-line `error: internal error ...` and exit status 1 (CLUE_MTL_TRACEBACK=1 shows the
traceback). Commands import torch only once their input has been checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

DEFAULT_SHARED_DATA = Path("../shared/data/tianchi")


class UsageError(Exception):
    pass


def _known_errors() -> tuple[type[BaseException], ...]:
    from clue_mtl.errors import KNOWN_ERRORS

    # OSError: a path that cannot be read or written (missing, a folder, no permission, disk full).
    return (UsageError, *KNOWN_ERRORS, OSError)


def _key_values(specs: list[str], what: str) -> dict[str, str]:
    from clue_mtl.tasks import TASK_NAMES

    pairs = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{what} {spec!r} is not of the form TASK=PATH")
        task = key.strip().lower()
        if task not in TASK_NAMES:
            raise UsageError(f"{what} {spec!r}: unknown task {key!r}; the tasks are {', '.join(TASK_NAMES)}")
        if task in pairs:
            raise UsageError(f"{what} names {task} twice ({pairs[task]} and {value}); give one file per task")
        pairs[task] = value
    return pairs


# ----------------------------------------------------------------------------- data
def cmd_link_data(args) -> int:
    target, source = Path(args.data_dir), Path(args.source).resolve()
    if not source.is_dir():
        raise UsageError(f"{source} does not exist; download the competition files into {target}/ instead")
    target.mkdir(parents=True, exist_ok=True)
    linked = 0
    for path in sorted(source.iterdir()):
        link = target / path.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(path)
            linked += 1
    print(f"linked {linked} entries of {source} into {target}/")
    return 0


def cmd_check_data(args) -> int:
    from clue_mtl.data.folder import check_data

    report, problems, notes = check_data(args.data_dir, strict=args.strict, id_mode=args.id_mode)
    if notes:
        print("\n".join(f"warning: {line}" for line in notes), file=sys.stderr)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    print("\n".join(report))
    return 0


def cmd_baseline(args) -> int:
    from clue_mtl.predict.baseline import run_baseline

    run_baseline(args.data_dir, out_dir=args.out_dir, dev_fraction=args.dev_fraction, seed=args.seed,
                 run_dir=args.run_dir)
    return 0


def cmd_score(args) -> int:
    from clue_mtl.predict.metrics import format_report
    from clue_mtl.predict.submission import gold_from_dir, gold_from_specs, score_submission

    if not args.gold_dir and not args.gold:
        raise UsageError("name the labelled files with --gold-dir DIR or --gold TASK=PATH")
    gold = gold_from_dir(args.gold_dir) if args.gold_dir else {}
    gold.update(gold_from_specs(_key_values(args.gold, "--gold")))
    result = score_submission(args.submission, gold)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_report(result["reports"]))
    return 0


# ----------------------------------------------------------------------------- models
TINY_ENCODERS = ("tiny-bert", "tiny-xlmr")


def cmd_build_encoder(args) -> int:
    _quiet_libraries()
    from clue_mtl.model.offline_encoders import OFFLINE_ENCODERS, build_offline_encoder
    from clue_mtl.testing import build_tiny_encoder

    if args.kind in TINY_ENCODERS:
        path = build_tiny_encoder(args.out, kind=args.kind.removeprefix("tiny-"))
    else:
        try:
            path = build_offline_encoder(args.kind, args.out)
        except (ImportError, FileExistsError) as error:
            raise UsageError(str(error)) from error
        print(f"terms of use: {OFFLINE_ENCODERS[args.kind].licence}")
    print(f"encoder written to {path}")
    return 0


def cmd_trim_vocab(args) -> int:
    _quiet_libraries()
    from clue_mtl.model.encoders import ensure_encoder
    from clue_mtl.model.vocab import corpus_texts, trim_vocabulary

    report = trim_vocabulary(ensure_encoder(args.encoder), args.out, corpus_texts(args.data_dir),
                             held_out=corpus_texts(args.data_dir, ("a", "b")))
    print(f"{report}\ntrimmed encoder written to {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from clue_mtl.config import load_pretrain_config

    config = load_pretrain_config(args.config, _overrides(args))
    _check_run_folder(args, config)
    _quiet_libraries()
    from clue_mtl.model.encoders import ensure_encoder
    from clue_mtl.recipes.pretrain import pretrain

    ensure_encoder(config.model.encoder)
    pretrainer = pretrain(config, args.run_dir, resume=args.resume, overwrite=args.overwrite)
    if pretrainer.accelerator.is_main_process:
        held_out = pretrainer.state.history[-1]
        encoder = pretrainer.folder.encoder_dir
        print(f"held-out masked-LM loss {held_out['loss']:.4f} (step 0: {pretrainer.state.history[0]['loss']:.4f}), "
              f"accuracy {held_out['accuracy']:.4f}; encoder written to {encoder}; "
              f"fine-tune it with `clue-mtl train --set model.encoder={encoder}`")
    return 0


def _config(args):
    """The run's config, and its run folder checked, before anything imports torch."""
    from clue_mtl.config import load_config

    config = load_config(args.config, _overrides(args))
    _check_run_folder(args, config)
    _quiet_libraries()
    return config


def _overrides(args) -> list[str]:
    """`--set KEY=VALUE`s, and `--minutes M` as `train.max_minutes=M`."""
    overrides = list(args.set or [])
    if args.minutes is not None:
        try:
            minutes = float(args.minutes)
        except ValueError:
            minutes = math.nan
        if not (math.isfinite(minutes) and minutes > 0):
            raise UsageError(f"--minutes must be a positive number of minutes, not {args.minutes!r}")
        overrides.append(f"train.max_minutes={minutes!r}")
    return overrides


def _check_run_folder(args, config) -> None:
    from clue_mtl.config import added_keys, config_to_dict
    from clue_mtl.runs.folder import RunFolder

    folder = RunFolder(args.run_dir or Path(config.output_dir) / config.name)
    folder.check_claim(config_to_dict(config), resume=args.resume, overwrite=args.overwrite, added=added_keys(config))


def cmd_train(args) -> int:
    config = _config(args)
    from clue_mtl.model.encoders import ensure_encoder
    from clue_mtl.recipes.multitask import train

    ensure_encoder(config.model.encoder)
    trainer = train(config, args.run_dir, resume=args.resume, overwrite=args.overwrite)
    if trainer.accelerator.is_main_process:
        print(f"best dev mean macro-F1 {trainer.state.best_score:.4f} at step {trainer.state.best_step}; "
              f"run folder {trainer.run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    _quiet_libraries()
    if bool(args.run) == bool(args.blend):
        raise UsageError("name one of --run RUN or --blend BLEND")
    if args.blend:
        from clue_mtl.predict.blend import evaluate_blend

        print(evaluate_blend(args.blend, plots=not args.no_plots)["report"])
        print(f"report and figures in {Path(args.blend) / 'evaluation'}")
        return 0
    from clue_mtl.predict.evaluate import evaluate_run
    from clue_mtl.predict.metrics import format_report
    from clue_mtl.runs.folder import RunFolder

    result = evaluate_run(args.run, data_dir=args.data_dir, plots=not args.no_plots)
    print(format_report(result["reports"]))
    print(f"report and figures in {RunFolder(args.run).evaluation_dir}")
    return 0


def cmd_predict(args) -> int:
    _quiet_libraries()
    if bool(args.run) == bool(args.blend):
        raise UsageError("name --run RUN (repeat to average runs) or --blend BLEND, not both")
    test_files = _key_values(args.test, "--test")
    if args.blend:
        from clue_mtl.predict.blend import predict_blend_submission

        path = predict_blend_submission(args.blend, args.out, split=args.split, data_dir=args.data_dir,
                                        test_files=test_files, id_mode=args.id_mode)
    else:
        from clue_mtl.predict.inference import predict_submission

        path = predict_submission(args.run, args.out, split=args.split, data_dir=args.data_dir,
                                  test_files=test_files, id_mode=args.id_mode)
    print(f"submission written to {path}")
    return 0


def cmd_blend(args) -> int:
    _quiet_libraries()
    from clue_mtl.predict.blend import build_blend, format_blend_report

    members = list(args.run or []) + list(args.baseline or [])
    blend = build_blend(members, args.out, data_dir=args.data_dir)
    print(format_blend_report(blend))
    print(f"blend written to {args.out}; predict with `clue-mtl predict --blend {args.out} --split a --out ZIP`")
    return 0


def cmd_run(args) -> int:
    """The main job (`pipeline.main_job`): baseline, training, blend, dev report, test A and B zips."""
    from clue_mtl.config import load_config
    from clue_mtl.pipeline import main_job

    config = load_config(args.config, _overrides(args))
    main_job(config, run_dir=args.run_dir, blend_dir=args.blend_dir, out_dir=args.out_dir, resume=args.resume,
             overwrite=args.overwrite, before_model_work=_quiet_libraries)
    return 0


def cmd_distill_labels(args) -> int:
    _quiet_libraries()
    from clue_mtl.training.distill import write_soft_labels

    path = write_soft_labels(args.run, args.out, args.data_dir)
    print(f"soft labels of {len(args.run)} teacher run(s) written to {path}")
    return 0


def cmd_average_weights(args) -> int:
    _quiet_libraries()
    from clue_mtl.predict.averaging import average_weights

    path = average_weights(args.run, args.out)
    print(f"averaged run written to {path}; predict with `clue-mtl predict --run {path}`")
    return 0


def cmd_compare_encoders(args) -> int:
    _quiet_libraries()
    from clue_mtl.recipes.probe import compare_encoders

    result = compare_encoders(args.before, args.after, args.data_dir, texts=args.texts, probe_rows=args.probe_rows)
    print(f"layer  CKA (after vs before, {result['texts']} texts)"
          + ("  probe before  probe after (OCNLI dev macro-F1)" if args.probe_rows else ""))
    for layer, cka in enumerate(result["cka"]):
        probes = (f"  {result['probe_before'][layer]:12.4f}  {result['probe_after'][layer]:11.4f}"
                  if args.probe_rows else "")
        print(f"{layer:5d}  {cka:.4f}{probes}")
    if args.json:  # beside the target, then renamed over it: never a half-written file
        from clue_mtl.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clue-mtl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def data_dir(sub: argparse.ArgumentParser, default: str | None = "data") -> None:
        sub.add_argument("--data-dir", default=default, help="folder of the competition files (default: %(default)s)")

    def config_options(sub: argparse.ArgumentParser, not_charged: str = "evaluation and checkpoints") -> None:
        sub.add_argument("--config", help="YAML config file")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-5")
        sub.add_argument("--minutes", metavar="M",
                         help=f"train by the clock (train.max_minutes=M): the first steps are timed and fix how many "
                              f"fill M minutes, in place of train.steps; {not_charged} are not charged")
        sub.add_argument("--run-dir", help="run folder (default: OUTPUT_DIR/NAME from the config)")
        sub.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace the run the run folder holds (its checkpoints, best model and metrics)")

    sub = command("link-data", cmd_link_data, "link the competition files from ../shared/data/tianchi into data/")
    sub.add_argument("--source", default=str(DEFAULT_SHARED_DATA))
    data_dir(sub)

    sub = command("check-data", cmd_check_data, "validate the competition files; print rows and label counts")
    data_dir(sub)
    sub.add_argument("--strict", action="store_true",
                     help="refuse rows that reading would mend (control characters, empty texts, blank lines)")
    sub.add_argument("--id-mode", choices=["file", "row"], default="file",
                     help="test ids are written (file: each must be unique) or replaced by row positions")

    sub = command("baseline", cmd_baseline, "TF-IDF + logistic regression: dev macro-F1 and test A/B zips")
    data_dir(sub)
    sub.add_argument("--out-dir", default="submissions")
    sub.add_argument("--dev-fraction", type=float, default=0.1)
    sub.add_argument("--seed", type=int, default=42)
    sub.add_argument("--run-dir", default="runs/baseline",
                     help="folder for the fitted models, a blend member (default: %(default)s)")

    sub = command("score", cmd_score, "score a submission zip against labelled files, as the leaderboard does")
    sub.add_argument("submission")
    sub.add_argument("--gold-dir", help="folder with labelled files under the training files' names")
    sub.add_argument("--gold", action="append", metavar="TASK=PATH", help="a labelled file for one task")
    sub.add_argument("--json", action="store_true", help="machine-readable output")

    from clue_mtl.model.offline_encoders import OFFLINE_ENCODERS

    sub = command("build-encoder", cmd_build_encoder, "write an offline encoder folder")
    sub.add_argument("kind", choices=[*OFFLINE_ENCODERS, *TINY_ENCODERS])
    sub.add_argument("--out", required=True)

    config_options(command("train", cmd_train, "multi-task training"))

    config_options(command("pretrain", cmd_pretrain, "further pre-training: whole-word masked LM on the competition text"))

    sub = command("compare-encoders", cmd_compare_encoders,
                  "how far training moved an encoder: per-layer CKA, and a frozen-layer OCNLI probe")
    sub.add_argument("--before", required=True, help="encoder folder or hub id (e.g. the pre-training's source)")
    sub.add_argument("--after", required=True, help="encoder folder (e.g. runs/NAME/encoder)")
    sub.add_argument("--texts", type=int, default=512, help="competition texts for CKA (default: %(default)s)")
    sub.add_argument("--probe-rows", type=int, default=0,
                     help="OCNLI training rows for a logistic-regression probe of each layer (0: no probe)")
    sub.add_argument("--json", help="also write the figures to this JSON file")
    data_dir(sub)

    sub = command("trim-vocab", cmd_trim_vocab, "keep only the embedding rows the competition text uses")
    sub.add_argument("--encoder", required=True, help="encoder folder or hub id")
    sub.add_argument("--out", required=True, help="the trimmed encoder's folder")
    data_dir(sub)

    sub = command("evaluate", cmd_evaluate, "dev report of a run or a blend: per task, per class, confusion matrices")
    sub.add_argument("--run", help="a run folder")
    sub.add_argument("--blend", help="a blend folder: members, blend and biased blend side by side")
    data_dir(sub, default=None)
    sub.add_argument("--no-plots", action="store_true")

    sub = command("predict", cmd_predict, "predict test files into a submission zip (several runs: ensemble)")
    sub.add_argument("--run", action="append", help="run folder; repeat to average runs")
    sub.add_argument("--blend", help="a blend folder from `clue-mtl blend`")
    sub.add_argument("--split", choices=["a", "b"], default="a")
    sub.add_argument("--out", required=True)
    data_dir(sub, default=None)
    sub.add_argument("--test", action="append", metavar="TASK=PATH", help="an explicit test file for one task")
    sub.add_argument("--id-mode", choices=["file", "row"], help="ids from the test file or row positions")

    sub = command("blend", cmd_blend, "fit per-task member weights and macro-F1 class biases on the dev split")
    sub.add_argument("--run", action="append", help="a trained run folder; repeat")
    sub.add_argument("--baseline", action="append", help="a baseline folder from `clue-mtl baseline` (e.g. runs/baseline)")
    sub.add_argument("--out", required=True, help="the blend folder, e.g. blends/NAME")
    data_dir(sub, default=None)

    sub = command("distill-labels", cmd_distill_labels,
                  "teachers' averaged class probabilities for every training row (for distillation)")
    sub.add_argument("--run", action="append", required=True, help="teacher run folder; repeat to average")
    sub.add_argument("--out", required=True, help="soft-label file (safetensors)")
    data_dir(sub, default=None)

    sub = command("average-weights", cmd_average_weights, "average the best weights of runs that share an architecture")
    sub.add_argument("--run", action="append", required=True, help="run folder; repeat")
    sub.add_argument("--out", required=True, help="the new run folder")

    sub = command("run", cmd_run, "the main job: baseline, training, blend, test A and B submissions")
    config_options(sub, not_charged="the baseline, evaluation, checkpoints, the blend and the submissions")
    sub.add_argument("--out-dir", default="submissions")
    sub.add_argument("--blend-dir", help="the blend folder (default: blends/NAME)")
    return parser


def _quiet_libraries() -> None:
    """The kit draws its own progress bars; per-file loading bars from transformers are noise."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed on the way out."""
    raise KeyboardInterrupt


def _show_data_warnings() -> None:
    """Rows a data file had mended print as `warning: FILE:LINE: ...` lines, each file's once."""
    import warnings

    from clue_mtl.errors import DataWarning

    shown = warnings.showwarning
    if getattr(shown, "shows_data_warnings", False):  # main() ran before in this process
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, DataWarning):
            return shown(message, category, filename, lineno, file, line)
        print("\n".join(f"warning: {text}" for text in str(message).splitlines()), file=file or sys.stderr)

    show.shows_data_warnings = True
    warnings.showwarning = show
    warnings.simplefilter("default", DataWarning)


def main(argv: list[str] | None = None) -> int:
    import threading

    args = build_parser().parse_args(argv)
    _show_data_warnings()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.handler(args)
    except _known_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a fault of the kit, not of the input: still one line
        if os.environ.get("CLUE_MTL_TRACEBACK"):
            raise
        message = str(error).splitlines()[0][:300] if str(error) else ""
        print(f"error: internal error {type(error).__name__}: {message} (CLUE_MTL_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
