"""Per-task head networks: from a task's features (token states) to its logits.

    linear     pooling, dropout, a linear classifier (the official baseline's head)
    mlp        pooling, then one tanh hidden layer before the classifier
    bilstm     a bidirectional LSTM over the token states, then pooling and the classifier
    attention  one self-attention block (a transformer layer) of the task's own, then pooling
    san        MT-DNN's stochastic answer network for sentence pairs (Liu et al. 2018, 2019)

Every head's classifier is a dropout-led stack; with `samples > 1` (multi-sample dropout, Inoue
2019) training averages the logits of that many passes through it, each with its own dropout
masks, and prediction makes one pass (dropout is off). The paper averages the passes' losses;
averaging logits (as most public implementations do) keeps one loss per task for the weighting
methods and the distillation mix, at the cost of a slightly different gradient. `build_head` takes the resolved spec of
`structure.resolve_heads`. A head returns its logits and the vector its classifier read.
"""

from __future__ import annotations

import torch
from torch import nn

from clue_mtl.errors import ConfigError
from clue_mtl.model.features import LayerFeatures
from clue_mtl.model.pooling import Pooling, attend


def classifier_stack(width: int, num_labels: int, dropout: float, hidden: int = 0) -> nn.Sequential:
    """Dropout and a linear layer, with a tanh hidden layer between where `hidden` > 0."""
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    if hidden > 0:
        layers += [nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_labels))
    return nn.Sequential(*layers)


class TaskHead(nn.Module):
    """Features, an optional network over the token states, pooling and the classifier."""

    def __init__(self, features: LayerFeatures, network: nn.Module | None, pooling: Pooling,
                 classifier: nn.Sequential, samples: int = 1):
        super().__init__()
        self.features = features
        self.network = network
        self.pooling = pooling
        self.classifier = classifier
        self.samples = samples

    def classify(self, vector: torch.Tensor) -> torch.Tensor:
        if not self.training or self.samples == 1:
            return self.classifier(vector)
        return torch.stack([self.classifier(vector) for _ in range(self.samples)]).mean(0)

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.features(states)
        if self.network is not None:
            hidden = self.network(hidden, mask)
        pooled = self.pooling(hidden, mask)
        return self.classify(pooled), pooled


class BiLSTM(nn.Module):
    """A bidirectional LSTM over each row's real tokens (packed: padding never enters a state)."""

    keeps_float32 = True  # runs with autocast off: its weights stay float32 where a model is cast to bf16

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)
        self.width = 2 * hidden

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1).cpu()
        # float32: the packed LSTM has no bfloat16 kernel on CPU, and it is a small part of a step
        with torch.autocast(hidden.device.type, enabled=False):
            packed = nn.utils.rnn.pack_padded_sequence(hidden.float(), lengths, batch_first=True,
                                                       enforce_sorted=False)
            output, _ = self.lstm(packed)
            output, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=hidden.shape[1])
        return output


class SelfAttentionBlock(nn.Module):
    """One post-norm transformer layer of the task's own over the token states."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ConfigError(f"an attention head of {heads} heads needs features whose width ({width}) "
                              "it divides")
        self.block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout,
                                                activation="gelu", batch_first=True)
        self.width = width

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(hidden, src_key_padding_mask=~mask.bool())


class AnswerHead(nn.Module):
    """MT-DNN's stochastic answer network (SAN) for a sentence pair.

    The premise and hypothesis memories are the token states of the pair's two segments. The
    initial state is a self-attentive summary of the hypothesis; each of K steps attends over the
    premise with the current state (bilinear), updates the state with a GRU cell and predicts
    from [s; x; |s - x|; s * x]. Training drops each step's prediction with `step_dropout`
    (keeping at least one per row) and averages the rest; prediction averages all K. The logits
    returned are the log of the averaged probabilities.
    """

    keeps_float32 = True  # runs with autocast off: its weights stay float32 where a model is cast to bf16

    def __init__(self, features: LayerFeatures, num_labels: int, *, steps: int, step_dropout: float,
                 dropout: float, samples: int = 1):
        super().__init__()
        width = features.width
        self.features = features
        self.summary = nn.Linear(width, 1)
        self.bilinear = nn.Linear(width, width, bias=False)
        self.cell = nn.GRUCell(width, width)
        self.classifier = classifier_stack(4 * width, num_labels, dropout)
        self.steps, self.step_dropout, self.samples = steps, step_dropout, samples

    classify = TaskHead.classify

    def step_mask(self, rows: int, device: torch.device) -> torch.Tensor:
        """Which steps' predictions count (rows x steps): all at prediction, a random subset in training."""
        keep = torch.ones(rows, self.steps, dtype=torch.bool, device=device)
        if self.training and self.step_dropout > 0:
            keep = torch.rand(rows, self.steps, device=device) >= self.step_dropout
            forced = torch.randint(self.steps, (rows,), device=device)  # one step always counts
            keep[torch.arange(rows, device=device), forced] = True
        return keep

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if segments is None:
            raise ValueError("the SAN head needs the pair's segments")
        hidden = self.features(states).float()
        mask = mask.bool()
        premise, hypothesis = mask & (segments == 0), mask & (segments != 0)
        premise = torch.where(premise.any(1, keepdim=True), premise, mask)  # a truncated-away side:
        hypothesis = torch.where(hypothesis.any(1, keepdim=True), hypothesis, mask)  # the whole row
        with torch.autocast(hidden.device.type, enabled=False):  # a small recurrence: float32 throughout
            state = attend(self.summary(hidden).squeeze(-1), hidden, hypothesis)
            probabilities = []
            for _ in range(self.steps):
                scores = torch.einsum("bd,btd->bt", self.bilinear(state), hidden)
                read = attend(scores, hidden, premise)
                state = self.cell(read, state)
                joint = torch.cat([state, read, (state - read).abs(), state * read], dim=-1)
                probabilities.append(torch.softmax(self.classify(joint), dim=-1))
            stacked = torch.stack(probabilities, dim=1)                          # rows x steps x labels
            keep = self.step_mask(stacked.shape[0], stacked.device).unsqueeze(-1).float()
            averaged = (stacked * keep).sum(1) / keep.sum(1)
        return averaged.clamp(min=1e-12).log(), state


def build_head(spec: dict, *, hidden_size: int, num_states: int, num_labels: int, dropout: float) -> nn.Module:
    """The head a resolved spec (`structure.resolve_heads`) describes."""
    try:
        features = LayerFeatures(spec["features"], hidden_size, num_states, spec.get("layers"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    kind, samples = spec["type"], spec.get("samples", 1)
    if kind == "san":
        return AnswerHead(features, num_labels, steps=spec["steps"], step_dropout=spec["step_dropout"],
                          dropout=dropout, samples=samples)
    network: nn.Module | None = None
    width = features.width
    if kind == "bilstm":
        network = BiLSTM(width, spec["hidden"])
        width = network.width
    elif kind == "attention":
        network = SelfAttentionBlock(width, spec["heads"], dropout)
    pooling = Pooling(spec["pooling"], width)
    classifier = classifier_stack(pooling.out_width, num_labels, dropout, spec["hidden"] if kind == "mlp" else 0)
    return TaskHead(features, network, pooling, classifier, samples)
