"""Masking recipes for reconstruction pre-training: ``mask(x) -> (x~, y)``.

Every reconstruction model (BERT, SpanBERT, GPT, MAE) is trained on a corrupted input x~
and a target y that is only scored at some positions. The recipes here return a
:class:`Masked` triple ``(inputs, targets, mask)`` so the training step is always

    loss = F.cross_entropy(logits.transpose(1, 2), masked.targets)   # tokens
    loss = ((pred - masked.targets) ** 2).mean(-1)[masked.mask].mean()  # MAE patches

For tokens, ``targets`` holds the original id where ``mask`` is True and ``ignore_index``
(-100, PyTorch's ``cross_entropy`` default) elsewhere, so only masked positions train.

* :func:`random_mask` / :func:`mae_shuffle` -- exactly ``round(ratio * L)`` positions per
  row, chosen by an argsort of uniform noise (He et al. 2021, "Masked Autoencoders Are
  Scalable Vision Learners").
* :func:`bert_mask` -- Devlin et al. 2019 (BERT): each position chosen with probability
  ``ratio``; of the chosen, 80% -> [MASK], 10% -> random token, 10% unchanged.
* :func:`span_mask` -- Joshi et al. 2020 (SpanBERT): contiguous spans with clipped
  geometric lengths until ``round(ratio * L)`` positions are covered.
* :func:`causal_targets` -- autoregressive next-token prediction as the same recipe.
* :func:`patchify` / :func:`unpatchify` / :func:`mask_patches` -- MAE image patches.

Randomness: every random number is drawn on the CPU from the ``torch.Generator`` passed in
(never the global RNG), so the same generator state gives the same masks on any device;
results are then moved to the input's device.

Shape errors raise :class:`ValueError`. Out-of-range hyper-parameters (ratio, replace
probabilities, span lengths, token ids) raise :class:`fewshot.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fewshot.data.token_ids import IGNORE_INDEX
from fewshot.errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "Masked",
    "random_mask",
    "mae_shuffle",
    "bert_mask",
    "span_mask",
    "causal_targets",
    "patchify",
    "unpatchify",
    "mask_patches",
]



@dataclass
class Masked:
    """The output of a masking recipe.

    inputs:  x~, what the model sees -- (B, L) token ids, or (B, L_keep, D) kept patches.
    targets: y -- (B, L) ids with ``ignore_index`` where ``mask`` is False, or (B, L, D)
             patches (the loss is restricted with ``mask``).
    mask:    (B, L) bool, True where the loss is taken.
    ids_keep, ids_restore: MAE bookkeeping (:func:`mae_shuffle`), None for token recipes.
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    ids_keep: Tensor | None = None
    ids_restore: Tensor | None = None


# --------------------------------------------------------------------------- checks


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("masking needs a CPU torch.Generator (masks are drawn on the CPU)")
    return generator


def _check_tokens(tokens: object, min_length: int = 1) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D tensor (B, L), got shape {_shape(tokens)}")
    if tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 ids, got dtype {tokens.dtype}")
    if tokens.shape[1] < min_length:
        raise ValueError(f"tokens must have length >= {min_length}, got shape {_shape(tokens)}")
    return tokens


def _check_ratio(ratio: float, *, allow_one: bool = True) -> None:
    ok = 0 <= ratio <= 1 if allow_one else 0 <= ratio < 1
    if not isinstance(ratio, (int, float)) or not ok:
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"mask ratio must be in {bound}, got {ratio}")


def _check_token_id(name: str, value: int, vocab_size: int | None) -> None:
    if not isinstance(value, int) or value < 0 or (vocab_size is not None and value >= vocab_size):
        bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ConfigError(f"{name} must be an int in {bound}, got {value}")


def _special_mask(tokens: Tensor, special_ids: Sequence[int]) -> Tensor:
    special = torch.zeros(tokens.shape, dtype=torch.bool)
    for sid in special_ids:
        _check_token_id("special id", sid, None)
        special |= tokens.cpu() == sid
    return special


# --------------------------------------------------------------------------- random / MAE


