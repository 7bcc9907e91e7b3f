"""Run configuration: dataclasses, YAML files and strict `key=value` overrides.

A typo fails loudly: unknown keys and values of the wrong type raise `ConfigError` naming the key.
Every number must be finite and in its range. YAML is read by `read_yaml`, bounded before anything
expands: at most `MAX_YAML_BYTES`, no aliases (a few hundred bytes of nested aliases expand to
gigabytes), nesting at most `MAX_YAML_DEPTH` deep, keys that are plain strings and given once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clue_mtl.config.structure import HeadConfig, PrivateConfig, validate_structure
from clue_mtl.errors import ConfigError

# `auto`: `hardware.resolve_precision` picks bf16 where the hardware has it (resolved at run time).
PRECISIONS = ("no", "bf16", "fp16", "auto")
ATTENTION_KERNELS = ("auto", "math", "torch")
ENCODER_PASSES = ("auto", "joint", "per_task")
# `transformers.get_scheduler` names that need only warmup and total steps
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
# weighting methods whose weights follow the size of each task's loss (and DTP with kpi: likelihood)
LOSS_READERS = ("uncertainty", "dwa", "famo", "gradnorm")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio")  # `tracking.py`: Accelerate's trackers

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_SEED = 2**32 - 1                    # numpy's global seed (Accelerate's set_seed) takes 32 bits
MAX_BATCH = 1 << 16                     # rows per step, micro-batches per step: sanity bounds
MAX_LENGTH = 1 << 16                    # tokens per row, hidden units of a head
MAX_STEPS = 10**9
MAX_MINUTES = 60 * 24 * 366             # a year of training: a sanity bound
# Settings that change nothing a run computes: a run may resume with other values of these.
RESUMABLE_KEYS = ("name", "output_dir", "train.num_threads", "train.report_to")
# Keys added since runs were first saved, each with the value that does what runs did before it:
# a saved config without the key is the same run as one holding that value (fingerprints leave
# the key out at that value, so checkpoints saved before it still resume).
ADDED_KEYS = {"train.scheduler": "linear", "model.heads": {}, "model.private": {},
              "auxiliary_mlm.batch_size": 0, "auxiliary_mlm.mlm_probability": 0.15,
              "auxiliary_mlm.anneal": "none", "auxiliary_mlm.pairs": False, "auxiliary_mlm.max_texts": None,
              "train.encoder_pass": "per_task", "train.max_minutes": None,
              "train.warmup_steps": None, "model.frozen_layers": 0, "train.cache_frozen": False,
              "train.cache_max_gb": 8.0}
# The same for pre-training configs, whose keys partly share names with the run config's: a run
# config always saved `train.layer_lr_decay`, a pre-training config only since it was added there.
PRETRAIN_ADDED_KEYS = {**ADDED_KEYS, "train.layer_lr_decay": 1.0}


# ----------------------------------------------------------------------------- bounded YAML
class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases, deep nesting, non-string and repeated keys."""

    where = "config"
    depth = 0

    def _fail(self, mark, message: str):
        raise ConfigError(f"{self.where}:{mark.line + 1}: {message}")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._fail(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed in a config; "
                                         "write the value out")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                self._fail(self.peek_event().start_mark, f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag != "tag:yaml.org,2002:str":
                self._fail(key_node.start_mark, f"key {key_node.value!r} is not a name (YAML reads it as "
                                                f"{key_node.tag.rsplit(':', 1)[-1]}); quote it")
            if key_node.value in seen:
                self._fail(key_node.start_mark, f"key {key_node.value!r} is given twice")
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document read safely and boundedly; errors are `ConfigError`s naming `where` and the line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_YAML_BYTES:,} bytes; not a config")
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses unprintable characters here already
        loader.where = where
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({error.problem or error.context})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """A YAML file read as `parse_yaml` does, after checking it is a readable UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_YAML_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES:,} bytes; not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x})") from None
    return parse_yaml(text, str(path))


@dataclass
class DataConfig:
    data_dir: str = "data"
    tasks: list[str] = field(default_factory=lambda: ["ocnli", "ocemotion", "tnews"])
    dev_fraction: float = 0.1
    split_seed: int = 42
    max_length: int = 128
    max_train_rows: int | None = None   # per task, a stratified sample; None keeps all rows
    max_dev_rows: int | None = None     # per task, for quick evaluation
    id_mode: str = "file"               # submission ids: "file" (the test file's ids) or "row"


@dataclass
class ModelConfig:
    encoder: str = "artifacts/e5-small"  # hub name or local folder
    pooling: str = "mean"                # first | mean | max | mean_max | attention; see pooling.py
    task_pooling: dict[str, str] = field(default_factory=dict)  # per-task override
    dropout: float = 0.1
    head_hidden: int = 0                 # 0: a linear head; >0: one hidden layer of that size
    # per-task structure (structure.py): e.g. {ocnli: {type: san, steps: 5}, tnews: {features: scalar_mix}}
    heads: dict[str, HeadConfig] = field(default_factory=dict)
    # per-task private capacity (shared-private): e.g. {ocnli: {type: layers, layers: 2}, tnews: {type: lora}}
    private: dict[str, PrivateConfig] = field(default_factory=dict)
    freeze_word_embeddings: bool = False # keep the (large) token embedding matrix fixed
    num_layers: int = 0                  # >0: keep only the encoder's bottom N layers (shallower, faster)
    attention_dropout: float | None = None  # dropout on the attention probabilities; None keeps the encoder's (0.1 in BERT/XLM-R)
    frozen_layers: int = 0               # >0: the embeddings and the bottom k encoder layers fixed, run without dropout (frozen.py)


@dataclass
class WeightingConfig:
    method: str = "equal"
    params: dict[str, Any] = field(default_factory=dict)  # method hyperparameters
    lr: float = 0.025                    # its own optimiser, for methods with learned weights


@dataclass
class TrainConfig:
    steps: int = 1000                    # optimiser steps (not read with max_minutes)
    # >0: train by the clock (`budget.py`): the first steps are timed and fix the total that fills
    # this many minutes of optimiser steps, in place of `steps`; evaluation and checkpoints are
    # not charged. null: `steps` rules
    max_minutes: float | None = None
    batch_size: int = 32                 # rows per step over all tasks, split by `sampling`
    sampling: str = "power"              # proportional | power | uniform
    sampling_alpha: float = 0.75         # |D|^alpha for "power" (BAM uses 0.75)
    lr: float = 5e-5
    head_lr: float = 1e-3
    layer_lr_decay: float = 1.0          # <1: lower layers learn more slowly
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    # warm-up in steps, in place of warmup_ratio: a schedule that does not depend on the run's
    # length (with `scheduler: constant_with_warmup`, one long run serves any budget)
    warmup_steps: int | None = None
    scheduler: str = "linear"            # after warmup: linear | cosine | constant_with_warmup | ... (SCHEDULERS)
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    mixed_precision: str = "no"          # no | bf16 | fp16 | auto (bf16 where the hardware has it, else no)
    class_weighting: bool = False        # inverse-sqrt-frequency class weights in the loss
    length_grouping: bool = True
    eval_every: int = 200
    early_stopping_patience: int = 0     # evaluations without gain before stopping; 0 never stops
    log_every: int = 10
    num_threads: int = 0                 # torch threads on CPU; 0 leaves torch's default
    fused_optimizer: bool = True         # AdamW's fused kernel where torch has one (CPU, CUDA); false: the per-tensor loop
    attention_kernel: str = "auto"       # auto (math on a CPU in bf16, else torch's pick) | math | torch (`hardware.attention_kernel`)
    encoder_pass: str = "auto"           # joint (one pass over all tasks' rows) | per_task | auto (`resolved_encoder_pass`)
    cache_frozen: bool = False           # with model.frozen_layers: each row's layer-k states computed once, stored (bf16) under RUN/cache and read back (frozen.py)
    cache_max_gb: float = 8.0            # the most the cache stores; rows past it run the frozen layers at every visit
    ema_decay: float = 0.0               # >0: evaluate and save an exponential moving average of the weights
    fgm_epsilon: float = 0.0             # >0: FGM adversarial training on the word embeddings
    report_to: str = "none"              # none | tensorboard | wandb | mlflow | trackio (`tracking.py`)
    seed: int = 42


@dataclass
class DistillConfig:
    soft_labels: str | None = None       # a file from `clue-mtl distill-labels`; None trains on gold labels only
    mode: str = "fixed"                  # fixed: MT-DNN-KD mix; annealed: BAM teacher annealing (teacher -> gold)
    mix: float = 0.5                     # the teacher's share of the loss in fixed mode
    temperature: float = 1.0
    kind: str = "kl"                     # kl | soft_ce


@dataclass
class AuxiliaryMLMConfig:
    """Masked LM on the competition text as a fourth task, weighted with the three (MT-DNN's
    pre-training task joined with the supervised ones)."""
    batch_size: int = 0                  # corpus texts a step and process; 0: no auxiliary task
    mlm_probability: float = 0.15        # whole jieba words, as in pre-training
    anneal: str = "none"                 # none | linear: the masked-LM loss times 1 - step / steps
    pairs: bool = False                  # OCNLI's sentences as tokenizer(a, b) pairs
    max_texts: int | None = None         # an evenly spaced sample of the corpus (tests, quick runs)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    auxiliary_mlm: AuxiliaryMLMConfig = field(default_factory=AuxiliaryMLMConfig)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if annotation is Any:
        return _checked_any(value, key)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_type(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(annotation)
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{key}: key {bad_keys[0]!r} is not a name; quote it")
        return {k: _check_type(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, key)
    if annotation is str and isinstance(value, bool):
        # YAML 1.1 reads an unquoted `no` as False; for a text setting, the word was meant.
        return "yes" if value else "no"
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _finite(value: int | float, key: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r:.40}")
    return number


def _checked_any(value: Any, key: str) -> Any:
    """A free-form value (method parameters, config overrides): finite numbers, names as keys."""
    if isinstance(value, float):
        _finite(value, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: key {k!r} is not a name; quote it")
            _checked_any(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _checked_any(v, f"{key}[{i}]")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r:.60}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: key {bad_keys[0]!r} is not a name; quote it")
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''}{where}: "
                          f"{', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    config = _build(RunConfig, values, "")
    validate(config)
    # `auto` is resolved as the config is read, so the saved config, the checkpoint's fingerprint
    # and the resume check hold the pass that runs: a run saved before the key existed (one pass
    # per task) resumes wherever auto still gives that, and is refused where it now gives joint.
    config.train.encoder_pass = resolved_encoder_pass(config)
    return config


def resolved_encoder_pass(config: RunConfig) -> str:
    """`train.encoder_pass` with auto resolved: one pass over every task's rows (joint; 1.05-1.11x
    the whole step on 2 AMX cores: benchmarks/train_throughput, step_experiments) unless a task has
    private layers or adapters (its rows need an encoder of their own), or the weighting method
    backpropagates each task's loss alone (PCGrad, MGDA: one backward per task through one shared
    graph would need it retained)."""
    from clue_mtl.weighting import METHODS

    if config.train.encoder_pass != "auto":
        return config.train.encoder_pass
    per_task = bool(config.model.private) or METHODS[config.weighting.method].manual_gradients
    return "per_task" if per_task else "joint"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-5` -> (["train", "lr"], 3e-05). Values are read as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    value = parse_yaml(raw, f"override {text!r:.80}") if raw.strip() else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 3e-5 as a string
    return key.split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = copy.deepcopy(values) if values else {}
    for override in overrides:
        path, value = parse_override(override)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def _read_values(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The values of a YAML config file (or none) with `key=value` overrides applied."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train: ...) at the top, "
                              f"got a {type(values).__name__}")
        values = _float_strings(values)
    return apply_overrides(values, list(overrides))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    values = _read_values(path, list(overrides))
    with _naming_the_file(path):
        return config_from_dict(values)


def load_run_config(path: str | Path) -> RunConfig:
    """A run folder's saved config as that run ran: a key added since it was saved (`ADDED_KEYS`)
    takes the value that does what runs did before it, not today's default."""
    values = _read_values(path, [])
    for dotted, value in ADDED_KEYS.items():
        *sections, key = dotted.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):  # anything else is left for validation to name
            node.setdefault(key, copy.deepcopy(value))
    with _naming_the_file(path):
        return config_from_dict(values)


