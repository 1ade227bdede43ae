"""Data sources by name: ``data.source`` → one loader → the two sets a run needs (pre-training data
and held-out evaluation classes).

A source is one loader ``loader(data, eval_path, tokenizer) -> RunData`` and one entry,
:func:`register_source`, with an optional :class:`~fewshot.config.DataConfig` subclass holding its own
options. Image sources need only ``image_loader(data, size) -> ImageSet``: :func:`register_image_source`
gives them the class-disjoint split, character normalisation, unlabeled extras and Lake's runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pydantic import Field
from tokenizers import Tokenizer

from fewshot.config import DataConfig, register_source_config
from fewshot.data.lake import LakeRun, load_lake_runs
from fewshot.data.normalize import normalize_characters
from fewshot.data.pairs import PairsDataConfig, PairSet, load_pairs, manifest_path, pairs_tokenizer_text
from fewshot.data.scenes import FEWSHOT_FOLDER
from fewshot.data.sequences import SequenceSet, load_sequence_folder, moving_shapes
from fewshot.data.sources import load_digits, load_image_folder, load_omniglot, load_unlabeled_folder, resolve_data_path
from fewshot.data.splits import split_classes
from fewshot.data.text import TextDataConfig, TokenSet, encode_text, load_text_splits
from fewshot.data.types import ImageSet
from fewshot.errors import DataError

OMNIGLOT_DEFAULT = "omniglot/images_background_small1.zip"
MOVING_SHAPES_FRAMES = 16  # data.frames=null on moving-shapes


@dataclass
class RunData:
    # Unlabeled unless the method needs labels; token windows for text; None only from pairs read without the
    # run's tokenizer (an evaluation-only call: api.pretrain always hands a pairs run its tokenizer).
    pretrain: ImageSet | TokenSet | SequenceSet | PairSet | None
    evaluation: ImageSet | None  # labeled classes never seen in pre-training


# A source: (data config, eval.data_path, the run's tokenizer or None) -> RunData.
SourceLoader = Callable[[DataConfig, "str | None", "Tokenizer | None"], RunData]
# An image source: (data config, decode size) -> ImageSet at that size, before the run's preprocessing.
ImageLoader = Callable[[DataConfig, int], ImageSet]


class Source(NamedTuple):
    load: SourceLoader
    images: Callable[[DataConfig], ImageSet] | None  # the whole labeled source as images (`fewshot data NAME`)
    tokenizer_text: Callable[[DataConfig], str] | None = None  # what a new run's BPE tokenizer learns (text, pairs)


SOURCES: dict[str, Source] = {}


def register_source(
    name: str,
    loader: SourceLoader,
    config_class: type[DataConfig] | None = None,
    images: Callable[[DataConfig], ImageSet] | None = None,
    tokenizer_text: Callable[[DataConfig], str] | None = None,
) -> SourceLoader:
    """Make ``data.source=<name>`` load with ``loader(data, eval_path, tokenizer) -> RunData``.

    ``config_class``: a :class:`~fewshot.config.DataConfig` subclass with the source's own options
    (validated when a recipe names the source; default: the shared fields only). ``images``:
    optional ``images(data) -> ImageSet``, the whole source as labeled images, for :func:`load_source`.
    ``tokenizer_text``: optional ``tokenizer_text(data) -> str`` for a source of text: a new run trains its
    BPE tokenizer (``data.vocab_size``) on it, saves it beside the checkpoint and hands it to ``loader``.
    """
    register_source_config(name, config_class or DataConfig)
    SOURCES[name] = Source(loader, images, tokenizer_text)
    return loader


def register_image_source(name: str, image_loader: ImageLoader) -> ImageLoader:
    """Make ``data.source=<name>`` load its images with ``image_loader(data, size)``: class-disjoint
    splits, character normalisation, episodes and Lake's runs then work as for the built-in sources."""

    def images(data: DataConfig) -> ImageSet:
        return _preprocessed(image_loader(data, read_size(data)), data)

    register_source(name, lambda data, eval_path, tokenizer: _image_run_data(images(data), data, eval_path), images=images)
    return image_loader


def load_run_data(data: DataConfig, eval_path: str | None = None, tokenizer: Tokenizer | None = None) -> RunData:
    """The run's pre-training set and held-out evaluation set from the loader ``data.source`` names.

    Labeled image sources split their classes into pre-training and evaluation classes
    (class-disjoint, seeded); with ``pretrain_on_all``, an unlabeled source or an ``eval_path``,
    every image is used for pre-training and evaluation comes from elsewhere (the ``eval_path``
    folder, or Lake's runs). Pre-training images keep their labels here; methods that must not see
    them never read them.
    """
    return _source(data.source).load(data, eval_path, tokenizer)


