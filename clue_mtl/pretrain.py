"""The further pre-training recipe: whole-word masked language modelling on the competition text.

Features: the corpus is every normalised text of the three tasks (training, test A and test B
files; both OCNLI sentences), once each (`vocab.corpus_texts`), less a held-out slice chosen by a
hash of each text; any Hugging Face checkpoint (hub id or folder, with or without a masked-LM
head) or a fresh model from its config; optional vocabulary trimming first; whole-word masking
from jieba; AdamW with warmup and linear decay, gradient clipping, bf16/fp16; held-out masked-LM
loss and accuracy every N steps under one fixed masking; exact resume (`resume=True`).

A checkpoint without a masked-LM head (a bare encoder such as the offline e5-small) gets a new
head: its decoder tied to the word embedding, its transform at the library's initialisation, and
its output bias set to the log unigram frequencies of the training corpus (add-one smoothed), so
training starts near the unigram loss rather than about log(vocabulary) or worse (13-14 nats for
a random head). Near, not at: the transform at its initialisation adds logit noise over the bias,
so the held-out loss at step 0 on trimmed e5-small is 9.11 (benchmarks/results/pretrain_mlm.md),
between the unigram loss and a uniform guess (ln 16,663 = 9.72).

Trade-offs: texts are not packed: one text or OCNLI sentence per sequence, as the tasks see them,
with length grouping to limit padding. The head runs on the masked positions only (about 15% of
the tokens), which is what makes a 250k-row vocabulary affordable; for architectures whose head is
not one module over the base model the full forward is used. Masks are a function of (seed, step,
process) and batches of (seed, step), so resuming needs no data-loader or collator state.

Run folder:
    config.yaml      the resolved config
    metrics.jsonl    one JSON object per logged step or evaluation
    source/          the trimmed starting encoder (`model.trim_vocab` only)
    checkpoint-STEP/ the latest full training state, for --resume (`checkpoint.py`)
    encoder/         the result: masked-LM model and tokenizer (`save_pretrained`), for
                     `train`'s `model.encoder`; pretraining.json says where it came from
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import get_scheduler

from .accelerator import fresh_accelerator
from .batching import EncodedTask, TaskStream, tokenizer_fingerprint
from .config import ConfigError, PretrainConfig, save_config
from .masking import WholeWordMaskCollator
from .optim import adamw
from .recipe import RunRecipe
from .run_folder import RunFolder
from .tracking import accelerator_kwargs
from .vocab import corpus_texts, trim_vocabulary

CACHE_DIR = Path("artifacts/cache")
HELD_OUT_MASK_SEED = 20240601  # one masking of the held-out texts for every run and evaluation
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
HEAD_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")  # checkpoint classes that carry an LM head


# ----------------------------------------------------------------------------- corpus


def sample_texts(texts: list[str], limit: int | None) -> list[str]:
    """At most `limit` texts, evenly spaced over the corpus (so every task and split appears)."""
    if limit is None or len(texts) <= limit:
        return texts
    return [texts[i * len(texts) // limit] for i in range(limit)]


def held_out_split(texts: list[str], fraction: float, limit: int) -> tuple[list[str], list[str]]:
    """(training, held-out) texts, each in corpus order. The held-out texts are the
    `min(limit, round(fraction * n))` (at least 1) with the smallest hash: the choice depends on
    the texts, not on their order or any seed, so runs measure on the same texts."""
    count = min(limit, max(1, round(fraction * len(texts))), len(texts) - 1)
    keys = [hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() for text in texts]
    held = set(sorted(range(len(texts)), key=keys.__getitem__)[:count])
    return ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])


def encode_texts(collator: WholeWordMaskCollator, texts: list[str], *, cache_dir: str | Path | None,
                 fingerprint: str) -> list[dict[str, np.ndarray]]:
    """`collator.encode(texts)` (tokens and jieba word units), through a file cache."""
    cache_file = None
    if cache_dir is not None:
        # v2: the bare word-boundary piece is no longer a unit (units cached before it are stale)
        digest = hashlib.sha1(f"units-v2\n{fingerprint}\n{collator.max_length}\n".encode())
        digest.update("\n".join(texts).encode("utf-8"))
        cache_file = Path(cache_dir) / f"mlm-{digest.hexdigest()[:20]}.npz"
        if cache_file.exists():
            stored = np.load(cache_file)
            ends = np.cumsum(stored["lengths"])
            return [{"input_ids": ids, "word_units": units} for ids, units in
                    zip(np.split(stored["input_ids"], ends[:-1]), np.split(stored["word_units"], ends[:-1]))]
    features = [{key: np.asarray(value, dtype=np.int64) for key, value in feature.items()}
                for feature in collator.encode(texts)]
    collator.word_spans.clear()  # the segmentation cache is not needed once the units exist
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(".tmp.npz")
        np.savez(temporary, lengths=np.array([len(f["input_ids"]) for f in features]),
                 input_ids=np.concatenate([f["input_ids"] for f in features]),
                 word_units=np.concatenate([f["word_units"] for f in features]))
        temporary.replace(cache_file)
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


# ----------------------------------------------------------------------------- model


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


class MaskedLMObjective(nn.Module):
    """Summed masked-LM loss, correct predictions and predicted tokens of a batch.

    The vocabulary-wide head runs on the labelled positions only, where the model is a base model
    plus one head module (BERT, RoBERTa, XLM-R, DeBERTa, ...); otherwise the full forward is used.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        base, output = model.base_model, model.get_output_embeddings()
        heads = [name for name, child in model.named_children() if child is not base]
        only_head = (len(heads) == 1 and output is not None
                     and any(m is output for m in getattr(model, heads[0]).modules()))
        self.head_name = heads[0] if only_head else None  # a name: the head is not registered twice

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None):
        selected = labels != -100
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # BERT-style pairs; tokenizers without segment ids give none
            inputs["token_type_ids"] = token_type_ids
        if self.head_name is not None:
            hidden = self.model.base_model(**inputs)[0]
            logits = getattr(self.model, self.head_name)(hidden[selected])
        else:
            logits = self.model(**inputs).logits[selected]
        targets = labels[selected]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).sum()
        return loss, correct, selected.sum()


