"""The main job: a run config to a baseline, a trained run, their blend, both test zips, a dev report.

`main_job(config)` is what `clue-mtl run` runs and `benchmarks/main_job.py` calls (the quickstart
notebook shows its pieces one by one). In order:

1. the run folder checked (refused at once when it holds another run, or one under another config);
2. every file the job reads checked, once: the training files, and the test A and B files that the
   zips are predicted from at the end (kept checked, and read again only chunk by chunk);
3. the TF-IDF baseline on the run's split and training rows (`OUTPUT_DIR/baseline`: the saved one
   when it matches, else fitted), before training, so that its errors come early;
4. training (`recipes.multitask.train`, which takes the run folder under its lock); only its steps
   are charged to `train.max_minutes`;
5. the run's best model scored on its whole dev split (`evaluation/` in the run folder);
6. the blend of run and baseline (`blends/NAME`), its dev report printed and written;
7. a zip per test split, decided by the biased blend, read back as the leaderboard would.

Under several processes (`accelerate launch`) every process trains; the first fits the baseline
beforehand, and only the main one evaluates, blends and predicts (the others get None).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clue_mtl.config import RunConfig, added_keys, config_to_dict, validate
from clue_mtl.data.folder import CheckedFile, check_training_files, checked_test_files
from clue_mtl.runs.folder import RunFolder

TEST_SPLITS = ("a", "b")


@dataclass(frozen=True)
class JobResult:
    """What a main job wrote, and the dev figures its zips decide by."""

    run_dir: Path
    baseline_dir: Path
    blend_dir: Path
    zips: dict[str, Path]             # test split ("a", "b") -> its submission zip
    zip_rows: dict[str, int]          # test split -> rows in its zip, read back
    dev_macro_f1: dict[str, float]    # task -> the biased blend's dev macro-F1, cross-fitted
    dev_mean_macro_f1: float          # their mean: the job's dev figure
    report: str                       # the blend's dev report, as printed


def main_job(config: RunConfig, *, run_dir: str | Path | None = None, blend_dir: str | Path | None = None,
             out_dir: str | Path = "submissions", resume: bool = False, overwrite: bool = False,
             minutes: float | None = None, before_model_work: Callable[[], None] | None = None) -> JobResult | None:
    """Baseline, training, blend, both zips and the report for `config` (see the module's steps).

    run_dir: the run folder (default OUTPUT_DIR/NAME); blend_dir: the blend folder (default
    blends/NAME); out_dir: where `NAME-test-a.zip` and `NAME-test-b.zip` go. resume, overwrite: as
    `clue-mtl run --resume/--overwrite`. minutes: train by the clock (`train.max_minutes`).
    before_model_work: called once the inputs are checked, before the first model work (the CLI
    quiets transformers' loading bars there, so that a refused input does not wait for its import).
    Returns None on a process other than the main one.
    """
    config = _with_minutes(config, minutes)
    run_folder = _checked_run_folder(config, run_dir, resume=resume, overwrite=overwrite)
    test_files = _checked_job_files(config)
    if before_model_work is not None:
        before_model_work()
    from clue_mtl.model.encoders import ensure_encoder
    from clue_mtl.recipes.multitask import train

    ensure_encoder(config.model.encoder)
    baseline_dir = _fitted_baseline(config) if _fits_the_baseline() else None
    trainer = train(config, run_folder.path, resume=resume, overwrite=overwrite)
    if not trainer.accelerator.is_main_process:  # evaluation and prediction are one process's work
        return None
    blend_dir = Path(blend_dir or Path("blends") / config.name)
    figures = _blended(trainer.run_dir, baseline_dir, blend_dir)
    zips, zip_rows = _submissions(config, blend_dir, Path(out_dir), test_files)
    return JobResult(run_dir=Path(trainer.run_dir), baseline_dir=baseline_dir, blend_dir=blend_dir, zips=zips,
                     zip_rows=zip_rows, **figures)


def _with_minutes(config: RunConfig, minutes: float | None) -> RunConfig:
    """The config training `minutes` by the clock (`train.max_minutes`), checked as a loaded one is."""
    if minutes is None:
        return config
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_minutes=float(minutes)))
    validate(config)
    return config


def _checked_run_folder(config: RunConfig, run_dir: str | Path | None, *, resume: bool,
                        overwrite: bool) -> RunFolder:
    """The run folder, refused before any work when the run may not start there; training then
    takes it under its lock (`RunParts._claim_run_dir`)."""
    folder = RunFolder(run_dir or Path(config.output_dir) / config.name)
    folder.check_claim(config_to_dict(config), resume=resume, overwrite=overwrite, added=added_keys(config))
    return folder


def _checked_job_files(config: RunConfig) -> dict[str, dict[str, CheckedFile]]:
    """Every file the job reads, checked once before its first minute of work: split -> the test
    files, checked (task -> `CheckedFile`), which the zips are predicted from at the end."""
    data = config.data
    check_training_files(data.data_dir, list(data.tasks))
    return {split: checked_test_files(list(data.tasks), split=split, data_dir=data.data_dir, id_mode=data.id_mode)
            for split in TEST_SPLITS}


def _fits_the_baseline() -> bool:
    """One process fits the baseline: the first (RANK 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def _fitted_baseline(config: RunConfig) -> Path:
    from clue_mtl.predict.baseline import fitted_baseline

    return fitted_baseline(config.data, Path(config.output_dir) / "baseline", training_files_checked=True)


def _blended(run_dir: Path, baseline_dir: Path, blend_dir: Path) -> dict:
    """The run scored on its whole dev split, then blended with the baseline into `blend_dir`; its
    report printed (and written with figures to blend_dir/evaluation): the job's dev figures."""
    from clue_mtl.predict.blend import build_blend, evaluate_blend
    from clue_mtl.predict.evaluate import evaluate_run

    evaluation = evaluate_run(run_dir)
    blend = build_blend([run_dir, baseline_dir], blend_dir,
                        dev_probabilities={str(run_dir): evaluation["probabilities"]})
    report = evaluate_blend(blend_dir)["report"]
    print(report)
    print(f"the zips decide by the biased blend ({blend_dir}); cross-fitted dev mean macro-F1 "
          f"{blend.mean('biased'):.4f}")
    return {"dev_macro_f1": {task: float(blend.scores[task]["biased"]["cross_fitted"]) for task in blend.tasks},
            "dev_mean_macro_f1": blend.mean("biased"), "report": report}


def _submissions(config: RunConfig, blend_dir: Path, out_dir: Path,
                 test_files: dict[str, dict[str, CheckedFile]]) -> tuple[dict[str, Path], dict[str, int]]:
    """A zip per test split, decided by the biased blend from the files checked at the start, each
    read back as the leaderboard reads it: split -> path, split -> rows."""
    from clue_mtl.predict.blend import predict_blend_submission
    from clue_mtl.predict.submission import read_submission

    zips, rows = {}, {}
    for split in TEST_SPLITS:
        path = predict_blend_submission(blend_dir, out_dir / f"{config.name}-test-{split}.zip", split=split,
                                        checked=test_files[split])
        submission = read_submission(path, allow_partial=len(config.data.tasks) < 3)
        zips[split], rows[split] = path, sum(len(frame) for frame in submission.values())
        print(f"test {split.upper()} submission: {path} ({rows[split]} rows, validated)")
    return zips, rows
