"""The config schema: every key of a run config and a pre-training config, its type, default and meaning.

The dataclasses are the documentation: each key's comment says what it does. Per-task structure
(`model.heads`, `model.private`) is in `structure.py`; the checks of values in `checks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clue_mtl.config.structure import HeadConfig, PrivateConfig

# `auto`: `hardware.resolve_precision` picks bf16 where the hardware has it (resolved at run time).
PRECISIONS = ("no", "bf16", "fp16", "auto")
ATTENTION_KERNELS = ("auto", "math", "torch")
ENCODER_PASSES = ("auto", "joint", "per_task")
# `transformers.get_scheduler` names that need only warmup and total steps
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio")  # `tracking.py`: Accelerate's trackers


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
