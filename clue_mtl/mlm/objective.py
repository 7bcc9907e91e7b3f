"""Masked-LM pieces that both recipes use: pre-training (`recipes/pretrain.py`) and masked LM as an
auxiliary fourth task of multi-task training (`recipes/multitask.py`, `auxiliary_mlm:` in a run config).

- `encode_texts`: corpus texts (or OCNLI pairs) to token ids and jieba word units, file-cached;
- `MaskedBatches`: the masked batch of every step, a pure function of (seed, step, process);
- `load_masked_lm`, `set_unigram_bias`: a checkpoint with its masked-LM head, or a new head tied to
  the word embedding with the corpus's log unigram frequencies as its bias;
- `MaskedLMObjective`: the summed loss over masked positions only (the vocabulary-wide head never
  runs on the other 85% of the tokens), optionally with the encoder frozen (head warm-up);
- `WithMaskedLM`: a multi-task model and a masked-LM head over its shared encoder, one module, so
  that Accelerate and DDP see one model and the checkpoint holds the head.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clue_mtl.atomic import replace_file
from clue_mtl.data.batching import EncodedTask, TaskRows, TaskStream
from clue_mtl.errors import ConfigError
from clue_mtl.mlm.masking import Text, WholeWordMaskCollator
from clue_mtl.tasks import MLM_TASK

DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
HEAD_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")  # checkpoint classes that carry an LM head


# ----------------------------------------------------------------------------- corpus features
def sample_texts(texts: list, limit: int | None) -> list:
    """At most `limit` texts, evenly spaced over the corpus (so every task and split appears)."""
    if limit is None or len(texts) <= limit:
        return texts
    return [texts[i * len(texts) // limit] for i in range(limit)]


def paired_corpus(train_texts: list[str], pairs: list[tuple[str, str]]) -> list:
    """The training texts with OCNLI's sentences kept as `(premise, hypothesis)` pairs: each pair
    whose two sentences are both training texts, and every other training text alone. A pair
    touching a held-out sentence is dropped, so the held-out texts stay unseen."""
    kept = set(train_texts)
    pairs = [pair for pair in pairs if pair[0] in kept and pair[1] in kept]
    paired = {text for pair in pairs for text in pair}
    return [text for text in train_texts if text not in paired] + pairs


def _text_digest_part(text: Text) -> str:
    return text if isinstance(text, str) else "\x1e" + "\x1f".join(text)


def encode_texts(collator: WholeWordMaskCollator, texts: Sequence[Text], *, cache_dir: str | Path | None,
                 fingerprint: str) -> list[dict[str, np.ndarray]]:
    """`collator.encode(texts)` (tokens, jieba word units and, for BERT-style pairs, segment ids),
    through a file cache."""
    cache_file = None
    if cache_dir is not None:
        # v2: the bare word-boundary piece is no longer a unit (units cached before it are stale)
        digest = hashlib.sha1(f"units-v2\n{fingerprint}\n{collator.max_length}\n".encode())
        digest.update("\n".join(map(_text_digest_part, texts)).encode("utf-8"))
        cache_file = Path(cache_dir) / f"mlm-{digest.hexdigest()[:20]}.npz"
        if cache_file.exists():
            return _read_features(cache_file)
    features = [{key: np.asarray(value, dtype=np.int64) for key, value in feature.items()}
                for feature in collator.encode(list(texts))]
    collator.word_spans.clear()  # the segmentation cache is not needed once the units exist
    if cache_file is not None:
        _write_features(cache_file, features)
    return features


def _write_features(path: Path, features: list[dict[str, np.ndarray]]) -> None:
    arrays = {"lengths": np.array([len(f["input_ids"]) for f in features]),
              "input_ids": np.concatenate([f["input_ids"] for f in features]),
              "word_units": np.concatenate([f["word_units"] for f in features])}
    segmented = np.array(["token_type_ids" in f for f in features])
    if segmented.any():
        arrays["segmented"] = segmented
        arrays["token_type_ids"] = np.concatenate([f.get("token_type_ids", np.zeros_like(f["input_ids"]))
                                                   for f in features])
    replace_file(path, lambda temporary: np.savez(temporary, **arrays))


def _read_features(path: Path) -> list[dict[str, np.ndarray]]:
    stored = np.load(path, allow_pickle=False)
    ends = np.cumsum(stored["lengths"])[:-1]
    columns = ["input_ids", "word_units"]
    features = [dict(zip(columns, values)) for values in zip(*(np.split(stored[c], ends) for c in columns))]
    if "segmented" in stored:
        for feature, segmented, segments in zip(features, stored["segmented"],
                                                np.split(stored["token_type_ids"], ends)):
            if segmented:
                feature["token_type_ids"] = segments
    return features


def fixed_masked_batches(collator: WholeWordMaskCollator, features: list[dict], batch_size: int) -> list[dict]:
    """The held-out texts masked once, from the collator's seed, in batches of similar length.
    All texts are masked in one call, so the masks do not depend on `batch_size`."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    masked = collator([features[i] for i in order])
    batches = []
    for start in range(0, len(order), batch_size):
        rows = slice(start, start + batch_size)
        width = int(masked["attention_mask"][rows].sum(1).max())
        batches.append({key: value[rows, :width] for key, value in masked.items()})
    return batches