# ----------------------------------------------------------------------------- batches


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


# ----------------------------------------------------------------------------- recipe
@dataclass
class PretrainState:
    step: int = 0                                              # optimiser steps completed
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, correct, tokens since the last log
    history: list[dict] = field(default_factory=list)          # held-out evaluations

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class Pretrainer(RunRecipe):
    """Build with a config and a run folder, then call `train()`; the result is `run_dir/encoder`."""

    state_class = PretrainState
    progress_name = "pretrain"

    def __init__(self, config: PretrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
                 overwrite: bool = False, accelerator: Accelerator | None = None, show_progress: bool = True,
                 cache_dir: str | Path | None = CACHE_DIR):
        self.config = config
        self.folder = RunFolder(run_dir or Path(config.output_dir) / config.name)
        self.resume = resume
        self.show_progress = show_progress
        self.cache_dir = cache_dir
        train = config.train
        if train.num_threads > 0:
            torch.set_num_threads(train.num_threads)
        self.accelerator = accelerator or fresh_accelerator(
            mixed_precision=train.mixed_precision, step_scheduler_with_optimizer=False,
            **accelerator_kwargs(train.report_to, self.folder))
        self._claim_run_dir(overwrite)
        set_seed(train.seed)
        self.state = PretrainState()
        self._setup_data()
        self._setup_model()

    # ----------------------------------------------------------------------------- setup
    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, accelerator = self.config, self.accelerator
        texts = sample_texts(corpus_texts(cfg.data.data_dir), cfg.data.max_texts)
        self.train_texts, self.held_out_texts = held_out_split(texts, cfg.data.held_out_fraction,
                                                               cfg.data.max_held_out)
        self.source = cfg.model.encoder
        if cfg.model.trim_vocab:
            self.source = str(self.folder.source_dir)
            with accelerator.main_process_first():
                if not (self.folder.source_dir / "vocabulary_trim.json").exists():
                    report = trim_vocabulary(cfg.model.encoder, self.source, texts)
                    accelerator.print(f"trimmed {cfg.model.encoder}: {report}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)

        masking = cfg.masking
        def collator(seed: int) -> WholeWordMaskCollator:
            pad_to = 8 if cfg.train.mixed_precision != "no" and accelerator.device.type == "cuda" else None
            return WholeWordMaskCollator(
                self.tokenizer, masking.mlm_probability, seed=seed, max_length=cfg.data.max_length,
                mask_replace_prob=masking.mask_replace_prob, random_replace_prob=masking.random_replace_prob,
                pad_to_multiple_of=pad_to)

        self.collator = collator(cfg.train.seed)
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        with accelerator.main_process_first():
            self.train_features = encode_texts(self.collator, self.train_texts, cache_dir=self.cache_dir,
                                               fingerprint=fingerprint)
            held_out_features = encode_texts(self.collator, self.held_out_texts, cache_dir=self.cache_dir,
                                             fingerprint=fingerprint)
        self.held_out = fixed_masked_batches(collator(HELD_OUT_MASK_SEED), held_out_features,
                                             cfg.train.eval_batch_size)
        self.batches = MaskedBatches(
            self.train_features, self.collator, cfg.train.batch_size, seed=cfg.train.seed,
            length_grouping=cfg.train.length_grouping, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes)
        accelerator.print(f"corpus: {len(self.train_texts):,} training texts, {len(self.held_out_texts):,} held out, "
                          f"{self.batches.stream.batches_per_epoch:,} steps an epoch")

    def _setup_model(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        model, new_head, self.saved_dropout = load_masked_lm(
            self.source, from_scratch=cfg.model.from_scratch, config_overrides=cfg.model.config_overrides,
            dropout=cfg.model.dropout)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            raise ValueError(f"the tokenizer has {len(self.tokenizer):,} tokens but the embedding {rows:,} rows")
        if new_head:
            set_unigram_bias(model, self.train_features, self.tokenizer.all_special_ids)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = adamw([{"params": decay, "weight_decay": cfg.train.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr,
                          device_type=accelerator.device.type, precision=accelerator.mixed_precision)
        scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_training_steps=cfg.train.steps,
                                  num_warmup_steps=math.ceil(cfg.train.warmup_ratio * cfg.train.steps))
        self.model, self.optimizer, self.scheduler = accelerator.prepare(MaskedLMObjective(model), optimizer, scheduler)

    def _checkpoint_components(self) -> dict:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}

    @property
    def masked_lm(self) -> nn.Module:
        """The `AutoModelForMaskedLM` being trained."""
        return self.accelerator.unwrap_model(self.model).model

    # ----------------------------------------------------------------------------- training
    def _before_training(self, progress) -> None:
        if not self.state.history:  # the starting point, for comparison
            self._evaluate(progress)

    def _after_training(self) -> None:
        if self.state.step == self.config.train.steps:
            self.save_encoder()

    def train_step(self) -> None:
        """One optimiser step of masked-LM training; sums for the log accumulate in the state."""
        loss, correct, tokens = self._optimizer_step()
        self.state.window = [w + float(v) for w, v in zip(self.state.window, (loss, correct, tokens))]

    def _optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, accelerator = self.config, self.accelerator
        self.model.train()
        batch = {key: value.to(accelerator.device) for key, value in self.batches[self.state.step].items()}
        loss_sum, correct, tokens = self.model(**batch)
        self._stop_if_not_finite({"masked-LM": loss_sum})
        accelerator.backward(loss_sum / tokens.clamp(min=1))
        if cfg.train.grad_clip > 0:
            accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.detach(), correct, tokens

    def _log_step(self, step_output, steps_per_second: float) -> dict[str, str]:
        """Append the loss and accuracy since the last log to the metrics log; return the postfix."""
        loss, correct, tokens = self.accelerator.reduce(
            torch.tensor(self.state.window, dtype=torch.float64, device=self.accelerator.device), "sum").tolist()
        self.state.window = [0.0, 0.0, 0.0]
        record = {
            "kind": "train", "step": self.state.step, "loss": loss / max(tokens, 1.0),
            "accuracy": correct / max(tokens, 1.0), "lr": self.scheduler.get_last_lr()[0],
            "steps_per_second": steps_per_second, "epochs": self.batches.epochs_seen(self.state.step),
        }
        self._append_metrics(record)
        return {"loss": f"{record['loss']:.3f}", "acc": f"{record['accuracy']:.3f}"}

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Masked-LM loss (nats a predicted token), accuracy and perplexity on the held-out texts."""
        accelerator = self.accelerator
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        for batch in self.held_out[accelerator.process_index::accelerator.num_processes]:
            outputs = self.model(**{key: value.to(accelerator.device) for key, value in batch.items()})
            totals += torch.stack([value.double() for value in outputs])
        loss, correct, tokens = accelerator.reduce(totals, "sum").tolist()
        loss = loss / max(tokens, 1.0)
        return {"loss": loss, "accuracy": correct / max(tokens, 1.0), "perplexity": math.exp(min(loss, 700.0)),
                "tokens": int(tokens)}

    def _evaluate(self, progress) -> dict:
        entry = {"kind": "eval", "step": self.state.step, **self.evaluate()}
        self.state.history.append(entry)
        self._append_metrics(entry)
        if self.accelerator.is_main_process:
            progress.write(f"step {self.state.step}: held-out masked-LM loss {entry['loss']:.4f}, "
                           f"accuracy {entry['accuracy']:.4f}")
        return entry

    def _evaluate_and_checkpoint(self, progress) -> bool:
        self._evaluate(progress)
        self.save_checkpoint()
        return False  # no early stopping for pre-training

    # ----------------------------------------------------------------------------- run files
    def _write_run_files(self) -> None:
        self.folder.path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.folder.config_file)
        self.folder.metrics_file.write_text("", encoding="utf-8")

    def save_encoder(self) -> Path:
        """`run_dir/encoder`: the masked-LM model (dropout as in the source config) and tokenizer."""
        directory = self.folder.encoder_dir
        if self.accelerator.is_main_process:
            model = self.masked_lm
            training_dropout = {name: getattr(model.config, name) for name in self.saved_dropout}
            for name, value in self.saved_dropout.items():
                setattr(model.config, name, value)
            model.save_pretrained(directory)
            for name, value in training_dropout.items():
                setattr(model.config, name, value)
            self.tokenizer.save_pretrained(directory)
            provenance = {"source": self.config.model.encoder, "trimmed": self.config.model.trim_vocab,
                          "from_scratch": self.config.model.from_scratch, "steps": self.state.step,
                          "training_texts": len(self.train_texts), "held_out_texts": len(self.held_out_texts),
                          "held_out": self.state.history[-1] if self.state.history else None}
            (directory / "pretraining.json").write_text(json.dumps(provenance, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return directory


def pretrain(config: PretrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
             overwrite: bool = False, show_progress: bool = True) -> Pretrainer:
    pretrainer = Pretrainer(config, run_dir, resume=resume, overwrite=overwrite, show_progress=show_progress)
    pretrainer.train()
    return pretrainer
