"""Adapting a pre-trained encoder to a task with a fixed step budget, and scoring it over episodes.

One task (:func:`fit_classifier`):

1. a fresh copy of the base encoder; the method is applied to it (only its parameters train);
2. a cosine head started at the class prototypes of the support set (:class:`CosineHead`), so
   zero steps is the evaluator's nearest-prototype classifier;
3. ``steps`` AdamW steps on the whole support set as one batch (cross-entropy), the method's
   parameters at ``lr``, the head at ``head_lr``, each step on fresh augmented views of the support
   set when ``augment`` is given;
4. the queries classified by the adapted encoder and head.

Inputs are images, or texts when the base is a text base (a run's text tower behind
:class:`~fewshot.evaluate.speakers.TokenizedTexts`, or a Hugging Face
:class:`~fewshot.models.hf_text.TextEncoder`): whatever ``base(inputs) -> r`` takes.

The base encoder adapts in eval mode: BatchNorm keeps its pre-trained statistics (25 support
images make noisy batch statistics, and a frozen base must stay frozen). Wrapper methods manage
their own modes (their base stays in eval mode, their new modules train).

A frozen encoder (the linear probe) is run once on the support set under ``no_grad``, not per step.

:func:`run_adaptation` does this on seeded episodes (:class:`EpisodeSampler`, through the evaluator's
one episode loop, :func:`fewshot.evaluate.runner.fit_predict_episodes`) and reports accuracy
± 95% CI (:func:`fewshot.evaluate.runner.mean_ci95`), trainable parameters, the bytes one task
stores (the adapter file of episode 0) and seconds per episode.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fewshot.adapt.files import save_adapter
from fewshot.adapt.heads import DEFAULT_SCALE, AdaptedClassifier, CosineHead, fit_steps
from fewshot.adapt.inject import count_trainable
from fewshot.adapt.registry import adapt, get_adapt_method
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.episodes import EpisodeSampler
from fewshot.evaluate.runner import fit_predict_episodes, mean_ci95

if TYPE_CHECKING:
    from fewshot.data.views import ViewRecipe

__all__ = ["AdaptSettings", "Adaptation", "episode_generator", "fit_classifier", "run_adaptation"]


DEFAULT_LR = 1e-3  # the method's learning rate unless it or the user says otherwise


@dataclass
class AdaptSettings:
    steps: int = 50  # AdamW steps per task
    lr: float | None = None  # the method's parameters; None: the method's own (AdaptMethod.lr) or DEFAULT_LR
    head_lr: float = 1e-3  # the head; Adam at 1e-2 moves each unit-norm weight coordinate (≈ 1/√D) too far: 20-way 1-shot on Lake fell from 32% to 14% in 5 steps
    weight_decay: float = 0.0  # 0: AdamW's decay would pull (IA)³ scales and BitFit biases towards 0
    scale: float = DEFAULT_SCALE  # the cosine head's s
    augment: "ViewRecipe | None" = None  # views of the support set per step, or None
    batch_size: int = 512  # inputs per forward pass when classifying queries

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be a non-negative integer, got {self.steps!r}")
        for name in ("lr", "head_lr", "scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0, got {self.weight_decay!r}")


def episode_generator(seed: int, episode: int) -> torch.Generator:
    """The CPU generator of one episode's adaptation: injected weights and augmentations."""
    state = np.random.SeedSequence([seed, episode]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _set_mode(model: nn.Module, wrapper: bool) -> None:
    if wrapper:
        model.train()  # wrappers keep their base in eval mode themselves
    else:
        model.eval()


def _to(items: Any, device: torch.device) -> Any:
    """Images go to the model's device; texts stay a list (the text base tokenizes and moves them)."""
    return items.to(device) if isinstance(items, torch.Tensor) else list(items)


def fit_classifier(
    base: nn.Module,
    method: str,
    options: dict[str, Any] | None,
    support: torch.Tensor | list[str],
    support_labels: torch.Tensor,
    settings: AdaptSettings,
    generator: torch.Generator,
    classes: list[str] | None = None,
) -> AdaptedClassifier:
    """Adapt a copy of ``base`` with ``method`` on the support set (images (n, C, H, W), or texts for
    a text base), labels (n,) in 0..way-1."""
    support_labels = torch.as_tensor(support_labels, dtype=torch.long)
    images = isinstance(support, torch.Tensor)
    if (images and support.ndim != 4) or len(support) != len(support_labels) or len(support) == 0:
        shape = tuple(support.shape) if images else f"{len(support)} texts"
        raise DataError(f"support must be n images (n, C, H, W) or n texts with n labels, got {shape} and {len(support_labels)} labels")
    way = int(support_labels.max()) + 1
    if way < 2 or set(support_labels.tolist()) != set(range(way)):
        raise DataError(f"support labels must cover 0..way-1 with way ≥ 2, got classes {sorted(set(support_labels.tolist()))}")
    entry = get_adapt_method(method)
    if settings.augment is not None and not images:
        raise ConfigError("augment makes image views; a text base has none")
    device = next(base.parameters()).device
    model = adapt(copy.deepcopy(base), method, options, generator).to(device)
    _set_mode(model, entry.wrapper)
    x, y = _to(support, device), support_labels.to(device)
    frozen = count_trainable(model) == 0
    lr = settings.lr if settings.lr is not None else (entry.lr or DEFAULT_LR)

    with torch.no_grad():
        features = model(x)
    head = CosineHead.from_prototypes(features, y, way, settings.scale)
    groups = [{"params": list(head.parameters()), "lr": settings.head_lr}]
    if not frozen:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": lr})

    def embed() -> torch.Tensor:
        views = settings.augment(x, generator) if settings.augment is not None else x
        if not frozen:
            return model(views)
        if settings.augment is None:
            return features  # the frozen encoder's features of the support set, computed once
        with torch.no_grad():
            return model(views)

    fit_steps(embed, head, y, groups, settings.steps, settings.weight_decay)
    return AdaptedClassifier(model, head, classes)


class Adaptation:
    """:func:`fit_classifier` shaped like every classifier of the episode runner: ``fit(support,
    labels)`` adapts a fresh copy of ``base``, ``predict(query)`` gives class indices (numpy);
    the fitted :class:`AdaptedClassifier` is ``model_``."""

    def __init__(self, base: nn.Module, method: str, options: dict[str, Any], settings: AdaptSettings, generator: torch.Generator) -> None:
        self.base, self.method, self.options, self.settings, self.generator = base, method, options, settings, generator

    def fit(self, support: Any, labels: Any) -> "Adaptation":
        self.model_ = fit_classifier(self.base, self.method, self.options, support, torch.tensor(np.array(labels)),
                                     self.settings, self.generator)
        return self

    def predict(self, query: Any) -> np.ndarray:
        return self.model_.predict(query, self.settings.batch_size).numpy()


def run_adaptation(
    base: nn.Module,
    images: torch.Tensor | list[str],
    labels: torch.Tensor | np.ndarray,
    method: str,
    options: dict[str, Any] | None = None,
    way: int = 5,
    shot: int = 5,
    query: int = 15,
    episodes: int = 100,
    settings: AdaptSettings | None = None,
    seed: int = 0,
    base_sha256: str = "",
) -> dict[str, Any]:
    """Accuracy ± 95% CI of ``method`` over ``episodes`` seeded episodes, with its costs.

    ``images``: the pool's inputs (images, or texts for a text base). Returns ``{"method",
    "options", "way", "shot", "query", "episodes", "steps", "accuracy", "ci95",
    "trainable_params", "head_params", "bytes_per_task", "seconds_per_episode"}``; accuracy and
    ci95 as fractions. The same ``seed`` gives the same episodes as the evaluator.
    """
    settings = settings or AdaptSettings()
    options = dict(options or {})
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ConfigError(f"episodes must be a positive integer, got {episodes!r}")
    sampler = EpisodeSampler(labels, way, shot, query, seed)
    make = lambda i: Adaptation(base, method, options, settings, episode_generator(seed, i))  # noqa: E731
    accuracies, seconds, first = fit_predict_episodes(make, images, list(sampler.episodes(episodes)))
    clf = first.model_
    with tempfile.TemporaryDirectory() as tmp:
        bytes_per_task = save_adapter(Path(tmp) / "task", clf, method, options, base_sha256).stat().st_size
    accuracy, ci95 = mean_ci95(accuracies)
    return {
        "method": method,
        "options": options,
        "way": sampler.way,
        "shot": sampler.shot,
        "query": sampler.query,
        "episodes": len(accuracies),
        "steps": settings.steps,
        "accuracy": accuracy,
        "ci95": ci95,
        "trainable_params": count_trainable(clf.encoder),
        "head_params": sum(p.numel() for p in clf.head.parameters()),
        "bytes_per_task": bytes_per_task,
        "seconds_per_episode": float(np.mean(seconds)),
    }
