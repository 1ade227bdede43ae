"""Contrastive losses checked against slow, loop-by-loop transcriptions of their formulas.

The references below work on python floats (math.exp / math.log) and share no code with
the implementation: they are the formulas from the docstrings, written out term by term.
"""

from __future__ import annotations

import math

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.objectives.contrastive import (
    NPairLoss,
    NTXentLoss,
    SupConLoss,
    TripletLoss,
    batch_hard_triplet_loss,
    n_pair_loss,
    nt_xent_loss,
    supcon_loss,
    triplet_loss,
)

TOL = dict(atol=1e-6, rtol=1e-6)


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------- references


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def _sqdist(u: list[float], v: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(u, v))


def _cos(u: list[float], v: list[float]) -> float:
    return _dot(u, v) / (math.sqrt(_dot(u, u)) * math.sqrt(_dot(v, v)))


def ref_triplet(a, p, n, margin):
    a, p, n = a.tolist(), p.tolist(), n.tolist()
    total = 0.0
    for i in range(len(a)):
        total += max(0.0, _sqdist(a[i], p[i]) - _sqdist(a[i], n[i]) + margin)
    return total / len(a)


def ref_batch_hard(x, labels, margin):
    x, y = x.tolist(), labels.tolist()
    terms = []
    for i in range(len(x)):
        hardest_pos = None
        hardest_neg = None
        for j in range(len(x)):
            d = _sqdist(x[i], x[j])
            if j != i and y[j] == y[i]:
                hardest_pos = d if hardest_pos is None else max(hardest_pos, d)
            if y[j] != y[i]:
                hardest_neg = d if hardest_neg is None else min(hardest_neg, d)
        if hardest_pos is None or hardest_neg is None:
            continue
        terms.append(max(0.0, hardest_pos - hardest_neg + margin))
    return sum(terms) / len(terms)


def ref_n_pair(f, fp, l2_reg):
    f, fp = f.tolist(), fp.tolist()
    n = len(f)
    total = 0.0
    for i in range(n):
        inner = 0.0
        for j in range(n):
            if j != i:
                inner += math.exp(_dot(f[i], fp[j]) - _dot(f[i], fp[i]))
        total += math.log(1.0 + inner)
    loss = total / n
    norms = 0.0
    for row in f + fp:
        norms += _dot(row, row)
    return loss + l2_reg * norms / (2 * n)


def ref_nt_xent(z1, z2, tau, positive_in_denominator, negatives=None):
    views = z1.tolist() + z2.tolist()
    extra = [] if negatives is None else negatives.tolist()
    keys = views + extra
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        p = i + n if i < n else i - n
        denom = 0.0
        for k in range(len(keys)):
            if k == i:
                continue
            if k == p and not positive_in_denominator:
                continue
            denom += math.exp(_cos(views[i], keys[k]) / tau)
        total += -math.log(math.exp(_cos(views[i], views[p]) / tau) / denom)
    return total / (2 * n)


