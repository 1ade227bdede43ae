"""Injecting new modules into an existing encoder by target names (the PEFT habit).

A target is an ``fnmatch`` pattern on module names (``"*attn.qkv"``, ``"features.*"``) or, when
it starts with ``re:``, a regular expression that must match the whole name. Only modules of the
kinds a method knows are candidates; when no candidate matches, the error repeats the patterns
and lists the names that exist, so the fix is one copy-paste away.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fewshot.errors import ConfigError, EncoderMismatch


class Mergeable(nn.Module):
    """A wrapper whose change folds into ``base_layer``'s weights.

    ``merge()`` writes the change into the base weights and makes forward use the base alone;
    ``unmerge()`` takes it out again (the exact inverse, up to float error).
    """

    merged: bool = False

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def as_patterns(targets: str | Sequence[str], method: str) -> list[str]:
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{method}: targets must be a non-empty list of name patterns, got {targets!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"{method}: target {p!r} is not a valid regular expression: {exc}") from None
    return patterns


def find_targets(
    model: nn.Module, targets: str | Sequence[str], kinds: tuple[type[nn.Module], ...], method: str
) -> list[str]:
    """Names of the modules of ``kinds`` whose name matches one of ``targets``; ConfigError if none
    (EncoderMismatch if the model has no module of ``kinds`` at all)."""
    patterns = as_patterns(targets, method)
    candidates = [name for name, m in model.named_modules() if name and isinstance(m, kinds)]
    chosen = [name for name in candidates if any(_matches(name, p) for p in patterns)]
    if not chosen:
        kind = "/".join(k.__name__ for k in kinds)
        listed = ", ".join(candidates[:40]) + (f", … ({len(candidates)} in all)" if len(candidates) > 40 else "")
        # No module of the kind at all: the method does not fit this encoder; else the targets are wrong.
        raise (ConfigError if candidates else EncoderMismatch)(
            f"{method}: no {kind} module matches targets {patterns}; available {kind} modules: {listed or 'none'}"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def mergeables(model: nn.Module) -> list[Mergeable]:
    return [m for m in model.modules() if isinstance(m, Mergeable)]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every injected mergeable change into the base weights (in place)."""
    for m in mergeables(model):
        if not m.merged:
            m.merge()
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged change out of the base weights again (in place)."""
    for m in mergeables(model):
        if m.merged:
            m.unmerge()
    return model


def init_generator(generator: torch.Generator | None) -> torch.Generator:
    """The generator injected weights draw from: the one given, else a fixed seed (0)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return generator


def kaiming_uniform(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear/Conv2d's default weight init (kaiming-uniform, a=√5), drawn from ``generator``
    on the CPU so the same seed gives the same weights on every device."""
    cpu = torch.empty(weight.shape, dtype=weight.dtype)
    nn.init.kaiming_uniform_(cpu, a=5**0.5, generator=generator)
    with torch.no_grad():
        weight.copy_(cpu)
    return weight


def names_of(params: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
    return [n for n, _ in params]