@contextlib.contextmanager
def _naming_the_file(path: str | Path | None):
    """Errors in a config read from a file start with the file's name."""
    try:
        yield
    except ConfigError as error:
        if path is None or str(error).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {error}") from None


def _float_strings(values: Any) -> Any:
    """YAML 1.1 reads `3e-5` (no dot) as a string; read such strings as floats."""
    if isinstance(values, dict):
        return {k: _float_strings(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_float_strings(v) for v in values]
    if isinstance(values, str) and _looks_like_float(values) and "e" in values.lower():
        return float(values)
    return values


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True),
                          encoding="utf-8")


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict) or not values:
        return {prefix.rstrip("."): values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def added_keys(config: Any) -> dict[str, Any]:
    """The keys added since `config`'s kind of run was first saved (`ADDED_KEYS`, `PRETRAIN_ADDED_KEYS`)."""
    return PRETRAIN_ADDED_KEYS if isinstance(config, PretrainConfig) else ADDED_KEYS


def config_fingerprint(values: dict[str, Any], added: dict[str, Any] = ADDED_KEYS) -> str:
    """A digest of what a config makes a run compute (`RESUMABLE_KEYS` left out, and `added` keys
    at the value that does what runs did before them)."""
    flat = {k: v for k, v in _flatten(values).items()
            if k not in RESUMABLE_KEYS and not (k in added and v == added[k])}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       added: dict[str, Any] = ADDED_KEYS) -> list[str]:
    """`key: saved -> current` for every setting (outside `RESUMABLE_KEYS`) the two configs differ in."""
    old, new = added | _flatten(saved), added | _flatten(current)
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(set(old) | set(new))
            if key not in RESUMABLE_KEYS and old.get(key, missing) != new.get(key, missing)]


