"""Contrastive and metric-learning losses: pure functions plus thin ``nn.Module`` wrappers.

Every function is stateless and returns a scalar tensor (the mean over anchors). Negatives
are always arguments, never stored here, so a MoCo-style queue or negatives gathered from
other processes can be fed to the same code. The functions work in any floating dtype and
on any device; the inputs decide both.

Shape errors raise :class:`ValueError`. Out-of-range hyper-parameters (temperature, margin,
regularisation weight) raise :class:`fewshot.errors.ConfigError`, itself a ``ValueError``,
because they normally come from a recipe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError

__all__ = [
    "triplet_loss",
    "batch_hard_triplet_loss",
    "n_pair_loss",
    "nt_xent_loss",
    "supcon_loss",
    "info_nce_loss",
    "byol_loss",
    "TripletLoss",
    "NPairLoss",
    "NTXentLoss",
    "SupConLoss",
    "InfoNCELoss",
    "BYOLLoss",
]


# --------------------------------------------------------------------------- checks


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_embeddings(name: str, x: object, expected: str) -> Tensor:
    """A non-empty floating (B, D) tensor, or ValueError naming ``expected``."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor {expected}, got shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one feature {expected}, got shape {_shape(x)}")
    return x


def _check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )


def _check_labels(labels: object, n: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.shape != (n,):
        raise ValueError(f"labels must be a 1-D tensor of shape ({n},), got shape {_shape(labels)}")
    return labels


def _check_temperature(temperature: float) -> None:
    # ``not (t > 0)`` also rejects NaN.
    if not (temperature > 0) or not math.isfinite(temperature):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")


def _check_margin(margin: float) -> None:
    if not (margin >= 0) or not math.isfinite(margin):
        raise ConfigError(f"margin must be a finite number >= 0, got {margin}")


def _check_l2_reg(l2_reg: float) -> None:
    if not (l2_reg >= 0) or not math.isfinite(l2_reg):
        raise ConfigError(f"l2_reg must be a finite number >= 0, got {l2_reg}")


def _squared_distances(x: Tensor) -> Tensor:
    """(B, B) squared euclidean distances via ‖a‖² + ‖b‖² − 2aᵀb.

    The expansion avoids a (B, B, D) intermediate; rounding can make it slightly negative
    for near-identical rows, hence the clamp.
    """
    sq = x.pow(2).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)


