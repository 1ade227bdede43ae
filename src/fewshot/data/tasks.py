"""Seeded in-context learning prompts (x₁, y₁, …, x_k, y_k): linear regression with its curriculum, and
classification tasks made from a labeled image set.

Linear regression as in Garg et al. 2022 ("What can transformers learn in-context?"): per prompt a
task w ~ N(0, I_d), inputs x_i ~ N(0, I_d) and targets y_i = w·x_i + ε_i with ε_i ~ N(0, σ²). With a
finite task pool (Raventós et al. 2023's "task diversity") w is one of ``pool`` vectors drawn once
from the seed. Prompt ``idx`` is drawn from its own generator seeded by (seed, idx), so any batch
of indices gives the same prompts in any order, on any machine, and a resumed run sees the same data.

The curriculum (Garg et al.'s reference: active dimensions 5 → 20 by 1 and points 11 → 41 by 2,
every 2,000 steps) is applied by the method, which knows the step: the prompt keeps its first
``points`` pairs and the inactive input coordinates are zeroed, with y recomputed from the active
ones (:func:`truncate_prompts`) as in Garg et al.'s code.

Classification as in Kirsch et al. 2022 (GPICL, :class:`ClassificationTasks`): images brought to one
size and standardised, a random projection and a random assignment of labels per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from pydantic import Field, model_validator

from fewshot.config import DataConfig
from fewshot.data.registry import RunData, register_source
from fewshot.data.types import Batch
from fewshot.errors import DataError

# Distinct prompts in the index space when none is given: more than a 20-minute CPU run draws.
DEFAULT_PROMPTS = 1 << 22
# Training prompt i is drawn from the seed sequence (seed, 0, i), evaluation prompt i of evaluation seed s
# from (seed, 1, s, i), the task pool from (seed, 2): three streams that never meet.
_TRAIN, _EVAL, _POOL = 0, 1, 2


@dataclass(frozen=True)
class LinearRegressionTasks:
    """Prompts of ``points`` pairs from linear tasks in ``dim`` dimensions; a :class:`~fewshot.data.types.TrainingData`.

    ``batch(idx)`` gives ``xs`` (B, points, dim), ``ys`` (B, points) and the tasks ``ws`` (B, dim),
    float32; ``noise`` is σ; ``pool`` the number of distinct tasks (None = a fresh w per prompt);
    ``prompts`` the size of the index space (``len``). ``eval_seed`` draws evaluation prompts instead of
    training ones; they share the task pool, which depends on ``seed`` alone.
    """

    dim: int
    points: int
    noise: float = 0.0
    pool: int | None = None
    seed: int = 0
    prompts: int = DEFAULT_PROMPTS
    eval_seed: int | None = None  # None: training prompts; an int: evaluation prompts, never a training one

    def __post_init__(self) -> None:
        if self.dim < 1 or self.points < 1:
            raise ValueError(f"dim and points must be ≥ 1, got dim={self.dim}, points={self.points}")
        if self.noise < 0:
            raise ValueError(f"noise is a standard deviation ≥ 0, got {self.noise}")
        if self.pool is not None and self.pool < 1:
            raise ValueError(f"pool must be ≥ 1 tasks (or None for a fresh task per prompt), got {self.pool}")

    def __len__(self) -> int:
        return self.prompts

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"xs", "ys", "ws"})

    @cached_property
    def task_pool(self) -> np.ndarray | None:
        """The ``pool`` task vectors (pool, dim), drawn once from the seed alone; None without a pool."""
        if self.pool is None:
            return None
        return np.random.default_rng([self.seed, _POOL]).standard_normal((self.pool, self.dim))

    def batch(self, idx: torch.Tensor) -> Batch:
        """The prompts ``idx`` (B,): ``{"xs": (B, points, dim), "ys": (B, points), "ws": (B, dim)}``."""
        pool = self.task_pool
        xs = np.empty((len(idx), self.points, self.dim))
        ws = np.empty((len(idx), self.dim))
        noise = np.empty((len(idx), self.points))
        stream = [_TRAIN] if self.eval_seed is None else [_EVAL, self.eval_seed]
        for row, i in enumerate(torch.as_tensor(idx).tolist()):
            if not 0 <= i < self.prompts:
                raise IndexError(f"prompt {i} is outside 0..{self.prompts - 1}")
            rng = np.random.default_rng([self.seed, *stream, i])  # one generator per prompt: order-free, resumable
            xs[row] = rng.standard_normal((self.points, self.dim))
            ws[row] = rng.standard_normal(self.dim) if pool is None else pool[rng.integers(self.pool)]
            noise[row] = rng.standard_normal(self.points)
        ys = np.einsum("bkd,bd->bk", xs, ws) + self.noise * noise
        as_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
        return {"xs": as_tensor(xs), "ys": as_tensor(ys), "ws": as_tensor(ws)}

    def prompts_for(self, n: int) -> Batch:
        """The first ``n`` prompts (an evaluation set, with its own seed)."""
        return self.batch(torch.arange(n))


@dataclass(frozen=True)
class Curriculum:
    """Active input dimensions and prompt points at a training step (Garg et al. 2022, §4 and their
    ``curriculum.py``): each starts at its ``*_start``, grows by its increment every ``every`` steps
    and stops at the data's ``dim`` / ``points``. A start of None is the full size from step 0."""

    dim: int
    points: int
    dims_start: int | None = None
    points_start: int | None = None
    dims_increment: int = 1
    points_increment: int = 2
    every: int = 2000

    def at(self, step: int) -> tuple[int, int]:
        """(active dimensions, points) during step ``step`` (0-based: the state after ``step`` updates)."""
        grown = step // self.every
        dims = self.dim if self.dims_start is None else min(self.dims_start + self.dims_increment * grown, self.dim)
        points = self.points if self.points_start is None else min(self.points_start + self.points_increment * grown, self.points)
        return dims, points


