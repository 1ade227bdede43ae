"""Residual adapters: small new modules inserted into a frozen network.

Bottleneck adapters for transformers (Houlsby et al. 2019, "Parameter-Efficient Transfer
Learning for NLP"; Pfeiffer et al. 2021, "AdapterFusion"):

    adapter(h) = h + W_up · f(W_down · h),   W_down: (m, d), W_up: (d, m), f = GELU,

placed on the output of a block's sub-layer, before that sub-layer's residual sum:
``x + adapter(attn(LN(x)))`` and ``x + adapter(mlp(LN(x)))``. Houlsby puts one after both
sub-layers (``where="both"``) and also trains the layer norms; Pfeiffer puts one after the MLP only
(``where="mlp"``). W_up (and its bias) start at zero, so the adapted model starts equal to the base
(Houlsby's near-identity init, made exact). Not mergeable: f is non-linear.

Residual adapters for CNNs (Rebuffi et al. 2017, "Learning multiple visual domains with residual
adapters", series form):

    g(y) = y + α ∗ y,   α: a 1×1 convolution (out → out channels), zero at the start,

applied to the output y = W ∗ x + b of a convolution. Because both are linear, g folds exactly into
that convolution: W' = W + α·W (mixing W's output channels), b' = b + α·b. ``unmerge`` solves
(I + α)·W = W' for W, so it needs I + α invertible (it is near α = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.adapt.inject import Mergeable, find_targets, freeze, init_generator, kaiming_uniform, replace_module
from fewshot.errors import ConfigError, EncoderMismatch

__all__ = ["Bottleneck", "ConvResidualAdapter", "SublayerAdapter", "apply_bottleneck_adapters", "apply_conv_adapters"]

WHERE = ("both", "attn", "mlp")


class Bottleneck(nn.Module):
    """h + W_up·GELU(W_down·h + b_down) + b_up on the last axis; W_up, b_up start at zero."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        with torch.no_grad():
            kaiming_uniform(self.down.weight, generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class SublayerAdapter(nn.Module):
    """A block's sub-layer followed by a bottleneck adapter on its output.

    Wraps Attention (which may return ``(out, kv)`` with ``return_kv``; the adapter touches only
    ``out``) or the MLP, so :class:`~fewshot.models.transformer.Block` itself is unchanged.
    """

    def __init__(self, sublayer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer = sublayer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):  # attention with return_kv: (out, (k, v))
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def apply_bottleneck_adapters(
    encoder: nn.Module,
    bottleneck: int = 16,
    where: str = "both",
    norms: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Freeze ``encoder`` and insert a bottleneck adapter of width ``bottleneck`` after the attention
    and/or MLP sub-layer of every transformer Block (in place). ``norms=True`` also trains the
    blocks' layer norms, as Houlsby et al. do."""
    from fewshot.models.transformer import Block

    if where not in WHERE:
        raise ConfigError(f"adapter: where must be one of {', '.join(WHERE)}, got {where!r}")
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ConfigError(f"adapter: bottleneck must be a positive integer, got {bottleneck!r}")
    blocks = [m for m in encoder.modules() if isinstance(m, Block)]
    if not blocks:
        raise EncoderMismatch(f"adapter: needs a transformer encoder (Blocks), {type(encoder).__name__} has none; use conv-adapter for CNNs")
    generator = init_generator(generator)
    freeze(encoder)
    for block in blocks:
        dim = block.norm1.normalized_shape[0]
        if where in ("both", "attn"):
            block.attn = SublayerAdapter(block.attn, Bottleneck(dim, bottleneck, generator))
        if where in ("both", "mlp"):
            block.mlp = SublayerAdapter(block.mlp, Bottleneck(dim, bottleneck, generator))
        if norms:
            for norm in (block.norm1, block.norm2):
                norm.requires_grad_(True)
    return encoder


class ConvResidualAdapter(Mergeable):
    """conv(x) followed by g(y) = y + α ∗ y with α a zero-initialised 1×1 convolution (no bias)."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.alpha = nn.Parameter(torch.zeros(w.shape[0], w.shape[0], 1, 1, dtype=w.dtype, device=w.device))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y if self.merged else y + F.conv2d(y, self.alpha)

    def merge(self) -> None:
        a = self.alpha.flatten(1)  # (out, out)
        w = self.base_layer.weight.data
        w += (a @ w.flatten(1)).view_as(w)
        if self.base_layer.bias is not None:
            self.base_layer.bias.data += a @ self.base_layer.bias.data
        self.merged = True

    def unmerge(self) -> None:
        a = self.alpha.flatten(1)
        m = torch.eye(a.shape[0], dtype=torch.float64, device=a.device) + a.double()
        w = self.base_layer.weight.data
        w.copy_(torch.linalg.solve(m, w.flatten(1).double()).view_as(w))
        if self.base_layer.bias is not None:
            b = self.base_layer.bias.data
            b.copy_(torch.linalg.solve(m, b.double()))
        self.merged = False


def apply_conv_adapters(encoder: nn.Module, targets: str | Sequence[str] = "*", *, generator: torch.Generator | None = None) -> nn.Module:
    """Freeze ``encoder`` and follow every Conv2d matching ``targets`` with a residual adapter (in place)."""
    del generator  # zero init: nothing random
    freeze(encoder)
    for name in find_targets(encoder, targets, (nn.Conv2d,), "conv-adapter"):
        replace_module(encoder, name, ConvResidualAdapter(encoder.get_submodule(name)))
    return encoder
