"""Predictions from trained runs: logits over encoded rows, probabilities averaged over runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from clue_mtl.config import RunConfig, load_run_config
from clue_mtl.data.batching import encode_frame, inference_batches
from clue_mtl.data.folder import checked_test_files
from clue_mtl.errors import RunFolderError
from clue_mtl.hardware import resolve_precision
from clue_mtl.model.multitask import MultiTaskModel
from clue_mtl.predict.submission import write_streamed_submission
from clue_mtl.runs.folder import RunFolder
from clue_mtl.untrusted import LARGE_LIMIT, checked_size, first_line


@torch.no_grad()
def predict_logits(model: torch.nn.Module, task: str, data, *, pad_id: int, batch_size: int = 64,
                   accelerator: Accelerator | None = None, bf16: bool = False,
                   progress: str | None = None) -> np.ndarray:
    """Float32 logits for every row of `data`, in row order; `progress` names a progress bar.

    Under several processes each takes every n-th length-sorted batch and the pieces are gathered.
    The unwrapped model runs, since DDP's forward is a collective and ranks may hold different
    numbers of batches.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    pieces = []
    if accelerator is not None:
        autocast = accelerator.autocast()
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=math.ceil(len(data) / batch_size), desc=progress, leave=False, dynamic_ncols=True,
               disable=progress is None or rank != 0)
    with autocast, bar:
        for number, (rows, batch) in enumerate(inference_batches(data, batch_size, pad_id)):
            bar.update(1)
            if number % world != rank:
                continue
            batch = {key: value.to(device) for key, value in batch.items()}
            logits, _ = model(task, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            pieces.append((rows, logits.float().cpu().numpy()))
    if world > 1:
        pieces = gather_object(pieces)
    model.train(was_training)
    num_labels = pieces[0][1].shape[1]
    out = np.zeros((len(data), num_labels), dtype=np.float32)
    for rows, logits in pieces:
        out[rows] = logits
    return out


def float32_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules that run with autocast off and keep float32 weights (`keeps_float32`), by name."""
    return {name: module for name, module in model.named_modules() if getattr(module, "keeps_float32", False)}


def bf16_weights(model: MultiTaskModel) -> MultiTaskModel:
    """Cast the model's weights to bf16 in place, for prediction under bf16 autocast: 1.2-1.3x the
    rows/s of the forward pass against autocast casting float32 weights in every pass, with at least
    99.5% of test argmaxes unchanged (benchmarks/results/predict_experiments.md). Modules that run
    with autocast off (`keeps_float32`: the SAN and BiLSTM heads) keep their float32 weights as
    they were."""
    kept = {module: {name: value.clone() for name, value in module.state_dict().items()}
            for module in float32_modules(model).values()}
    model.to(torch.bfloat16)
    for module, state in kept.items():  # back to float32 with their exact values, not bf16's rounding
        module.float().load_state_dict(state)
    return model


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def load_tokenizer(directory: Path):
    """A run's saved tokenizer. Each of its files is checked first (a regular file of at most
    `LARGE_LIMIT` bytes: the tokenizers library would read a link to /dev/zero, or wait on a FIFO,
    forever); a folder it cannot parse is one `RunFolderError` line naming the folder."""
    if not directory.is_dir():
        raise RunFolderError(f"{directory}: missing; expected the run's tokenizer folder")
    for path in sorted(directory.iterdir()):
        if not path.is_dir():  # transformers reads no subfolder
            checked_size(path, limit=LARGE_LIMIT, what="tokenizer's files", error=RunFolderError)
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as error:  # the tokenizers library's parse errors are plain Exceptions, and no others are shared
        raise RunFolderError(f"{directory}: not a tokenizer folder ({type(error).__name__}: "
                             f"{first_line(error)})") from None


class LoadedRun:
    """A finished run folder: its config, tokenizer and best model; `show_progress` draws a bar
    over each prediction.

    Where it predicts in bf16 the weights are cast to bf16 once, as they load (`bf16_weights`).
    `float32_weights` keeps them in float32, the precision the run evaluated itself in while it
    trained.
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device | None = None, *, show_progress: bool = True,
                 float32_weights: bool = False):
        self.folder = RunFolder(run_dir)
        self.run_dir = self.folder.path
        self.show_progress = show_progress
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not self.folder.has_model():
            raise FileNotFoundError(f"{self.run_dir} holds no trained model (expected {self.folder.best_model_file})")
        self.config: RunConfig = load_run_config(self.folder.config_file)
        self.labels: dict[str, list[str]] = self.folder.read_labels()
        self.tokenizer = load_tokenizer(self.folder.tokenizer_dir)
        self.model = MultiTaskModel.load(self.folder.best_dir).to(device).eval()
        unlabelled = [task for task in self.model.tasks if task not in self.labels]
        if unlabelled:
            raise RunFolderError(f"{self.folder.labels_file}: no labels for {', '.join(unlabelled)}, which "
                                 f"{self.folder.best_meta_file} predicts")
        # bf16 where the run trained in it and this machine multiplies in it; float32 elsewhere
        # (emulated bf16 is many times slower, and float32 loses nothing).
        device_type = torch.device(device).type
        self.bf16 = (self.config.train.mixed_precision in ("bf16", "auto")
                     and resolve_precision("auto", device_type) == "bf16")
        if self.bf16 and not float32_weights:
            bf16_weights(self.model)

    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    def probabilities(self, task: str, frame: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
        data = encode_frame(self.tokenizer, frame, task, max_length=self.config.data.max_length)
        logits = predict_logits(self.model, task, data, pad_id=self.tokenizer.pad_token_id, batch_size=batch_size,
                                bf16=self.bf16, progress=f"{task} {self.run_dir.name}" if self.show_progress else None)
        return softmax(logits)


def ensemble_probabilities(runs: list[LoadedRun], task: str, frame: pd.DataFrame) -> np.ndarray:
    """The mean of the runs' class probabilities (runs must share the task's label order)."""
    first = runs[0].labels[task]
    for run in runs[1:]:
        if run.labels[task] != first:
            raise ValueError(f"{run.run_dir}: {task} labels differ from {runs[0].run_dir}'s")
    return np.mean([run.probabilities(task, frame) for run in runs], axis=0)


def predict_submission(run_dirs: list[str | Path], out: str | Path, *, split: str = "a",
                       data_dir: str | Path | None = None, test_files: dict[str, str | Path] | None = None,
                       id_mode: str | None = None, float32_weights: bool = False, progress: bool = True) -> Path:
    """Predict every task's test file with one run or an ensemble of runs and write the zip.

    Test files come from `test_files` (task -> path) or else from `data_dir` (default: the first
    run's data folder) under the competition's names for `split`. Every file is checked before
    the first model pass, then predicted in chunks (`submission.write_streamed_submission`).
    `float32_weights`: as `LoadedRun`.
    """
    runs = [LoadedRun(run_dir, float32_weights=float32_weights, show_progress=False) for run_dir in run_dirs]
    tasks = runs[0].tasks
    for run in runs[1:]:
        if run.tasks != tasks:
            raise ValueError(f"{run.run_dir} predicts {run.tasks}, {runs[0].run_dir} predicts {tasks}")
    id_mode = id_mode or runs[0].config.data.id_mode
    files = checked_test_files(tasks, split=split, data_dir=data_dir or runs[0].config.data.data_dir,
                               test_files=test_files, id_mode=id_mode)

    def decide(task: str, frame: pd.DataFrame) -> list[str]:
        labels = runs[0].labels[task]
        return [labels[i] for i in ensemble_probabilities(runs, task, frame).argmax(-1)]

    return write_streamed_submission(files, decide, out, id_mode=id_mode, allow_partial=len(tasks) < 3,
                                     progress=progress)
