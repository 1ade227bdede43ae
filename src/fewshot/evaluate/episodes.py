"""N-way K-shot episodes drawn from a labeled evaluation set.

The encoder embeds the evaluation images once; an :class:`Episode` only holds indices into
that feature matrix, so thousands of episodes cost almost nothing to draw.

Episode ``i`` of a sampler is drawn from its own generator, ``np.random.default_rng([seed, i])``:
it does not depend on which episodes were drawn before (or on the global random state), so
episode 17 is the same whether you draw 0..599 or only 17. Across machines it is the same for the
same numpy version (numpy's ``Generator`` does not promise identical streams across versions).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fewshot.errors import DataError

__all__ = ["Episode", "EpisodeSampler", "as_feature_matrix", "as_label_vector"]


def as_feature_matrix(features: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """``features`` as a finite floating-point numpy array of shape (N, D).

    Tensors are detached and moved to the CPU; float32/float64 keep their dtype (no copy for
    numpy input), anything else becomes float64.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu()
        if not features.is_floating_point() or features.dtype in (torch.float16, torch.bfloat16):
            features = features.double()
        features = features.numpy()
    array = np.asarray(features)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise DataError(f"{name} must be a matrix (N, D), got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {tuple(array.shape)})")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise DataError(f"{name} contain NaN or infinite values in {bad} of {array.shape[0]} rows")
    return array


def as_label_vector(labels: np.ndarray | torch.Tensor, n: int | None = None) -> np.ndarray:
    """``labels`` as a numpy int64 vector of non-negative class indices (length ``n`` if given)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataError(f"labels must be a vector (N,), got shape {tuple(array.shape)}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if n is not None and array.shape[0] != n:
        raise DataError(f"{array.shape[0]} labels for {n} feature rows")
    if array.size and array.min() < 0:
        raise DataError(
            f"{int((array < 0).sum())} labels are negative: evaluation needs a labeled set"
        )
    return array


def _positive_int(value: object, name: str, minimum: int) -> int:
    try:
        number = operator.index(value)  # rejects floats such as 5.0 and strings
    except TypeError:
        raise DataError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise DataError(f"{name} must be at least {minimum}, got {value!r}")
    return number


@dataclass(frozen=True, eq=False)
class Episode:
    """One N-way K-shot task, as indices into the evaluation feature matrix.

    support: (way*shot,) indices; support_labels: (way*shot,) in 0..way-1.
    query: (way*query,) indices; query_labels: (way*query,) in 0..way-1.
    Examples are grouped by class, classes in the order they were drawn (class ``j`` of the
    episode is relabelled ``j``). Support and query never share an index. The arrays are
    read-only.
    """

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray

    @property
    def way(self) -> int:
        return int(self.support_labels.max()) + 1


class EpisodeSampler:
    """Draws ``way``-way ``shot``-shot episodes with ``query`` queries per class.

    Every class present in ``labels`` takes part; each must have at least ``shot + query``
    examples. Invalid requests raise :class:`DataError` at construction.

    ``episode(i)`` draws episode ``i``; ``episodes(n)`` yields episodes ``0..n-1``; iterating over
    the sampler yields episodes ``0, 1, 2, ...`` without end (take what you need, e.g. with
    ``itertools.islice``).
    """

    def __init__(
        self,
        labels: np.ndarray | torch.Tensor,
        way: int,
        shot: int,
        query: int,
        seed: int = 0,
    ) -> None:
        labels = as_label_vector(labels)
        self.way = _positive_int(way, "way", 2)
        self.shot = _positive_int(shot, "shot", 1)
        self.query = _positive_int(query, "query", 1)
        self.seed = _positive_int(seed, "seed", 0)

        classes, counts = np.unique(labels, return_counts=True)
        if self.way > len(classes):
            raise DataError(
                f"{self.way}-way needs {self.way} classes, the evaluation set has {len(classes)}"
            )
        needed = self.shot + self.query
        small = np.flatnonzero(counts < needed)
        if small.size:
            first = small[0]
            others = f" (and {small.size - 1} other classes)" if small.size > 1 else ""
            raise DataError(
                f"class {int(classes[first])} has {int(counts[first])} examples{others}, but "
                f"{self.shot}-shot with {self.query} queries needs {needed} per class"
            )
        self.classes: np.ndarray = classes
        order = np.argsort(labels, kind="stable")
        self._members: list[np.ndarray] = np.split(order, np.cumsum(counts)[:-1])

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(way={self.way}, shot={self.shot}, query={self.query}, "
            f"seed={self.seed}, classes={len(self.classes)})"
        )

    def episode(self, i: int) -> Episode:
        """Episode ``i``, drawn from ``np.random.default_rng([seed, i])``."""
        i = _positive_int(i, "episode index", 0)
        rng = np.random.default_rng([self.seed, i])
        chosen = rng.choice(len(self.classes), size=self.way, replace=False)
        per_class = self.shot + self.query
        picks = np.stack(
            [rng.choice(self._members[c], size=per_class, replace=False) for c in chosen]
        )  # (way, shot + query)
        support = picks[:, : self.shot].reshape(-1)
        query = picks[:, self.shot :].reshape(-1)
        support_labels = np.repeat(np.arange(self.way, dtype=np.int64), self.shot)
        query_labels = np.repeat(np.arange(self.way, dtype=np.int64), self.query)
        for array in (support, query, support_labels, query_labels):
            array.setflags(write=False)
        return Episode(support, support_labels, query, query_labels)

    def episodes(self, n: int) -> Iterator[Episode]:
        """Episodes ``0..n-1``."""
        n = _positive_int(n, "number of episodes", 0)
        return (self.episode(i) for i in range(n))

    def __iter__(self) -> Iterator[Episode]:
        """Episodes ``0, 1, 2, ...`` without end."""
        return (self.episode(i) for i in itertools.count())
