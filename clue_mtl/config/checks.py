"""Config validation: every value in its range, choices among the kit's names, settings that do not combine.

`validate` checks a run config, `validate_pretrain` a pre-training config; the first failed check
raises `ConfigError` with its message. Torch is imported only by the last check (`_validate_choices`,
the weighting methods), so a config refused earlier costs no torch import.
"""

from __future__ import annotations

from typing import Any

from clue_mtl.config.building import check_finite
from clue_mtl.config.policy import weighted_tasks
from clue_mtl.config.schema import (ATTENTION_KERNELS, ENCODER_PASSES, PRECISIONS, REPORT_TO, SCHEDULERS,
                                    PretrainConfig, RunConfig)
from clue_mtl.config.structure import POOLING_NAMES, validate_structure
from clue_mtl.errors import ConfigError

# weighting methods whose weights follow the size of each task's loss (and DTP with kpi: likelihood)
LOSS_READERS = ("uncertainty", "dwa", "famo", "gradnorm")

MAX_SEED = 2**32 - 1                    # numpy's global seed (Accelerate's set_seed) takes 32 bits
MAX_BATCH = 1 << 16                     # rows per step, micro-batches per step: sanity bounds
MAX_LENGTH = 1 << 16                    # tokens per row, hidden units of a head
MAX_STEPS = 10**9
MAX_MINUTES = 60 * 24 * 366             # a year of training: a sanity bound


def validate(config: RunConfig) -> None:
    from clue_mtl.tasks import TASKS

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    check_finite(config)
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


def validate_pretrain(config: PretrainConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    check_finite(config)
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


def _validate_choices(config: RunConfig) -> None:
    """Names chosen from the kit's registries: poolings and weighting methods with their parameters."""
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
