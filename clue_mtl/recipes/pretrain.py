"""The further pre-training recipe: whole-word masked language modelling on the competition text.

Features: the corpus is every normalised text of the three tasks (training, test A and test B
files; both OCNLI sentences), once each (`vocab.corpus_texts`), less a held-out slice chosen by a
hash of each text; with `data.pairs`, OCNLI's sentences are trained as `tokenizer(a, b)` pairs
(the held-out texts stay single, so every variant is measured on the same texts); a masked-LM
head warm-up (`train.head_warmup_steps`: the head trains alone, the encoder frozen, until the
held-out loss flattens); layer-wise learning-rate decay of the encoder (`train.layer_lr_decay`); any Hugging Face checkpoint (hub id or folder, with or without a masked-LM
head) or a fresh model from its config; optional vocabulary trimming first; whole-word masking
from jieba; AdamW with warmup and linear decay, gradient clipping, bf16/fp16; held-out masked-LM
loss and accuracy every N steps under one fixed masking; exact resume (`resume=True`); training
by the clock (`train.max_minutes`, `budget.py`; not with the head warm-up, which counts steps).

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

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from clue_mtl.atomic import replace_folder
from clue_mtl.config import ConfigError, PretrainConfig, save_config
from clue_mtl.data.batching import tokenizer_fingerprint
from clue_mtl.mlm.masking import WholeWordMaskCollator
from clue_mtl.mlm.objective import (
    MaskedBatches,
    MaskedLMObjective,
    encode_texts,
    fixed_masked_batches,
    load_masked_lm,
    paired_corpus,
    sample_texts,
    set_unigram_bias,
)
from clue_mtl.model.encoders import encoder_layers
from clue_mtl.model.vocab import corpus_pairs, corpus_texts, trim_vocabulary
from clue_mtl.training.loop import RunParts
from clue_mtl.training.optim import PAIRS, adamw, layer_rate_scales, parameter_groups

CACHE_DIR = Path("artifacts/cache")
HELD_OUT_MASK_SEED = 20240601  # one masking of the held-out texts for every run and evaluation


# ----------------------------------------------------------------------------- corpus


def held_out_split(texts: list[str], fraction: float, limit: int) -> tuple[list[str], list[str]]:
    """(training, held-out) texts, each in corpus order. The held-out texts are the
    `min(limit, round(fraction * n))` (at least 1) with the smallest hash: the choice depends on
    the texts, not on their order or any seed, so runs measure on the same texts."""
    count = min(limit, max(1, round(fraction * len(texts))), len(texts) - 1)
    keys = [hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() for text in texts]
    held = set(sorted(range(len(texts)), key=keys.__getitem__)[:count])
    return ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])


# ----------------------------------------------------------------------------- recipe
@dataclass
class PretrainState:
    step: int = 0                                              # optimiser steps completed
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, correct, tokens since the last log
    history: list[dict] = field(default_factory=list)          # held-out evaluations
    encoder_frozen: bool = False                               # in the head warm-up
    encoder_unfrozen_at: int | None = None                     # the step the head warm-up ended

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class Pretrainer(RunParts):
    """Build with a config and a run folder, then call `train()`: the run's loop, written out; the
    result is `run_dir/encoder`. `train_step()` is one optimiser step."""

    def __init__(self, config: PretrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
                 overwrite: bool = False, accelerator: Accelerator | None = None, show_progress: bool = True,
                 cache_dir: str | Path | None = CACHE_DIR):
        self._open_run(config, run_dir, resume=resume, show_progress=show_progress, accelerator=accelerator)
        self.cache_dir = cache_dir
        train = config.train
        self._claim_run_dir(overwrite)
        with self._released_if_setup_fails():
            set_seed(train.seed)
            self.state = PretrainState(encoder_frozen=train.head_warmup_steps > 0)
            self.budget = self._step_budget()
            self._setup_data()
            self._setup_model()

    # ----------------------------------------------------------------------------- setup
    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, accelerator = self.config, self.accelerator
        texts = sample_texts(corpus_texts(cfg.data.data_dir), cfg.data.max_texts)
        self.train_texts, self.held_out_texts = held_out_split(texts, cfg.data.held_out_fraction,
                                                               cfg.data.max_held_out)
        if cfg.data.pairs:
            self.train_texts = paired_corpus(self.train_texts, corpus_pairs(cfg.data.data_dir))
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
        objective = MaskedLMObjective(model)
        if cfg.train.head_warmup_steps and objective.head_name is None:
            raise ConfigError(f"train.head_warmup_steps: {type(model).__name__}'s masked-LM head is not one "
                              "module over the encoder, so the encoder cannot be frozen alone")
        encoder_ids = {id(p) for p in model.base_model.parameters()}
        self.head_parameters = [p for p in model.parameters() if id(p) not in encoder_ids]
        groups, parts = self._parameter_groups(model)
        optimizer = adamw(groups, lr=cfg.train.lr, device_type=accelerator.device.type,
                          precision=accelerator.mixed_precision)
        if cfg.train.head_warmup_steps:
            factors = [self._lr_factor(part) for part in parts]
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        else:
            scheduler = self._learning_rate_schedule(optimizer)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(objective, optimizer, scheduler)

    def _parameter_groups(self, model: nn.Module) -> tuple[list[dict], list[str]]:
        """AdamW's groups, and the part ("encoder" or "head") each belongs to: the encoder's, top
        layer first, then the head's; in each, matrices with weight decay, then vectors without.
        Encoder layer i of n (the embeddings are layer 0, and with them the decoder tied to the word
        embeddings) learns at lr * layer_lr_decay ** (n - i); the head and anything above the last
        layer at lr. At layer_lr_decay 1 these are the four groups runs always had, so their
        optimiser checkpoints still load."""
        train = self.config.train
        # without decay, no layer list is needed (an architecture whose layers are not found still trains)
        scale_of = layer_rate_scales(encoder_layers(model), train.layer_lr_decay) if train.layer_lr_decay < 1 else {}
        groups, parts = [], []
        for part, parameters in (("encoder", list(model.base_model.parameters())), ("head", self.head_parameters)):
            # the head holds no layer: at 1
            part_groups = parameter_groups([(p, scale_of.get(id(p), 1.0)) for p in parameters], lr=train.lr,
                                           weight_decay=train.weight_decay, layout=PAIRS)
            groups += part_groups
            parts += [part] * len(part_groups)
        return groups, parts

    def _lr_factor(self, part: str):
        """The learning-rate factor of the encoder's or the head's groups at a step, with a head
        warm-up: the encoder at 0 and the head at `head_warmup_lr` while the encoder is frozen,
        then both on linear warmup and decay over the steps that remain. Reads the recipe state,
        which the checkpoint holds, so a resumed run gets the same rates."""
        train = self.config.train

        def factor(step: int) -> float:
            if self.state.encoder_frozen:
                return 0.0 if part == "encoder" else train.head_warmup_lr / train.lr
            start = self.state.encoder_unfrozen_at or 0
            total, done = train.steps - start, step - start
            warmup = math.ceil(train.warmup_ratio * total)
            if done < warmup:
                return done / warmup
            return max(0.0, (total - done) / max(1, total - warmup))
        return factor

    @property
    def checkpointed(self) -> dict:
        """What the checkpoint holds besides the model (`RunParts`)."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}

    @property
    def masked_lm(self) -> nn.Module:
        """The `AutoModelForMaskedLM` being trained."""
        return self.accelerator.unwrap_model(self.model).model

    # ----------------------------------------------------------------------------- training
    def train(self, until_step: int | None = None) -> PretrainState:
        """Train to `total_steps`, or stop at `until_step` with a checkpoint to resume from; at the
        run's end, write `encoder/`. The run folder's lock, taken by the claim (or again by a second
        call), is let go at the end.

        First the held-out loss of the starting point (a fresh run). Each step: one optimiser step
        (`train_step`), timed into the budget; in the head warm-up, the look that decides whether
        the head is warm; every `log_every` steps a line in the metrics log; every `eval_every`
        steps (and at the last) the held-out evaluation and the checkpoint. No early stopping.
        """
        train = self.config.train
        with self._holding_run_folder():
            self._start_or_resume(self._write_run_files)
            progress = self._progress_bar("pretrain")
            if not self.state.history:  # the starting point, for comparison
                self._evaluate(progress)
            started, first_step = time.perf_counter(), self.state.step
            while self.state.step < self._last_step(until_step):
                with self._spending("training"):
                    self.train_step()
                    if self._head_warmup_look_due():
                        self._unfreeze_encoder_if_head_warm(progress)
                self._count_budget_step(progress)
                progress.update(1)
                finished = self.state.step == self.total_steps
                if self.state.step % train.log_every == 0 or finished:
                    speed = self._steps_per_second(self.state.step - first_step, started)
                    progress.set_postfix(self._log_step(speed))
                if self.state.step % train.eval_every == 0 or finished:
                    with self._spending("evaluation"):
                        if self.state.history[-1]["step"] != self.state.step:  # not looked at by the warm-up
                            self._evaluate(progress)
                        self.save_checkpoint()
            progress.close()
            self._checkpoint_if_stopped_short()  # interrupted by `until_step`: resumable from here
            self._report_budget()
            if self.state.step == self.total_steps:
                self.save_encoder()
            self._close_run()
        return self.state

    def train_step(self) -> None:
        """One optimiser step of masked-LM training, then the step counted: the batch's forward and
        backward (in the head warm-up, the encoder frozen), clipping, AdamW and the schedule; the
        loss, correct and token sums for the next log line kept in the state."""
        cfg, accelerator = self.config, self.accelerator
        self.model.train()
        batch = {key: value.to(accelerator.device) for key, value in self.batches[self.state.step].items()}
        frozen = self.state.encoder_frozen
        # Frozen, the encoder gets no gradient, so DDP must not wait for one: the head's gradients
        # are averaged by hand instead.
        with accelerator.no_sync(self.model) if frozen else contextlib.nullcontext():
            loss_sum, correct, tokens = self.model(**batch, frozen_encoder=frozen)
            self._stop_if_not_finite({"masked-LM": loss_sum})
            accelerator.backward(loss_sum / tokens.clamp(min=1))
        if frozen:
            self._keep_encoder_frozen()
        if cfg.train.grad_clip > 0:
            accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.window = [w + float(v) for w, v in zip(self.state.window, (loss_sum.detach(), correct, tokens))]
        self.state.step += 1

    def _keep_encoder_frozen(self) -> None:
        """No encoder gradient (the tied word embedding gets one through the decoder), so AdamW
        leaves the encoder, its moments and its weight decay untouched; the head's gradients
        averaged over processes."""
        for parameter in self.masked_lm.base_model.parameters():
            parameter.grad = None
        if self.accelerator.num_processes > 1:
            for parameter in self.head_parameters:
                if parameter.grad is not None:
                    parameter.grad = self.accelerator.reduce(parameter.grad, "mean")

    def _head_warmup_look_due(self) -> bool:
        """In the head warm-up, every `head_warmup_eval_every` steps and at `head_warmup_steps`."""
        train, step = self.config.train, self.state.step
        return self.state.encoder_frozen and (step % train.head_warmup_eval_every == 0
                                              or step >= train.head_warmup_steps)

    def _unfreeze_encoder_if_head_warm(self, progress) -> None:
        """The held-out loss decides whether the head is warm (it gained less than
        `head_warmup_min_gain` nats since the last look, or `head_warmup_steps` are spent): then the
        encoder is unfrozen."""
        train = self.config.train
        previous = self.state.history[-1]["loss"]
        entry = self._evaluate(progress, phase="head warm-up")
        if previous - entry["loss"] < train.head_warmup_min_gain or self.state.step >= train.head_warmup_steps:
            self._unfreeze_encoder(progress)

    def _unfreeze_encoder(self, progress) -> None:
        self.state.encoder_frozen, self.state.encoder_unfrozen_at = False, self.state.step
        scheduler = self.scheduler.scheduler  # the LambdaLR inside Accelerate's wrapper
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
        if self.accelerator.is_main_process:
            progress.write(f"step {self.state.step}: the head is warm; the encoder trains from here")

    def _log_step(self, steps_per_second: float) -> dict[str, str]:
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

    def _evaluate(self, progress, phase: str = "training") -> dict:
        with self._spending("evaluation"):  # the head warm-up's looks are timed inside the training block
            entry = {"kind": "eval", "step": self.state.step, "phase": phase, **self.evaluate()}
        self.state.history.append(entry)
        self._append_metrics(entry)
        if self.accelerator.is_main_process:
            progress.write(f"step {self.state.step}: held-out masked-LM loss {entry['loss']:.4f}, "
                           f"accuracy {entry['accuracy']:.4f}")
        return entry

    # ----------------------------------------------------------------------------- run files
    def _write_run_files(self) -> None:
        self.folder.path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.folder.config_file)
        self.folder.metrics_file.write_text("", encoding="utf-8")

    def save_encoder(self) -> Path:
        """`run_dir/encoder`: the masked-LM model (dropout as in the source config) and tokenizer,
        written beside and swapped in whole (`atomic.replace_folder`): a kill leaves no half encoder."""
        directory = self.folder.encoder_dir
        if self.accelerator.is_main_process:
            with replace_folder(directory) as staging:  # the run folder's lock keeps other writers out
                self._write_encoder(staging)
        self.accelerator.wait_for_everyone()
        return directory

    def _write_encoder(self, directory: Path) -> None:
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
                      "head_warmup_steps": self.state.encoder_unfrozen_at, "pairs": self.config.data.pairs,
                      "training_texts": len(self.train_texts), "held_out_texts": len(self.held_out_texts),
                      "held_out": self.state.history[-1] if self.state.history else None}
        (directory / "pretraining.json").write_text(json.dumps(provenance, indent=2) + "\n")


def pretrain(config: PretrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
             overwrite: bool = False, show_progress: bool = True) -> Pretrainer:
    pretrainer = Pretrainer(config, run_dir, resume=resume, overwrite=overwrite, show_progress=show_progress)
    pretrainer.train()
    return pretrainer
