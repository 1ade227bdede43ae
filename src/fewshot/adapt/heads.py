"""The head trained on top of the adapted encoder, and the two together as a classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptedClassifier", "CosineHead", "DEFAULT_SCALE", "fit_steps"]

# Cosine classifiers fix or learn a scale s on the similarities: Chen et al. (2019, Baseline++) use
# 10 for wide outputs, Gidaris & Komodakis (2018) learn it near there. s = 10 turns similarities in
# [-1, 1] into logits sharp enough for cross-entropy to move them within a few dozen steps.
DEFAULT_SCALE = 10.0


class CosineHead(nn.Module):
    """logits = s · (r / ‖r‖) Wᵀ + b, W: (way, dim), b: (way,).

    :meth:`from_prototypes` starts W at the L2-normalised class means of L2-normalised support
    features and b at zero, so before any step the head *is* the nearest-prototype (cosine)
    classifier of the evaluator (the Proto-MAML initialisation, Triantafillou et al. 2020, on the
    cosine metric); training then moves W, b and the adapted encoder together.
    """

    def __init__(self, dim: int, way: int, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(way, dim))
        self.bias = nn.Parameter(torch.zeros(way))
        self.scale = float(scale)

    @classmethod
    @torch.no_grad()
    def from_prototypes(cls, features: torch.Tensor, labels: torch.Tensor, way: int, scale: float = DEFAULT_SCALE) -> "CosineHead":
        """features (n, dim), labels (n,) in 0..way-1."""
        head = cls(features.shape[1], way, scale).to(features.device)
        normed = F.normalize(features.float(), dim=1)
        sums = torch.zeros(way, features.shape[1], device=features.device).index_add_(0, labels, normed)
        head.weight.copy_(F.normalize(sums / torch.bincount(labels, minlength=way).clamp(min=1)[:, None], dim=1))
        return head

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(r.float(), dim=1) @ self.weight.t() + self.bias


def fit_steps(embed, head: nn.Module, labels: torch.Tensor, groups: list[dict], steps: int, weight_decay: float = 0.0) -> list[float]:
    """The few-shot fit every adapter shares (images and Hugging Face text alike): ``steps``
    full-batch AdamW steps on cross-entropy(head(embed()), labels); returns the losses.
    ``embed()`` gives the support features each step (fresh views, or a cached tensor)."""
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(head(embed()), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


class AdaptedClassifier(nn.Module):
    """The adapted encoder followed by its head; ``classes`` names the head's outputs."""

    def __init__(self, encoder: nn.Module, head: CosineHead, classes: list[str] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classes = list(classes) if classes is not None else [str(i) for i in range(head.weight.shape[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor | list[str], batch_size: int = 512) -> torch.Tensor:
        """Class indices (n,) for images (n, C, H, W) or texts, in eval mode and batches, on the model's device."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        move = (lambda b: b.to(device)) if isinstance(x, torch.Tensor) else list  # a text base tokenizes and moves its texts
        out = [self(move(x[i : i + batch_size])).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out)
