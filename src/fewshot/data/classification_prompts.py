"""``data.source=classification-prompts``: general-purpose in-context classification prompts (Kirsch et al.
2022, GPICL) from a labeled image set, for ``method=icl-classify``.

The images are brought to one input size and flattened (digits are 8 × 8 already; Omniglot is
area-downsampled to match, :func:`~fewshot.data.tasks.image_features`) and standardised per feature
with the training images' own mean and std. ``data.heldout_images`` of each class's images are kept out
of training (seeded by ``data.split_seed``), so a run can be scored on tasks made from images it never
saw. The prompts themselves (a random projection and a random labelling per task, a finite pool or
fresh tasks) are :class:`~fewshot.data.tasks.ClassificationTasks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fewshot.config import DataConfig
from fewshot.data.registry import OMNIGLOT_DEFAULT, RunData, register_source
from fewshot.data.sources import load_digits, load_omniglot, resolve_data_path
from fewshot.data.tasks import ClassificationTasks, image_features, standardise
from fewshot.errors import DataError

__all__ = ["ClassificationPromptsConfig", "PromptImages", "classification_tasks", "prompt_images", "standardised_features"]


class ClassificationPromptsConfig(DataConfig):
    """``data.source=classification-prompts``: the image set, the input size and the tasks' shape."""

    images: Literal["digits", "omniglot"] = Field("digits", description="the labeled set the tasks are made from "
                                                  "(omniglot reads data.path or $FEWSHOT_DATA's background set)")
    input_size: int = Field(8, ge=2, le=64, description="images are area-resized to input_size × input_size and flattened (Kirsch et al.: one size for all sets)")
    ways: int = Field(5, ge=2, description="classes per task; labels 0 … ways − 1 in a random order per task")
    points: int = Field(26, ge=2, description="samples per prompt: the loss is taken at every one, after the samples before it")
    task_pool: int | None = Field(None, ge=1, description="distinct (projection, labelling) tasks, 2^p in Kirsch et al.; null = fresh tasks")
    heldout_images: float = Field(0.2, ge=0, lt=1, description="fraction of each class's images kept out of training")
    prompts: int = Field(1 << 22, ge=1, description="distinct training prompts (the data set's length)")

    @model_validator(mode="after")
    def _enough_points(self) -> ClassificationPromptsConfig:
        if self.points <= self.ways:
            raise ValueError(f"data.points={self.points} leaves no query after one example per class; set it above data.ways={self.ways}")
        return self


@dataclass(frozen=True)
class PromptImages:
    """A run's labeled inputs, standardised with the training part's statistics: (M, d) features and (M,) labels each."""

    train: torch.Tensor
    train_labels: torch.Tensor
    heldout: torch.Tensor
    heldout_labels: torch.Tensor
    classes: list[str]


def standardised_features(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (N, C, H, W) → (N, C·size²) features standardised with the set's own per-feature mean and std."""
    return standardise(image_features(images, size))[0]


def prompt_images(data: ClassificationPromptsConfig) -> PromptImages:
    """The configured set split per class into training and held-out images (seeded), then standardised with
    the training images' mean and std."""
    if data.images == "digits":
        images = load_digits(8)
    else:
        images = load_omniglot(resolve_data_path(data.path, OMNIGLOT_DEFAULT), 28)
    if data.ways > len(images.classes):
        raise DataError(f"data.ways={data.ways} needs {data.ways} classes; {data.images} has {len(images.classes)}")
    features = image_features(images.images, data.input_size)
    rng = np.random.default_rng([data.split_seed, 31])
    labels = images.labels.numpy()
    heldout = np.zeros(len(labels), dtype=bool)
    for c in range(len(images.classes)):
        members = np.flatnonzero(labels == c)
        heldout[rng.permutation(members)[: int(round(data.heldout_images * len(members)))]] = True
    train, mean, std = standardise(features[~heldout])
    rest = standardise(features[heldout], mean, std)[0]
    as_index = lambda mask: torch.from_numpy(np.flatnonzero(mask))  # noqa: E731
    return PromptImages(train, images.labels[as_index(~heldout)], rest, images.labels[as_index(heldout)], list(images.classes))


def classification_tasks(data: ClassificationPromptsConfig, inputs: torch.Tensor, labels: torch.Tensor,
                         eval_seed: int | None = None, fresh_tasks: bool = False) -> ClassificationTasks:
    """Prompts over ``inputs``: the run's training tasks (its pool, or fresh ones), or with ``eval_seed``
    evaluation prompts; ``fresh_tasks`` draws tasks outside the pool (tasks never trained on)."""
    pool = None if fresh_tasks else data.task_pool
    return ClassificationTasks(inputs, labels, data.ways, data.points, pool, data.split_seed, eval_seed, data.prompts)


def load_classification_prompts(data: ClassificationPromptsConfig, eval_path: str | None, tokenizer: object = None) -> RunData:
    """``data.source=classification-prompts``: the training prompts; ``fewshot icl evaluate`` draws evaluation prompts."""
    if eval_path is not None:
        raise DataError("data.source=classification-prompts draws its own evaluation prompts; remove eval.data_path")
    split = prompt_images(data)
    return RunData(classification_tasks(data, split.train, split.train_labels), None)


register_source("classification-prompts", load_classification_prompts, ClassificationPromptsConfig)