def ref_supcon(rows, labels, tau):
    """rows: list of vectors, labels: list of labels, one per row."""
    terms = []
    for i in range(len(rows)):
        denom = 0.0
        for a in range(len(rows)):
            if a != i:
                denom += math.exp(_cos(rows[i], rows[a]) / tau)
        positives = [p for p in range(len(rows)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        s = 0.0
        for p in positives:
            s += math.log(math.exp(_cos(rows[i], rows[p]) / tau) / denom)
        terms.append(-s / len(positives))
    return sum(terms) / len(terms)


# --------------------------------------------------------------------------- against references


@pytest.mark.parametrize("margin", [0.0, 1.0, 4.0])
def test_triplet_matches_reference(margin):
    a, p, n = _rand(7, 5, seed=0), _rand(7, 5, seed=1), _rand(7, 5, seed=2)
    expected = ref_triplet(a, p, n, margin)
    torch.testing.assert_close(triplet_loss(a, p, n, margin), _scalar(expected), **TOL)
    torch.testing.assert_close(TripletLoss(margin)(a, p, n), _scalar(expected), **TOL)


def test_triplet_reference_has_both_active_and_inactive_terms():
    # Guards the test above: with margin 1 some hinges are clipped and some are not.
    a, p, n = (_rand(7, 5, seed=s).tolist() for s in (0, 1, 2))
    raw = [_sqdist(a[i], p[i]) - _sqdist(a[i], n[i]) + 1.0 for i in range(7)]
    assert any(r < 0 for r in raw) and any(r > 0 for r in raw)


@pytest.mark.parametrize("margin", [0.5, 3.0])
def test_batch_hard_matches_reference(margin):
    x = _rand(12, 4, seed=3)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # label 3 has no positive
    expected = ref_batch_hard(x, labels, margin)
    torch.testing.assert_close(batch_hard_triplet_loss(x, labels, margin), _scalar(expected), **TOL)


def test_batch_hard_module_uses_both_views_with_index_labels():
    a, p = _rand(6, 4, seed=4), _rand(6, 4, seed=5)
    both = torch.cat([a, p])
    expected = ref_batch_hard(both, torch.tensor(list(range(6)) * 2), 2.0)
    torch.testing.assert_close(TripletLoss(2.0, batch_hard=True)(a, p), _scalar(expected), **TOL)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = ref_batch_hard(both, torch.cat([labels, labels]), 2.0)
    torch.testing.assert_close(TripletLoss(2.0, batch_hard=True)(a, p, labels=labels), _scalar(expected), **TOL)


@pytest.mark.parametrize("l2_reg", [0.0, 0.25])
def test_n_pair_matches_reference(l2_reg):
    f, fp = _rand(6, 5, seed=6), _rand(6, 5, seed=7)
    expected = ref_n_pair(f, fp, l2_reg)
    torch.testing.assert_close(n_pair_loss(f, fp, l2_reg), _scalar(expected), **TOL)
    torch.testing.assert_close(NPairLoss(l2_reg)(f, fp), _scalar(expected), **TOL)


def test_n_pair_regulariser_changes_the_loss():
    f, fp = _rand(6, 5, seed=6), _rand(6, 5, seed=7)
    assert n_pair_loss(f, fp, 0.25).item() > n_pair_loss(f, fp, 0.0).item() + 0.1


@pytest.mark.parametrize("positive_in_denominator", [True, False])
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_nt_xent_matches_reference(positive_in_denominator, tau):
    z1, z2 = _rand(5, 8, seed=8, scale=3.0), _rand(5, 8, seed=9)
    expected = ref_nt_xent(z1, z2, tau, positive_in_denominator)
    got = nt_xent_loss(z1, z2, tau, positive_in_denominator)
    torch.testing.assert_close(got, _scalar(expected), **TOL)
    torch.testing.assert_close(NTXentLoss(tau, positive_in_denominator)(z1, z2), _scalar(expected), **TOL)


@pytest.mark.parametrize("positive_in_denominator", [True, False])
def test_nt_xent_with_extra_negatives_matches_reference(positive_in_denominator):
    z1, z2, neg = _rand(4, 6, seed=10), _rand(4, 6, seed=11), _rand(9, 6, seed=12, scale=5.0)
    expected = ref_nt_xent(z1, z2, 0.3, positive_in_denominator, neg)
    got = nt_xent_loss(z1, z2, 0.3, positive_in_denominator, negatives=neg)
    torch.testing.assert_close(got, _scalar(expected), **TOL)
    module = NTXentLoss(0.3, positive_in_denominator)
    torch.testing.assert_close(module(z1, z2, negatives=neg), _scalar(expected), **TOL)
    # The negatives must matter, or the test above proves nothing about them.
    assert abs(expected - ref_nt_xent(z1, z2, 0.3, positive_in_denominator)) > 1e-2


def test_nt_xent_empty_negatives_equal_none():
    z1, z2 = _rand(4, 6, seed=10), _rand(4, 6, seed=11)
    torch.testing.assert_close(
        nt_xent_loss(z1, z2, negatives=torch.empty(0, 6, dtype=torch.float64)), nt_xent_loss(z1, z2), **TOL
    )


def test_nt_xent_single_pair_with_negatives_decoupled():
    z1, z2, neg = _rand(1, 3, seed=13), _rand(1, 3, seed=14), _rand(2, 3, seed=15)
    expected = ref_nt_xent(z1, z2, 0.5, False, neg)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.5, False, neg), _scalar(expected), **TOL)