def validate(config: RunConfig) -> None:
    from clue_mtl.tasks import TASKS

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    _check_finite(config)
    unknown = [t for t in config.data.tasks if t not in TASKS]
    need(not unknown, f"data.tasks: unknown task(s) {unknown}; choose from {list(TASKS)}")
    need(len(config.data.tasks) > 0, "data.tasks: name at least one task")
    need(len(set(config.data.tasks)) == len(config.data.tasks), "data.tasks: a task is listed twice")
    need(0 < config.data.dev_fraction < 1, "data.dev_fraction must lie strictly between 0 and 1")
    need(config.data.id_mode in ("file", "row"), "data.id_mode must be 'file' or 'row'")
    need(config.data.max_length >= 8, "data.max_length must be at least 8")
    need(config.train.sampling in ("proportional", "power", "uniform"),
         "train.sampling must be proportional, power or uniform")
    need(config.train.mixed_precision in PRECISIONS, "train.mixed_precision must be no, bf16, fp16 or auto")
    need(config.train.attention_kernel in ATTENTION_KERNELS, "train.attention_kernel must be auto, math or torch")
    need(config.train.encoder_pass in ENCODER_PASSES, "train.encoder_pass must be auto, joint or per_task")
    need(config.train.batch_size >= len(config.data.tasks),
         "train.batch_size must give every task at least one row per step")
    need(config.train.steps > 0, "train.steps must be positive")
    need(0 < config.train.layer_lr_decay <= 1, "train.layer_lr_decay must lie in (0, 1]")
    need(config.train.grad_accumulation >= 1, "train.grad_accumulation must be at least 1")
    need(config.train.eval_every > 0 and config.train.log_every > 0, "train.eval_every and train.log_every must be positive")
    for name in ("max_train_rows", "max_dev_rows"):
        limit = getattr(config.data, name)
        need(limit is None or limit > 0, f"data.{name} must be positive (or null for all rows)")
    need(0 <= config.model.dropout < 1, "model.dropout must lie in [0, 1)")
    need(0 <= config.model.num_layers <= MAX_LENGTH, f"model.num_layers must lie in [0, {MAX_LENGTH:,}] (0 keeps all)")
    _validate_frozen(config, need)
    need(config.model.attention_dropout is None or 0 <= config.model.attention_dropout < 1,
         "model.attention_dropout must lie in [0, 1) (or null for the encoder's own)")
    need(0 <= config.model.head_hidden <= MAX_LENGTH, f"model.head_hidden must lie in [0, {MAX_LENGTH:,}]")
    need(config.train.steps <= MAX_STEPS, f"train.steps must be at most {MAX_STEPS:,}")
    _validate_numbers(config.train, need)
    _validate_schedule_and_tracking(config.train, need)
    need(config.train.batch_size <= MAX_BATCH, f"train.batch_size must be at most {MAX_BATCH:,}")
    need(config.train.grad_accumulation <= MAX_BATCH, f"train.grad_accumulation must be at most {MAX_BATCH:,}")
    need(config.train.head_lr >= 0, "train.head_lr must not be negative")
    need(config.train.sampling_alpha >= 0, "train.sampling_alpha must not be negative")
    need(config.train.early_stopping_patience >= 0, "train.early_stopping_patience must not be negative")
    need(0 <= config.data.split_seed <= MAX_SEED, f"data.split_seed must lie in [0, {MAX_SEED}]")
    need(config.data.max_length <= MAX_LENGTH, f"data.max_length must be at most {MAX_LENGTH:,}")
    need(config.weighting.lr >= 0, "weighting.lr must not be negative")
    auxiliary = config.auxiliary_mlm
    need(0 <= auxiliary.batch_size <= MAX_BATCH, f"auxiliary_mlm.batch_size must lie in [0, {MAX_BATCH:,}]")
    need(0 < auxiliary.mlm_probability < 1, "auxiliary_mlm.mlm_probability must lie strictly between 0 and 1")
    need(auxiliary.anneal in ("none", "linear"), "auxiliary_mlm.anneal must be none or linear")
    need(auxiliary.max_texts is None or auxiliary.max_texts >= 1, "auxiliary_mlm.max_texts must be at least 1")
    need(0 <= config.train.ema_decay < 1, "train.ema_decay must lie in [0, 1)")
    need(config.train.fgm_epsilon >= 0, "train.fgm_epsilon must not be negative")
    need(not (config.train.fgm_epsilon > 0 and config.model.freeze_word_embeddings),
         "train.fgm_epsilon needs trainable word embeddings (model.freeze_word_embeddings: false)")
    need(config.distill.mode in ("fixed", "annealed"), "distill.mode must be fixed or annealed")
    need(config.distill.kind in ("kl", "soft_ce"), "distill.kind must be kl or soft_ce")
    need(0 <= config.distill.mix <= 1, "distill.mix must lie in [0, 1]")
    need(config.distill.temperature > 0, "distill.temperature must be positive")
    bad_pooling = [t for t in config.model.task_pooling if t not in config.data.tasks]
    need(not bad_pooling, f"model.task_pooling names tasks not trained: {bad_pooling}")
    validate_structure(config.model, config.data.tasks, need)
    _validate_choices(config)  # last: it imports the models and weighting methods (torch)


