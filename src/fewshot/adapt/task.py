"""Adaptation from a pre-trained run: what ``fewshot adapt`` and :func:`fewshot.api.adapt` do.

Two modes: score a method over seeded episodes of the run's held-out classes, or adapt once on a
labeled support folder (class-per-folder, preprocessed like the run's data) and save the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from fewshot.adapt.classifier import AdaptedClassifier
from fewshot.adapt.files import adapter_target, load_adapter, save_adapter
from fewshot.adapt.inject import count_trainable
from fewshot.adapt.registry import get_adapt_method
from fewshot.adapt.runner import AdaptSettings, episode_generator, fit_classifier, run_adaptation
from fewshot.config import RunConfig
from fewshot.errors import ConfigError, DataError
from fewshot.run import Run

__all__ = ["adapt_checkpoint", "load_adapted", "method_options"]

Log = Callable[[str], None]


def method_options(method: str, options: dict[str, Any] | None, config: RunConfig) -> dict[str, Any]:
    """``options`` plus what the run's config knows and the method needs but the encoder does not
    record (the padding prompt's image size and channels)."""
    options = dict(options or {})
    accepted = get_adapt_method(method).options()
    if "image_size" in accepted and "image_size" not in options:
        options["image_size"] = config.data.image_size
    if "in_channels" in accepted and "in_channels" not in options:
        options["in_channels"] = config.data.channels
    return options


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def adapt_checkpoint(
    path: str | Path,
    method: str,
    options: dict[str, Any] | None = None,
    *,
    support: str | Path | None = None,
    episodes: int | None = None,
    way: int = 5,
    shot: int = 5,
    query: int = 15,
    settings: AdaptSettings | None = None,
    augment: bool = False,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    device: str = "auto",
    log: Log = lambda _: None,
) -> dict[str, Any]:
    """Adapt the encoder of checkpoint/run ``path`` with ``method``.

    ``episodes``: score it on that many seeded ``way``-way ``shot``-shot episodes of the run's
    held-out classes (or ``eval.data_path``); returns the row of :func:`run_adaptation`.
    ``support``: adapt once on that labeled folder; ``out`` (required) receives the adapter file: an
    existing one is refused unless ``force`` (and then only an earlier adapter is replaced), and a run's
    checkpoints/ folder is refused always, all before anything is loaded or trained.
    ``augment`` trains on views from the run's own augmentation recipe.
    """
    from fewshot.data.datasets import load_eval_folder
    from fewshot.data.views import make_views

    if (support is None) == (episodes is None):
        raise ConfigError("give either a support folder (adapt once) or a number of episodes (score the method)")
    if support is not None and out is None:
        raise ConfigError("adapting on a support folder needs an output file for the adapter (--out FILE)")
    if episodes is not None and out is not None:
        raise ConfigError("--out saves the adapter of one support set; with episodes, use --json for the results")
    get_adapt_method(method)  # an unknown name fails before the checkpoint loads
    if out is not None:
        adapter_target(out, overwrite=force)  # refused before any work, not after it
    run = Run.open(path)
    config, base_sha256 = run.config, run.base_sha256
    base = run.encoder().to(_device(device)).eval()  # the encoder alone: no heads, queues or targets
    options = method_options(method, options, config)
    settings = settings or AdaptSettings()
    if augment:
        settings.augment = make_views(config.views.name, config.data.image_size, config.data.channels, **config.views.options)
    if episodes is not None:
        data = run.evaluation_set()
        if data is None:
            raise DataError("the run has no held-out classes to draw episodes from; set eval.data_path in the run or use --support")
        log(f"adapting with {method} on {episodes} {way}-way {shot}-shot episodes, {settings.steps} steps each")
        row = run_adaptation(base, data.images, data.labels, method, options, way, shot, query, episodes, settings, seed, base_sha256)
        return {"checkpoint": str(path), **row}
    data = load_eval_folder(str(support), config.data)
    log(f"adapting with {method} on {len(data)} support images of {len(data.classes)} classes, {settings.steps} steps")
    clf = fit_classifier(base, method, options, data.images, data.labels, settings, episode_generator(seed, 0), data.classes)
    file = save_adapter(out, clf, method, options, base_sha256, extra={"base_checkpoint": str(path)}, overwrite=force)
    accuracy = float((clf.predict(data.images) == data.labels).float().mean())
    return {
        "checkpoint": str(path),
        "method": method,
        "options": options,
        "classes": data.classes,
        "support_images": len(data),
        "steps": settings.steps,
        "support_accuracy": accuracy,
        "trainable_params": count_trainable(clf.encoder),
        "head_params": sum(p.numel() for p in clf.head.parameters()),
        "adapter": str(file),
        "bytes": file.stat().st_size,
    }


def load_adapted(adapter: str | Path, path: str | Path) -> AdaptedClassifier:
    """The classifier of adapter file ``adapter`` on the encoder of checkpoint/run ``path``."""
    run = Run.open(path)
    return load_adapter(adapter, run.encoder(), run.base_sha256)
