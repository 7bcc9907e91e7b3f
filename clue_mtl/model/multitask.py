"""The multi-task model: one shared Hugging Face encoder, each task's private part and its head.

The structure is per task (`structure.py`): the features a head reads (`features.py`), the head's
network (`heads.py`) and the task's private share of the encoder (`private.py`). The resolved
structure is saved beside the weights (`best/model.json`), so a run loads without flags.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from clue_mtl.atomic import replace_folder
from clue_mtl.config import ModelConfig
from clue_mtl.config.structure import HeadConfig, PrivateConfig, resolve_heads, resolve_private, validate_structure
from clue_mtl.data.batching import TaskRows
from clue_mtl.errors import RunFolderError
from clue_mtl.model.encoders import encoder_layers, keep_bottom_layers
from clue_mtl.model.frozen import running_from
from clue_mtl.model.heads import AnswerHead, build_head
from clue_mtl.model.private import PrivateLayers, TaskAdapters, is_adapter
from clue_mtl.runs.folder import MODEL_FILE, MODEL_META_FILE
from clue_mtl.tasks import TASKS, get_task
from clue_mtl.untrusted import first_line, read_json, safetensors_shapes

try:  # transformers' switch for skipping the random draw of weights about to be loaded
    from transformers.initialization import no_init_weights
except ImportError:  # releases that kept it elsewhere, or had none: the draw runs, only slower
    no_init_weights = contextlib.nullcontext


class MultiTaskModel(nn.Module):
    """A shared encoder and one head per task; `forward(task, ...)` runs the encoder on one task's batch.

    Run per task, each task's batch is padded only to its own longest row, the tasks' graphs stay
    separate (per-task gradients come cheap), and each task can run its own layers and adapters.
    `forward(parts, ...)` with the tasks' `TaskRows` runs the encoder once over all of them (a
    `batching.joint_batch`): fewer, larger matrix products, for models without private parts.

    heads: each task's resolved head spec (`structure.resolve_heads`); private: the tasks' private
    parts (`structure.resolve_private`); sep_token_id: where a pair's first segment ends, for SAN
    heads of encoders without segment ids (XLM-R).
    """

    def __init__(self, encoder: PreTrainedModel, task_labels: dict[str, int], *, heads: dict[str, dict],
                 private: dict[str, dict] | None = None, dropout: float = 0.1, sep_token_id: int | None = None):
        super().__init__()
        private = dict(private or {})
        encoder_config = encoder.config.to_dict()  # before any cut: what `load` rebuilds from
        depths = {t: spec["layers"] for t, spec in private.items() if spec["type"] == "layers"}
        self.private = PrivateLayers(encoder, depths) if depths else None
        if depths and set(depths) == set(task_labels):  # the shared top layers would serve no task
            keep_bottom_layers(encoder, self.private.full_depth - min(depths.values()))
        lora = {t: spec for t, spec in private.items() if spec["type"] == "lora"}
        self.adapters = TaskAdapters(encoder, lora) if lora else None  # after the copies: they get none
        self.encoder = encoder
        num_states = (self.private.full_depth if self.private else len(encoder_layers(encoder)) - 1) + 1
        self.heads = nn.ModuleDict({
            task: build_head(heads[task], hidden_size=encoder.config.hidden_size, num_states=num_states,
                             num_labels=n, dropout=dropout)
            for task, n in task_labels.items()
        })
        self.sep_token_id = sep_token_id
        self.meta = {"task_labels": dict(task_labels), "heads": {t: heads[t] for t in task_labels},
                     "private": private, "dropout": dropout, "sep_token_id": sep_token_id,
                     "encoder_config": encoder_config}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def forward(self, task: str | tuple[TaskRows, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, start: tuple[int, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The task's logits and the vector its classifier read. `token_type_ids` (segment ids of a
        BERT-style pair) reach the encoder only when given, so encoders without them are called as before.
        Given the `TaskRows` of a joint batch instead of a task: {task: (logits, features)} from one
        encoder pass over all the rows. `start`: (k, the rows' layer-k states), where the encoder
        runs from (`frozen.running_from`: stored states of frozen layers)."""
        if not isinstance(task, str):
            return self._joint_forward(task, input_ids, attention_mask, token_type_ids, start)
        states = self.hidden_states(task, input_ids, attention_mask, token_type_ids,
                                    every_layer=self.heads[task].features.needs_all_layers, start=start)
        return self._head_output(task, states, input_ids, attention_mask, token_type_ids)

    def _joint_forward(self, parts: tuple[TaskRows, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None, start: tuple[int, torch.Tensor] | None = None
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each part's rows cut back to its own width: the states, mask and segment ids its head
        would have had from a pass of its own (padding is masked out of attention)."""
        if self.private is not None or self.adapters is not None:
            raise ValueError("one encoder pass serves every task only where no task has private layers or adapters")
        every_layer = any(self.heads[part.task].features.needs_all_layers for part in parts)
        states = self.hidden_states(None, input_ids, attention_mask, token_type_ids, every_layer=every_layer,
                                    start=start)
        outputs = {}
        for part in parts:
            rows, width = part.rows, part.width
            segments = None if token_type_ids is None else token_type_ids[rows, :width]
            outputs[part.task] = self._head_output(part.task, [state[rows, :width] for state in states],
                                                   input_ids[rows, :width], attention_mask[rows, :width], segments)
        return outputs

    def _head_output(self, task: str, states: list[torch.Tensor], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.heads[task]
        segments = None
        if isinstance(head, AnswerHead):
            segments = pair_segments(input_ids, token_type_ids, self.sep_token_id)
        return head(states, attention_mask, segments)

    def hidden_states(self, task: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, every_layer: bool = False,
                      start: tuple[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """[embeddings, layer 1, ..., top] token states as the task's encoder computes them (with its
        private layers and adapters); only [top] unless `every_layer`. From `start` = (k, layer-k
        states) only the layers above k run, and the list is [layer k, ..., top]."""
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        with contextlib.ExitStack() as running:
            if self.adapters is not None:
                running.enter_context(self.adapters.active(task))
            if self.private is not None:
                running.enter_context(self.private.running(task))
            recorded: list[torch.Tensor] = []
            if every_layer:  # each module's output, recorded as it is computed
                for module in encoder_layers(self.encoder):
                    running.callback(module.register_forward_hook(
                        lambda _module, _inputs, out: recorded.append(out[0] if isinstance(out, tuple) else out)).remove)
            if start is not None:  # after the hooks: they are on the modules, not on the stand-in
                running.enter_context(running_from(self.encoder, *start))
            top = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
        if start is not None and recorded:
            recorded.insert(0, start[1])
        return [*recorded[:-1], top]  # the encoder's own output on top (a final norm included)

    # ------------------------------------------------------------------ what weighting and optimiser see
    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's own parameters, without any task's adapters."""
        return [p for n, p in self.encoder.named_parameters() if not is_adapter(n)]

    def last_shared_layer_parameters(self) -> list[nn.Parameter]:
        """The top layer every task runs (GradNorm's W): below the deepest private copies."""
        layers = encoder_layers(self.encoder)  # [embeddings, layer 1, ..., layer N]
        top = len(layers) - 1
        if self.private is not None:
            top = self.private.full_depth - max(len(copies) for copies in self.private.copies.values())
        return [p for n, p in layers[top].named_parameters() if not is_adapter(n)]

    def task_parameters(self) -> list[nn.Parameter]:
        """Everything a single task owns: heads, private layers, adapters."""
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def encoder_stacks(self) -> list[list[nn.Module]]:
        """Each task's [embeddings, layer 1, ..., layer N] as it runs them (layer-wise rates)."""
        embeddings, *shared = encoder_layers(self.encoder)
        stacks = []
        for task in self.tasks:
            stack = self.private.stack(task) if self.private else None
            stacks.append([embeddings, *(shared if stack is None else stack)])
        return stacks

    # ------------------------------------------------------------------ saving and loading
    def save(self, directory: str | Path) -> None:
        """The structure (`model.json`) and the weights written into a new folder beside
        `directory`, swapped in whole (`atomic.replace_folder`): a kill while `best/` is saved again
        leaves the previous model complete, in `best/` or, between the swap's two renames, at
        `.best.previous`, where the next reader (`RunFolder.recover_best`) or save puts it back.
        The caller holds the lock of the folder `directory` is in (the run folder's), so no other
        writer shares the staging folder."""
        with replace_folder(directory) as staging:
            (staging / MODEL_META_FILE).write_text(json.dumps(self.meta, indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
            save_model(self, str(staging / MODEL_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "MultiTaskModel":
        """The model saved in `directory`. The folder may come from anywhere: a description or
        weights this kit cannot build from are one `RunFolderError` line naming the file."""
        directory = Path(directory)
        meta_file = directory / MODEL_META_FILE
        meta = checked_structure(read_json(meta_file, what="model description", error=RunFolderError), meta_file)
        try:  # the strict load below sets every weight: skip the random draw (1.2 s for e5-small)
            with no_init_weights():
                encoder = encoder_from_config(saved_encoder_config(meta))
            model = cls(encoder, meta["task_labels"], heads=meta["heads"], private=meta["private"],
                        dropout=meta["dropout"], sep_token_id=meta["sep_token_id"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            # values of the right types that still build nothing (hidden_size not a multiple of the heads, ...)
            raise RunFolderError(f"{meta_file}: cannot build its model ({type(error).__name__}: "
                                 f"{first_line(error)})") from None
        load_weights(model, directory / MODEL_FILE)
        return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into `model` strictly. Its header is compared with the model first,
    so a file is refused before anything is read from it that the model has no place for."""
    shapes = safetensors_shapes(path, what="model's weights", error=RunFolderError)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, shape in shapes.items():
        if expected.get(name) != shape:
            found = "no such tensor" if name not in expected else f"shape {list(expected[name])}"
            raise RunFolderError(f"{path}: not this model's weights ({name} {list(shape)}; the model has {found})")
    try:
        load_model(model, str(path))
    except (SafetensorError, RuntimeError, OSError) as error:  # a missing tensor, a file that changed meanwhile
        raise RunFolderError(f"{path}: not this model's weights ({first_line(error)})") from None


def checked_structure(meta: object, where: Path) -> dict:
    """A saved model's meta (`model.json`) made complete (`model_structure`) and checked: known
    tasks with their label counts, heads and private parts as a config may give them, an encoder
    type transformers knows. Anything else is one `RunFolderError` line naming the file."""
    def need(condition: bool, problem: str) -> None:
        if not condition:
            raise RunFolderError(f"{where}: {problem}")

    need(isinstance(meta, dict), "expected a JSON object describing the model")
    try:
        meta = model_structure(meta)
    except (KeyError, TypeError, AttributeError):
        need(False, "a model saved before per-task structures, but without its pooling per task")
    task_labels, heads, private = meta.get("task_labels"), meta.get("heads"), meta.get("private")
    need(isinstance(task_labels, dict) and bool(task_labels)
         and all(task in TASKS and task_labels[task] == TASKS[task].num_labels
                 and type(task_labels[task]) is int for task in task_labels),
         "task_labels must map each task to its number of labels")
    dropout, sep_token_id = meta.get("dropout"), meta.get("sep_token_id")
    need(type(dropout) in (int, float) and 0 <= dropout < 1, "dropout must be a number in [0, 1)")
    need(sep_token_id is None or (type(sep_token_id) is int and sep_token_id >= 0),
         "sep_token_id must be a token id or null")
    encoder_config = meta.get("encoder_config")
    model_type = encoder_config.get("model_type") if isinstance(encoder_config, dict) else None
    need(isinstance(model_type, str) and model_type in CONFIG_MAPPING,
         f"encoder_config.model_type {model_type!r} is not a model type transformers knows")
    _check_parts(heads, private, list(task_labels), need)
    return meta


def _check_parts(heads: object, private: object, tasks: list[str], need: Callable[[bool, str], None]) -> None:
    """Saved heads and private parts checked as a config's `model.heads` and `model.private` are
    (`structure.validate_structure`): the same names, types and bounds (no head of 10**9 units)."""
    need(isinstance(heads, dict) and set(heads) == set(tasks) and all(isinstance(h, dict) for h in heads.values()),
         "heads must map each task of task_labels to its head")
    need(isinstance(private, dict) and all(isinstance(p, dict) for p in private.values()),
         "private must map tasks to their private parts")
    try:
        structure = SimpleNamespace(heads={t: HeadConfig(**spec) for t, spec in heads.items()},
                                    private={t: PrivateConfig(**spec) for t, spec in private.items()},
                                    head_hidden=0, task_pooling={})
        validate_structure(structure, tasks, need)
    except TypeError as error:  # an unknown setting, or a string where a number belongs
        need(False, f"heads or private hold a setting of the wrong name or type ({first_line(error)})")


def model_structure(meta: dict) -> dict:
    """A saved model's meta with its structure complete: models saved before per-task structures
    had only `pooling` and `head_hidden`, and meant a linear (or MLP) head on the last layer."""
    if "heads" in meta:
        return meta
    kind = "mlp" if meta.get("head_hidden") else "linear"
    heads = {task: {"type": kind, "features": "last", "pooling": pooling, "samples": 1,
                    **({"hidden": meta["head_hidden"]} if kind == "mlp" else {})}
             for task, pooling in meta["pooling"].items()}
    return {**meta, "heads": heads, "private": {}, "sep_token_id": None}


def pair_segments(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, sep_token_id: int | None
                  ) -> torch.Tensor:
    """0 on a pair's first segment, 1 on the second: the segment ids where the encoder has them,
    else everything after each row's first separator (XLM-R's `<s> a </s></s> b </s>`)."""
    if token_type_ids is not None and bool(token_type_ids.any()):
        return token_type_ids
    if sep_token_id is None:
        raise ValueError("a SAN head on an encoder without segment ids needs the tokenizer's sep_token_id")
    is_sep = (input_ids == sep_token_id).long()
    return ((is_sep.cumsum(1) - is_sep) > 0).long()


def saved_encoder_config(meta: dict):
    """The encoder's Hugging Face config, from a saved model's meta (`model.json`)."""
    encoder_config = dict(meta["encoder_config"])
    return AutoConfig.for_model(encoder_config.pop("model_type"), **encoder_config)


def encoder_from_config(config) -> PreTrainedModel:
    """A randomly initialised encoder of the given config, without a pooler where the class has one."""
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


def build_model(encoder: PreTrainedModel, tasks: list[str], model_config: ModelConfig | None = None, *,
                sep_token_id: int | None = None, **settings) -> MultiTaskModel:
    """The model a `ModelConfig` describes (or the default one with `settings` such as
    `pooling="first"`, `head_hidden=8`, `task_pooling={...}`, `dropout`) over `encoder`."""

    if model_config is not None and settings:
        raise TypeError(f"build_model: pass a model config or settings, not both ({', '.join(settings)})")
    model_config = model_config or ModelConfig(**settings)
    return MultiTaskModel(
        encoder, {t: get_task(t).num_labels for t in tasks}, heads=resolve_heads(model_config, tasks),
        private=resolve_private(model_config), dropout=model_config.dropout, sep_token_id=sep_token_id,
    )