def _validate_frozen(config: RunConfig, need) -> None:
    """`model.frozen_layers` and `train.cache_frozen`: what cannot hold is refused here where the
    config alone tells (the encoder's depth, private layers and adapters are checked at setup:
    `frozen.check_frozen`)."""
    frozen, train = config.model.frozen_layers, config.train
    need(0 <= frozen <= MAX_LENGTH, f"model.frozen_layers must lie in [0, {MAX_LENGTH:,}] (0 freezes nothing)")
    need(not (config.model.num_layers and frozen > config.model.num_layers),
         f"model.frozen_layers ({frozen}) must not pass model.num_layers ({config.model.num_layers})")
    need(not (frozen and train.fgm_epsilon > 0),
         "train.fgm_epsilon perturbs the word embeddings, which model.frozen_layers freezes")
    need(0 < train.cache_max_gb <= 1 << 20, "train.cache_max_gb must lie in (0, 1048576]")
    if not train.cache_frozen:
        return
    need(frozen > 0, "train.cache_frozen stores the frozen layers' output: set model.frozen_layers")
    need(not config.auxiliary_mlm.batch_size, "train.cache_frozen does not combine with the auxiliary masked LM "
         "(auxiliary_mlm.batch_size): its masked texts are not the stored rows")
    mixed = [task for task, head in config.model.heads.items() if head.features == "scalar_mix"]
    need(not mixed, f"model.heads.{mixed[0] if mixed else ''}: a scalar mix reads every layer, and "
         "train.cache_frozen stores layer model.frozen_layers alone")