# --------------------------------------------------------------------------- functions


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0) -> Tensor:
    """Triplet loss with squared euclidean distances (Schroff et al. 2015, FaceNet).

    L = (1/B) Σ_i max(0, ‖a_i − p_i‖² − ‖a_i − n_i‖² + margin)

    Args:
        anchor: (B, D) anchor embeddings a_i.
        positive: (B, D) embeddings p_i that should be close to a_i.
        negative: (B, D) embeddings n_i that should be at least ``margin`` further away.
        margin: the gap ε ≥ 0 demanded between the two squared distances.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``anchor`` is not a non-empty floating (B, D) tensor, or if
            ``positive`` or ``negative`` does not have exactly its shape.
        ConfigError: if ``margin`` is negative or not finite.
    """
    _check_margin(margin)
    _check_embeddings("anchor", anchor, "(B, D)")
    _check_same_shape("positive", positive, "anchor", anchor)
    _check_same_shape("negative", negative, "anchor", anchor)
    d_pos = (anchor - positive).pow(2).sum(dim=1)
    d_neg = (anchor - negative).pow(2).sum(dim=1)
    return F.relu(d_pos - d_neg + margin).mean()


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, "In defense of the triplet loss").

    With squared distances d(i, j) = ‖x_i − x_j‖², for every anchor i:

        d⁺_i = max_{j ≠ i, y_j = y_i} d(i, j)     (hardest positive)
        d⁻_i = min_{k: y_k ≠ y_i} d(i, k)          (hardest negative)
        ℓ_i  = max(0, d⁺_i − d⁻_i + margin)

    L is the mean of ℓ_i over the usable anchors, those with at least one positive and
    one negative; the rest are skipped. Without labels, pass the image index for both
    views (e.g. ``labels = arange(B).repeat(2)`` for ``cat([view1, view2])``).

    Args:
        embeddings: (B, D) embeddings x_i of the whole batch.
        labels: (B,) class or instance id y_i of each row (any dtype comparable with ==).
        margin: the gap ≥ 0 demanded between hardest positive and hardest negative.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``embeddings`` is not a non-empty floating (B, D) tensor, if
            ``labels`` is not of shape (B,), or if no anchor has both a positive and a
            negative in the batch.
        ConfigError: if ``margin`` is negative or not finite.
    """
    _check_margin(margin)
    _check_embeddings("embeddings", embeddings, "(B, D)")
    b = embeddings.shape[0]
    _check_labels(labels, b)

    dist = _squared_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(b, dtype=torch.bool, device=embeddings.device)
    pos_mask = same & not_self
    neg_mask = ~same
    usable = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    if not bool(usable.any()):
        raise ValueError(
            f"batch_hard_triplet_loss needs an anchor with both a positive and a negative; "
            f"got {b} embeddings with {labels.unique().numel()} distinct labels"
        )
    # Fill with ∓inf so that the excluded pairs can never be picked by max / min.
    hardest_pos = dist.masked_fill(~pos_mask, -math.inf).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg_mask, math.inf).amin(dim=1)
    per_anchor = F.relu(hardest_pos[usable] - hardest_neg[usable] + margin)
    return per_anchor.mean()


def n_pair_loss(anchor: Tensor, positive: Tensor, l2_reg: float = 0.0) -> Tensor:
    """Multi-class N-pair loss (Sohn 2016, "Improved deep metric learning with multi-class
    N-pair loss objective").

    L = (1/N) Σ_i log(1 + Σ_{j≠i} exp(f_iᵀf⁺_j − f_iᵀf⁺_i))  +  λ · (1/2N) Σ_{f ∈ {f_i, f⁺_i}} ‖f‖²

    Each anchor's own positive is the target and the other rows' positives are its
    negatives. The second term is the paper's penalty on embedding norms (λ = ``l2_reg``);
    it is needed because the dot products are not normalised.

    Args:
        anchor: (N, D) anchor embeddings f_i.
        positive: (N, D) positive embeddings f⁺_i, row i paired with anchor row i.
        l2_reg: weight λ ≥ 0 of the embedding-norm penalty.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``anchor`` is not a non-empty floating (N, D) tensor or
            ``positive`` does not have exactly its shape.
        ConfigError: if ``l2_reg`` is negative or not finite.
    """
    _check_l2_reg(l2_reg)
    _check_embeddings("anchor", anchor, "(N, D)")
    _check_same_shape("positive", positive, "anchor", anchor)
    logits = anchor @ positive.T
    # log(1 + Σ_{j≠i} exp(l_ij − l_ii)) = logsumexp_j(l_ij) − l_ii: cross-entropy with target i.
    targets = torch.arange(anchor.shape[0], device=anchor.device)
    loss = F.cross_entropy(logits, targets)
    if l2_reg > 0:
        loss = loss + l2_reg * torch.cat([anchor, positive]).pow(2).sum(dim=1).mean()
    return loss


def nt_xent_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.5,
    positive_in_denominator: bool = True,
    negatives: Tensor | None = None,
) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020).

    The 2N views are v = [z1; z2]; view i's positive is the other view of the same
    image, p(i) = (i + N) mod 2N. With s_{i,k} = cos(v_i, v_k) / τ:

        ℓ_i = −log( exp(s_{i,p(i)}) / Σ_{k ∈ D(i)} exp(s_{i,k}) ),   L = (1/2N) Σ_i ℓ_i

    * ``positive_in_denominator=True`` (SimCLR): D(i) = every k ≠ i.
    * ``positive_in_denominator=False`` (decoupled contrastive loss, Yeh et al. 2021):
      D(i) = every k ∉ {i, p(i)}, i.e. only negatives.

    ``negatives`` (M rows, cosine-normalised like the views) join every view's D(i): a
    MoCo queue or the views of other processes. Pass them detached or not as the method
    requires; this function does neither.

    Args:
        z1: (N, D) embeddings of the first view of each image.
        z2: (N, D) embeddings of the second view, row i from the same image as z1 row i.
        temperature: τ > 0.
        positive_in_denominator: whether D(i) contains the positive (see above).
        negatives: (M, D) extra negative embeddings, or None. Same dtype and device as z1.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``z1`` is not a non-empty floating (N, D) tensor, if ``z2`` does not
            have exactly its shape, if ``negatives`` is not (M, D) with the same D, or if
            the decoupled form is asked for with no negative at all (N = 1 and M = 0).
        ConfigError: if ``temperature`` is not a finite number > 0.
    """
    _check_temperature(temperature)
    _check_embeddings("z1", z1, "(N, D)")
    _check_same_shape("z2", z2, "z1", z1)
    if negatives is not None:
        if not isinstance(negatives, Tensor) or negatives.ndim != 2 or negatives.shape[1] != z1.shape[1]:
            raise ValueError(
                f"negatives must be a 2-D tensor (M, {z1.shape[1]}) matching the feature size of z1, "
                f"got shape {_shape(negatives)}"
            )
        if negatives.shape[0] == 0:
            negatives = None
    n = z1.shape[0]
    m = 0 if negatives is None else negatives.shape[0]
    if not positive_in_denominator and n == 1 and m == 0:
        raise ValueError(
            "nt_xent_loss with positive_in_denominator=False needs at least one negative: "
            "got N=1 pair and no extra negatives"
        )

    views = F.normalize(torch.cat([z1, z2]), dim=1)
    keys = views if negatives is None else torch.cat([views, F.normalize(negatives, dim=1)])
    logits = (views @ keys.T) / temperature  # (2N, 2N + M)

    rows = torch.arange(2 * n, device=z1.device)
    partner = (rows + n) % (2 * n)
    # A view is never its own negative: -inf drops it from the softmax with zero gradient.
    exclude = torch.zeros_like(logits, dtype=torch.bool)
    exclude[rows, rows] = True
    if positive_in_denominator:
        return F.cross_entropy(logits.masked_fill(exclude, -math.inf), partner)
    positive_logit = logits[rows, partner]
    exclude[rows, partner] = True
    denominator = torch.logsumexp(logits.masked_fill(exclude, -math.inf), dim=1)
    return (denominator - positive_logit).mean()


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss, the L_out form (Khosla et al. 2020, "Supervised
    Contrastive Learning").

    With cosine similarities s_{i,a} = cos(z_i, z_a) / τ, A(i) = every a ≠ i and
    P(i) = {p ∈ A(i): y_p = y_i}:

        ℓ_i = −(1/|P(i)|) Σ_{p ∈ P(i)} log( exp(s_{i,p}) / Σ_{a ∈ A(i)} exp(s_{i,a}) )

    L is the mean of ℓ_i over the anchors with |P(i)| > 0; the others are skipped.

    A (B, V, D) input (V views of each of B samples) is flattened to (B·V, D), each view
    keeping its sample's label, as in the paper; every view is then an anchor.

    Args:
        z: (B, D) embeddings, or (B, V, D) for V views per sample.
        labels: (B,) class of each sample (any dtype comparable with ==).
        temperature: τ > 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``z`` is not a non-empty floating (B, D) or (B, V, D) tensor, if
            ``labels`` is not of shape (B,), or if no anchor has a positive.
        ConfigError: if ``temperature`` is not a finite number > 0.
    """
    _check_temperature(temperature)
    if isinstance(z, Tensor) and z.ndim == 3:
        if 0 in z.shape:
            raise ValueError(f"z must be non-empty (B, V, D), got shape {tuple(z.shape)}")
        b, v, d = z.shape
        _check_labels(labels, b)
        z = z.reshape(b * v, d)
        labels = labels.repeat_interleave(v)
    else:
        _check_embeddings("z", z, "(B, D) or (B, V, D)")
        _check_labels(labels, z.shape[0])
    n = z.shape[0]

    zn = F.normalize(z, dim=1)
    logits = (zn @ zn.T) / temperature
    is_self = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(is_self, -math.inf)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

    positives = (labels[:, None] == labels[None, :]) & ~is_self
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError(
            f"supcon_loss needs at least one anchor with a positive (another row with its label); "
            f"got {n} rows with {labels.unique().numel()} distinct labels"
        )
    # torch.where, not multiplication by the mask: the diagonal holds -inf and 0·(-inf) is NaN.
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / n_pos[has_pos].to(log_prob.dtype)
    return per_anchor.mean()


# --------------------------------------------------------------------------- modules


class TripletLoss(nn.Module):
    """Triplet loss as a module; see :func:`triplet_loss` and :func:`batch_hard_triplet_loss`.

    With ``batch_hard=False``, ``forward(anchor, positive, negative)`` applies
    :func:`triplet_loss`. With ``batch_hard=True``, ``forward(anchor, positive, labels=None)``
    applies :func:`batch_hard_triplet_loss` to ``cat([anchor, positive])`` with each row's
    label used for both of its views; the default labels are the row index, so the two
    views of one image are the only positives.

    Raises:
        ConfigError: if ``margin`` is negative or not finite.
    """

    def __init__(self, margin: float = 1.0, batch_hard: bool = False) -> None:
        super().__init__()
        _check_margin(margin)
        self.margin = margin
        self.batch_hard = bool(batch_hard)

    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        negative: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """anchor, positive (and negative): (B, D); labels: (B,) or None (batch-hard only)."""
        if not self.batch_hard:
            if negative is None:
                raise ValueError("TripletLoss(batch_hard=False) needs a negative (B, D) tensor, got None")
            if labels is not None:
                raise ValueError("TripletLoss(batch_hard=False) takes no labels; use batch_hard=True")
            return triplet_loss(anchor, positive, negative, self.margin)

        if negative is not None:
            raise ValueError(
                "TripletLoss(batch_hard=True) mines negatives from the batch; got an explicit negative"
            )
        _check_embeddings("anchor", anchor, "(B, D)")
        _check_same_shape("positive", positive, "anchor", anchor)
        b = anchor.shape[0]
        if labels is None:
            labels = torch.arange(b, device=anchor.device)
        else:
            _check_labels(labels, b)
        return batch_hard_triplet_loss(torch.cat([anchor, positive]), labels.repeat(2), self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, batch_hard={self.batch_hard}"


class NPairLoss(nn.Module):
    """Multi-class N-pair loss as a module; see :func:`n_pair_loss`.

    Raises:
        ConfigError: if ``l2_reg`` is negative or not finite.
    """

    def __init__(self, l2_reg: float = 0.0) -> None:
        super().__init__()
        _check_l2_reg(l2_reg)
        self.l2_reg = l2_reg

    def forward(self, anchor: Tensor, positive: Tensor) -> Tensor:
        """anchor, positive: (N, D)."""
        return n_pair_loss(anchor, positive, self.l2_reg)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (or its decoupled form) as a module; see :func:`nt_xent_loss`.

    Raises:
        ConfigError: if ``temperature`` is not a finite number > 0.
    """

    def __init__(self, temperature: float = 0.5, positive_in_denominator: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.positive_in_denominator = bool(positive_in_denominator)

    def forward(self, z1: Tensor, z2: Tensor, negatives: Tensor | None = None) -> Tensor:
        """z1, z2: (N, D); negatives: (M, D) or None."""
        return nt_xent_loss(z1, z2, self.temperature, self.positive_in_denominator, negatives)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, positive_in_denominator={self.positive_in_denominator}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss (L_out) as a module; see :func:`supcon_loss`.

    Raises:
        ConfigError: if ``temperature`` is not a finite number > 0.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """z: (B, D) or (B, V, D); labels: (B,)."""
        return supcon_loss(z, labels, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# --------------------------------------------------------------------------- momentum-encoder losses (MoCo, BYOL)


def info_nce_loss(query: Tensor, key: Tensor, negatives: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE against a set of shared negatives, as MoCo uses it (He et al. 2020, "Momentum
    Contrast for unsupervised visual representation learning", eq. 1; the loss is Oord et al.
    2018's, "Representation learning with contrastive predictive coding").

    All rows are L2-normalised first. With q_i, k_i, n_j the unit vectors:

        ℓ_i = −log( exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·n_j/τ)) ),   L = (1/N) Σ_i ℓ_i

    Unlike :func:`nt_xent_loss`, the other rows of the batch are *not* negatives: every query
    sees only its own key and the shared ``negatives`` (MoCo's queue). Computed as one
    (N, 1 + K) logits matrix whose column 0 is the positive, then cross-entropy with target 0.
    The function neither detaches nor stops gradients: pass ``key`` and ``negatives`` detached
    when they come from a momentum encoder or a queue.

    Args:
        query: (N, D) queries q_i (the online branch).
        key: (N, D) positive keys k_i, row i the other view of query i's image.
        negatives: (K, D) negatives n_j shared by every query; K = 0 gives a loss of 0.
        temperature: τ > 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``query`` is not a non-empty floating (N, D) tensor, if ``key`` does not
            have exactly its shape, or if ``negatives`` is not (K, D) with the same D and dtype.
        ConfigError: if ``temperature`` is not a finite number > 0.
    """
    _check_temperature(temperature)
    _check_embeddings("query", query, "(N, D)")
    _check_same_shape("key", key, "query", query)
    if not isinstance(negatives, Tensor) or negatives.ndim != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives must be a 2-D tensor (K, {query.shape[1]}) matching the feature size of query, "
            f"got shape {_shape(negatives)}"
        )
    if negatives.dtype != query.dtype:
        raise ValueError(f"negatives must have the dtype of query ({query.dtype}), got {negatives.dtype}")
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    n = F.normalize(negatives, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    logits = torch.cat([positive, q @ n.T], dim=1) / temperature  # (N, 1 + K)
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's normalised mean squared error (Grill et al. 2020, "Bootstrap your own latent", eq. 2).

        ℓ_i = ‖ p_i/‖p_i‖ − z_i/‖z_i‖ ‖² = 2 − 2·cos(p_i, z_i),   L = (1/N) Σ_i ℓ_i

    so 0 for aligned rows, 2 for orthogonal ones and 4 for opposite ones. The stop-gradient
    on the target branch is the caller's job (pass ``target`` detached); the function does
    not impose it, so it can also be used for SimSiam-style experiments.

    Args:
        prediction: (N, D) online predictions p_i.
        target: (N, D) target projections z_i, row i from the other view of the same image.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``prediction`` is not a non-empty floating (N, D) tensor or ``target``
            does not have exactly its shape.
    """
    _check_embeddings("prediction", prediction, "(N, D)")
    _check_same_shape("target", target, "prediction", prediction)
    cos = (F.normalize(prediction, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    return (2.0 - 2.0 * cos).mean()


class InfoNCELoss(nn.Module):
    """MoCo's InfoNCE with shared negatives as a module; see :func:`info_nce_loss`.

    Raises:
        ConfigError: if ``temperature`` is not a finite number > 0.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor) -> Tensor:
        """query, key: (N, D); negatives: (K, D)."""
        return info_nce_loss(query, key, negatives, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class BYOLLoss(nn.Module):
    """BYOL's normalised MSE as a module (it has no hyper-parameters); see :func:`byol_loss`."""

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """prediction, target: (N, D)."""
        return byol_loss(prediction, target)


# --------------------------------------------------------------------------- time-contrastive (TCN, R3M)


def time_contrastive_loss(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 1.0,
    cross_sequence: bool = True,
    l2_reg: float = 0.0,
) -> Tensor:
    """Time-contrastive InfoNCE of R3M (Nair et al. 2022, "R3M: A Universal Visual Representation
    for Robot Manipulation", eq. 1), after the time-contrastive networks of Sermanet et al. 2018.

    Row b holds frames of one sequence: anchor a_b, a positive p_b close to it in time, and
    negatives n_bm of the same sequence further away. With the negative squared euclidean
    distance as similarity, S(u, v) = −‖u − v‖² / τ (no normalisation):

        ℓ_b = −log( e^{S(a_b, p_b)} / ( e^{S(a_b, p_b)} + Σ_m e^{S(a_b, n_bm)} + Σ_{b'≠b} e^{S(a_b, a_b')} ) )

        L = (1/B) Σ_b ℓ_b + λ · (1/2B) Σ_b (‖a_b‖² + ‖p_b‖²)

    The last sum of the denominator (``cross_sequence=True``) takes the anchors of the other
    sequences of the batch as negatives, as R3M compares each anchor with other videos' frames
    (R3M draws 3 of them at random; here all B − 1). λ = ``l2_reg`` penalises the embeddings'
    size: without normalisation, scaling every embedding up would sharpen the softmax for free
    (R3M adds L1 and L2 penalties with weight 1e-5 for the same reason).

    Args:
        anchor: (B, D) anchor embeddings a_b.
        positive: (B, D) positive embeddings p_b.
        negatives: (B, M, D) per-anchor negatives n_bm, or None (M = 0).
        temperature: τ > 0 (R3M: 1).
        cross_sequence: also contrast with the other rows' anchors.
        l2_reg: λ ≥ 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``anchor`` is not a non-empty floating (B, D) tensor, ``positive`` does not
            have its shape, ``negatives`` is not (B, M, D), or no anchor has any negative.
        ConfigError: if ``temperature`` or ``l2_reg`` is out of range.
    """
    _check_temperature(temperature)
    _check_l2_reg(l2_reg)
    _check_embeddings("anchor", anchor, "(B, D)")
    _check_same_shape("positive", positive, "anchor", anchor)
    b, d = anchor.shape
    if negatives is not None and (
        not isinstance(negatives, Tensor) or negatives.ndim != 3 or negatives.shape[0] != b or negatives.shape[2] != d
    ):
        raise ValueError(f"negatives must be a 3-D tensor ({b}, M, {d}), got shape {_shape(negatives)}")
    m = 0 if negatives is None else negatives.shape[1]
    if m == 0 and (not cross_sequence or b == 1):
        raise ValueError(
            f"time_contrastive_loss needs at least one negative: got M={m} per-anchor negatives, "
            f"cross_sequence={cross_sequence} and B={b}"
        )
    # Differences, not the ‖u‖² + ‖v‖² − 2uᵀv expansion: no cancellation when frames are close.
    columns = [-(anchor - positive).pow(2).sum(dim=1, keepdim=True)]  # column 0: the positive
    if m:
        columns.append(-(anchor[:, None] - negatives).pow(2).sum(dim=2))  # (B, M)
    if cross_sequence and b > 1:
        others = -(anchor[:, None] - anchor[None]).pow(2).sum(dim=2)  # (B, B)
        eye = torch.eye(b, dtype=torch.bool, device=anchor.device)
        columns.append(others[~eye].reshape(b, b - 1))  # drop a_b against itself
    logits = torch.cat(columns, dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=anchor.device))
    if l2_reg > 0:
        loss = loss + l2_reg * torch.cat([anchor, positive]).pow(2).sum(dim=1).mean()
    return loss