def truncate_prompts(xs: torch.Tensor, ys: torch.Tensor, ws: torch.Tensor, dims: int, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``points`` pairs with input coordinates ≥ ``dims`` zeroed and y from the rest.

    xs: (B, k, d), ys: (B, k), ws: (B, d). y' = y − Σ_{j ≥ dims} x_j w_j keeps each prompt's noise,
    so y' = w_active · x_active + ε, as if the prompt had been drawn in ``dims`` dimensions.
    """
    xs, ys = xs[:, :points], ys[:, :points]
    if dims < xs.shape[-1]:
        ys = ys - torch.einsum("bkd,bd->bk", xs[..., dims:], ws[:, dims:])
        xs = torch.cat([xs[..., :dims], torch.zeros_like(xs[..., dims:])], dim=-1)
    return xs, ys


class RegressionDataConfig(DataConfig):
    """``data.source=linear-regression``: seeded prompts of Garg et al. 2022 (defaults: their d = 20,
    2d + 1 = 41 points and curriculum). The prompts' seed is ``data.split_seed``."""

    dim: int = Field(20, ge=1, description="d: input dimensions (Garg et al.: 20)")
    points: int = Field(41, ge=1, description="pairs per training prompt (Garg et al.: 2d + 1 = 41)")
    noise: float = Field(0.0, ge=0, description="σ of the label noise ε ~ N(0, σ²)")
    task_pool: int | None = Field(None, ge=1, description="distinct tasks w, drawn once from the seed; null = a fresh w per prompt")
    prompts: int = Field(DEFAULT_PROMPTS, ge=1, description="distinct training prompts (the data set's length; the trainer permutes them)")
    curriculum_dims: int | None = Field(5, ge=1, description="active dimensions at step 0, + 1 every curriculum_every steps; null = all d")
    curriculum_points: int | None = Field(11, ge=1, description="points at step 0, + 2 every curriculum_every steps; null = all")
    curriculum_every: int = Field(2000, ge=1, description="steps between curriculum increments (Garg et al.: 2,000)")

    @model_validator(mode="after")
    def _curriculum_within_the_prompt(self) -> RegressionDataConfig:
        for name, start, end in (("dims", self.curriculum_dims, self.dim), ("points", self.curriculum_points, self.points)):
            if start is not None and start > end:
                raise ValueError(f"data.curriculum_{name}={start} starts above data.{'dim' if name == 'dims' else 'points'}={end}; "
                                 f"set it to at most {end}, or null for no curriculum")
        return self


def curriculum_for(data: RegressionDataConfig) -> Curriculum:
    """The curriculum of a regression data config (increments 1 and 2, as Garg et al.'s reference)."""
    return Curriculum(data.dim, data.points, data.curriculum_dims, data.curriculum_points, every=data.curriculum_every)


def regression_tasks(
    data: RegressionDataConfig, eval_seed: int | None = None, points: int | None = None, fresh_tasks: bool = False
) -> LinearRegressionTasks:
    """The prompts ``data`` describes: its training prompts, or with ``eval_seed`` evaluation prompts,
    optionally ``points`` long and, with ``fresh_tasks``, a new w per prompt even when training had a pool."""
    pool = None if fresh_tasks else data.task_pool
    return LinearRegressionTasks(data.dim, points or data.points, data.noise, pool, data.split_seed, data.prompts, eval_seed)


def image_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Images (N, C, H, W) → (N, C·size²): area-resized to size × size and flattened, as Kirsch et al.
    2022 bring every data set to one input size (digits are 8 × 8 already; Omniglot is downsampled)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[-2:] != (size, size):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
    return images.flatten(1).float()


def standardise(features: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features − mean) / std per feature, with the set's own mean and std unless given (held-out
    images take the training set's); a constant feature keeps std 1. Returns (standardised, mean, std)."""
    mean = features.mean(0) if mean is None else mean
    std = features.std(0) if std is None else std
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (features - mean) / std, mean, std


@dataclass(frozen=True)
class ClassificationTasks:
    """General-purpose in-context classification prompts (Kirsch et al. 2022, GPICL) from a labeled set.

    A task is a random projection A (d × d, A_ij ~ N(0, 1/d)) and ``ways`` of the set's classes in a
    random order, which gives them the labels 0 … ways − 1; a prompt is ``points`` samples of those
    classes, x' = A x with y' the class's place in that order. With ``pool`` (2^p in the paper) each prompt
    takes one of ``pool`` tasks fixed by the seed; without it each prompt draws a fresh task. The model
    reads support tokens (x', one-hot y') and query tokens (x', 0); ``batch(idx)`` gives ``xs`` (B, points, d)
    and ``labels`` (B, points). Seeded per (seed, idx) like :class:`LinearRegressionTasks`.

    inputs: (M, d) standardised features (:func:`image_features`, :func:`standardise`); labels: (M,) in 0 … C − 1.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    ways: int
    points: int
    pool: int | None = None
    seed: int = 0
    eval_seed: int | None = None
    prompts: int = DEFAULT_PROMPTS

    def __post_init__(self) -> None:
        if self.inputs.ndim != 2 or self.labels.shape != (self.inputs.shape[0],):
            raise ValueError(f"inputs must be (M, d) and labels (M,), got {tuple(self.inputs.shape)} and {tuple(self.labels.shape)}")
        classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        if not 1 <= self.ways <= classes:
            raise DataError(f"{self.ways}-way tasks need {self.ways} classes; the set has {classes}")
        if self.pool is not None and self.pool < 1:
            raise ValueError(f"pool must be ≥ 1 tasks (or None for a fresh task per prompt), got {self.pool}")

    def __len__(self) -> int:
        return self.prompts

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"xs", "labels"})

    @cached_property
    def _by_class(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, most images of a class) indices of each class's images, padded; (C,) how many each has."""
        labels = self.labels.numpy()
        members = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        counts = np.array([len(m) for m in members])
        table = np.zeros((len(members), counts.max()), dtype=np.int64)
        for c, m in enumerate(members):
            table[c, : len(m)] = m
        return table, counts

    def task(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(A (d, d), the ``ways`` classes in label order) drawn from ``rng``."""
        d = self.inputs.shape[1]
        projection = rng.standard_normal((d, d)) / np.sqrt(d)
        return projection, rng.permutation(len(self._by_class[1]))[: self.ways]

    def prompt(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompt ``i`` as (sample indices into the set (points,), A (d, d), classes in label order (ways,))."""
        if not 0 <= i < self.prompts:
            raise IndexError(f"prompt {i} is outside 0..{self.prompts - 1}")
        stream = [_TRAIN] if self.eval_seed is None else [_EVAL, self.eval_seed]
        rng = np.random.default_rng([self.seed, *stream, i])
        if self.pool is None:
            projection, order = self.task(rng)
        else:
            projection, order = self.task(np.random.default_rng([self.seed, _POOL, int(rng.integers(self.pool))]))
        table, counts = self._by_class
        classes = order[rng.integers(self.ways, size=self.points)]  # each sample's class, then one of its images
        samples = table[classes, (rng.random(self.points) * counts[classes]).astype(np.int64)]
        return samples, projection, order

    def batch(self, idx: torch.Tensor) -> Batch:
        """The prompts ``idx`` (B,): ``{"xs": (B, points, d), "labels": (B, points)}``."""
        xs, labels = [], []
        for i in torch.as_tensor(idx).tolist():
            samples, projection, order = self.prompt(i)
            rank = {int(c): y for y, c in enumerate(order)}
            xs.append(self.inputs[samples].double().numpy() @ projection.T)
            labels.append([rank[int(c)] for c in self.labels[samples]])
        return {"xs": torch.from_numpy(np.stack(xs)).float(), "labels": torch.tensor(labels, dtype=torch.long)}


def load_regression_data(data: RegressionDataConfig, eval_path: str | None, tokenizer: object = None) -> RunData:
    """``data.source=linear-regression``: the training prompts; evaluation prompts are drawn by ``fewshot icl evaluate``."""
    if eval_path is not None:
        raise DataError("data.source=linear-regression draws its own evaluation prompts (fewshot icl evaluate); remove eval.data_path")
    return RunData(regression_tasks(data), None)


register_source("linear-regression", load_regression_data, RegressionDataConfig)

__all__ = [
    "ClassificationTasks", "Curriculum", "DEFAULT_PROMPTS", "LinearRegressionTasks", "image_features", "standardise", "RegressionDataConfig", "curriculum_for",
    "load_regression_data", "regression_tasks", "truncate_prompts",
]