def load_source(data: DataConfig) -> ImageSet:
    """The labeled source named by ``data.source``, at ``data.image_size`` (sequence sources: every frame)."""
    images = _source(data.source).images
    if images is None:
        raise DataError(f"data.source={data.source} is not a set of images")
    return images(data)


def source_tokenizer_text(data: DataConfig) -> str | None:
    """The text a new run on ``data.source`` trains its tokenizer on; None when the source has no text."""
    make = _source(data.source).tokenizer_text
    return None if make is None else make(data)


def trains_tokenizer(name: str) -> bool:
    """Whether runs on source ``name`` keep a tokenizer (``tokenizer.json``) beside their checkpoint."""
    return _source(name).tokenizer_text is not None


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data source '{name}'; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


# -- image sources --------------------------------------------------------------------------------


def read_size(data: DataConfig) -> int:
    """The size images are decoded at: ``data.normalize_from`` when they are normalised afterwards, else ``data.image_size``."""
    return data.normalize_from if data.normalize else data.image_size


def preprocess(images: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """The run's preprocessing after decoding at :func:`read_size`: character normalisation to
    ``data.image_size`` when ``data.normalize`` (see :mod:`fewshot.data.normalize`), else nothing."""
    if not data.normalize:
        return images
    return normalize_characters(images, data.image_size, data.normalize_spread, data.normalize_max_stretch, data.normalize_blur)


def _preprocessed(images: ImageSet, data: DataConfig) -> ImageSet:
    return ImageSet(preprocess(images.images, data), images.labels, images.classes, images.groups)


def load_lake_runs_for(path: str, data: DataConfig) -> list[LakeRun]:
    """Lake's runs (``path``: all_runs.zip or its folder) with the run's own preprocessing, so a
    checkpoint trained on normalised characters is scored on normalised characters."""
    runs = load_lake_runs(resolve_data_path(path, ""), read_size(data))
    return [LakeRun(r.name, preprocess(r.train_images, data), preprocess(r.test_images, data), r.answers) for r in runs]


def load_eval_folder(path: str, data: DataConfig) -> ImageSet:
    """A labeled class-per-folder evaluation set, preprocessed like the pre-training data."""
    return _preprocessed(load_image_folder(resolve_data_path(path, ""), read_size(data), data.channels, data.invert), data)


def _holdout_split(classes: int, data: DataConfig) -> tuple[list[int], list[int]]:
    holdout = int(data.holdout_classes) if data.holdout_classes >= 1 else data.holdout_classes
    return split_classes(classes, holdout, data.split_seed)


def _merge(a: ImageSet, b: ImageSet) -> ImageSet:
    if a.image_shape != b.image_shape:
        raise DataError(f"unlabeled images have shape {b.image_shape}, the labeled source {a.image_shape}; set data.channels")
    return ImageSet(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes, a.groups)


def _image_run_data(source: ImageSet, data: DataConfig, eval_path: str | None) -> RunData:
    """Held-out classes of a labeled source (or everything for pre-training when evaluation comes
    from elsewhere); ``data.unlabeled_path`` images join pre-training without labels."""
    if data.pretrain_on_all or not source.labeled or eval_path is not None:
        train, evaluation = source, None
    else:
        train_classes, eval_classes = _holdout_split(len(source.classes), data)
        train, evaluation = source.select_classes(train_classes), source.select_classes(eval_classes)
    if data.unlabeled_path is not None:
        extra = load_unlabeled_folder(resolve_data_path(data.unlabeled_path, ""), read_size(data), data.channels, data.invert)
        train = _merge(train.unlabeled(), _preprocessed(extra, data))
    if eval_path is not None:
        evaluation = load_eval_folder(eval_path, data)
    return RunData(train, evaluation)


def _folder_path(data: DataConfig) -> str:
    if data.path is None:
        raise DataError(f"data.source={data.source} needs data.path (the image folder)")
    return resolve_data_path(data.path, "")


register_image_source("digits", lambda data, size: load_digits(size))
register_image_source("omniglot", lambda data, size: load_omniglot(resolve_data_path(data.path, OMNIGLOT_DEFAULT), size))
register_image_source("folder", lambda data, size: load_image_folder(_folder_path(data), size, data.channels, data.invert))
register_image_source("unlabeled", lambda data, size: load_unlabeled_folder(_folder_path(data), size, data.channels, data.invert))


# -- text -----------------------------------------------------------------------------------------


def _text_run_data(data: TextDataConfig, eval_path: str | None, tokenizer: Tokenizer | None) -> RunData:
    """Token windows of the corpus's training split; evaluate/text.py reads the held-out split itself."""
    if tokenizer is None:
        raise DataError("data.source=text needs the run's tokenizer to turn the corpus into token windows")
    return RunData(TokenSet(encode_text(tokenizer, load_text_splits(data).train), data.seq_len), None)


register_source("text", _text_run_data, TextDataConfig, tokenizer_text=lambda data: load_text_splits(data).train)


# -- image–caption pairs --------------------------------------------------------------------------


def _pairs_run_data(data: PairsDataConfig, eval_path: str | None, tokenizer: Tokenizer | None) -> RunData:
    """The manifest's rows as a :class:`~fewshot.data.pairs.PairSet`; evaluation classes from ``eval_path``, else
    from the ``fewshot-shapes/`` folder beside a manifest that ``fewshot data scenes`` wrote, else none.
    Without the run's tokenizer (evaluate, adapt: they read only the evaluation classes) the pairs are not read."""
    manifest = manifest_path(data)
    scenes_folder = manifest.parent / FEWSHOT_FOLDER
    folder = eval_path or (str(scenes_folder) if scenes_folder.is_dir() else None)
    evaluation = load_eval_folder(folder, data) if folder else None
    if tokenizer is None:
        return RunData(None, evaluation)
    pairs = load_pairs(manifest, tokenizer, data.seq_len, data.image_size, data.channels, data.separator)
    if pairs.truncated:  # counted and reported (one line on stderr), never silent
        logging.getLogger("fewshot").warning(f"fewshot: {pairs.truncated} of {len(pairs)} captions in {manifest} are longer "
                                             f"than data.seq_len={data.seq_len} tokens and were cut")
    return RunData(pairs, evaluation)


register_source("pairs", _pairs_run_data, PairsDataConfig, tokenizer_text=pairs_tokenizer_text)


# -- sequences ------------------------------------------------------------------------------------


class SequenceDataConfig(DataConfig):
    """``data.source=sequences``: ``data.path/SEQUENCE/FRAME`` image files (unlabeled)."""

    frames: int | None = Field(
        None, ge=2, description="frames per sequence: moving-shapes generates this many (null = 16); "
        "sequences keeps the first N of each folder (null = all, which must then be equally many)"
    )


class MovingShapesDataConfig(SequenceDataConfig):
    """``data.source=moving-shapes``: generated sequences of one moving shape each (label = the shape), seeded by ``data.split_seed``."""

    sequences: int = Field(400, ge=1, description="moving-shapes: sequences generated (balanced over 10 shapes)")


def _moving_shapes(data: MovingShapesDataConfig) -> SequenceSet:
    return moving_shapes(data.sequences, data.frames or MOVING_SHAPES_FRAMES, data.image_size, data.split_seed, data.channels)


def _sequence_folder(data: SequenceDataConfig) -> SequenceSet:
    if data.path is None:
        raise DataError("data.source=sequences needs data.path (a folder of SEQUENCE/FRAME images)")
    return load_sequence_folder(resolve_data_path(data.path, ""), data.image_size, data.channels, data.invert, data.frames)


def _sequence_run_data(load: Callable[[SequenceDataConfig], SequenceSet], data: SequenceDataConfig, eval_path: str | None) -> RunData:
    """Sequences for pre-training; for evaluation, labeled sources (moving-shapes) hold out whole
    classes (shapes) as image sources do, and each held-out sequence gives one image, its middle
    frame, so no two evaluation images are near-copies from one sequence."""
    if data.unlabeled_path is not None:
        raise DataError(f"data.unlabeled_path adds still images; it cannot join sequence data (data.source={data.source})")
    if data.normalize:
        raise DataError(f"data.normalize applies to image sources, not to sequences (data.source={data.source}); set data.normalize=false")
    source = load(data)
    evaluation: ImageSet | None = None
    if data.pretrain_on_all or not source.labeled or eval_path is not None:
        train = source
    else:
        train_classes, eval_classes = _holdout_split(len(source.classes), data)
        train = source.select_classes(train_classes)
        evaluation = source.select_classes(eval_classes).as_images(frame=source.num_frames // 2)
    if eval_path is not None:
        evaluation = load_eval_folder(eval_path, data)
    return RunData(train, evaluation)


register_source(
    "sequences", lambda data, eval_path, _: _sequence_run_data(_sequence_folder, data, eval_path), SequenceDataConfig,
    images=lambda data: _sequence_folder(data).as_images(),  # every frame of every sequence
)
register_source(
    "moving-shapes", lambda data, eval_path, _: _sequence_run_data(_moving_shapes, data, eval_path), MovingShapesDataConfig,
    images=lambda data: _moving_shapes(data).as_images(),
)

__all__ = [
    "ImageLoader", "RunData", "SOURCES", "Source", "SourceLoader", "load_eval_folder", "load_lake_runs_for", "load_run_data",
    "load_source", "preprocess", "read_size", "register_image_source", "register_source", "source_tokenizer_text", "trains_tokenizer",
]
