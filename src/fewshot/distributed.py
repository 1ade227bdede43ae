"""Negatives from every process: all-gather with gradient for the contrastive objectives.

Under DDP each process holds a slice of the global batch. Gathering the other slices' embeddings
*with* their gradient (``torch.distributed.nn.functional.all_gather``: its backward sums each
slice's gradient from every process) and using them as extra negatives gives every local anchor the
denominator it would have on one device with the whole batch. Since DDP then averages parameter
gradients over the W processes, the update equals the single-device update on the concatenated
batch (tests/test_distributed.py checks loss and gradients on 2 gloo processes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_others(*tensors: torch.Tensor) -> torch.Tensor | None:
    """The other processes' rows of each tensor, concatenated, with gradient; None on one process.

    tensors: each (n, D) with the same n on every process. Returns (Σ (W−1)·n, D).
    """
    if world_size() == 1:
        return None
    rank = dist.get_rank()
    others = []
    for tensor in tensors:
        slices = all_gather(tensor)
        others += [s for r, s in enumerate(slices) if r != rank]
    return torch.cat(others)


def gather_all(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process in rank order, without gradient (MoCo's keys need none);
    ``x`` itself on one process. Every rank gets the same result, so queues stay identical."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
