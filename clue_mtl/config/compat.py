"""Configs across versions: keys added since runs were first saved, fingerprints, differences.

A run folder written before a key existed must still resume: its saved config, without the key, is
the same run as one holding the key's `ADDED_KEYS` value, and fingerprints leave such keys out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clue_mtl.config.schema import PretrainConfig

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
