"""CLIP's symmetric image–text InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", Fig. 3), a pure function of the two towers' embeddings.

With ℓ2-normalised image embeddings I and text embeddings T (row i of each from the same pair),
the logit scale s = exp(min(t, ln 100)) of a learned log-scale t (initialised at ln(1/0.07)):

    L = ½ [ CE(s · I Tᵀ, P) + CE(s · T Iᵀ, P) ]

CE(logits, P) = −(1/R) Σ_i Σ_j P_ij log softmax_j(logits)_ij over the R rows. The paper's target
is the diagonal, P = Id. Here P_ij = [a_i = b_j] / #{j' : a_i = b_j'} for the caption keys a of the
rows and b of the columns: a row whose caption text occurs several times in the batch spreads its
target uniformly over every column with the same caption, so an identical caption of another
image is a positive, never a negative. Without repeated keys (or without keys) P is the diagonal
and L is the paper's loss; the keys of the two directions are the same, so P is used both ways.
Where identical captions also have identical embeddings (a deterministic text tower), the two
targets give the same loss and the same gradients to both towers (the softmax cannot tell the
two columns apart); P differs, and keeps the pairing between identical captions from mattering,
where their embeddings differ: text dropout or augmentation, or captions padded differently
on different processes.

Across processes (open_clip's ``ClipLoss``, ``gather_with_grad=True``): the columns are the rows
of every process (``other_images``, ``other_texts``, ``other_keys``: the other processes' rows,
gathered with their gradient by :func:`fewshot.distributed.gather_others`). ``local_loss=False``
scores every gathered row against every column, as one device on the whole batch would;
``local_loss=True`` (open_clip's ``local_loss``) scores only this process's rows against all
columns, R = n instead of W·n rows, and the mean over processes is the same global loss with the
same gradients. tests/test_clip.py checks the loss against a loop transcription and open_clip's
``ClipLoss``, and 2 gloo processes against one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MAX_LOGIT_SCALE", "INIT_LOGIT_SCALE", "clip_loss", "clip_targets"]

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # the paper's initial temperature τ = 0.07
MAX_LOGIT_SCALE = math.log(100)  # "clipped to prevent scaling the logits by more than 100"


def _check(name: str, x: object, dim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point() or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty floating-point (B, D) tensor, got {shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} features like image, got {x.shape[1]}")
    return x


def _keys(name: str, keys: Tensor | None, n: int, start: int, device: torch.device) -> Tensor:
    """Caption keys of n rows, or distinct stand-ins (start, start + 1, …) when none are given."""
    if keys is None:
        return torch.arange(start, start + n, device=device)
    if not isinstance(keys, Tensor) or keys.shape != (n,) or keys.is_floating_point():
        shape = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
        raise ValueError(f"{name} must be an integer ({n},) tensor, got {shape}")
    return keys.to(device)


def clip_targets(row_keys: Tensor, column_keys: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """P (R, C): each row's target spread uniformly over the columns with its caption key."""
    same = (row_keys[:, None] == column_keys[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def clip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    caption_keys: Tensor | None = None,
    other_images: Tensor | None = None,
    other_texts: Tensor | None = None,
    other_keys: Tensor | None = None,
    local_loss: bool = False,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> Tensor:
    """Symmetric image–text InfoNCE with a learned temperature (see the module docstring).

    Args:
        image: (n, D) image embeddings of this process's pairs (normalised here).
        text: (n, D) text embeddings, row i the caption of image i.
        logit_scale: scalar t (a tensor to learn it); the logits are scaled by s = exp(min(t, max_logit_scale)).
        caption_keys: (n,) integers, equal exactly where two rows' caption texts are identical;
            None = every caption distinct (the paper's diagonal target).
        other_images, other_texts: (M, D) the other processes' rows (with gradient), or None.
        other_keys: (M,) their caption keys (None: distinct from everything, like missing caption_keys).
        local_loss: score only this process's rows against every column (open_clip's local_loss).

    Returns the scalar loss. open_clip's equivalent: ``ClipLoss(local_loss, gather_with_grad=True,
    rank, world_size)(F.normalize(image), F.normalize(text), logit_scale.exp())`` when no caption repeats.
    """
    image = _check("image", image)
    text = _check("text", text, image.shape[1])
    if text.shape != image.shape:
        raise ValueError(f"text must have the shape of image {tuple(image.shape)}, got {tuple(text.shape)}")
    n, device = image.shape[0], image.device
    keys = _keys("caption_keys", caption_keys, n, 0, device)
    if (other_images is None) != (other_texts is None):
        raise ValueError("other_images and other_texts come together (both gathered, or neither)")
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    all_images, all_texts, all_keys = image, text, keys
    if other_images is not None:
        other_images = F.normalize(_check("other_images", other_images, image.shape[1]), dim=1)
        other_texts = F.normalize(_check("other_texts", other_texts, image.shape[1]), dim=1)
        if other_texts.shape != other_images.shape:
            raise ValueError(f"other_texts must have the shape of other_images {tuple(other_images.shape)}")
        start = n if caption_keys is None else int(keys.max()) + 1  # stand-ins never equal a real key
        other = _keys("other_keys", other_keys, other_images.shape[0], start, device)
        all_images, all_texts = torch.cat([image, other_images]), torch.cat([text, other_texts])
        all_keys = torch.cat([keys, other])
    rows_i, rows_t, row_keys = (image, text, keys) if local_loss else (all_images, all_texts, all_keys)
    scale = torch.as_tensor(logit_scale, dtype=image.dtype, device=device).clamp(max=max_logit_scale).exp()
    target = clip_targets(row_keys, all_keys, image.dtype)
    image_to_text = F.cross_entropy(scale * rows_i @ all_texts.T, target)
    text_to_image = F.cross_entropy(scale * rows_t @ all_images.T, target)
    return (image_to_text + text_to_image) / 2
