"""Negatives from every process: all-gather with gradient for the contrastive objectives.

Under DDP each process holds a slice of the global batch. Gathering the other slices' embeddings
*with* their gradient (``torch.distributed.nn.functional.all_gather``: its backward sums each
slice's gradient from every process) and using them as extra negatives gives every local anchor the
denominator it would have on one device with the whole batch: the loss and its gradients with
respect to the embeddings equal one device's on the concatenated batch.

What that makes of the whole update (DDP averages the parameter gradients over the W processes):
it equals one device's on the concatenated batch *of the same views* where nothing else mixes the
samples of a batch, i.e. without BatchNorm, or with BatchNorm made global by SyncBatchNorm
(``train.sync_batchnorm``, on by default under DDP on GPUs). torch has no CPU SyncBatchNorm: on CPU
each process normalises its own slice, and the update differs. Each process draws its own views
(seed + 7919·rank), so a DDP run never sees the views one device would draw. tests/test_distributed.py
checks all of this on 2 gloo processes (loss and embedding gradients; parameter gradients on fixed
views, equal for a ViT, not for Conv-4 with per-process BatchNorm; MoCo's queue), except
SyncBatchNorm's synchronisation, which needs GPUs.
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