def test_supcon_matches_reference_several_per_class():
    z = _rand(10, 6, seed=16)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 3, 1])  # label 3 is alone: skipped as an anchor
    expected = ref_supcon(z.tolist(), labels.tolist(), 0.1)
    torch.testing.assert_close(supcon_loss(z, labels, 0.1), _scalar(expected), **TOL)
    torch.testing.assert_close(SupConLoss(0.1)(z, labels), _scalar(expected), **TOL)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supcon_matches_reference_multi_view(tau):
    b, v, d = 5, 3, 4
    z = _rand(b, v, d, seed=17)
    labels = torch.tensor([2, 0, 2, 1, 0])
    rows, row_labels = [], []
    for i in range(b):
        for j in range(v):
            rows.append(z[i, j].tolist())
            row_labels.append(int(labels[i]))
    expected = ref_supcon(rows, row_labels, tau)
    torch.testing.assert_close(supcon_loss(z, labels, tau), _scalar(expected), **TOL)
    # Label 1 has a single sample, but its other views are its positives.
    assert sum(1 for y in row_labels if y == 1) == v


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("n", [2, 3, 6])
@pytest.mark.parametrize("m", [0, 5])
def test_nt_xent_identical_embeddings(n, m):
    # Every similarity equals 1/τ, so ℓ_i = log |D(i)|: 2N−1+M terms, or 2N−2+M without the positive.
    z = torch.ones(n, 4, dtype=torch.float64) * 0.7
    neg = None if m == 0 else torch.ones(m, 4, dtype=torch.float64) * 3.0
    torch.testing.assert_close(nt_xent_loss(z, z.clone(), 0.2, True, neg), _scalar(math.log(2 * n - 1 + m)), **TOL)
    torch.testing.assert_close(nt_xent_loss(z, z.clone(), 0.2, False, neg), _scalar(math.log(2 * n - 2 + m)), **TOL)


@pytest.mark.parametrize("tau", [0.25, 1.0])
def test_nt_xent_orthogonal_pairs(tau):
    # z1 = z2 = distinct one-hot rows: cos = 1 to the positive, 0 to every other view.
    n = 4
    z = torch.eye(n, 6, dtype=torch.float64) * 2.5
    standard = math.log(1.0 + (2 * n - 2) * math.exp(-1.0 / tau))
    decoupled = math.log(2 * n - 2) - 1.0 / tau
    torch.testing.assert_close(nt_xent_loss(z, z.clone(), tau, True), _scalar(standard), **TOL)
    torch.testing.assert_close(nt_xent_loss(z, z.clone(), tau, False), _scalar(decoupled), **TOL)


