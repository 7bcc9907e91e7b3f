"""The resumable checkpoint: tensors in safetensors, the rest in JSON.

Nothing is pickled, so resuming someone else's run folder runs none of their code: tensors are read
with safetensors, everything else with `json`, and only into structures this module builds
(`_encode`/`_decode`: mappings, lists, tuples, numbers, strings and tensors).

    checkpoint-STEP/          one per saved step; only the newest complete one is kept
        model.safetensors       the model's weights (tied tensors stored once)
        state.safetensors       optimisers, schedulers, loss weighting, EMA, gradient scaler: their
                                tensors, and their structure as JSON in the file's metadata
        rng-RANK.safetensors    each process's random generators (Python, numpy, torch, CUDA)
        trainer_state.json      the recipe's own state (step, best score, history)
        COMPLETE                written last: format, step, config fingerprint, processes, and the
                                size of every file above

The swap no kill can strand: a checkpoint is written into `.checkpoint-STEP.partial/`, `COMPLETE`
last, then renamed to `checkpoint-STEP/`; only then are older checkpoints renamed to
`.checkpoint-N.trash` and removed. Resume takes the newest `checkpoint-*` whose `COMPLETE` lists
files present at the sizes it gives, and sweeps whatever a killed save left. Under several
processes each writes its own RNG file and the main process everything else; every process loads.

Resuming compares the config's fingerprint with the checkpoint's; `runs.folder.RunFolder` claims
and clears the folder around the checkpoints.

torch and safetensors are imported inside the functions that need them: the command line checks
a run folder before it imports torch.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from clue_mtl.errors import CheckpointError

FORMAT = 1
COMPLETE_FILE = "COMPLETE"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
RECIPE_STATE_FILE = "trainer_state.json"
STATE_KEY = "clue_mtl.state"            # the safetensors metadata entry holding the JSON structure
MAX_JSON_BYTES = 64 << 20
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{1,12})")
LEFTOVER_NAME = re.compile(r"\.checkpoint-\d{1,12}\.(partial|trash)")
LEGACY_CHECKPOINTS = ("checkpoint", "checkpoint.new")  # Accelerate's pickled state, kit versions <= 0.1


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


# ----------------------------------------------------------------------------- file operations
# Every change to the disk goes through these five, so a test can kill the save at each of them.
def _make_dir(path: Path) -> None:
    os.mkdir(path)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _write_model(model, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))


def _rename(source: Path, target: Path) -> None:
    os.replace(source, target)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ----------------------------------------------------------------------------- finding checkpoints
def _manifest(directory: Path) -> dict | None:
    """The checkpoint's COMPLETE record if every file it lists is present at its size, else None."""
    try:
        with open(directory / COMPLETE_FILE, "rb") as file:
            manifest = json.loads(file.read(1 << 20))
        files = manifest["files"]
        complete = (manifest["format"] == FORMAT and isinstance(files, dict) and files and all(
            isinstance(size, int) and (directory / name).is_file() and (directory / name).stat().st_size == size
            for name, size in files.items() if isinstance(name, str) and "/" not in name and name != ".."))
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    return manifest if complete else None


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-STEP` folder, newest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint and its manifest, or None."""
    for _, path in _checkpoints(Path(run_dir)):
        manifest = _manifest(path)
        if manifest is not None:
            return path, manifest
    return None


def sweep(run_dir: str | Path, keep: Path | None) -> None:
    """Remove what killed saves left: staging and trash folders, incomplete and superseded checkpoints."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if LEFTOVER_NAME.fullmatch(path.name) or (CHECKPOINT_NAME.fullmatch(path.name) and path != keep):
            trash = path if path.name.endswith(".trash") else run_dir / f".{path.name.lstrip('.')}.trash"
            if trash != path:
                _rename(path, trash)
            _remove_tree(trash)


# ----------------------------------------------------------------------------- the JSON structure
TENSOR, MAPPING, TUPLE = "$tensor", "$map", "$tuple"
_SCALARS = (type(None), bool, int, float, str)


def _encode(value: Any, tensors: dict, path: str) -> Any:
    """`value` as JSON, its tensors moved into `tensors` under their path."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, _SCALARS):
                raise TypeError(f"cannot checkpoint {path}: key {key!r}")
        return {MAPPING: [[key, _encode(item, tensors, f"{path}/{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"cannot checkpoint {path}: a {type(value).__name__}")


def _decode(node: Any, tensors: dict) -> Any:
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if isinstance(node, dict):
        kind, content = next(iter(node.items())) if len(node) == 1 else (None, None)
        if kind == TENSOR and content in tensors:
            return tensors[content]
        if kind == TUPLE and isinstance(content, list):
            return tuple(_decode(item, tensors) for item in content)
        if kind == MAPPING and isinstance(content, list) and all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], _SCALARS) for pair in content):
            return {key: _decode(item, tensors) for key, item in content}
        raise CheckpointError(f"unexpected entry {json.dumps(node)[:80]}")
    if isinstance(node, _SCALARS):
        return node
    raise CheckpointError(f"unexpected entry {node!r:.80}")


def _unshared(tensors: dict) -> dict:
    """Tensors that share storage (tied weights) copied apart: safetensors stores each once."""
    seen, result = set(), {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return result


def _state_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    tensors: dict = {}
    structure = _encode(state, tensors, "")
    return save(_unshared(tensors), metadata={STATE_KEY: json.dumps(structure)})


def _read_state(path: Path) -> dict:
    """A state file written by `_state_bytes`, read without unpickling anything."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            raw = (file.metadata() or {}).get(STATE_KEY)
            if raw is None or len(raw) > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: not a clue-mtl state file")
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        state = _decode(json.loads(raw), tensors)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except Exception as error:  # OSError, SafetensorError, JSON errors, RecursionError: all mean unreadable
        raise CheckpointError(f"{path}: not a readable state file ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a clue-mtl state file")
    return state


# ----------------------------------------------------------------------------- random generators
def _rng_state() -> dict:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, path: Path) -> None:
    import numpy as np
    import torch

    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a random-generator state ({error})") from None


# ----------------------------------------------------------------------------- saving and loading
def save_checkpoint(run_dir: str | Path, step: int, *, model, components: dict[str, Any], recipe_state: dict,
                    fingerprint: str, accelerator) -> Path:
    """Write `checkpoint-STEP/` (see the module doc) and remove the older ones; returns its path.

    components: name -> an object with `state_dict()`/`load_state_dict()` (optimisers, schedulers,
    the weighting strategy, the EMA); the model is saved from `accelerator.unwrap_model(model)`.
    """
    run_dir = Path(run_dir)
    target, staging = checkpoint_dir(run_dir, step), run_dir / f".checkpoint-{step}.partial"
    main = accelerator.is_main_process
    if main:
        if staging.exists():
            _remove_tree(staging)
        _make_dir(staging)
    accelerator.wait_for_everyone()
    _write_bytes(staging / rng_file(accelerator.process_index), _state_bytes(_rng_state()))
    if main:
        _write_model(accelerator.unwrap_model(model), staging / MODEL_FILE)
        state = {name: part.state_dict() for name, part in components.items()}
        state["accelerator_step"] = accelerator.step
        _write_bytes(staging / STATE_FILE, _state_bytes(state))
        _write_bytes(staging / RECIPE_STATE_FILE, json.dumps(recipe_state, indent=2).encode())
    accelerator.wait_for_everyone()
    if main:
        names = [MODEL_FILE, STATE_FILE, RECIPE_STATE_FILE, *map(rng_file, range(accelerator.num_processes))]
        manifest = {"format": FORMAT, "step": step, "config_fingerprint": fingerprint,
                    "processes": accelerator.num_processes,
                    "files": {name: (staging / name).stat().st_size for name in names}}
        _write_bytes(staging / COMPLETE_FILE, json.dumps(manifest, indent=2).encode())
        if target.exists():  # the same step saved again: the old copy goes first, to the trash
            _rename(target, run_dir / f".{target.name}.trash")
        _rename(staging, target)
        sweep(run_dir, keep=target)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(run_dir: str | Path, *, model, components: dict[str, Any], fingerprint: str,
                    accelerator) -> dict:
    """Restore the newest complete checkpoint into `model` and `components`; returns the recipe state."""
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    found = latest_checkpoint(run_dir)
    if found is None:
        legacy = [name for name in LEGACY_CHECKPOINTS if (run_dir / name).is_dir()]
        hint = (f"; {run_dir / legacy[0]} is the old pickled format, which is not loaded: start again with "
                "--overwrite" if legacy else "")
        raise CheckpointError(f"nothing to resume: {run_dir} holds no complete checkpoint{hint}")
    directory, manifest = found
    if manifest.get("config_fingerprint") != fingerprint:
        raise CheckpointError(f"{directory} was written under another config than the one given "
                              f"(fingerprint {manifest.get('config_fingerprint')!r}, now {fingerprint!r})")
    if manifest.get("processes") != accelerator.num_processes:
        raise CheckpointError(f"{directory} was written by {manifest.get('processes')} process(es); resume it "
                              f"with as many (now {accelerator.num_processes}) to continue it exactly")
    try:
        load_model(accelerator.unwrap_model(model), str(directory / MODEL_FILE), strict=True)
    except Exception as error:  # a corrupt file (SafetensorError) or other tensors (RuntimeError)
        raise CheckpointError(f"{directory / MODEL_FILE}: does not fit this model "
                              f"({str(error).splitlines()[0][:200]})") from None
    state = _read_state(directory / STATE_FILE)
    if set(state) != {*components, "accelerator_step"}:
        raise CheckpointError(f"{directory}: holds {sorted(state)}, this run needs {sorted(components)}")
    for name, part in components.items():
        try:
            part.load_state_dict(state[name])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{directory / STATE_FILE}: {name} does not fit this run ({error})") from None
    if not isinstance(state["accelerator_step"], int):
        raise CheckpointError(f"{directory / STATE_FILE}: accelerator_step is not a number")
    accelerator.step = state["accelerator_step"]
    recipe_state = _read_json(directory / RECIPE_STATE_FILE)
    rng_path = directory / rng_file(accelerator.process_index)
    _set_rng_state(_read_state(rng_path), rng_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sweep(run_dir, keep=directory)
    accelerator.wait_for_everyone()
    return recipe_state


def _read_json(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            value = json.loads(file.read(MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


# ----------------------------------------------------------------------------- for the run folder
def checkpoint_names(run_dir: str | Path) -> list[str]:
    """The names of the `checkpoint-STEP` folders in `run_dir`, newest first."""
    return [path.name for _, path in _checkpoints(Path(run_dir))]


def remove_entries(run_dir: str | Path, names: list[str]) -> None:
    """Remove the named entries of `run_dir` and whatever a killed save left (`runs.folder.RunFolder.clear`)."""
    run_dir = Path(run_dir)
    for name in names:
        _remove_tree(run_dir / name)  # a checkpoint half removed lacks files its COMPLETE lists: not complete
    sweep(run_dir, keep=None)