class MaskedBatches:
    """The masked batch of every step, as this process's share of the global batch: rows from
    `batching.TaskStream` (a pure function of seed and step), masks seeded by (seed, step, process)."""

    def __init__(self, features: list[dict], collator: WholeWordMaskCollator, batch_size: int, *, seed: int,
                 length_grouping: bool, process_index: int = 0, num_processes: int = 1):
        self.features, self.collator, self.seed = features, collator, seed
        self.process_index, self.num_processes = process_index, num_processes
        data = EncodedTask(task="corpus", ids=[], input_ids=[f["input_ids"] for f in features], labels=None)
        self.stream = TaskStream(data, batch_size * num_processes, seed, length_grouping)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rows = self.stream.indices(step)[self.process_index::self.num_processes]
        mask_seed = np.random.SeedSequence([self.seed, step, self.process_index]).generate_state(1, np.uint64)[0]
        self.collator.generator.manual_seed(int(mask_seed >> np.uint64(1)))
        return self.collator([self.features[i] for i in rows])

    def epochs_seen(self, step: int) -> float:
        return step / self.stream.batches_per_epoch


# ----------------------------------------------------------------------------- the head
def load_masked_lm(source: str, *, from_scratch: bool = False, config_overrides: dict | None = None,
                   dropout: float | None = None) -> tuple[nn.Module, bool, dict[str, float]]:
    """`(model, new_head, saved_dropout)`: an `AutoModelForMaskedLM` in float32 from `source`.

    Where `source` holds no masked-LM head (or `from_scratch`), the new head's decoder is tied to
    the word embedding. `config_overrides` change the config (and stay in it); `dropout` sets
    every dropout field of the config for pre-training, and `saved_dropout` holds the values to
    write back when saving.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(source)
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    has_head = not from_scratch and any(a.endswith(HEAD_ARCHITECTURES) for a in config.architectures or [])
    if not has_head:
        config.tie_word_embeddings = True
    saved_dropout = {name: getattr(config, name) for name in DROPOUT_FIELDS
                     if isinstance(getattr(config, name, None), float)}
    if dropout is not None:
        for name in saved_dropout:
            setattr(config, name, dropout)
    if from_scratch:
        return AutoModelForMaskedLM.from_config(config, dtype=torch.float32), True, saved_dropout
    model, info = AutoModelForMaskedLM.from_pretrained(source, config=config, dtype=torch.float32,
                                                       output_loading_info=True)
    prefix = model.base_model_prefix + "."
    new_head = any(not key.startswith(prefix) for key in info["missing_keys"])
    return model, new_head, saved_dropout


def set_unigram_bias(model: nn.Module, features: list[dict], skip_ids) -> None:
    """The output bias := log unigram frequency of the features' tokens (add-one smoothed)."""
    bias = getattr(model.get_output_embeddings(), "bias", None)
    if bias is None:
        return
    counts = np.bincount(np.concatenate([f["input_ids"] for f in features]), minlength=len(bias))
    counts = counts[:len(bias)].astype(np.float64)
    counts[list(skip_ids)] = 0.0
    with torch.no_grad():
        bias.copy_(torch.from_numpy(np.log((counts + 1.0) / (counts + 1.0).sum())))


