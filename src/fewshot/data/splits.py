"""Class-disjoint train/eval splits.

Few-shot evaluation must use classes never seen in pre-training. Splits are drawn with
``numpy.random.default_rng(seed)`` (never the global generators), so the same arguments
give the same split on every machine with the same NumPy; both index lists are returned
sorted ascending.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fewshot.errors import DataError

__all__ = ["split_by_group", "split_classes"]


def split_classes(n_classes: int, holdout: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Split class indices ``0..n_classes-1`` into (train, eval), class-disjoint.

    ``holdout`` is the number of eval classes (an int) or their fraction (a float in
    (0, 1), rounded half up to a count). Raises DataError if either side would be empty.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 0:
        raise DataError(f"n_classes must be a non-negative integer, got {n_classes!r}")
    n_classes = int(n_classes)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(holdout, bool):
        raise DataError(f"holdout must be a class count or a fraction in (0, 1), got {holdout!r}")
    if isinstance(holdout, numbers.Integral):
        n_eval = int(holdout)
        what = f"holdout={n_eval}"
    elif isinstance(holdout, numbers.Real) and 0.0 < float(holdout) < 1.0:
        n_eval = math.floor(n_classes * float(holdout) + 0.5)
        what = f"holdout={float(holdout)} of {n_classes} classes ({n_eval})"
    else:
        raise DataError(f"holdout must be a class count or a fraction in (0, 1), got {holdout!r}")
    if n_eval < 1:
        raise DataError(f"{what} leaves no eval classes; hold out at least 1 of {n_classes} classes")
    if n_eval > n_classes - 1:
        raise DataError(f"{what} leaves no training classes; there are only {n_classes} classes")
    perm = np.random.default_rng(int(seed)).permutation(n_classes)
    eval_idx = sorted(int(i) for i in perm[:n_eval])
    train_idx = sorted(int(i) for i in perm[n_eval:])
    return train_idx, eval_idx


def split_by_group(groups: list[str] | None, eval_groups: list[str]) -> tuple[list[int], list[int]]:
    """Split classes by their group (Omniglot: alphabet): classes whose group is in
    ``eval_groups`` go to eval, the rest to train. Returns (train, eval) class indices.

    ``groups`` is the per-class group list (``ImageSet.groups``). Raises DataError naming
    unknown groups and listing the known ones, or if either side would be empty.
    """
    if groups is None:
        raise DataError("this data set has no groups (alphabets) to split by; split by classes instead")
    if isinstance(eval_groups, str):
        eval_groups = [eval_groups]
    known = sorted(set(groups))
    wanted = set(eval_groups)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise DataError(
            f"unknown group{'s' if len(unknown) > 1 else ''} {', '.join(repr(g) for g in unknown)}; "
            f"known groups: {', '.join(known)}"
        )
    if not wanted:
        raise DataError(f"no eval groups given; choose some of: {', '.join(known)}")
    eval_idx = [i for i, g in enumerate(groups) if g in wanted]
    train_idx = [i for i, g in enumerate(groups) if g not in wanted]
    if not train_idx:
        raise DataError(f"eval groups {', '.join(sorted(wanted))} leave no training classes; keep at least one group for training")
    return train_idx, eval_idx
