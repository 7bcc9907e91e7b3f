"""The multi-task training recipe, through Accelerate.

Features: one shared encoder and a head per task; every step carries a batch of every task
(sizes by a sampling rule); a pluggable loss-weighting strategy with its own optimiser; AdamW with
decay/no-decay groups and layer-wise learning-rate decay; warmup and a learning-rate schedule (`transformers.get_scheduler`); gradient
clipping and accumulation; bf16/fp16; evaluation every N steps by mean macro-F1 with the best
checkpoint kept and early stopping; exact resume (`resume=True`); training by the clock
(`train.max_minutes`: the steps that fill the minutes, measured and fixed once, `budget.py`).

Trade-offs: the encoder runs once over every task's rows of a step (`train.encoder_pass`: fewer,
larger matrix products) unless per-task passes are needed (private layers, per-task gradients),
at the price of padding every row to the step's widest; the batch stream is indexed by step, so
resuming needs no data-loader state.

The run folder's layout is `runs/folder.py`'s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from clue_mtl.config import RunConfig, resolved_encoder_pass, save_config, validate, weighted_tasks
from clue_mtl.data.batching import (
    EncodedTask,
    MultiTaskBatches,
    encode_frame,
    joint_batch,
    task_batch_sizes,
    tokenizer_fingerprint,
)
from clue_mtl.data.folder import save_split, task_frames
from clue_mtl.errors import ConfigError
from clue_mtl.hardware import PRECISION_DTYPES, ThroughputMeter, attention_kernel, matmul_peak
from clue_mtl.mlm.masking import WholeWordMaskCollator
from clue_mtl.mlm.objective import (
    MaskedBatches,
    WithMaskedLM,
    auxiliary_corpus,
    auxiliary_head,
    encode_texts,
    masked_lm_loss,
)
from clue_mtl.model.encoders import keep_bottom_layers, load_encoder
from clue_mtl.model.frozen import (
    FrozenStates,
    StateCache,
    cache_folder,
    cache_key,
    check_frozen,
    freeze_bottom,
    hold_eval,
    prepare_cache_folder,
)
from clue_mtl.model.multitask import MultiTaskModel, build_model
from clue_mtl.model.vocab import corpus_pairs, corpus_texts
from clue_mtl.predict.inference import predict_logits
from clue_mtl.predict.metrics import leaderboard_score, task_report
from clue_mtl.tasks import MLM_TASK, get_task
from clue_mtl.training.adversarial import FGM
from clue_mtl.training.distill import read_soft_labels
from clue_mtl.training.ema import ExponentialMovingAverage
from clue_mtl.training.loop import RunParts
from clue_mtl.training.losses import class_weights, task_loss
from clue_mtl.training.optim import BY_RATE, PAIRS, adamw, multitask_rates, parameter_groups
from clue_mtl.weighting import StepContext, build_weighting

CACHE_DIR = Path("artifacts/cache")


@dataclass
class TrainerState:
    step: int = 0                    # optimiser steps completed
    best_score: float = -1.0
    best_step: int = -1
    evaluations_without_gain: int = 0
    history: list[dict] = field(default_factory=list)  # evaluation results

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _trainable(parameters: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [parameter for parameter in parameters if parameter.requires_grad]


class Trainer(RunParts):
    """Build with a config and a run folder, then call `train()`: the run's loop, written out;
    `train_step()` is one optimiser step."""

    def __init__(self, config: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False,
                 overwrite: bool = False, accelerator: Accelerator | None = None, show_progress: bool = True):
        validate(config)  # a config built in code gets the checks a loaded one had
        train = config.train
        self._open_run(config, run_dir, resume=resume, show_progress=show_progress, accelerator=accelerator,
                       gradient_accumulation_steps=train.grad_accumulation)
        self._claim_run_dir(overwrite)
        with self._released_if_setup_fails():
            if train.mixed_precision == "auto" and show_progress:
                self.accelerator.print(f"mixed precision auto: {self.accelerator.mixed_precision} on this "
                                       f"{self.accelerator.device.type}")
            set_seed(train.seed)
            self.state = TrainerState()
            self.budget = self._step_budget()
            self._setup_data()
            self._setup_model()
            self.meter = self._throughput_meter()
        self.step_tokens = 0  # padded tokens of the last step's task passes, all micro-batches (not FGM's)

    # ----------------------------------------------------------------------------- setup
    def _setup_data(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        overrides = {} if cfg.model.attention_dropout is None else {
            "attention_probs_dropout_prob": cfg.model.attention_dropout}
        encoder, self.tokenizer = load_encoder(cfg.model.encoder, **overrides)
        if cfg.model.num_layers:
            keep_bottom_layers(encoder, cfg.model.num_layers)
        self._encoder = encoder
        fingerprint = self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        soft_labels = None
        if cfg.distill.soft_labels:
            soft_labels = read_soft_labels(cfg.distill.soft_labels)
            soft_labels.check_split(cfg.data.dev_fraction, cfg.data.split_seed)
            soft_labels.check_temperature(cfg.distill.temperature)
        self.train_data: dict[str, EncodedTask] = {}
        self.dev_data: dict[str, EncodedTask] = {}
        self.dev_ids: dict[str, list[str]] = {}
        self.mended: dict[str, dict] = {}   # per task, what reading the training file cleaned or skipped
        for task in cfg.data.tasks:
            train_frame, dev_frame, self.dev_ids[task], self.mended[task] = task_frames(cfg.data, task)
            kwargs = dict(max_length=cfg.data.max_length, cache_dir=CACHE_DIR, fingerprint=fingerprint)
            self.train_data[task] = encode_frame(self.tokenizer, train_frame, task, **kwargs)
            self.dev_data[task] = encode_frame(self.tokenizer, dev_frame, task, **kwargs)
            if soft_labels is not None and task in soft_labels.tasks:  # other tasks learn from gold alone
                self.train_data[task].soft_labels = soft_labels.for_frame(task, train_frame)

        sizes = {task: len(data) for task, data in self.train_data.items()}
        self.batch_sizes = task_batch_sizes(sizes, cfg.train.batch_size, cfg.train.sampling, cfg.train.sampling_alpha)
        pad_to = 8 if cfg.train.mixed_precision != "no" and accelerator.device.type == "cuda" else None
        self.batches = MultiTaskBatches(
            self.train_data, self.batch_sizes, seed=cfg.train.seed, pad_id=self.tokenizer.pad_token_id,
            length_grouping=cfg.train.length_grouping, pad_to_multiple_of=pad_to,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
            with_rows=cfg.train.cache_frozen,
        )
        self.mlm_batches = self._auxiliary_batches(fingerprint) if cfg.auxiliary_mlm.batch_size else None

    def _auxiliary_batches(self, fingerprint: str) -> MaskedBatches:
        """The auxiliary task's masked batches: every text of the training and test files, as
        pre-training reads them. The dev rows' texts are among them (unlabelled, as the test
        texts are), which is how the test texts will be seen."""
        cfg, accelerator = self.config, self.accelerator
        auxiliary = cfg.auxiliary_mlm
        texts = auxiliary_corpus(corpus_texts(cfg.data.data_dir),
                                 corpus_pairs(cfg.data.data_dir) if auxiliary.pairs else None, auxiliary.max_texts)
        collator = WholeWordMaskCollator(self.tokenizer, auxiliary.mlm_probability, seed=cfg.train.seed,
                                         max_length=cfg.data.max_length)
        with accelerator.main_process_first():
            self.mlm_features = encode_texts(collator, texts, cache_dir=CACHE_DIR, fingerprint=fingerprint)
        return MaskedBatches(self.mlm_features, collator, auxiliary.batch_size, seed=cfg.train.seed,
                             length_grouping=cfg.train.length_grouping, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes)

    def _setup_model(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        model = build_model(self._encoder, cfg.data.tasks, cfg.model, sep_token_id=self.tokenizer.sep_token_id)
        del self._encoder
        if cfg.model.freeze_word_embeddings:
            model.encoder.get_input_embeddings().weight.requires_grad_(False)
        self.frozen_modules = []  # the embeddings and layers below model.frozen_layers, held in eval mode
        self.frozen_states: FrozenStates | None = None  # their stored output, opened at the first step
        if cfg.model.frozen_layers:
            self.frozen_modules = freeze_bottom(model.encoder, cfg.model.frozen_layers)
            check_frozen(model, cfg.model.frozen_layers, cached=cfg.train.cache_frozen)
        rates = multitask_rates(model, lr=cfg.train.lr, head_lr=cfg.train.head_lr,
                                layer_lr_decay=cfg.train.layer_lr_decay)
        groups = parameter_groups(rates, weight_decay=cfg.train.weight_decay, layout=BY_RATE)
        if self.mlm_batches is not None:
            head = auxiliary_head(cfg.model.encoder, model.encoder, self.mlm_features, self.tokenizer.all_special_ids)
            self.mlm_head_parameters = [p for p in head.parameters() if p is not model.encoder.get_input_embeddings().weight]
            # after the model's groups, one pair at head_lr: the layout runs with the head always had
            groups += parameter_groups([(p, 1.0) for p in self.mlm_head_parameters], lr=cfg.train.head_lr,
                                       weight_decay=cfg.train.weight_decay, layout=PAIRS)
            model = WithMaskedLM(model, head)
        optimizer = adamw(groups, device_type=accelerator.device.type, fused=cfg.train.fused_optimizer,
                          precision=accelerator.mixed_precision)
        scheduler = self._learning_rate_schedule(optimizer)
        self.weighting = build_weighting(cfg.weighting.method, weighted_tasks(cfg), cfg.weighting.params)
        self.weighting.to(accelerator.device)
        self.joint_pass = resolved_encoder_pass(cfg) == "joint"
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        # Not prepared by Accelerate: strategies set these gradients by hand, unscaled and
        # identical on every rank, so no loss-scale division and no second scaler update apply.
        weighting_parameters = list(self.weighting.parameters())
        self.weighting_optimizer = (torch.optim.Adam(weighting_parameters, lr=cfg.weighting.lr)
                                    if weighting_parameters else None)
        self.ema = ExponentialMovingAverage(self.unwrapped, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.fgm = FGM(self.unwrapped, cfg.train.fgm_epsilon) if cfg.train.fgm_epsilon else None
        # what the gradient-level weighting methods act on; fixed once the embeddings are frozen or not
        # (private layers and adapters are a task's own: with the heads, not shared)
        model = self.unwrapped
        self._shared_parameters = _trainable(model.shared_parameters())
        self._last_shared_parameters = _trainable(model.last_shared_layer_parameters())
        self._head_parameters = _trainable(model.task_parameters())
        if self.mlm_batches is not None:  # the auxiliary head is the masked LM's own, as a head is its task's
            self._head_parameters += _trainable(self.mlm_head_parameters)
        if cfg.model.frozen_layers and ((self.weighting.manual_gradients and not self._shared_parameters)
                                        or (cfg.weighting.method == "gradnorm" and not self._last_shared_parameters)):
            raise ConfigError(f"weighting.method {cfg.weighting.method!r} acts on the shared encoder's gradients, but "
                              f"model.frozen_layers ({cfg.model.frozen_layers}) leaves it no trainable layer there")
        self.class_weights = {
            task: class_weights(data.labels, get_task(task).num_labels).to(accelerator.device)
            if cfg.train.class_weighting else None
            for task, data in self.train_data.items()
        }

    @property
    def checkpointed(self) -> dict:
        """What the checkpoint holds besides the model (`RunParts`)."""
        components = {"optimizer": self.optimizer, "scheduler": self.scheduler, "weighting": self.weighting}
        if self.weighting_optimizer is not None:
            components["weighting_optimizer"] = self.weighting_optimizer
        if self.ema is not None:
            components["ema"] = self.ema
        return components

    @property
    def unwrapped(self) -> MultiTaskModel:
        """The multi-task model (without the auxiliary masked-LM head: `best/` is what predicts)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.model if isinstance(model, WithMaskedLM) else model

    def _throughput_meter(self) -> ThroughputMeter:
        """Rows/s for the progress bar and the metrics log; with the progress bar shown, also the
        fraction of this machine's matmul peak (measured now, in about half a second)."""
        accelerator, train = self.accelerator, self.config.train
        rows = sum(self.batch_sizes.values()) * train.grad_accumulation * accelerator.num_processes
        peak = None
        if self.show_progress and accelerator.is_main_process:
            peak = matmul_peak(PRECISION_DTYPES[accelerator.mixed_precision], accelerator.device)
        return ThroughputMeter(rows, peak)

    # ----------------------------------------------------------------------------- training
    def train(self, until_step: int | None = None) -> TrainerState:
        """Train to `total_steps`, or stop at `until_step` with a checkpoint to resume from. The run
        folder's lock, taken by the claim (or again by a second call), is let go at the end.

        Each step: one optimiser step (`train_step`), timed into the budget and watched by the
        throughput meter; every `log_every` steps a line in the metrics log; every `eval_every`
        steps (and at the last) the dev evaluation, `best/` when it gains, the checkpoint, and early
        stopping once `early_stopping_patience` evaluations in a row gained nothing.
        """
        train = self.config.train
        with self._holding_run_folder():
            self._start_or_resume(self._write_run_files)
            progress = self._progress_bar("train")
            started, first_step = time.perf_counter(), self.state.step
            while self.state.step < self._last_step(until_step):
                with self._spending("training"), self.meter.watching():
                    losses, total = self.train_step()
                self.meter.step_done(self.step_tokens)
                self._count_budget_step(progress)
                progress.update(1)
                finished = self.state.step == self.total_steps
                if self.state.step % train.log_every == 0 or finished:
                    speed = self._steps_per_second(self.state.step - first_step, started)
                    progress.set_postfix(self._log_step(losses, total, speed))
                if self.state.step % train.eval_every == 0 or finished:
                    with self._spending("evaluation"):
                        self._evaluate_and_keep_best(progress)
                        self.save_checkpoint()
                    if self._patience_spent():
                        break  # early stopping
            progress.close()
            self._checkpoint_if_stopped_short()  # interrupted by `until_step`: resumable from here
            self._report_budget()
            self._close_run()
        return self.state

    def train_step(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimiser step over a batch of every task, then the step counted: for each
        micro-batch, the tasks' forward passes and losses, the weighting's backward (and FGM's),
        and the optimisers, which step once the gradients are complete. Returns the last
        micro-batch's per-task losses and combined loss."""
        train, accelerator = self.config.train, self.accelerator
        self.model.train()
        hold_eval(self.frozen_modules)
        self.step_tokens = 0
        with attention_kernel(train.attention_kernel, accelerator.device.type, accelerator.mixed_precision):
            for micro in range(train.grad_accumulation):
                batches = self._micro_batches(micro)
                with accelerator.accumulate(self.model), self._gradient_sync_context():
                    losses, features, accuracies = self._forward_losses(batches)
                    self._stop_if_not_finite(losses)
                    total = self.weighting.backward(losses, self._step_context(features, accuracies, micro))
                    if self.fgm is not None:
                        self._adversarial_backward(batches)
                    self._apply_gradients()
        self.state.step += 1
        return {task: loss.detach() for task, loss in losses.items()}, total

    def _micro_batches(self, micro: int) -> dict[str, dict[str, torch.Tensor]]:
        """This step's `micro`-th batch of every task, on the device."""
        index = self.state.step * self.config.train.grad_accumulation + micro
        step_batches = dict(self.batches[index])
        if self.mlm_batches is not None:
            step_batches[MLM_TASK] = self.mlm_batches[index]
        return {task: {key: value.to(self.accelerator.device) for key, value in batch.items()}
                for task, batch in step_batches.items()}

    def _forward_losses(self, batches: dict[str, dict[str, torch.Tensor]]):
        """Each task's loss, its pooled features and its batch accuracy (the auxiliary masked LM
        runs its own pass); counts the padded tokens the encoder ran."""
        losses, features, accuracies = {}, {}, {}
        tasks = {task: batch for task, batch in batches.items() if task != MLM_TASK}
        for task, (logits, features[task]) in self._task_outputs(tasks).items():
            losses[task] = self._task_loss(task, logits, tasks[task])
            accuracies[task] = (logits.detach().argmax(-1) == tasks[task]["labels"]).float().mean()
        if MLM_TASK in batches:
            self.step_tokens += int(batches[MLM_TASK]["input_ids"].numel())
            losses[MLM_TASK], accuracies[MLM_TASK] = self._masked_lm_loss(batches[MLM_TASK])
        return losses, features, accuracies

    def _task_outputs(self, batches: dict[str, dict[str, torch.Tensor]]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (logits, features)}: one encoder pass over every task's rows, or one per task;
        with `train.cache_frozen`, from the rows' stored layer-k states (`frozen.py`)."""
        stored = self._stored_states().for_batches(batches) if self.config.train.cache_frozen else None
        if self.joint_pass and len(batches) > 1:
            parts, joint = joint_batch(batches, self.batches.pad_id)
            self.step_tokens += int(joint["input_ids"].numel())
            start = {} if stored is None else {"start": self._start([row for t in batches for row in stored[t]],
                                                                    joint["input_ids"])}
            return self.model(parts, joint["input_ids"], joint["attention_mask"], joint.get("token_type_ids"), **start)
        outputs = {}
        for task, batch in batches.items():
            self.step_tokens += int(batch["input_ids"].numel())
            start = {} if stored is None else {"start": self._start(stored[task], batch["input_ids"])}
            outputs[task] = self.model(task, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                       **start)
        return outputs

    def _start(self, rows: list[torch.Tensor], input_ids: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Where the encoder starts: layer k, from these rows' states padded to the batch's width."""
        return self.config.model.frozen_layers, self.frozen_states.padded(rows, input_ids.shape[1], input_ids.device)

    def _stored_states(self) -> FrozenStates:
        """The frozen layers' stored output, opened at the first step, after any resume: fresh for a
        new run, cut back to this step's commit for a resumed one. The key is taken from the loaded
        weights, so a resume keys the weights its checkpoint holds."""
        if self.frozen_states is None:
            cfg, accelerator, model = self.config, self.accelerator, self.unwrapped
            key = cache_key(model.encoder, cfg.model.frozen_layers, self.train_data,
                            tokenizer=self.tokenizer_fingerprint, max_length=cfg.data.max_length,
                            precision=accelerator.mixed_precision, attention_kernel=cfg.train.attention_kernel,
                            device=accelerator.device.type)
            if accelerator.is_main_process:
                prepare_cache_folder(self.folder.cache_dir, key, fresh=not self.resume)
            accelerator.wait_for_everyone()
            cache = StateCache(cache_folder(self.folder.cache_dir, key),
                               lengths={task: data.lengths for task, data in self.train_data.items()},
                               hidden=model.encoder.config.hidden_size, max_bytes=int(cfg.train.cache_max_gb * 2**30),
                               rank=accelerator.process_index).open(self.state.step if self.resume else None)
            self.frozen_states = FrozenStates(model.encoder, cfg.model.frozen_layers, cache,
                                              pad_id=self.tokenizer.pad_token_id, autocast=accelerator.autocast)
        return self.frozen_states

    def save_checkpoint(self) -> None:
        """The checkpoint, after the frozen layers' stored output is committed at this step: a
        resume from it reads what this run read (`frozen.StateCache.commit`)."""
        if self.frozen_states is not None:
            self.frozen_states.cache.commit(self.state.step)
        super().save_checkpoint()

    def _masked_lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary task's mean loss over its masked tokens (annealed: times 1 - step/steps,
        `_schedule_point`) and its masked-token accuracy."""
        logits, targets = self.model(MLM_TASK, batch["input_ids"], batch["attention_mask"],
                                     batch.get("token_type_ids"), labels=batch["labels"])
        if targets.numel() == 0:  # nothing masked in this micro-batch: a zero that keeps the graph
            return logits.sum() * 0.0, torch.zeros((), device=logits.device)
        loss_sum, correct = masked_lm_loss(logits, targets)
        loss = loss_sum / targets.numel()
        if self.config.auxiliary_mlm.anneal == "linear":
            step, steps = self._schedule_point()
            loss = loss * (1.0 - step / steps)
        return loss, correct.float() / targets.numel()

    def _step_context(self, features, accuracies, micro: int) -> StepContext:
        """What a weighting strategy may read: the shared parameters (all, and the last layer's),
        the heads, the features, the step, and the means over processes."""
        return StepContext(
            backward=self.accelerator.backward, shared_parameters=self._shared_parameters,
            last_shared_parameters=self._last_shared_parameters, features=features,
            step=self.state.step, accuracies=accuracies, head_parameters=self._head_parameters,
            reduce_mean=lambda tensor: self.accelerator.reduce(tensor, "mean"),
            micro_batch=micro, micro_batches=self.config.train.grad_accumulation,
        )

    def _apply_gradients(self) -> None:
        """Clip and step the model's optimiser (Accelerate skips it until the last micro-batch);
        after the last one, the schedule, the EMA and the weighting's own optimiser."""
        accelerator = self.accelerator
        if accelerator.sync_gradients and self.config.train.grad_clip > 0:
            accelerator.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return
        self.scheduler.step()
        skipped = accelerator.optimizer_step_was_skipped  # fp16 overflow: keep EMA and Adam's state clean
        if self.ema is not None and not skipped:
            self.ema.update()
        if self.weighting_optimizer is not None:
            if not skipped:
                self.weighting_optimizer.step()
            self.weighting_optimizer.zero_grad(set_to_none=True)

    def _task_loss(self, task: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        step, steps = self._schedule_point()
        return task_loss(logits, batch, class_weight=self.class_weights[task], distill=self.config.distill,
                         step=step, steps=steps)

    def _adversarial_backward(self, batches: dict[str, dict[str, torch.Tensor]]) -> None:
        """FGM: perturb the word embeddings along their gradient, add the perturbed losses'
        gradients (weighted as the strategy weights tasks now), restore the embeddings."""
        attacked = self.fgm.attack()
        if not attacked and self.accelerator.num_processes == 1:
            return
        # Under DDP every rank runs the same forwards (each is a collective), attacked or not.
        weights = self.weighting.task_weights()
        adversarial = sum(weights[task] * self._task_loss(task, self._logits(task, b), b)
                          for task, b in batches.items() if task != MLM_TASK)  # the attack is on the tasks
        self.accelerator.backward(adversarial if attacked else adversarial * 0.0)
        self.fgm.restore()

    def _logits(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(task, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[0]

    def _gradient_sync_context(self):
        """Gradient-level methods average per-task gradients themselves: DDP must not sync too."""
        if self.weighting.manual_gradients:
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def _log_step(self, losses: dict[str, torch.Tensor], total: torch.Tensor,
                  steps_per_second: float) -> dict[str, str]:
        """Append the step's losses, weights and rate (and the meter's figures) to the metrics log;
        return the progress bar's postfix."""
        losses = {task: self.accelerator.reduce(loss, "mean").item() for task, loss in losses.items()}
        record = {
            "kind": "train", "step": self.state.step, "loss": losses, "total_loss": float(total),
            "weights": self.weighting.task_weights(), "lr": self.scheduler.get_last_lr()[0],
            "steps_per_second": steps_per_second,
            "epochs": self.batches.epochs_seen(self.state.step * self.config.train.grad_accumulation),
        }
        throughput = self.meter.report()  # training steps only, since the last log line
        record.update(throughput)
        if self.accelerator.device.type == "cuda":  # the most this process has held on its GPU so far
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        self._append_metrics(record)
        postfix = {task: f"{loss:.3f}" for task, loss in losses.items()}
        if throughput:
            postfix["rows/s"] = f"{throughput['samples_per_second']:.1f}"
        if "fraction_of_peak" in throughput:
            fraction = throughput["fraction_of_peak"]
            postfix["peak"] = f"{fraction:.0%}" if fraction >= 0.1 else f"{fraction:.1%}"
        return postfix

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Dev macro-F1 per task and their mean (all processes take part; every one gets the result)."""
        reports = {}
        for task, data in self.dev_data.items():
            logits = predict_logits(self.model, task, data, pad_id=self.tokenizer.pad_token_id,
                                    accelerator=self.accelerator)
            labels = get_task(task).labels
            gold = [labels[i] for i in data.labels]
            predicted = [labels[i] for i in logits.argmax(-1)]
            reports[task] = task_report(get_task(task), gold, predicted)
        return {"reports": reports, "mean_macro_f1": leaderboard_score(reports)}

    def _evaluate_and_keep_best(self, progress) -> None:
        """Evaluate (with the EMA weights, when on), log the result, and save `best/` when the mean
        macro-F1 gains; count the evaluations without a gain."""
        accelerator = self.accelerator
        self._stop_if_weights_not_finite()  # never evaluate, let alone keep as best, a diverged model
        with self._evaluation_weights():
            result = self.evaluate()
        score = result["mean_macro_f1"]
        improved = score > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.state.evaluations_without_gain = 0
        else:
            self.state.evaluations_without_gain += 1
        entry = {"kind": "eval", "step": self.state.step, "mean_macro_f1": score,
                 "macro_f1": {t: r["macro_f1"] for t, r in result["reports"].items()}}
        self.state.history.append(entry)
        self._append_metrics(entry)
        if accelerator.is_main_process:
            per_task = ", ".join(f"{t} {v:.4f}" for t, v in entry["macro_f1"].items())
            progress.write(f"step {self.state.step}: dev mean macro-F1 {score:.4f} ({per_task})"
                           + (" best" if improved else ""))
        if improved and accelerator.is_main_process:
            with self._evaluation_weights():
                self.unwrapped.save(self.folder.best_dir)

    def _patience_spent(self) -> bool:
        """Early stopping: `train.early_stopping_patience` evaluations in a row without a gain."""
        patience = self.config.train.early_stopping_patience
        return patience > 0 and self.state.evaluations_without_gain >= patience

    def _evaluation_weights(self):
        """The EMA weights swapped in, when EMA is on; the raw weights stay in the checkpoint."""
        if self.ema is None or self.ema.updates == 0:  # fp16 may have skipped every step so far
            return contextlib.nullcontext()
        return self.ema.apply_to(self.unwrapped)

    # ----------------------------------------------------------------------------- run files
    def _write_run_files(self) -> None:
        folder = self.folder
        folder.path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, folder.config_file)
        save_split(self.dev_ids, folder.split_file)
        folder.write_mended_rows(self.mended)
        folder.write_labels({task: list(get_task(task).labels) for task in self.config.data.tasks})
        self.tokenizer.save_pretrained(folder.tokenizer_dir)
        folder.metrics_file.write_text("", encoding="utf-8")


def train(config: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          show_progress: bool = True) -> Trainer:
    trainer = Trainer(config, run_dir, resume=resume, overwrite=overwrite, show_progress=show_progress)
    trainer.train()
    return trainer
