"""(IA)³: learned vectors that rescale inner activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", T-Few).

In every transformer block, with l_k, l_v ∈ R^d and l_ff ∈ R^{d_ff}, all initialised to ones:

    attention:  softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V)
    MLP:        (l_ff ⊙ γ(W₁ x)) W₂

so the adapted model starts equal to the base. Each rescaling folds into a weight:
l_k, l_v scale the key and value rows of the fused qkv projection (weights and biases);
l_ff scales the input columns of W₂. For convolutions (our CNN encoders) a vector l ∈ R^out
rescales each output channel, y = l ⊙ (W ∗ x + b), which folds into W and b. ``unmerge`` divides
again, so it needs l without zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fewshot.adapt.inject import Mergeable, find_targets, freeze, replace_module
from fewshot.errors import ConfigError

__all__ = ["IA3Conv2d", "IA3FeedForward", "IA3KeyValue", "apply_ia3"]


def _check_nonzero(*vectors: torch.Tensor) -> None:
    if any(bool((v == 0).any()) for v in vectors):
        raise ConfigError("ia3: cannot unmerge a rescaling vector that has a zero entry")


class IA3KeyValue(Mergeable):
    """The fused qkv projection (out = 3d: q | k | v) with keys scaled by l_k and values by l_v."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if base_layer.out_features % 3:
            raise ConfigError(f"ia3: a fused qkv projection has 3·d outputs, got {base_layer.out_features}")
        d = base_layer.out_features // 3
        w = base_layer.weight
        self.base_layer = base_layer
        self.ia3_l_k = nn.Parameter(torch.ones(d, dtype=w.dtype, device=w.device))
        self.ia3_l_v = nn.Parameter(torch.ones(d, dtype=w.dtype, device=w.device))
        self.merged = False

    def scale(self) -> torch.Tensor:
        """(3d,): 1 on the query rows, l_k on the key rows, l_v on the value rows."""
        return torch.cat([torch.ones_like(self.ia3_l_k), self.ia3_l_k, self.ia3_l_v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else out * self.scale()

    def merge(self) -> None:
        s = self.scale()
        self.base_layer.weight.data *= s[:, None]
        if self.base_layer.bias is not None:
            self.base_layer.bias.data *= s
        self.merged = True

    def unmerge(self) -> None:
        _check_nonzero(self.ia3_l_k, self.ia3_l_v)
        s = self.scale()
        self.base_layer.weight.data /= s[:, None]
        if self.base_layer.bias is not None:
            self.base_layer.bias.data /= s
        self.merged = False


class IA3FeedForward(Mergeable):
    """W₂ of the MLP applied to l_ff ⊙ h (h = the hidden activation γ(W₁x))."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.ia3_l_ff = nn.Parameter(torch.ones(base_layer.in_features, dtype=w.dtype, device=w.device))
        self.merged = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.base_layer(h if self.merged else h * self.ia3_l_ff)

    def merge(self) -> None:
        self.base_layer.weight.data *= self.ia3_l_ff[None, :]
        self.merged = True

    def unmerge(self) -> None:
        _check_nonzero(self.ia3_l_ff)
        self.base_layer.weight.data /= self.ia3_l_ff[None, :]
        self.merged = False


class IA3Conv2d(Mergeable):
    """y = l ⊙ conv(x), one learned scale per output channel."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.ia3_l = nn.Parameter(torch.ones(w.shape[0], dtype=w.dtype, device=w.device))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y if self.merged else y * self.ia3_l[:, None, None]

    def merge(self) -> None:
        self.base_layer.weight.data *= self.ia3_l[:, None, None, None]
        if self.base_layer.bias is not None:
            self.base_layer.bias.data *= self.ia3_l
        self.merged = True

    def unmerge(self) -> None:
        _check_nonzero(self.ia3_l)
        self.base_layer.weight.data /= self.ia3_l[:, None, None, None]
        if self.base_layer.bias is not None:
            self.base_layer.bias.data /= self.ia3_l
        self.merged = False


def apply_ia3(encoder: nn.Module, targets: str | Sequence[str] | None = None, *, generator: torch.Generator | None = None) -> nn.Module:
    """Freeze ``encoder`` and add (IA)³ vectors (in place).

    Transformers: keys, values and MLP hidden activations of every Block (``targets`` unused).
    Other encoders: the output channels of every Conv2d matching ``targets`` (default all).
    """
    from fewshot.models.transformer import Block

    del generator  # init at ones: nothing random
    freeze(encoder)
    blocks = [m for m in encoder.modules() if isinstance(m, Block)]
    if blocks:
        if targets is not None:
            raise ConfigError("ia3: targets apply to CNN encoders; a transformer gets keys, values and MLP activations of every block")
        for block in blocks:
            block.attn.qkv = IA3KeyValue(block.attn.qkv)
            block.mlp[-1] = IA3FeedForward(block.mlp[-1])
        return encoder
    for name in find_targets(encoder, targets or "*", (nn.Conv2d,), "ia3"):
        replace_module(encoder, name, IA3Conv2d(encoder.get_submodule(name)))
    return encoder

