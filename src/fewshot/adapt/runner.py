"""Adapting a pre-trained encoder to a task with a fixed step budget, and scoring it over episodes.

One task (:func:`fit_classifier`):

1. a fresh copy of the base encoder; the method is applied to it (only its parameters train);
2. a cosine head started at the class prototypes of the support set (:class:`CosineHead`), so
   zero steps is the evaluator's nearest-prototype classifier;
3. ``steps`` AdamW steps on the whole support set as one batch (cross-entropy), the method's
   parameters at ``lr``, the head at ``head_lr``, each step on fresh augmented views of the support
   set when ``augment`` is given;
4. the queries classified by the adapted encoder and head.

The base encoder adapts in eval mode: BatchNorm keeps its pre-trained statistics (25 support
images make noisy batch statistics, and a frozen base must stay frozen). Wrapper methods manage
their own modes (their base stays in eval mode, their new modules train).

A frozen encoder (the linear probe) is run once on the support set under ``no_grad``, not per step.

:func:`run_adaptation` does this on seeded episodes (:class:`EpisodeSampler`) and reports accuracy
± 95% CI (:func:`fewshot.evaluate.runner.mean_ci95`), trainable parameters, the bytes one task
stores (the adapter file of episode 0) and seconds per episode.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fewshot.adapt.classifier import DEFAULT_SCALE, AdaptedClassifier, CosineHead, fit_steps
from fewshot.adapt.files import save_adapter
from fewshot.adapt.inject import count_trainable
from fewshot.adapt.registry import adapt, get_adapt_method
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.episodes import EpisodeSampler
from fewshot.evaluate.runner import mean_ci95

if TYPE_CHECKING:
    from fewshot.data.views import ViewRecipe

__all__ = ["AdaptSettings", "episode_generator", "fit_classifier", "run_adaptation", "score_episodes"]


@dataclass
class AdaptSettings:
    steps: int = 50  # AdamW steps per task
    lr: float = 1e-3  # the method's parameters
    head_lr: float = 1e-3  # the head; Adam at 1e-2 moves each unit-norm weight coordinate (≈ 1/√D) too far: 20-way 1-shot on Lake fell from 32% to 14% in 5 steps
    weight_decay: float = 0.0  # 0: AdamW's decay would pull (IA)³ scales and BitFit biases towards 0
    scale: float = DEFAULT_SCALE  # the cosine head's s
    augment: "ViewRecipe | None" = None  # views of the support set per step, or None
    batch_size: int = 512  # images per forward pass when classifying queries

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be a non-negative integer, got {self.steps!r}")
        for name in ("lr", "head_lr", "scale"):
            if not getattr(self, name) > 0:
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


def fit_classifier(
    base: nn.Module,
    method: str,
    options: dict[str, Any] | None,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    settings: AdaptSettings,
    generator: torch.Generator,
    classes: list[str] | None = None,
) -> AdaptedClassifier:
    """Adapt a copy of ``base`` with ``method`` on support images (n, C, H, W), labels (n,) in 0..way-1."""
    support_labels = torch.as_tensor(support_labels, dtype=torch.long)
    if support.ndim != 4 or len(support) != len(support_labels) or len(support) == 0:
        raise DataError(f"support must be (n, C, H, W) images with n labels, got {tuple(support.shape)} and {len(support_labels)} labels")
    way = int(support_labels.max()) + 1
    if way < 2 or set(support_labels.tolist()) != set(range(way)):
        raise DataError(f"support labels must cover 0..way-1 with way ≥ 2, got classes {sorted(set(support_labels.tolist()))}")
    entry = get_adapt_method(method)
    device = next(base.parameters()).device
    model = adapt(copy.deepcopy(base), method, options, generator).to(device)
    _set_mode(model, entry.wrapper)
    x, y = support.to(device), support_labels.to(device)
    frozen = count_trainable(model) == 0

    with torch.no_grad():
        features = model(x)
    head = CosineHead.from_prototypes(features, y, way, settings.scale)
    groups = [{"params": list(head.parameters()), "lr": settings.head_lr}]
    if not frozen:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": settings.lr})

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


def score_episodes(fit_predict, labels, way: int, shot: int, query: int, episodes: int, seed: int = 0):
    """The episode loop every adaptation study shares (images here, texts in :mod:`fewshot.adapt.hf`).

    ``fit_predict(i, support_idx, support_labels, query_idx) -> (predicted labels, fitted model)``
    fits a fresh model on episode ``i``'s support and predicts its queries. Episodes come from
    :class:`EpisodeSampler` ``(labels, way, shot, query, seed)``, the evaluator's episodes.
    Returns ``(sampler, accuracies, seconds per episode, the first episode's fitted model)``.
    """
    sampler = EpisodeSampler(labels, way, shot, query, seed)
    accuracies, seconds, first = [], [], None
    for i, episode in enumerate(sampler.episodes(episodes)):
        start = time.perf_counter()
        predicted, fitted = fit_predict(i, episode.support, episode.support_labels, episode.query)
        seconds.append(time.perf_counter() - start)
        accuracies.append(float(np.mean(np.asarray(predicted) == episode.query_labels)))
        first = fitted if first is None else first
    if not accuracies:
        raise ConfigError(f"episodes must be a positive integer, got {episodes!r}")
    return sampler, accuracies, seconds, first


def run_adaptation(
    base: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
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

    Returns ``{"method", "options", "way", "shot", "query", "episodes", "steps", "accuracy",
    "ci95", "trainable_params", "head_params", "bytes_per_task", "seconds_per_episode"}``;
    accuracy and ci95 as fractions. The same ``seed`` gives the same episodes as the evaluator.
    """
    settings = settings or AdaptSettings()
    options = dict(options or {})

    def fit_predict(i, support, support_labels, query):
        clf = fit_classifier(base, method, options, images[torch.from_numpy(support.copy())],
                             torch.from_numpy(support_labels.copy()), settings, episode_generator(seed, i))
        return clf.predict(images[torch.from_numpy(query.copy())], settings.batch_size).numpy(), clf

    sampler, accuracies, seconds, clf = score_episodes(fit_predict, labels, way, shot, query, episodes, seed)
    trainable = count_trainable(clf.encoder)
    head_params = sum(p.numel() for p in clf.head.parameters())
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
        "trainable_params": trainable,
        "head_params": head_params,
        "bytes_per_task": bytes_per_task,
        "seconds_per_episode": float(np.mean(seconds)),
    }
