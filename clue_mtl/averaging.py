"""Uniform weight averaging of several runs' best models ("model soup") into a new run folder.

The runs must share an architecture: the same tensors (names, shapes, dtypes), the same heads and
pooling, the same encoder config and the same tokenizer files. Floating-point tensors are averaged
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

from .errors import AveragingError
from .model import MODEL_FILE, MODEL_META_FILE

RUN_FILES = ("config.yaml", "split.json", "labels.json")
IGNORED_ENCODER_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def _architecture(meta: dict) -> dict:
    encoder = {k: v for k, v in meta["encoder_config"].items() if k not in IGNORED_ENCODER_KEYS}
    return {"task_labels": meta["task_labels"], "pooling": meta["pooling"], "head_hidden": meta["head_hidden"],
            "encoder_config": encoder}


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


def _tokenizer_files(run_dir: Path) -> dict[str, bytes]:
    folder = run_dir / "tokenizer"
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def average_weights(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write the uniform average of the runs' `best/` models as a new run folder `out_dir`."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if len(run_dirs) < 2:
        raise AveragingError("averaging needs at least two runs")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AveragingError(f"{out_dir} already exists and is not empty")
    for run_dir in run_dirs:
        for name in (f"best/{MODEL_FILE}", f"best/{MODEL_META_FILE}", *RUN_FILES, "tokenizer"):
            if not (run_dir / name).exists():
                raise AveragingError(f"{run_dir}: missing {name}; is it a finished run folder?")

    first = run_dirs[0]
    first_meta = json.loads((first / "best" / MODEL_META_FILE).read_text(encoding="utf-8"))
    first_tokenizer = _tokenizer_files(first)
    first_labels = json.loads((first / "labels.json").read_text(encoding="utf-8"))
    sums: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for number, run_dir in enumerate(run_dirs):
        meta = json.loads((run_dir / "best" / MODEL_META_FILE).read_text(encoding="utf-8"))
        difference = _first_difference(_architecture(first_meta), _architecture(meta), "model")
        if difference:
            raise AveragingError(f"{run_dir} and {first} differ in architecture: {difference}")
        if json.loads((run_dir / "labels.json").read_text(encoding="utf-8")) != first_labels:
            raise AveragingError(f"{run_dir} and {first} differ in labels.json")
        tokenizer = _tokenizer_files(run_dir)
        if tokenizer != first_tokenizer:
            name = next(n for n in sorted(set(tokenizer) | set(first_tokenizer))
                        if tokenizer.get(n) != first_tokenizer.get(n))
            raise AveragingError(f"{run_dir} and {first} have different tokenizers (tokenizer/{name})")
        tensors = load_file(run_dir / "best" / MODEL_FILE)
        if number == 0:
            reference = tensors
            sums = {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}
            continue
        _check_same_tensors(reference, tensors, first, run_dir)
        for key, tensor in tensors.items():
            if tensor.is_floating_point():
                sums[key] += tensor.double()
    averaged = {k: (s / len(run_dirs)).to(reference[k].dtype) if reference[k].is_floating_point() else s
                for k, s in sums.items()}

    (out_dir / "best").mkdir(parents=True, exist_ok=True)
    save_file(averaged, str(out_dir / "best" / MODEL_FILE))
    shutil.copyfile(first / "best" / MODEL_META_FILE, out_dir / "best" / MODEL_META_FILE)
    for name in RUN_FILES:
        shutil.copyfile(first / name, out_dir / name)
    shutil.copytree(first / "tokenizer", out_dir / "tokenizer")
    sources = {"method": "uniform", "runs": [str(run_dir.resolve()) for run_dir in run_dirs],
               "best": [_best(run_dir) for run_dir in run_dirs]}
    (out_dir / "averaged_from.json").write_text(json.dumps(sources, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    return out_dir


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


def _best(run_dir: Path) -> dict | None:
    from .distill import best_evaluation

    return best_evaluation(run_dir)
