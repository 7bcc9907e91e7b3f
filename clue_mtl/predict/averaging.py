"""Uniform weight averaging of several runs' best models ("model soup") into a new run folder.

The runs must share an architecture: the same tensors (names, shapes, dtypes), the same per-task structure
(heads, features, pooling, private layers and adapters), the same encoder config and the same tokenizer files. Floating-point tensors are averaged
in float64 and stored in their own dtype; other tensors must be equal and are copied.

The result is an ordinary run folder (config.yaml, split.json, labels.json, tokenizer/ from the
first run; best/model.safetensors and best/model.json) that `LoadedRun`, `evaluate` and `predict`
accept, plus `averaged_from.json` naming the sources. Averaging helps when the runs are
fine-tuned from the same pre-trained encoder (Wortsman et al., 2022); runs from different
encoders share no basin and average to noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from clue_mtl.atomic import replace_folder
from clue_mtl.errors import AveragingError
from clue_mtl.model.multitask import model_structure
from clue_mtl.runs.folder import RunFolder

IGNORED_ENCODER_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def _architecture(meta: dict) -> dict:
    """What two models must share to be averaged: tasks, every head's and private part's structure, encoder."""
    meta = model_structure(meta)
    encoder = {k: v for k, v in meta["encoder_config"].items() if k not in IGNORED_ENCODER_KEYS}
    return {"task_labels": meta["task_labels"], "heads": meta["heads"], "private": meta["private"],
            "encoder_config": encoder}


def _refuse_adapters(run: RunFolder) -> None:
    """LoRA adapters do not average: the mean of B times the mean of A is not the mean of B A,
    and each run starts A from its own random draw."""
    meta = model_structure(json.loads(run.best_meta_file.read_text(encoding="utf-8"))) \
        if run.best_meta_file.exists() else {"private": {}}
    lora = sorted(task for task, spec in meta["private"].items() if spec["type"] == "lora")
    if lora:
        raise AveragingError(f"{run.path}: {', '.join(lora)} use LoRA adapters (model.private), whose "
                             "weights do not average; ensemble the runs' predictions instead")


def _first_difference(a, b, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{where}.{key} is only in one of them"
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def _split(run: RunFolder) -> dict:
    try:
        return json.loads(run.split_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AveragingError(f"{run.split_file}: not a readable split ({error})") from None


def _tokenizer_files(run: RunFolder) -> dict[str, bytes]:
    folder = run.tokenizer_dir
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def _run_files(run: RunFolder) -> list[Path]:
    """What a run folder must hold to be averaged; the first run's are copied to the result."""
    return [run.best_model_file, run.best_meta_file, run.config_file, run.split_file, run.labels_file,
            run.tokenizer_dir]


def average_weights(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write the uniform average of the runs' `best/` models as a new run folder `out_dir`."""
    runs = [RunFolder(run_dir) for run_dir in run_dirs]
    if len(runs) < 2:
        raise AveragingError("averaging needs at least two runs")
    out = RunFolder(out_dir)
    if out.path.exists() and any(out.path.iterdir()):
        raise AveragingError(f"{out.path} already exists and is not empty")
    for run in runs:
        run.recover_best()
        _refuse_adapters(run)
        for path in _run_files(run):
            if not path.exists():
                raise AveragingError(f"{run.path}: missing {path.relative_to(run.path)}; is it a finished "
                                     "run folder?")

    first = runs[0]
    first_meta = json.loads(first.best_meta_file.read_text(encoding="utf-8"))
    first_tokenizer = _tokenizer_files(first)
    first_labels = first.read_labels()
    first_split = _split(first)
    sums: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for number, run in enumerate(runs):
        meta = json.loads(run.best_meta_file.read_text(encoding="utf-8"))
        difference = _first_difference(_architecture(first_meta), _architecture(meta), "model")
        if difference:
            raise AveragingError(f"{run.path} and {first.path} differ in architecture: {difference}")
        if run.read_labels() != first_labels:
            raise AveragingError(f"{run.path} and {first.path} differ in labels.json")
        if _split(run) != first_split:  # the soup's dev rows must be every member's dev rows
            raise AveragingError(f"{run.path} and {first.path} held out different dev rows (split.json): "
                                 "the soup would have trained on part of its own dev split")
        tokenizer = _tokenizer_files(run)
        if tokenizer != first_tokenizer:
            name = next(n for n in sorted(set(tokenizer) | set(first_tokenizer))
                        if tokenizer.get(n) != first_tokenizer.get(n))
            raise AveragingError(f"{run.path} and {first.path} have different tokenizers (tokenizer/{name})")
        tensors = load_file(run.best_model_file)
        if number == 0:
            reference = tensors
            sums = {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}
            continue
        _check_same_tensors(reference, tensors, first.path, run.path)
        for key, tensor in tensors.items():
            if tensor.is_floating_point():
                sums[key] += tensor.double()
    averaged = {k: (s / len(runs)).to(reference[k].dtype) if reference[k].is_floating_point() else s
                for k, s in sums.items()}

    sources = {"method": "uniform", "runs": [str(run.path.resolve()) for run in runs],
               "best": [run.best_evaluation() for run in runs]}
    # the soup appears whole or not at all: a kill leaves no half folder that refuses the next try
    with out.lock(), replace_folder(out.path) as staging:
        written = RunFolder(staging)
        written.best_dir.mkdir()
        save_file(averaged, str(written.best_model_file))
        for source, target in zip(_run_files(first), _run_files(written)):
            if source != first.best_model_file:
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        written.averaged_from_file.write_text(json.dumps(sources, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return out.path


def _check_same_tensors(reference: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                        first: Path, run_dir: Path) -> None:
    for key in sorted(set(reference) | set(tensors)):
        if key not in tensors or key not in reference:
            owner = first if key in reference else run_dir
            raise AveragingError(f"tensor {key} is only in {owner}; {first} and {run_dir} differ in architecture")
        a, b = reference[key], tensors[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AveragingError(f"tensor {key}: {tuple(a.shape)} {a.dtype} in {first}, "
                                 f"{tuple(b.shape)} {b.dtype} in {run_dir}")
        if not a.is_floating_point() and not torch.equal(a, b):
            raise AveragingError(f"tensor {key} ({a.dtype}) differs between {first} and {run_dir}")

