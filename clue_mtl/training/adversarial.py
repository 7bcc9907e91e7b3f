"""FGM adversarial training (Miyato et al., 2017) on the word-embedding matrix.

After the ordinary backward pass, `attack()` moves the embedding weight one step of length
epsilon along its gradient, r = epsilon * g / ||g||; the trainer then runs the forward and backward
passes again, so the adversarial loss's gradients add to the clean ones, and `restore()` puts the
exact weights back (from a copy: w + r - r is not w in floating point) before the optimiser step.

g / ||g|| does not change under fp16 loss scaling; an overflowed (non-finite) or zero gradient
skips the attack (`attack()` returns False and `restore()` has nothing to do).
"""

from __future__ import annotations

import torch
from torch import nn


class FGM:
    """Fast Gradient Method on `model.encoder.get_input_embeddings().weight`."""

    def __init__(self, model: nn.Module, epsilon: float = 1.0):
        if epsilon <= 0:
            raise ValueError(f"FGM epsilon must be positive, not {epsilon}")
        encoder = getattr(model, "encoder", model)
        self.weight: nn.Parameter = encoder.get_input_embeddings().weight
        if not self.weight.requires_grad:
            raise ValueError("FGM perturbs the word embeddings along their gradient, but they are frozen "
                             "(model.freeze_word_embeddings)")
        self.epsilon = epsilon
        self._backup: torch.Tensor | None = None

    @torch.no_grad()
    def attack(self) -> bool:
        """Add epsilon * g / ||g|| to the embedding weight; False (and no change) if g is 0 or not finite."""
        if self._backup is not None:
            raise RuntimeError("FGM.attack() called twice without restore()")
        grad = self.weight.grad
        if grad is None:
            raise RuntimeError("FGM.attack() needs the embedding gradient: call it after the backward pass")
        norm = torch.linalg.vector_norm(grad.float())
        if not torch.isfinite(norm) or norm == 0:
            return False
        self._backup = self.weight.detach().clone()
        self.weight.add_((self.epsilon / norm) * grad.to(self.weight.dtype))
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights from before `attack()` exactly; a no-op if nothing was perturbed."""
        if self._backup is not None:
            self.weight.copy_(self._backup)
            self._backup = None