def _check_finite(config: Any, prefix: str = "") -> None:
    """Every number of a config finite, also where the config was built in code rather than read."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{item.name}.")
        elif isinstance(value, dict) and all(dataclasses.is_dataclass(v) for v in value.values()):
            for key, entry in value.items():  # model.heads, model.private
                _check_finite(entry, f"{prefix}{item.name}.{key}.")
        elif isinstance(value, (float, dict, list)):
            _checked_any(value, prefix + item.name)


def _validate_schedule_and_tracking(train: Any, need) -> None:
    need(train.scheduler in SCHEDULERS, f"train.scheduler must be one of {', '.join(SCHEDULERS)}")
    need(train.report_to in REPORT_TO, f"train.report_to must be one of {', '.join(REPORT_TO)}")


def _validate_numbers(train: Any, need) -> None:
    """The ranges the two recipes' `train` sections share (finiteness is checked when reading)."""
    need(train.lr >= 0, "train.lr must not be negative")
    need(train.weight_decay >= 0, "train.weight_decay must not be negative")
    need(0 <= train.warmup_ratio <= 1, "train.warmup_ratio must lie in [0, 1]")
    need(train.warmup_steps is None or 0 <= train.warmup_steps <= MAX_STEPS,
         f"train.warmup_steps must lie in [0, {MAX_STEPS:,}] (or null for train.warmup_ratio)")
    need(train.grad_clip >= 0, "train.grad_clip must not be negative (0 turns clipping off)")
    need(0 <= train.num_threads <= 1024, "train.num_threads must lie in [0, 1024] (0 keeps torch's default)")
    need(0 <= train.seed <= MAX_SEED, f"train.seed must lie in [0, {MAX_SEED}]")
    need(train.max_minutes is None or 0 < train.max_minutes <= MAX_MINUTES,
         f"train.max_minutes must lie in (0, {MAX_MINUTES:,}] (or null to train for train.steps)")


