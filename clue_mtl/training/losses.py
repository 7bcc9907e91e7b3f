"""Per-task losses: class-weighted cross-entropy, mixed with the teachers' soft labels when distilling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clue_mtl.config import DistillConfig
from clue_mtl.training.distill import annealed_mix, distillation_loss


def class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    """Inverse square-root frequency, normalised to mean 1 (a mild push toward macro-F1)."""
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def task_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, class_weight: torch.Tensor | None,
              distill: DistillConfig, step: int, steps: int) -> torch.Tensor:
    """Cross-entropy on the gold label, mixed with the teachers' soft label when the batch has one
    (`teacher_probs`); `step` of `steps` sets the mix under BAM's teacher annealing."""
    if "teacher_probs" not in batch:
        return F.cross_entropy(logits.float(), batch["labels"], weight=class_weight)
    mix = distill.mix if distill.mode == "fixed" else annealed_mix(step, steps)
    return distillation_loss(logits.float(), batch["labels"], batch["teacher_probs"], mix=mix,
                             temperature=distill.temperature, kind=distill.kind, class_weight=class_weight)
