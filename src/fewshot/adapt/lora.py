"""LoRA: low-rank updates of frozen weights (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large
Language Models").

For a frozen weight W₀ (out × in) the adapted layer computes

    h = W₀ x + (α / r) · B A x,      A: (r, in),  B: (out, r),  B = 0 at the start,

so the adapted model starts exactly equal to the base. A gets nn.Linear's default init
(kaiming-uniform, as in the paper's code and PEFT). Trainable parameters per layer: r·(in + out).

For a Conv2d (out, in, kh, kw), A is a conv with the layer's kernel, stride, padding and dilation
from ``in`` to ``r`` channels and B a 1×1 conv from ``r`` to ``out`` (PEFT's choice), so
ΔW = B A reshaped to (out, in, kh, kw) and the count is r·(in·kh·kw + out).

``merge`` writes W₀ + (α/r)·BA into the base weight; ``unmerge`` subtracts it again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.adapt.inject import Mergeable, find_targets, freeze, init_generator, kaiming_uniform, replace_module
from fewshot.errors import ConfigError

__all__ = ["LoRAConv2d", "LoRALinear", "apply_lora", "default_lora_targets"]


class _LoRA(Mergeable):
    """W₀ kept in ``base_layer``; merge adds (α/r)·BA into it, unmerge takes it out again."""

    base_layer: nn.Module
    merged: bool

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        self.base_layer.weight.data += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        self.base_layer.weight.data -= self.delta_weight()
        self.merged = False


class LoRALinear(_LoRA):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base_layer.weight
        self.lora_A = nn.Parameter(kaiming_uniform(torch.empty(r, base_layer.in_features, dtype=w.dtype), generator).to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=w.dtype, device=w.device))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B A, shaped like the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)



class LoRAConv2d(_LoRA):
    def __init__(self, base_layer: nn.Conv2d, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
            raise ConfigError("lora: grouped convolutions and non-zero padding modes are not supported")
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base_layer.weight
        out_ch, in_ch, kh, kw = w.shape
        self.lora_A = nn.Parameter(kaiming_uniform(torch.empty(r, in_ch, kh, kw, dtype=w.dtype), generator).to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(out_ch, r, 1, 1, dtype=w.dtype, device=w.device))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B A as a (out, in, kh, kw) kernel: B (out, r) times A (r, in·kh·kw)."""
        b = self.lora_B.flatten(1)
        return self.scaling * (b @ self.lora_A.flatten(1)).view_as(self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        c = self.base_layer
        a = F.conv2d(x, self.lora_A, None, c.stride, c.padding, c.dilation)
        return out + self.scaling * F.conv2d(a, self.lora_B)


def default_lora_targets(encoder: nn.Module) -> list[str]:
    """Transformers: the fused q/k/v projection of every attention (the paper adapts W_q and W_v;
    ours are one Linear). Other encoders: every Conv2d."""
    from fewshot.models.transformer import Attention

    if any(isinstance(m, Attention) for m in encoder.modules()):
        return ["*attn.qkv"]
    return ["*"]


def apply_lora(
    encoder: nn.Module,
    r: int = 4,
    alpha: float = 8.0,
    targets: str | Sequence[str] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Freeze ``encoder`` and wrap every Linear/Conv2d matching ``targets`` with LoRA (in place).

    Only the A and B matrices are trainable. ``targets`` defaults to :func:`default_lora_targets`.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"lora: rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"lora: alpha must be a positive number, got {alpha!r}")
    generator = init_generator(generator)
    freeze(encoder)
    names = find_targets(encoder, targets or default_lora_targets(encoder), (nn.Linear, nn.Conv2d), "lora")
    for name in names:
        layer = encoder.get_submodule(name)
        wrap = LoRALinear if isinstance(layer, nn.Linear) else LoRAConv2d
        replace_module(encoder, name, wrap(layer, r, float(alpha), generator))
    return encoder
