"""What ``fewshot adapt`` and :func:`fewshot.api.adapt` do, for every kind of base.

A base is a run folder (an image run: its encoder; a gpt / mlm text run: its text tower with its
tokenizer) or a registered Hugging Face model (``all-minilm-l6-v2``): :func:`open_base` gives the
encoder (inputs → r), the SHA-256 adapter files bind to, and the config whose ``data.*`` and
``eval.*`` say where the episodes come from. Then one of two modes: score a method over seeded
episodes (an image run's held-out classes; for text, speaker identification on the held-out
speeches, as the text evaluator builds them), or adapt once on a labeled support set (an image
folder; a CSV or JSON Lines file of labeled texts for a text base) and save the adapter. Every option is a field of :class:`AdaptConfig`, validated before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from fewshot.adapt.files import adapter_target, load_adapter, save_adapter
from fewshot.adapt.fitting import AdaptSettings, episode_generator, fit_classifier, run_adaptation
from fewshot.adapt.heads import AdaptedClassifier
from fewshot.adapt.inject import count_trainable
from fewshot.adapt.registry import get_adapt_method
from fewshot.config import RunConfig, load_config
from fewshot.errors import ConfigError, DataError
from fewshot.run import Run

__all__ = ["AdaptConfig", "Base", "adapt_base", "load_adapted", "method_options", "open_base"]

Log = Callable[[str], None]


class AdaptConfig(BaseModel):
    """The options of ``fewshot adapt`` (and :func:`fewshot.api.adapt`); unset episode shapes come
    from the base's ``eval.*``."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field("lora", description="adaptation method: fewshot.adapt.adapt_method_names()")
    options: dict[str, Any] = Field(default_factory=dict, description="method options, e.g. {r: 4, alpha: 8}")
    support: str | None = Field(
        None, description="adapt once on this labeled set (needs out): a class-per-folder image folder, or for a text base a "
        "CSV with text,label columns or JSON Lines of {text, label}"
    )
    episodes: int | None = Field(None, ge=1, description="score the method on N seeded episodes")
    way: int | None = Field(None, ge=2, description="N of the N-way episodes (default eval.ways[0])")
    shot: int | None = Field(None, ge=1, description="K of the K-shot episodes (default the largest of eval.shots)")
    query: int | None = Field(None, ge=1, description="queries per class and episode (default eval.queries)")
    seed: int | None = Field(None, ge=0, description="seed of the episodes and injected weights (default eval.seed)")
    steps: int = Field(50, ge=0, description="AdamW steps per task on the support set")
    lr: float | None = Field(None, gt=0, description="learning rate of the method's parameters (default: the method's, else 1e-3)")
    head_lr: float = Field(1e-3, gt=0, description="learning rate of the cosine head")
    augment: bool = Field(False, description="train on views from the run's augmentation recipe (image runs)")
    out: str | None = Field(None, description="adapter file to write with support; never an existing file unless force")
    force: bool = Field(False, description="with out: replace an earlier adapter file (never other files)")
    device: str = Field("auto", description="auto, cpu or cuda")
    overrides: list[str] = Field(default_factory=list, description="key=value on the base's config, e.g. eval.queries=5 data.path=play.txt")


