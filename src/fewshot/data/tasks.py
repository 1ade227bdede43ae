"""Seeded in-context regression prompts (x₁, y₁, …, x_k, y_k) and the curriculum that grows them.

Linear regression as in Garg et al. 2022 ("What can transformers learn in-context?"): per prompt a
task w ~ N(0, I_d), inputs x_i ~ N(0, I_d) and targets y_i = w·x_i + ε_i with ε_i ~ N(0, σ²). With a
finite task pool (Raventós et al. 2023's "task diversity") w is one of ``pool`` vectors drawn once
from the seed. Prompt ``idx`` is drawn from its own generator seeded by (seed, idx), so any batch
of indices gives the same prompts in any order, on any machine, and a resumed run sees the same data.

The curriculum (Garg et al.'s reference: active dimensions 5 → 20 by 1 and points 11 → 41 by 2,
every 2,000 steps) is applied by the method, which knows the step: the prompt keeps its first
``points`` pairs and the inactive input coordinates are zeroed, with y recomputed from the active
ones (:func:`truncate_prompts`) as in Garg et al.'s code.
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


def load_regression_data(data: RegressionDataConfig, eval_path: str | None, tokenizer: object = None) -> RunData:
    """``data.source=linear-regression``: the training prompts; evaluation prompts are drawn by ``fewshot icl evaluate``."""
    if eval_path is not None:
        raise DataError("data.source=linear-regression draws its own evaluation prompts (fewshot icl evaluate); remove eval.data_path")
    return RunData(regression_tasks(data), None)


register_source("linear-regression", load_regression_data, RegressionDataConfig)

__all__ = [
    "Curriculum", "DEFAULT_PROMPTS", "LinearRegressionTasks", "RegressionDataConfig", "curriculum_for",
    "load_regression_data", "regression_tasks", "truncate_prompts",
]