def test_supcon_identical_embeddings():
    # Every log-probability is −log(B−1), whatever the positive sets are.
    z = torch.full((7, 3), 0.4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    torch.testing.assert_close(supcon_loss(z, labels, 0.3), _scalar(math.log(6)), **TOL)


def test_n_pair_identical_embeddings():
    f = torch.full((5, 3), 0.2, dtype=torch.float64)
    torch.testing.assert_close(n_pair_loss(f, f.clone()), _scalar(math.log(5)), **TOL)
    # Plus λ·‖f‖² = 0.5 · 3 · 0.04.
    torch.testing.assert_close(n_pair_loss(f, f.clone(), 0.5), _scalar(math.log(5) + 0.06), **TOL)


def test_triplet_by_hand():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [1.0, 3.0]], dtype=torch.float64)  # d⁺ = 1, 4
    n = torch.tensor([[2.0, 0.0], [1.0, 2.0]], dtype=torch.float64)  # d⁻ = 4, 1
    # max(0, 1 − 4 + 1) = 0 and max(0, 4 − 1 + 1) = 4.
    torch.testing.assert_close(triplet_loss(a, p, n, 1.0), _scalar(2.0), **TOL)


def test_batch_hard_by_hand():
    # 1-D points; class 0 at {0, 1}, class 1 at {3, 7}.
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: d⁺=1, d⁻=9 → 0;  anchor 1: d⁺=1, d⁻=4 → 0 (margin 1)
    # anchor 2: d⁺=16, d⁻=4 → 13;  anchor 3: d⁺=16, d⁻=36 → 0
    torch.testing.assert_close(batch_hard_triplet_loss(x, labels, 1.0), _scalar(13.0 / 4), **TOL)


# --------------------------------------------------------------------------- gradients


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    return _rand(*shape, seed=seed).requires_grad_(True)


def _assert_useful_grad(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


def test_gradients_flow():
    a, p, n = _leaf(6, 4, seed=20), _leaf(6, 4, seed=21), _leaf(6, 4, seed=22)
    triplet_loss(a, p, n, margin=50.0).backward()
    _assert_useful_grad(a, p, n)

    x = _leaf(8, 4, seed=23)
    batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), margin=50.0).backward()
    _assert_useful_grad(x)

    f, fp = _leaf(6, 4, seed=24), _leaf(6, 4, seed=25)
    n_pair_loss(f, fp, l2_reg=0.1).backward()
    _assert_useful_grad(f, fp)

    for pid in (True, False):
        z1, z2, neg = _leaf(5, 4, seed=26), _leaf(5, 4, seed=27), _leaf(3, 4, seed=28)
        nt_xent_loss(z1, z2, 0.5, pid, neg).backward()
        _assert_useful_grad(z1, z2, neg)

    z = _leaf(4, 2, 3, seed=29)
    supcon_loss(z, torch.tensor([0, 1, 0, 2])).backward()
    _assert_useful_grad(z)


def test_supcon_gradient_finite_with_skipped_anchor():
    z = _leaf(5, 3, seed=30)
    supcon_loss(z, torch.tensor([0, 0, 1, 1, 2])).backward()
    _assert_useful_grad(z)


# --------------------------------------------------------------------------- dtypes


