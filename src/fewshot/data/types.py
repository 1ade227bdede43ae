"""The in-memory image set every loader returns, and what the trainer needs of any data set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

# What the trainer hands a method: named tensors, e.g. {"images": (B, C, H, W), "labels": (B,)},
# {"tokens": (B, T)} or {"frames": (B, T, C, H, W)}; a method declares the keys it reads (Method.inputs).
Batch = Mapping[str, torch.Tensor]


class TrainingData(Protocol):
    """What the trainer needs of a data set: its size, a batch by index and the keys every batch holds.
    :class:`ImageSet` is one; token windows and frame sequences are others."""

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor) -> Batch: ...

    @property
    def keys(self) -> frozenset[str]: ...


@dataclass
class ImageSet:
    """Images held in memory as one tensor.

    images: (N, C, H, W) float32 in [0, 1], foreground bright (Omniglot ink is inverted to 1).
    labels: (N,) int64 indices into ``classes``; all -1 when the set is unlabeled.
    classes: class names (empty when unlabeled).
    groups: optional group of each class (Omniglot: its alphabet), same length as ``classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor) -> Batch:
        """``{"images", "labels"}`` of the samples ``idx`` (no labels when the set is unlabeled)."""
        return {"images": self.images[idx], "labels": self.labels[idx]} if self.labeled else {"images": self.images[idx]}

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"images", "labels"} if self.labeled else {"images"})

    @property
    def labeled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def select_classes(self, class_indices: list[int]) -> "ImageSet":
        """The images of the given classes, relabelled 0..len(class_indices)-1 in that order."""
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[torch.as_tensor(class_indices, dtype=torch.long)] = torch.arange(len(class_indices))
        keep = remap[self.labels] >= 0
        return ImageSet(
            images=self.images[keep],
            labels=remap[self.labels[keep]],
            classes=[self.classes[i] for i in class_indices],
            groups=None if self.groups is None else [self.groups[i] for i in class_indices],
        )

    def unlabeled(self) -> "ImageSet":
        """The same images with the labels dropped (for label-free pre-training)."""
        return ImageSet(self.images, torch.full_like(self.labels, -1), [], None)
