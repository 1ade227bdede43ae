"""One registry of adaptation methods: name → function(encoder, **options) → adapted module.

The adapted module maps inputs (images, or texts for a text base) to r like the encoder and has only the method's parameters
trainable. In-place methods (LoRA, adapters, (IA)³, BitFit, …) inject into the encoder they are
given; PEFT's methods (``peft-lora`` …, :mod:`fewshot.adapt.hf`) return the Hugging Face base
with PEFT's adapter attached; wrapper methods (prompts, PGN: :mod:`fewshot.adapt.prompts`, :mod:`fewshot.adapt.pgn`)
return ``Wrapper(encoder, **options)`` holding the frozen encoder as ``.base``. Callers that keep
the base pass a copy (the runner does, once per episode).

``mergeable`` methods fold into the base weights with :func:`fewshot.adapt.inject.merge` and come
back out with :func:`~fewshot.adapt.inject.unmerge`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fewshot.adapt import adapters, finetune, ia3, lora
from fewshot.adapt.inject import merge, unmerge
from fewshot.errors import ConfigError

__all__ = ["ADAPT_METHODS", "AdaptMethod", "adapt", "adapt_method_names", "get_adapt_method"]


@dataclass(frozen=True)
class AdaptMethod:
    name: str
    build: Callable[..., nn.Module]  # build(encoder, *, generator, **options)
    summary: str
    mergeable: bool = False
    wrapper: bool = False  # returns a new module holding the frozen encoder as .base
    lr: float | None = None  # the method's learning rate when none is given (None: AdaptSettings')

    def options(self) -> list[str]:
        """The option names ``build`` takes (everything after the encoder but the generator)."""
        params = list(inspect.signature(self.build).parameters.values())[1:]
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "generator"]

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise ConfigError(f"{self.name}: nothing to merge ({self.summary})")
        return merge(model)

    def unmerge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise ConfigError(f"{self.name}: nothing to unmerge ({self.summary})")
        return unmerge(model)


ADAPT_METHODS: dict[str, AdaptMethod] = {}


def register(method: AdaptMethod) -> AdaptMethod:
    ADAPT_METHODS[method.name] = method
    return method


def _wrapper(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    """``cls(encoder, **options)`` with its new parameters drawn from ``generator``: the wrappers
    draw from the global generator, so it is seeded from ours inside a forked RNG state."""

    def build(encoder: nn.Module, *, generator: torch.Generator | None = None, **options: Any) -> nn.Module:
        seed = int(torch.randint(2**62, (1,), generator=generator).item()) if generator is not None else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(encoder, **options)

    build.__signature__ = inspect.signature(cls)  # type: ignore[attr-defined]  # options as the class takes them
    return build


for _m in (
    AdaptMethod("linear-probe", finetune.apply_linear_probe, "frozen encoder, only the head trains"),
    AdaptMethod("full", finetune.apply_full, "every encoder parameter trains"),
    AdaptMethod("partial", finetune.apply_partial, "the last k blocks train (option k)"),
    AdaptMethod("bitfit", finetune.apply_bitfit, "only the biases train"),
    AdaptMethod("norm", finetune.apply_norm_tuning, "only LayerNorm/BatchNorm γ, β train"),
    AdaptMethod("lora", lora.apply_lora, "W₀ + (α/r)·BA on targeted Linear/Conv2d layers", mergeable=True),
    AdaptMethod("ia3", ia3.apply_ia3, "(IA)³: learned rescaling of keys, values, MLP activations / conv channels", mergeable=True),
    AdaptMethod("adapter", adapters.apply_bottleneck_adapters, "bottleneck adapters after attention and/or MLP (Houlsby/Pfeiffer)"),
    AdaptMethod("conv-adapter", adapters.apply_conv_adapters, "residual 1×1 adapters after convolutions (Rebuffi)", mergeable=True),
):
    register(_m)


def _register_wrappers() -> None:
    """The prompt wrappers of fewshot.adapt.prompts and fewshot.adapt.pgn."""
    from fewshot.adapt import pgn, prompts

    for name, cls, summary in (
        ("prompt", prompts.PromptTuning, "prompt tuning / VPT-shallow: n learned input tokens (ViT)"),
        ("deep-prompt", prompts.DeepPromptTuning, "deep prompt tuning / VPT-deep: learned tokens at every layer (ViT)"),
        ("prefix", prompts.PrefixTuning, "prefix tuning: learned keys and values in every attention, MLP-reparameterised (ViT)"),
        ("padding-prompt", prompts.PaddingPrompt, "a learned pixel border added to the image (any encoder)"),
        ("pgn", pgn.PromptGenerationNetwork, "prompt generation network: per-image prompts from a token library (ViT)"),
    ):
        register(AdaptMethod(name, _wrapper(cls), summary, wrapper=True))


_register_wrappers()


def _register_peft() -> None:
    """PEFT's methods on Hugging Face bases (fewshot.adapt.hf), beside fewshot's own."""
    from fewshot.adapt import hf

    for name, summary in (
        ("lora", "PEFT LoRA on a Hugging Face model (r=8, α=16, query + value)"),
        ("ia3", "PEFT (IA)³ on a Hugging Face model (keys, values, FFN activations)"),
        ("prefix", "PEFT prefix tuning on a Hugging Face model (10 virtual tokens)"),
        ("prompt", "PEFT prompt tuning on a Hugging Face model (10 virtual tokens)"),
    ):
        register(AdaptMethod(f"peft-{name}", hf.peft_builder(name), summary, lr=hf.DEFAULT_LR[name]))


_register_peft()


def adapt_method_names() -> list[str]:
    return list(ADAPT_METHODS)


def get_adapt_method(name: str) -> AdaptMethod:
    if name not in ADAPT_METHODS:
        raise ConfigError(f"unknown adaptation method {name!r}; known: {', '.join(ADAPT_METHODS)}")
    return ADAPT_METHODS[name]


def adapt(
    encoder: nn.Module, name: str, options: dict[str, Any] | None = None, generator: torch.Generator | None = None
) -> nn.Module:
    """Apply method ``name`` with ``options`` to ``encoder`` (in place for in-place methods).

    Unknown options are a ConfigError listing the accepted ones; so is a method that does not fit
    the encoder (an adapter for transformer blocks on a CNN, say).
    """
    method = get_adapt_method(name)
    options = dict(options or {})
    accepted = method.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for adaptation method {name!r}; accepted: {', '.join(accepted) or 'none'}")
    return method.build(encoder, generator=generator, **options)