def test_float32_agrees_with_float64():
    cases = [
        lambda a, b, c: triplet_loss(a, b, c, 2.0),
        lambda a, b, c: batch_hard_triplet_loss(torch.cat([a, b]), torch.arange(6).repeat(2)),
        lambda a, b, c: n_pair_loss(a, b, 0.1),
        lambda a, b, c: nt_xent_loss(a, b, 0.5, True, c),
        lambda a, b, c: nt_xent_loss(a, b, 0.5, False, c),
        lambda a, b, c: supcon_loss(torch.stack([a, b], dim=1), torch.tensor([0, 1, 0, 1, 2, 2])),
    ]
    a, b, c = _rand(6, 5, seed=31), _rand(6, 5, seed=32), _rand(6, 5, seed=33)
    for fn in cases:
        want = fn(a, b, c)
        got = fn(a.float(), b.float(), c.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_bfloat16_runs():
    a, b = _rand(6, 5, seed=31).bfloat16(), _rand(6, 5, seed=32).bfloat16()
    for loss in (nt_xent_loss(a, b), supcon_loss(torch.cat([a, b]), torch.arange(6).repeat(2)), n_pair_loss(a, b)):
        assert loss.dtype == torch.bfloat16 and torch.isfinite(loss)


# --------------------------------------------------------------------------- bad input


X = torch.zeros(4, 3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: triplet_loss(X[0], X[0], X[0]),
        lambda: triplet_loss(X, X[:3], X),
        lambda: triplet_loss(X, X, torch.zeros(4, 2)),
        lambda: triplet_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3)),
        lambda: triplet_loss(X.long(), X.long(), X.long()),
        lambda: batch_hard_triplet_loss(X, torch.tensor([0, 0, 1])),
        lambda: batch_hard_triplet_loss(X, torch.tensor([[0, 0, 1, 1]])),
        lambda: batch_hard_triplet_loss(torch.zeros(4, 3, 1), torch.tensor([0, 0, 1, 1])),
        lambda: batch_hard_triplet_loss(torch.randn(4, 3), torch.tensor([0, 0, 0, 0])),  # no negative
        lambda: batch_hard_triplet_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3])),  # no positive
        lambda: n_pair_loss(X, torch.zeros(4, 2)),
        lambda: n_pair_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)),
        lambda: nt_xent_loss(X, torch.zeros(3, 3)),
        lambda: nt_xent_loss(X[0], X[0]),
        lambda: nt_xent_loss(X, X, negatives=torch.zeros(5, 2)),
        lambda: nt_xent_loss(X, X, negatives=torch.zeros(5)),
        lambda: nt_xent_loss(torch.zeros(1, 3), torch.zeros(1, 3), positive_in_denominator=False),
        lambda: supcon_loss(X, torch.tensor([0, 0, 1])),
        lambda: supcon_loss(torch.zeros(4, 2, 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])),
        lambda: supcon_loss(torch.zeros(2, 2, 2, 2), torch.tensor([0, 0])),
        lambda: supcon_loss(X[0], torch.tensor([0])),
        lambda: supcon_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3])),  # no anchor has a positive
        lambda: TripletLoss()(X, X),  # plain triplet needs a negative
        lambda: TripletLoss()(X, X, X, labels=torch.arange(4)),
        lambda: TripletLoss(batch_hard=True)(X, X, X),
        lambda: TripletLoss(batch_hard=True)(X, X[:2]),
        lambda: TripletLoss(batch_hard=True)(X, X, labels=torch.arange(8)),
    ],
)
def test_bad_shapes_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_shape_error_message_says_what_came_in():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 3\)"):
        nt_xent_loss(X, torch.zeros(3, 3))


@pytest.mark.parametrize(
    "call",
    [
        lambda: TripletLoss(margin=-0.1),
        lambda: TripletLoss(margin=float("nan")),
        lambda: NPairLoss(l2_reg=-1.0),
        lambda: NTXentLoss(temperature=0.0),
        lambda: NTXentLoss(temperature=-0.5),
        lambda: NTXentLoss(temperature=float("nan")),
        lambda: NTXentLoss(temperature=float("inf")),
        lambda: SupConLoss(temperature=0.0),
        lambda: SupConLoss(temperature=-1.0),
        lambda: triplet_loss(X, X, X, margin=-1.0),
        lambda: batch_hard_triplet_loss(X, torch.tensor([0, 0, 1, 1]), margin=-1.0),
        lambda: n_pair_loss(X, X, l2_reg=-0.5),
        lambda: nt_xent_loss(X, X, temperature=0.0),
        lambda: supcon_loss(X, torch.tensor([0, 0, 1, 1]), temperature=-0.1),
    ],
)
def test_bad_hyper_parameters_raise(call):
    with pytest.raises(ConfigError, match=r"must be"):
        call()
    assert issubclass(ConfigError, ValueError)


def test_modules_have_no_state():
    for module in (TripletLoss(), TripletLoss(batch_hard=True), NPairLoss(), NTXentLoss(), SupConLoss()):
        assert list(module.parameters()) == [] and list(module.buffers()) == []
        assert "=" in repr(module)