# ----------------------------------------------------------------------------- pre-training
@dataclass
class PretrainDataConfig:
    data_dir: str = "data"
    max_length: int = 128
    max_texts: int | None = None         # an evenly spaced sample of the corpus (tests, quick runs)
    held_out_fraction: float = 0.02      # texts kept out of training to measure masked-LM loss
    max_held_out: int = 2000
    pairs: bool = False                  # OCNLI's sentences as tokenizer(a, b) pairs, not alone


@dataclass
class PretrainModelConfig:
    encoder: str = "artifacts/e5-small"  # hub name or local folder, with or without an LM head
    from_scratch: bool = False           # random weights from the encoder's config (and tokenizer)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. num_hidden_layers; saved
    dropout: float | None = None         # hidden and attention dropout while pre-training only
    trim_vocab: bool = False             # first keep only the embedding rows the corpus uses


@dataclass
class MaskingConfig:
    mlm_probability: float = 0.15        # fraction of tokens predicted, whole jieba words at a time
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1


@dataclass
class PretrainTrainConfig:
    steps: int = 1000                    # optimiser steps (not read with max_minutes)
    max_minutes: float | None = None     # >0: train by the clock, as `TrainConfig.max_minutes`
    batch_size: int = 32                 # texts per step and process
    lr: float = 1e-4
    layer_lr_decay: float = 1.0          # <1: lower encoder layers learn more slowly (the head at lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    # warm-up in steps, in place of warmup_ratio: a schedule that does not depend on the run's
    # length (with `scheduler: constant_with_warmup`, one long run serves any budget)
    warmup_steps: int | None = None
    scheduler: str = "linear"            # after warmup: linear | cosine | constant_with_warmup | ... (SCHEDULERS)
    grad_clip: float = 1.0
    mixed_precision: str = "no"          # no | bf16 | fp16 | auto (bf16 where the hardware has it, else no)
    length_grouping: bool = True
    eval_every: int = 500
    eval_batch_size: int = 64
    log_every: int = 10
    num_threads: int = 0
    report_to: str = "none"              # none | tensorboard | wandb | mlflow | trackio (`tracking.py`)
    seed: int = 42
    # masked-LM head warm-up: the first steps (at most head_warmup_steps of `steps`) train the head
    # alone at head_warmup_lr, the encoder frozen, until the held-out loss, looked at every
    # head_warmup_eval_every steps, gains less than head_warmup_min_gain nats; then everything
    # trains on linear warmup and decay over the steps left
    head_warmup_steps: int = 0
    head_warmup_lr: float = 1e-3
    head_warmup_eval_every: int = 100
    head_warmup_min_gain: float = 0.02


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    output_dir: str = "runs"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] = ()) -> PretrainConfig:
    values = _read_values(path, list(overrides))
    with _naming_the_file(path):
        config = _build(PretrainConfig, values, "")
        validate_pretrain(config)
    return config


