"""From a data config to the two sets a run needs: pre-training images and held-out evaluation classes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from fewshot.config import DataConfig, register_data_source
from fewshot.data.lake import LakeRun, load_lake_runs
from fewshot.data.normalize import normalize_characters
from fewshot.data.sequences import SequenceSet, load_sequence_folder, moving_shapes
from fewshot.data.sources import load_digits, load_image_folder, load_omniglot, load_unlabeled_folder, resolve_data_path
from fewshot.data.splits import split_classes
from fewshot.data.text import TokenSet, encode_text, load_text_splits
from fewshot.data.types import ImageSet
from fewshot.errors import DataError

OMNIGLOT_DEFAULT = "omniglot/images_background_small1.zip"
SEQUENCE_SOURCES = ("sequences", "moving-shapes")
TEXT_SOURCE = "text"
MOVING_SHAPES_FRAMES = 16  # data.frames=null on moving-shapes

# An image source: (data config, decode size) -> ImageSet at that size, before the run's preprocessing.
ImageLoader = Callable[[DataConfig, int], ImageSet]
IMAGE_SOURCES: dict[str, ImageLoader] = {}


def register_image_source(name: str, loader: ImageLoader) -> ImageLoader:
    """Make ``data.source=<name>`` load its images with ``loader(data, size)``: class-disjoint splits,
    character normalisation, episodes and Lake's runs then work as for the built-in sources."""
    register_data_source(name)
    IMAGE_SOURCES[name] = loader
    return loader


def _folder_path(data: DataConfig) -> str:
    if data.path is None:
        raise DataError(f"data.source={data.source} needs data.path (the image folder)")
    return resolve_data_path(data.path, "")


register_image_source("digits", lambda data, size: load_digits(size))
register_image_source("omniglot", lambda data, size: load_omniglot(resolve_data_path(data.path, OMNIGLOT_DEFAULT), size))
register_image_source("folder", lambda data, size: load_image_folder(_folder_path(data), size, data.channels, data.invert))
register_image_source("unlabeled", lambda data, size: load_unlabeled_folder(_folder_path(data), size, data.channels, data.invert))
for _name in (*SEQUENCE_SOURCES, TEXT_SOURCE):  # read by load_sequence_source and fewshot.data.text
    register_data_source(_name)


def load_sequence_source(data: DataConfig) -> SequenceSet:
    """The sequences named by ``data.source`` (sequences, moving-shapes), at ``data.image_size``."""
    if data.source == "moving-shapes":
        frames = data.frames or MOVING_SHAPES_FRAMES
        return moving_shapes(data.sequences, frames, data.image_size, data.split_seed, data.channels)
    if data.path is None:
        raise DataError("data.source=sequences needs data.path (a folder of SEQUENCE/FRAME images)")
    return load_sequence_folder(resolve_data_path(data.path, ""), data.image_size, data.channels, data.invert, data.frames)


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


def load_source(data: DataConfig) -> ImageSet:
    """The labeled source named by ``data.source``, at ``data.image_size`` (sequence sources: every frame)."""
    if data.source in SEQUENCE_SOURCES:
        return load_sequence_source(data).as_images()
    if data.source == TEXT_SOURCE:
        raise DataError("data.source=text is a text corpus, not images: it is read by fewshot.data.text")
    if data.source not in IMAGE_SOURCES:
        raise DataError(f"unknown data source '{data.source}'; known: {', '.join(sorted(IMAGE_SOURCES))}")
    return _preprocessed(IMAGE_SOURCES[data.source](data, read_size(data)), data)


def load_lake_runs_for(path: str, data: DataConfig) -> list[LakeRun]:
    """Lake's runs (``path``: all_runs.zip or its folder) with the run's own preprocessing, so a
    checkpoint trained on normalised characters is scored on normalised characters."""
    runs = load_lake_runs(resolve_data_path(path, ""), read_size(data))
    return [LakeRun(r.name, preprocess(r.train_images, data), preprocess(r.test_images, data), r.answers) for r in runs]


@dataclass
class RunData:
    pretrain: ImageSet | TokenSet | SequenceSet  # unlabeled unless the method needs labels; token windows for text
    evaluation: ImageSet | None  # labeled classes never seen in pre-training


def _merge(a: ImageSet, b: ImageSet) -> ImageSet:
    if a.image_shape != b.image_shape:
        raise DataError(f"unlabeled images have shape {b.image_shape}, the labeled source {a.image_shape}; set data.channels")
    return ImageSet(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes, a.groups)


def load_eval_folder(path: str, data: DataConfig) -> ImageSet:
    """A labeled class-per-folder evaluation set, preprocessed like the pre-training data."""
    return _preprocessed(load_image_folder(resolve_data_path(path, ""), read_size(data), data.channels, data.invert), data)


def load_run_data(data: DataConfig, eval_path: str | None = None, tokenizer: Tokenizer | None = None) -> RunData:
    """Split the source's classes into pre-training and evaluation classes (class-disjoint, seeded).

    With ``pretrain_on_all``, an unlabeled source or an ``eval_path``, every image is used for
    pre-training and evaluation comes from elsewhere (the ``eval_path`` folder, or Lake's runs). Pre-training images keep
    their labels here; methods that must not see them never read them.
    """
    if data.source == TEXT_SOURCE:  # windows of the training split; evaluate/text.py reads the held-out split itself
        if tokenizer is None:
            raise DataError("data.source=text needs the run's tokenizer to turn the corpus into token windows")
        return RunData(TokenSet(encode_text(tokenizer, load_text_splits(data).train), data.seq_len), None)
    if data.source in SEQUENCE_SOURCES:
        return _sequence_run_data(data, eval_path)
    source = load_source(data)
    if data.pretrain_on_all or not source.labeled or eval_path is not None:
        train, evaluation = source, None
    else:
        holdout = int(data.holdout_classes) if data.holdout_classes >= 1 else data.holdout_classes
        train_classes, eval_classes = split_classes(len(source.classes), holdout, data.split_seed)
        train, evaluation = source.select_classes(train_classes), source.select_classes(eval_classes)
    if data.unlabeled_path is not None:
        extra = load_unlabeled_folder(resolve_data_path(data.unlabeled_path, ""), read_size(data), data.channels, data.invert)
        train = _merge(train.unlabeled(), _preprocessed(extra, data))
    if eval_path is not None:
        evaluation = load_eval_folder(eval_path, data)
    return RunData(train, evaluation)


def _sequence_run_data(data: DataConfig, eval_path: str | None) -> RunData:
    """Sequences for pre-training; for evaluation, labeled sources (moving-shapes) hold out whole
    classes (shapes) as :func:`load_run_data` does, and each held-out sequence gives one image, its
    middle frame, so no two evaluation images are near-copies from one sequence."""
    if data.unlabeled_path is not None:
        raise DataError(f"data.unlabeled_path adds still images; it cannot join sequence data (data.source={data.source})")
    if data.normalize:
        raise DataError(f"data.normalize applies to image sources, not to sequences (data.source={data.source}); set data.normalize=false")
    source = load_sequence_source(data)
    evaluation: ImageSet | None = None
    if data.pretrain_on_all or not source.labeled or eval_path is not None:
        train = source
    else:
        holdout = int(data.holdout_classes) if data.holdout_classes >= 1 else data.holdout_classes
        train_classes, eval_classes = split_classes(len(source.classes), holdout, data.split_seed)
        train = source.select_classes(train_classes)
        evaluation = source.select_classes(eval_classes).as_images(frame=source.num_frames // 2)
    if eval_path is not None:
        evaluation = load_eval_folder(eval_path, data)
    return RunData(train, evaluation)
