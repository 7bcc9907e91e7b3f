"""The multi-task model: one shared Hugging Face encoder, one pooled dense head per task."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .pooling import POOLINGS
from .run_folder import MODEL_FILE, MODEL_META_FILE



class TaskHead(nn.Module):
    """Pooling, dropout and a linear classifier, optionally after one tanh hidden layer."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float, head_hidden: int = 0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.pooling = pooling
        width = hidden_size * (2 if pooling == "mean_max" else 1)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if head_hidden > 0:
            layers += [nn.Linear(width, head_hidden), nn.Tanh(), nn.Dropout(dropout)]
            width = head_hidden
        layers.append(nn.Linear(width, num_labels))
        self.classifier = nn.Sequential(*layers)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return POOLINGS[self.pooling](hidden, mask)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


class MultiTaskModel(nn.Module):
    """A shared encoder and one head per task; `forward(task, ...)` runs the encoder on one task's batch.

    The encoder runs once per task per step, so each task's batch is padded only to its own
    longest row and the tasks' graphs stay separate (per-task gradients come cheap).
    """

    def __init__(self, encoder: PreTrainedModel, task_labels: dict[str, int], *, pooling: dict[str, str],
                 dropout: float = 0.1, head_hidden: int = 0):
        super().__init__()
        self.encoder = encoder
        hidden_size = encoder.config.hidden_size
        self.heads = nn.ModuleDict({
            task: TaskHead(hidden_size, n, pooling[task], dropout, head_hidden) for task, n in task_labels.items()
        })
        self.meta = {"task_labels": dict(task_labels), "pooling": dict(pooling), "dropout": dropout,
                     "head_hidden": head_hidden}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def encode(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The task's pooled shared representation. `token_type_ids` (segment ids of a BERT-style
        pair) reach the encoder only when given, so encoders without them are called as before."""
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
        return self.heads[task].pool(hidden, attention_mask)

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.encode(task, input_ids, attention_mask, token_type_ids)
        return self.heads[task](pooled), pooled

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, encoder_config=self.encoder.config.to_dict())
        (directory / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        save_model(self, str(directory / MODEL_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "MultiTaskModel":
        directory = Path(directory)
        meta = json.loads((directory / MODEL_META_FILE).read_text(encoding="utf-8"))
        encoder_config = dict(meta.pop("encoder_config"))
        config = AutoConfig.for_model(encoder_config.pop("model_type"), **encoder_config)
        model = cls(encoder_from_config(config), meta["task_labels"], pooling=meta["pooling"],
                    dropout=meta["dropout"], head_hidden=meta["head_hidden"])
        load_model(model, str(directory / MODEL_FILE))
        return model


def encoder_from_config(config) -> PreTrainedModel:
    """A randomly initialised encoder of the given config, without a pooler where the class has one."""
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


def build_model(encoder: PreTrainedModel, tasks: list[str], *, pooling: str = "mean",
                task_pooling: dict[str, str] | None = None, dropout: float = 0.1,
                head_hidden: int = 0) -> MultiTaskModel:
    from .tasks import get_task

    task_pooling = task_pooling or {}
    return MultiTaskModel(
        encoder, {t: get_task(t).num_labels for t in tasks},
        pooling={t: task_pooling.get(t, pooling) for t in tasks}, dropout=dropout, head_hidden=head_hidden,
    )