def validate_pretrain(config: PretrainConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    _check_finite(config)
    data, masking, train = config.data, config.masking, config.train
    need(data.max_length >= 8, "data.max_length must be at least 8")
    need(data.max_texts is None or data.max_texts >= 2, "data.max_texts must be at least 2")
    need(0 < data.held_out_fraction < 1, "data.held_out_fraction must lie strictly between 0 and 1")
    need(data.max_held_out >= 1, "data.max_held_out must be at least 1")
    need(config.model.dropout is None or 0 <= config.model.dropout < 1, "model.dropout must lie in [0, 1)")
    need(0 < masking.mlm_probability < 1, "masking.mlm_probability must lie strictly between 0 and 1")
    need(masking.mask_replace_prob >= 0 and masking.random_replace_prob >= 0
         and masking.mask_replace_prob + masking.random_replace_prob <= 1,
         "masking.mask_replace_prob and random_replace_prob must be >= 0 and sum to at most 1")
    need(train.steps > 0, "train.steps must be positive")
    need(train.batch_size > 0 and train.eval_batch_size > 0, "train.batch_size and eval_batch_size must be positive")
    need(train.eval_every > 0 and train.log_every > 0, "train.eval_every and log_every must be positive")
    need(train.mixed_precision in PRECISIONS, "train.mixed_precision must be no, bf16, fp16 or auto")
    need(train.batch_size <= MAX_BATCH and train.eval_batch_size <= MAX_BATCH,
         f"train.batch_size and eval_batch_size must be at most {MAX_BATCH:,}")
    need(data.max_length <= MAX_LENGTH, f"data.max_length must be at most {MAX_LENGTH:,}")
    need(train.steps <= MAX_STEPS, f"train.steps must be at most {MAX_STEPS:,}")
    _validate_numbers(train, need)
    _validate_schedule_and_tracking(train, need)
    need(0 < train.layer_lr_decay <= 1, "train.layer_lr_decay must lie in (0, 1]")
    if train.head_warmup_steps:
        need(0 < train.head_warmup_steps < train.steps, "train.head_warmup_steps must lie between 0 and train.steps")
        need(train.head_warmup_eval_every > 0, "train.head_warmup_eval_every must be positive")
        need(train.lr > 0 and train.head_warmup_lr > 0 and train.head_warmup_min_gain >= 0,
             "train.lr and train.head_warmup_lr must be positive, train.head_warmup_min_gain at least 0")
        need(train.scheduler == "linear", "train.head_warmup_steps works with train.scheduler linear only")
        need(not config.model.from_scratch, "train.head_warmup_steps: a model from scratch has no encoder to keep")
        need(train.max_minutes is None, "train.head_warmup_steps counts steps of train.steps; it does not combine "
                                        "with train.max_minutes")
        need(train.warmup_steps is None, "train.head_warmup_steps schedules its own warm-up by train.warmup_ratio; "
                                         "it does not combine with train.warmup_steps")
    need(train.head_warmup_steps >= 0, "train.head_warmup_steps must be at least 0")


def weighted_tasks(config: RunConfig) -> list[str]:
    """The losses the weighting combines: the tasks, and the auxiliary masked LM where it is on."""
    from clue_mtl.tasks import MLM_TASK

    return [*config.data.tasks, *([MLM_TASK] if config.auxiliary_mlm.batch_size else [])]


def _validate_choices(config: RunConfig) -> None:
    """Names chosen from the kit's registries: poolings and weighting methods with their parameters."""
    from clue_mtl.config.structure import POOLING_NAMES
    from clue_mtl.weighting import build_weighting

    for where, pooling in [("model.pooling", config.model.pooling)] + [
            (f"model.task_pooling.{t}", p) for t, p in config.model.task_pooling.items()]:
        if pooling not in POOLING_NAMES:
            raise ConfigError(f"{where}: unknown pooling {pooling!r}; choose from {', '.join(POOLING_NAMES)}")
    try:
        weighting = build_weighting(config.weighting.method, weighted_tasks(config), config.weighting.params)
    except ValueError as error:
        raise ConfigError(f"weighting: {error}") from None
    reads_losses = config.weighting.method in LOSS_READERS or (
        config.weighting.method == "dtp" and config.weighting.params.get("kpi") == "likelihood")
    if config.distill.soft_labels and config.distill.kind == "soft_ce" and reads_losses:
        raise ConfigError(f"distill.kind soft_ce adds the teacher's entropy (times T^2) to each task's loss, which "
                          f"weighting.method {config.weighting.method!r} reads as signal; use distill.kind kl "
                          "(the same gradients, without the constant)")
    if config.train.fgm_epsilon > 0 and weighting.manual_gradients:
        raise ConfigError(f"train.fgm_epsilon does not combine with weighting.method {config.weighting.method!r}, "
                          "which writes gradients by hand")
    if config.train.encoder_pass == "joint" and config.model.private:
        raise ConfigError("train.encoder_pass joint runs one encoder for every task; model.private gives tasks "
                          "their own layers or adapters (use auto or per_task)")
    if config.train.encoder_pass == "joint" and weighting.manual_gradients:
        raise ConfigError(f"train.encoder_pass joint shares one graph between the tasks; weighting.method "
                          f"{config.weighting.method!r} backpropagates each task alone (use auto or per_task)")