def adapt_config(**fields: Any) -> AdaptConfig:
    """An :class:`AdaptConfig`, or a one-line ConfigError naming the option."""
    try:
        return AdaptConfig(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "adapt"
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown adapt option '{where}'; options: {', '.join(AdaptConfig.model_fields)}") from None
        raise ConfigError(f"bad adapt option '{where}': {first['msg']} (got {first.get('input')!r})") from None


@dataclass
class Base:
    """What adaptation starts from: ``encoder`` (inputs → r, eval mode), ``sha256`` (what adapter
    files bind to), ``config`` (data.* and eval.*), ``text`` (inputs are texts), ``name``."""

    encoder: nn.Module
    sha256: str
    config: RunConfig
    text: bool
    name: str


def open_base(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Base:
    """A run folder / checkpoint (image or text run) or a registered Hugging Face model name."""
    from fewshot.models.hf_text import PRETRAINED, load_pretrained

    if str(path) in PRETRAINED:
        # No run: the episodes come from the default text source (data.path= for another corpus).
        config = load_config(overrides=["data.source=text", *overrides])
        return Base(load_pretrained(str(path)), PRETRAINED[str(path)].sha256, config, True, str(path))
    run = Run.open(path)
    config = load_config(base=run.config.model_dump(mode="json"), overrides=list(overrides))
    if run.config.data.source != "text":
        return Base(run.encoder(), run.base_sha256, config, False, str(path))
    from fewshot.evaluate.speakers import TokenizedTexts

    return Base(TokenizedTexts(run.encoder(), run.tokenizer()).eval(), run.base_sha256, config, True, str(path))


def episode_pool(base: Base, shot: int, query: int) -> tuple[Any, Any]:
    """(inputs, labels) the episodes are drawn from: the held-out classes of an image run (or
    ``eval.data_path``); for text, the held-out speakers with ≥ shot + query speeches."""
    if base.text:
        from fewshot.data.text import load_text_splits, parse_speeches
        from fewshot.evaluate.speakers import speaker_pool

        data = base.config.data
        pool = speaker_pool(parse_speeches(load_text_splits(data).heldout), shot + query, data.holdout_classes, data.split_seed)
        return pool.texts, pool.labels
    from fewshot.data.registry import load_run_data

    data = load_run_data(base.config.data, base.config.eval.data_path).evaluation
    if data is None:
        raise DataError("the run has no held-out classes to draw episodes from; set eval.data_path in the run or use --support")
    return data.images, data.labels


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


def adapt_base(path: str | Path, method: str = "lora", options: dict[str, Any] | None = None, *,
               log: Log = lambda _: None, **fields: Any) -> dict[str, Any]:
    """Adapt base ``path`` (run folder, checkpoint or Hugging Face model name) with ``method``; the
    other fields are those of :class:`AdaptConfig`.

    ``episodes``: score it on that many seeded ``way``-way ``shot``-shot episodes (see
    :func:`episode_pool`); returns the row of :func:`run_adaptation`, the same keys for every base.
    ``support``: adapt once on that labeled set (an image folder; for a text base a CSV ``text,label``
    or JSON Lines file, :func:`fewshot.data.text.load_labeled_texts`); ``out`` (required) receives the adapter
    file: an existing one is refused unless ``force`` (and then only an earlier adapter is
    replaced), and a run's checkpoints/ folder is refused always, all before anything is loaded.
    ``augment`` trains on views from the run's own augmentation recipe.
    """
    from fewshot.data.registry import load_eval_folder
    from fewshot.data.text import load_labeled_texts
    from fewshot.data.views import make_views

    cfg = adapt_config(method=method, options=options or {}, **fields)
    if (cfg.support is None) == (cfg.episodes is None):
        raise ConfigError("give either a support folder (adapt once) or a number of episodes (score the method)")
    if cfg.support is not None and cfg.out is None:
        raise ConfigError("adapting on a support folder needs an output file for the adapter (--out FILE)")
    if cfg.episodes is not None and cfg.out is not None:
        raise ConfigError("--out saves the adapter of one support set; with episodes, use --json for the results")
    get_adapt_method(cfg.method)  # an unknown name fails before the base loads
    device = _device(cfg.device)
    if cfg.out is not None:
        adapter_target(cfg.out, overwrite=cfg.force)  # refused before any work, not after it
    if cfg.support is not None and not Path(cfg.support).exists():
        raise DataError(f"support set '{cfg.support}' does not exist")
    base = open_base(path, cfg.overrides)
    if base.text and cfg.augment:
        raise ConfigError(f"'{path}' is a text base: --augment makes image views, a text base has none")
    if base.text and cfg.support is not None and Path(cfg.support).is_dir():
        raise DataError(f"'{path}' is a text base: --support takes a CSV (text,label) or JSON Lines file of labeled texts, not a folder")
    config, ev = base.config, base.config.eval
    encoder = base.encoder.to(device).eval()
    options = method_options(cfg.method, cfg.options, config)
    settings = AdaptSettings(steps=cfg.steps, lr=cfg.lr, head_lr=cfg.head_lr)
    if cfg.augment:
        settings.augment = make_views(config.views.name, config.data.image_size, config.data.channels, **config.views.options)
    seed = ev.seed if cfg.seed is None else cfg.seed
    if cfg.episodes is not None:
        way, shot = cfg.way or ev.ways[0], cfg.shot or max(ev.shots)
        query = cfg.query or ev.queries
        items, labels = episode_pool(base, shot, query)
        log(f"adapting with {cfg.method} on {cfg.episodes} {way}-way {shot}-shot episodes, {settings.steps} steps each")
        row = run_adaptation(encoder, items, labels, cfg.method, options, way, shot, query, cfg.episodes, settings, seed, base.sha256)
        return {"checkpoint": str(path), **row}
    if base.text:
        data = load_labeled_texts(cfg.support)
        items, kind = data.texts, "texts"
    else:
        data = load_eval_folder(str(cfg.support), config.data)
        items, kind = data.images, "images"
    log(f"adapting with {cfg.method} on {len(data)} support {kind} of {len(data.classes)} classes, {settings.steps} steps")
    clf = fit_classifier(encoder, cfg.method, options, items, data.labels, settings, episode_generator(seed, 0), data.classes)
    file = save_adapter(cfg.out, clf, cfg.method, options, base.sha256, extra={"base_checkpoint": str(path)}, overwrite=cfg.force)
    accuracy = float((clf.predict(items) == data.labels).float().mean())
    return {
        "checkpoint": str(path),
        "method": cfg.method,
        "options": options,
        "classes": data.classes,
        f"support_{kind}": len(data),
        "steps": settings.steps,
        "support_accuracy": accuracy,
        "trainable_params": count_trainable(clf.encoder),
        "head_params": sum(p.numel() for p in clf.head.parameters()),
        "adapter": str(file),
        "bytes": file.stat().st_size,
    }


def load_adapted(adapter: str | Path, path: str | Path) -> AdaptedClassifier:
    """The classifier of adapter file ``adapter`` on base ``path`` (run, checkpoint or model name)."""
    base = open_base(path)
    return load_adapter(adapter, base.encoder, base.sha256)
