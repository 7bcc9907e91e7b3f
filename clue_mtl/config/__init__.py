"""Run and pre-training configs: read from bounded YAML with strict overrides, typed, checked, fingerprinted.

One concept a module, from the bottom: `reading` (bounded YAML, FILE:LINE errors, `key=value`
overrides), `structure` (per-task heads and private parts), `schema` (the dataclasses: every key,
its default and meaning), `building` (values to dataclasses, types checked), `policy` (what
`train.encoder_pass: auto` resolves to, the losses the weighting combines), `checks` (ranges,
choices, settings that do not combine), `compat` (keys added since runs were saved, fingerprints,
differences), `loading` (`load_config` and the other entry points). Callers import from here.
"""

from clue_mtl.config.checks import (LOSS_READERS, MAX_BATCH, MAX_LENGTH, MAX_MINUTES, MAX_SEED, MAX_STEPS, validate,
                                    validate_pretrain)
from clue_mtl.config.compat import (ADDED_KEYS, PRETRAIN_ADDED_KEYS, RESUMABLE_KEYS, added_keys, config_differences,
                                    config_fingerprint)
from clue_mtl.config.loading import (config_from_dict, config_to_dict, load_config, load_pretrain_config,
                                     load_run_config, save_config)
from clue_mtl.config.policy import resolved_encoder_pass, weighted_tasks
from clue_mtl.config.reading import (MAX_YAML_BYTES, MAX_YAML_DEPTH, apply_overrides, parse_override, parse_yaml,
                                     read_yaml)
from clue_mtl.config.schema import (ATTENTION_KERNELS, ENCODER_PASSES, PRECISIONS, REPORT_TO, SCHEDULERS,
                                    AuxiliaryMLMConfig, DataConfig, DistillConfig, MaskingConfig, ModelConfig,
                                    PretrainConfig, PretrainDataConfig, PretrainModelConfig, PretrainTrainConfig,
                                    RunConfig, TrainConfig, WeightingConfig)
from clue_mtl.config.structure import HeadConfig, PrivateConfig
from clue_mtl.errors import ConfigError

__all__ = [
    # loading and saving
    "load_config", "load_pretrain_config", "load_run_config", "config_from_dict", "config_to_dict", "save_config",
    "ConfigError",
    # the schema
    "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "WeightingConfig", "DistillConfig", "AuxiliaryMLMConfig",
    "HeadConfig", "PrivateConfig", "PretrainConfig", "PretrainDataConfig", "PretrainModelConfig", "MaskingConfig",
    "PretrainTrainConfig", "PRECISIONS", "ATTENTION_KERNELS", "ENCODER_PASSES", "SCHEDULERS", "REPORT_TO",
    # checks and their bounds
    "validate", "validate_pretrain", "LOSS_READERS", "MAX_SEED", "MAX_BATCH", "MAX_LENGTH", "MAX_STEPS", "MAX_MINUTES",
    # policy
    "resolved_encoder_pass", "weighted_tasks",
    # across versions
    "ADDED_KEYS", "PRETRAIN_ADDED_KEYS", "RESUMABLE_KEYS", "added_keys", "config_fingerprint", "config_differences",
    # YAML
    "read_yaml", "parse_yaml", "parse_override", "apply_overrides", "MAX_YAML_BYTES", "MAX_YAML_DEPTH",
]