def head_module_name(model: nn.Module) -> str | None:
    """The child of a masked-LM model that is its whole head (`lm_head`, `cls`, ...), or None
    where the head is not one module over the base model."""
    base, output = model.base_model, model.get_output_embeddings()
    heads = [name for name, child in model.named_children() if child is not base]
    if len(heads) == 1 and output is not None and any(m is output for m in getattr(model, heads[0]).modules()):
        return heads[0]
    return None


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct predictions) over the masked positions' logits."""
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, (logits.detach().argmax(-1) == targets).sum()


class MaskedLMObjective(nn.Module):
    """Summed masked-LM loss, correct predictions and predicted tokens of a batch.

    The vocabulary-wide head runs on the labelled positions only, where the model is a base model
    plus one head module (BERT, RoBERTa, XLM-R, DeBERTa, ...); otherwise the full forward is used.
    With `frozen_encoder` the base model runs without gradients (head warm-up; needs the one-module head).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head_name = head_module_name(model)  # a name: the head is not registered twice

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, frozen_encoder: bool = False):
        selected = labels != -100
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # BERT-style pairs; tokenizers without segment ids give none
            inputs["token_type_ids"] = token_type_ids
        if self.head_name is not None:
            with torch.no_grad() if frozen_encoder else contextlib.nullcontext():
                hidden = self.model.base_model(**inputs)[0]
            logits = getattr(self.model, self.head_name)(hidden[selected])
        else:
            if frozen_encoder:
                raise ConfigError(f"{type(self.model).__name__}: a head warm-up needs the masked-LM head "
                                  "to be one module over the base model")
            logits = self.model(**inputs).logits[selected]
        loss, correct = masked_lm_loss(logits, labels[selected])
        return loss, correct, selected.sum()


# ----------------------------------------------------------------------------- auxiliary task
def auxiliary_corpus(texts: list[str], pairs: list[tuple[str, str]] | None, limit: int | None) -> list:
    """The auxiliary task's texts: `texts`, with OCNLI's sentences as their `pairs` where given,
    at most `limit` of them, evenly spaced."""
    return sample_texts(texts if pairs is None else paired_corpus(texts, pairs), limit)


def auxiliary_head(source: str, encoder: nn.Module, features: list[dict], skip_ids) -> nn.Module:
    """The masked-LM head of `source` (trained, where the checkpoint has one; else new, with the
    unigram bias of `features`), its decoder tied to `encoder`'s word embedding."""
    model, new_head, _ = load_masked_lm(source)
    name = head_module_name(model)
    if name is None:
        raise ConfigError(f"auxiliary_mlm: {type(model).__name__}'s masked-LM head is not one module over "
                          "the encoder; this encoder cannot take the auxiliary task")
    if new_head:
        set_unigram_bias(model, features, skip_ids)
    output, words = model.get_output_embeddings(), encoder.get_input_embeddings()
    if output.weight.shape != words.weight.shape:
        raise ConfigError(f"auxiliary_mlm: the head's decoder {tuple(output.weight.shape)} does not fit the "
                          f"encoder's word embedding {tuple(words.weight.shape)}")
    output.weight = words.weight  # tied: one parameter, the encoder's
    return getattr(model, name)


class WithMaskedLM(nn.Module):
    """`model` (a `MultiTaskModel`) and a masked-LM head over its shared encoder.

    `forward(task, ...)` is the task's forward (or, given a joint batch's `TaskRows`, every task's);
    `forward(MLM_TASK, input_ids, attention_mask,
    token_type_ids, labels=...)` is the masked-LM pass through the shared encoder (no task's
    private layers or adapters) and returns (logits at the masked positions, their targets).
    """

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model = model
        self.mlm_head = head

    def forward(self, task: str | tuple[TaskRows, ...], input_ids, attention_mask, token_type_ids=None, labels=None):
        if task != MLM_TASK:
            return self.model(task, input_ids, attention_mask, token_type_ids)
        inputs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        selected = labels != -100
        return self.mlm_head(hidden[selected]), labels[selected]