def mae_shuffle(
    batch: int, length: int, ratio: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row random shuffle that removes exactly ``round(ratio * length)`` positions.

    As MAE (He et al. 2021): ``ids_shuffle = argsort(noise)`` with uniform noise, the first
    ``L_keep = length - round(ratio * length)`` shuffled positions are kept and
    ``ids_restore = argsort(ids_shuffle)``. Returns

    * ``ids_keep``    (B, L_keep) int64 -- ``x_kept = gather(x, 1, ids_keep)``;
    * ``ids_restore`` (B, L) int64 -- ``gather(cat([x_kept, fill]), 1, ids_restore)`` puts
      every token back in its original position;
    * ``mask``        (B, L) bool -- True = removed (where MAE takes its loss).

    ``round`` is Python's (half to even). ``ratio`` must be in [0, 1) so at least one
    position is kept.
    """
    _check_generator(generator)
    _check_ratio(ratio, allow_one=False)
    if not isinstance(batch, int) or not isinstance(length, int) or batch < 1 or length < 1:
        raise ValueError(f"batch and length must be ints >= 1, got {batch}, {length}")
    n_mask = round(ratio * length)
    n_keep = length - n_mask
    if n_keep < 1:
        raise ConfigError(f"mask ratio {ratio} removes every one of {length} positions")
    noise = torch.rand(batch, length, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, :n_keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def random_mask(shape: tuple[int, int], ratio: float, generator: torch.Generator) -> Tensor:
    """(B, L) bool mask with exactly ``round(ratio * L)`` True (masked) positions per row.

    Same draw as :func:`mae_shuffle` (argsort of uniform noise); ``ratio`` may be 1 here.
    """
    _check_generator(generator)
    _check_ratio(ratio)
    if len(shape) != 2 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be (B, L) with B, L >= 1, got {shape}")
    batch, length = shape
    n_mask = round(ratio * length)
    noise = torch.rand(batch, length, generator=generator)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return ranks < n_mask


# --------------------------------------------------------------------------- BERT


def bert_mask(
    tokens: Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    ratio: float = 0.15,
    replace: tuple[float, float, float] = (0.8, 0.1, 0.1),
    special_ids: Sequence[int] = (),
    ignore_index: int = IGNORE_INDEX,
) -> Masked:
    """BERT masked-language-model corruption (Devlin et al. 2019).

    tokens: (B, L) int64. Each non-special position is chosen independently with
    probability ``ratio``; a chosen position is, with probabilities
    ``replace = (p_mask, p_random, p_keep)``, replaced by ``mask_token_id``, by a random
    token, or left unchanged. ``replace=(0.8, 0.1, 0.1)`` is BERT; ``(0.8, 0.2, 0.0)`` is
    the 80% [MASK] / 20% random variant.

    Random tokens are uniform over the whole vocabulary ``[0, vocab_size)``, special ids
    included (as the BERT reference code and HuggingFace's collator do); they are rare
    (``p_random / vocab_size`` each) and the target is still the original token.

    Returns :class:`Masked` with ``inputs`` (B, L) the corrupted ids, ``targets`` (B, L)
    the original id where chosen else ``ignore_index``, ``mask`` (B, L) True where chosen.
    Special-id positions are never chosen.
    """
    _check_tokens(tokens)
    _check_generator(generator)
    _check_ratio(ratio)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be an int >= 1, got {vocab_size}")
    _check_token_id("mask_token_id", mask_token_id, vocab_size)
    if len(replace) != 3:
        raise ConfigError(f"replace must be (p_mask, p_random, p_keep), got {replace}")
    if any(not (0 <= p <= 1) for p in replace) or not math.isclose(sum(replace), 1.0, abs_tol=1e-6):
        raise ConfigError(f"replace probabilities must each be in [0, 1] and sum to 1, got {replace}")
    p_mask, p_random, _ = replace

    special = _special_mask(tokens, special_ids)
    shape = tokens.shape
    chosen = (torch.rand(shape, generator=generator) < ratio) & ~special
    u = torch.rand(shape, generator=generator)
    to_mask = chosen & (u < p_mask)
    to_random = chosen & (u >= p_mask) & (u < p_mask + p_random)
    random_ids = torch.randint(0, vocab_size, shape, generator=generator, dtype=torch.int64)

    device = tokens.device
    chosen, to_mask, to_random = chosen.to(device), to_mask.to(device), to_random.to(device)
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_token_id), tokens)
    inputs = torch.where(to_random, random_ids.to(device), inputs)
    targets = torch.where(chosen, tokens, torch.full_like(tokens, ignore_index))
    return Masked(inputs=inputs, targets=targets, mask=chosen)


# --------------------------------------------------------------------------- SpanBERT


def span_mask(
    tokens: Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    ratio: float = 0.15,
    mean_span: float = 3.0,
    max_span: int = 10,
    special_ids: Sequence[int] = (),
    ignore_index: int = IGNORE_INDEX,
) -> Masked:
    """SpanBERT span masking (Joshi et al. 2020): contiguous spans replaced by [MASK].

    Per row, the budget is ``round(ratio * n)`` with n the number of non-special positions.
    Span lengths are drawn from Geometric(p = 1 / mean_span) on {1, 2, ...} (mean
    ``mean_span`` before clipping), clipped at ``max_span`` (SpanBERT: 10), so the realised
    mean is ``(1 - (1 - p) ** max_span) / p`` (2.948 for the defaults). Spans are added
    until the budget is met; the last span is truncated so exactly the budget is covered.

    Each span's start is uniform over the starts where it covers no special position and
    neither overlaps nor touches an earlier span (one unmasked gap on each side), so every
    run of masked positions is exactly one span. If no start is left for a span (only with
    large ratios), the row stops short of its budget. All chosen positions become
    ``mask_token_id`` (SpanBERT also uses BERT's 80/10/10 inside spans; apply that on top
    if wanted).

    Returns :class:`Masked` (inputs, targets, mask), each (B, L), as :func:`bert_mask`.
    """
    _check_tokens(tokens)
    _check_generator(generator)
    _check_ratio(ratio, allow_one=False)
    _check_token_id("mask_token_id", mask_token_id, None)
    if not isinstance(mean_span, (int, float)) or not (1 <= mean_span < math.inf):
        raise ConfigError(f"mean_span must be a finite number >= 1, got {mean_span}")
    if not isinstance(max_span, int) or max_span < 1:
        raise ConfigError(f"max_span must be an int >= 1, got {max_span}")

    special = _special_mask(tokens, special_ids)
    batch, length = tokens.shape
    p = 1.0 / mean_span
    chosen = torch.zeros(batch, length, dtype=torch.bool)
    positions = torch.arange(length)
    for b in range(batch):
        budget = round(ratio * int((~special[b]).sum()))
        if budget == 0:
            continue
        # At most ``budget`` spans are needed; draw all lengths at once.
        u = torch.rand(budget, generator=generator, dtype=torch.float64)
        if p >= 1:
            lengths = torch.ones(budget, dtype=torch.int64)
        else:
            # Inverse CDF of Geometric(p) on {1, 2, ...}; 1 - u is in (0, 1].
            lengths = 1 + torch.floor(torch.log1p(-u) / math.log1p(-p)).to(torch.int64)
        lengths = lengths.clamp(max=max_span).tolist()
        row_special = special[b].to(torch.int64)
        spec_cum = torch.cat([torch.zeros(1, dtype=torch.int64), row_special.cumsum(0)])
        covered = 0
        for span in lengths:
            span = min(span, budget - covered)
            if span > length:
                break
            # Masked neighbours within [s - 1, s + span] (padded), specials within [s, s + span).
            padded = torch.cat([torch.zeros(1, dtype=torch.int64), chosen[b].to(torch.int64),
                                torch.zeros(1, dtype=torch.int64)])
            mask_cum = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)])
            starts = positions[: length - span + 1]
            near_mask = mask_cum[starts + span + 2] - mask_cum[starts]
            in_special = spec_cum[starts + span] - spec_cum[starts]
            valid = starts[(near_mask == 0) & (in_special == 0)]
            if valid.numel() == 0:
                break
            k = int(torch.randint(valid.numel(), (1,), generator=generator))
            s = int(valid[k])
            chosen[b, s : s + span] = True
            covered += span
            if covered >= budget:
                break

    chosen = chosen.to(tokens.device)
    inputs = torch.where(chosen, torch.full_like(tokens, mask_token_id), tokens)
    targets = torch.where(chosen, tokens, torch.full_like(tokens, ignore_index))
    return Masked(inputs=inputs, targets=targets, mask=chosen)


# --------------------------------------------------------------------------- causal


def causal_targets(
    tokens: Tensor, ignore_index: int = IGNORE_INDEX, pad_id: int | None = None
) -> Masked:
    """Autoregressive (GPT) training as a masking recipe: predict the next token.

    tokens: (B, L) int64, L >= 2. ``inputs = tokens[:, :-1]`` and
    ``targets = tokens[:, 1:]`` (both (B, L - 1)), ``mask`` all True -- except, if
    ``pad_id`` is given, where the target is padding (target ``ignore_index``, mask False).

    Nothing is hidden from the input here: the causal attention mask that stops position t
    from seeing t + 1.. lives in the model (e.g.
    ``F.scaled_dot_product_attention(..., is_causal=True)``).
    """
    _check_tokens(tokens, min_length=2)
    inputs = tokens[:, :-1]
    targets = tokens[:, 1:].clone()
    mask = torch.ones_like(targets, dtype=torch.bool)
    if pad_id is not None:
        mask = targets != pad_id
        targets = torch.where(mask, targets, torch.full_like(targets, ignore_index))
    return Masked(inputs=inputs, targets=targets, mask=mask)


# --------------------------------------------------------------------------- patches


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p * p * C) non-overlapping p x p patches, as MAE.

    L = (H / p) * (W / p), patches in row-major order; each patch is flattened in
    (row, column, channel) order, i.e. ``images[b, c, i*p + r, j*p + q]`` lands at
    ``out[b, i * (W/p) + j, (r * p + q) * C + c]``. H and W must be multiples of p.
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a 4-D tensor (B, C, H, W), got shape {_shape(images)}")
    if not isinstance(p, int) or p < 1:
        raise ConfigError(f"patch size must be an int >= 1, got {p}")
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, image_size: tuple[int, int] | None = None) -> Tensor:
    """Exact inverse of :func:`patchify`: (B, L, p * p * C) -> (B, C, H, W).

    ``image_size = (H, W)``; None means square, H = W = p * sqrt(L).
    """
    if not isinstance(patches, Tensor) or patches.ndim != 3:
        raise ValueError(f"patches must be a 3-D tensor (B, L, D), got shape {_shape(patches)}")
    if not isinstance(p, int) or p < 1:
        raise ConfigError(f"patch size must be an int >= 1, got {p}")
    b, length, d = patches.shape
    if d % (p * p):
        raise ValueError(f"patch dimension {d} is not a multiple of p * p = {p * p}")
    c = d // (p * p)
    if image_size is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{length} patches do not form a square; pass image_size")
        hp = wp = side
    else:
        h, w = image_size
        if h % p or w % p or (h // p) * (w // p) != length:
            raise ValueError(f"image_size {image_size} does not match {length} patches of size {p}")
        hp, wp = h // p, w // p
    x = patches.reshape(b, hp, wp, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, hp * p, wp * p)


def mask_patches(patches: Tensor, ratio: float, generator: torch.Generator) -> Masked:
    """MAE random masking of (B, L, D) patches (He et al. 2021).

    Returns :class:`Masked` with ``inputs`` (B, L_keep, D) the kept patches, ``targets``
    (B, L, D) all patches, ``mask`` (B, L) True = removed (where the loss is taken), and
    ``ids_keep`` / ``ids_restore`` from :func:`mae_shuffle`.
    """
    if not isinstance(patches, Tensor) or patches.ndim != 3:
        raise ValueError(f"patches must be a 3-D tensor (B, L, D), got shape {_shape(patches)}")
    b, length, d = patches.shape
    ids_keep, ids_restore, mask = mae_shuffle(b, length, ratio, generator)
    device = patches.device
    ids_keep, ids_restore, mask = ids_keep.to(device), ids_restore.to(device), mask.to(device)
    kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    return Masked(inputs=kept, targets=patches, mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)
