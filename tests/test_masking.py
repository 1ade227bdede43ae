"""Tests for fewshot.data.masking.

Statistical checks use >= 1e5 Bernoulli trials and a tolerance of 5 binomial standard
errors, sqrt(p (1 - p) / n): a correct implementation fails such a check with probability
< 1e-6, and the draws are seeded, so the tests are deterministic anyway.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.data.masking import (
    IGNORE_INDEX,
    bert_mask,
    causal_targets,
    mae_shuffle,
    mask_patches,
    patchify,
    random_mask,
    span_mask,
    unpatchify,
)
from fewshot.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def five_se(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- BERT

VOCAB = 1000
MASK_ID = 3
CLS, PAD = 0, 1


def _tokens(b: int = 500, length: int = 400, seed: int = 1) -> torch.Tensor:
    # Ordinary ids in [4, VOCAB): never the [MASK] id nor a special id.
    return torch.randint(4, VOCAB, (b, length), generator=gen(seed))


@pytest.mark.parametrize("replace", [(0.8, 0.1, 0.1), (0.8, 0.2, 0.0)])
def test_bert_mask_statistics(replace):
    tokens = _tokens()  # 2e5 positions
    out = bert_mask(tokens, MASK_ID, VOCAB, gen(2), ratio=0.15, replace=replace)
    n = tokens.numel()
    chosen = out.mask
    frac = chosen.float().mean().item()
    assert abs(frac - 0.15) < five_se(0.15, n)  # 5 SE = 0.004

    m = int(chosen.sum())  # ~3e4 chosen positions
    inp, orig = out.inputs[chosen], tokens[chosen]
    is_mask = inp == MASK_ID
    is_same = inp == orig
    is_random = ~is_mask & ~is_same
    p_mask, p_rand, p_keep = replace
    # A random token equals the original or [MASK] with probability 1 / VOCAB each.
    expected = {
        "mask": p_mask + p_rand / VOCAB,
        "same": p_keep + p_rand / VOCAB,
        "random": p_rand * (1 - 2 / VOCAB),
    }
    measured = {"mask": is_mask, "same": is_same, "random": is_random}
    for k, e in expected.items():
        got = measured[k].float().mean().item()
        tol = max(five_se(e, m), 1e-12)
        assert abs(got - e) <= tol, (k, got, e, tol)

    # Targets: original id where chosen, ignore_index elsewhere.
    assert torch.equal(out.targets[chosen], orig)
    assert (out.targets[~chosen] == IGNORE_INDEX).all()
    # Unchosen positions are untouched.
    assert torch.equal(out.inputs[~chosen], tokens[~chosen])
    # The unchanged 10%: input == original and target == original.
    if p_keep > 0:
        keep = chosen & (out.inputs == tokens)
        assert keep.any()
        assert torch.equal(out.targets[keep], tokens[keep])
        assert torch.equal(out.inputs[keep], tokens[keep])


def test_bert_loss_only_on_masked_positions():
    tokens = _tokens(4, 32)
    out = bert_mask(tokens, MASK_ID, VOCAB, gen(0), ratio=0.5)
    logits = torch.randn(4, 32, VOCAB, requires_grad=True)
    F.cross_entropy(logits.transpose(1, 2), out.targets).backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, out.mask)


def test_bert_random_tokens_uniform():
    # replace=(0, 1, 0): every chosen position becomes a uniform random id over the whole
    # vocabulary (special ids included, the documented choice). 10 bins, ~3e4 draws.
    vocab = 10
    tokens = torch.randint(4, vocab, (500, 400), generator=gen(3))
    out = bert_mask(tokens, MASK_ID, vocab, gen(4), ratio=0.15, replace=(0.0, 1.0, 0.0))
    draws = out.inputs[out.mask]
    counts = torch.bincount(draws, minlength=vocab).float()
    n = draws.numel()
    freq = counts / n
    for f in freq.tolist():
        assert abs(f - 1 / vocab) < five_se(1 / vocab, n)  # 5 SE ~ 0.0087


def test_bert_special_ids_never_chosen():
    tokens = _tokens(500, 400, seed=5)
    tokens[:, 0] = CLS
    pad = torch.rand(tokens.shape, generator=gen(6)) < 0.3
    tokens[pad] = PAD
    out = bert_mask(tokens, MASK_ID, VOCAB, gen(7), ratio=0.5, special_ids=(CLS, PAD))
    special = (tokens == CLS) | (tokens == PAD)
    assert not out.mask[special].any()
    assert (out.targets[special] == IGNORE_INDEX).all()
    assert torch.equal(out.inputs[special], tokens[special])
    # Non-special positions are still chosen at the given rate.
    n = int((~special).sum())
    assert abs(out.mask[~special].float().mean().item() - 0.5) < five_se(0.5, n)


def test_bert_deterministic():
    tokens = _tokens(8, 64)
    a = bert_mask(tokens, MASK_ID, VOCAB, gen(9))
    b = bert_mask(tokens, MASK_ID, VOCAB, gen(9))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.mask, b.mask)


# --------------------------------------------------------------------------- random / MAE


@pytest.mark.parametrize("ratio,length", [(0.75, 196), (0.15, 50), (0.5, 7), (0.0, 10)])
def test_mae_shuffle_exact_count_and_identity(ratio, length):
    b, d = 16, 5
    ids_keep, ids_restore, mask = mae_shuffle(b, length, ratio, gen(0))
    n_mask = round(ratio * length)
    assert mask.dtype == torch.bool and mask.shape == (b, length)
    assert (mask.sum(1) == n_mask).all()
    assert ids_keep.shape == (b, length - n_mask)
    # ids_keep gathers exactly the unmasked positions.
    for r in range(b):
        assert set(ids_keep[r].tolist()) == set(torch.nonzero(~mask[r]).flatten().tolist())
    # The MAE identity: pad the kept tokens back with the removed ones (or a fill value)
    # in shuffled order, and gather with ids_restore.
    x = torch.randn(b, length, d, generator=gen(1))
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    removed = torch.gather(x, 1, ids_shuffle[:, length - n_mask :].unsqueeze(-1).expand(-1, -1, d))
    restored = torch.gather(torch.cat([kept, removed], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(restored, x)
    fill = torch.zeros(b, n_mask, d)
    padded = torch.gather(torch.cat([kept, fill], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(padded[~mask], x[~mask])
    assert (padded[mask] == 0).all()


def test_random_mask_exact_count_rows_differ_and_deterministic():
    m = random_mask((64, 100), 0.3, gen(0))
    assert m.dtype == torch.bool and (m.sum(1) == 30).all()
    assert len({tuple(r.tolist()) for r in m}) == 64  # different rows, different masks
    assert torch.equal(m, random_mask((64, 100), 0.3, gen(0)))
    assert not torch.equal(m, random_mask((64, 100), 0.3, gen(1)))
    assert random_mask((2, 5), 1.0, gen(0)).all()
    _, _, a = mae_shuffle(64, 100, 0.3, gen(0))
    _, _, b = mae_shuffle(64, 100, 0.3, gen(0))
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 64


def test_mask_patches_round_trip():
    images = torch.randn(3, 3, 32, 32, generator=gen(0))
    patches = patchify(images, 8)
    out = mask_patches(patches, 0.75, gen(1))
    assert out.inputs.shape == (3, 4, 8 * 8 * 3)
    assert (out.mask.sum(1) == 12).all()
    d = patches.shape[-1]
    fill = torch.zeros(3, 12, d)
    full = torch.gather(torch.cat([out.inputs, fill], 1), 1, out.ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(full[~out.mask], patches[~out.mask])


# --------------------------------------------------------------------------- SpanBERT


def _runs(mask_row: torch.Tensor) -> list[int]:
    padded = torch.cat([torch.zeros(1), mask_row.float(), torch.zeros(1)])
    diff = padded.diff()
    starts = torch.nonzero(diff == 1).flatten()
    ends = torch.nonzero(diff == -1).flatten()
    return (ends - starts).tolist()


def test_span_mask_fraction_and_span_lengths():
    b, length, ratio, mean_span = 50, 4000, 0.15, 3.0
    tokens = _tokens(b, length)
    out = span_mask(tokens, MASK_ID, gen(0), ratio=ratio, mean_span=mean_span)
    # Budget round(0.15 * 4000) = 600 per row is met exactly (last span truncated).
    assert (out.mask.sum(1) == round(ratio * length)).all()
    assert (out.inputs[out.mask] == MASK_ID).all()
    assert torch.equal(out.inputs[~out.mask], tokens[~out.mask])
    assert torch.equal(out.targets[out.mask], tokens[out.mask])
    assert (out.targets[~out.mask] == IGNORE_INDEX).all()

    runs = [r for row in out.mask for r in _runs(row)]
    n = len(runs)  # ~1e4 spans (each run is one span: spans never touch)
    assert max(runs) <= 10
    mean_run = sum(runs) / n
    # Geometric(p = 1/3) clipped at 10 has mean (1 - (2/3)^10) * 3 = 2.948 (vs mean_span 3)
    # and sd <= sqrt(6) = 2.45 (the unclipped sd); 5 SE = 5 * 2.45 / sqrt(1e4) ~ 0.12. The
    # truncated last span of each row (1 of ~200) lowers the mean by ~1.5 / 200 ~ 0.008,
    # well inside the tolerance.
    p = 1 / mean_span
    expected = (1 - (1 - p) ** 10) / p
    tol = 5 * math.sqrt((1 - p) / p**2) / math.sqrt(n)
    assert abs(mean_run - expected) < tol, (mean_run, expected, tol)
    assert abs(mean_run - mean_span) < 0.2


def test_span_mask_specials_and_determinism():
    tokens = _tokens(20, 300)
    tokens[:, 0] = CLS
    tokens[:, -20:] = PAD
    a = span_mask(tokens, MASK_ID, gen(3), ratio=0.3, special_ids=(CLS, PAD))
    b = span_mask(tokens, MASK_ID, gen(3), ratio=0.3, special_ids=(CLS, PAD))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.inputs, b.inputs)
    special = (tokens == CLS) | (tokens == PAD)
    assert not a.mask[special].any()
    assert (a.mask.sum(1) == round(0.3 * 279)).all()


# --------------------------------------------------------------------------- causal


def test_causal_targets_shift_by_one():
    tokens = _tokens(4, 9)
    out = causal_targets(tokens)
    assert out.inputs.shape == out.targets.shape == out.mask.shape == (4, 8)
    assert out.mask.all()
    for b in range(4):
        for t in range(8):
            assert out.inputs[b, t] == tokens[b, t]
            assert out.targets[b, t] == tokens[b, t + 1]


def test_causal_targets_pad():
    tokens = torch.tensor([[5, 6, 7, PAD, PAD]])
    out = causal_targets(tokens, pad_id=PAD)
    assert out.targets.tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert out.mask.tolist() == [[True, True, False, False]]


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 8), ((1, 1, 12, 8), 4), ((2, 2, 6, 6), 1)])
def test_patchify_round_trip(shape, p):
    x = torch.randn(*shape, generator=gen(0))
    patches = patchify(x, p)
    b, c, h, w = shape
    assert patches.shape == (b, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, (h, w)), x)
    if h == w:
        assert torch.equal(unpatchify(patches, p), x)


def test_patchify_matches_loop():
    b, c, h, w, p = 2, 3, 4, 6, 2
    x = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    patches = patchify(x, p)
    wp = w // p
    for n in range(b):
        for i in range(h // p):
            for j in range(wp):
                expected = x[n, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
                assert torch.equal(patches[n, i * wp + j], expected)


# --------------------------------------------------------------------------- errors


def test_bad_hyper_parameters_raise_config_error():
    tokens = _tokens(2, 10)
    g = gen(0)
    bad = [
        lambda: bert_mask(tokens, MASK_ID, VOCAB, g, replace=(0.8, 0.1, 0.2)),
        lambda: bert_mask(tokens, MASK_ID, VOCAB, g, replace=(1.2, -0.2, 0.0)),
        lambda: bert_mask(tokens, MASK_ID, VOCAB, g, replace=(0.8, 0.2)),
        lambda: bert_mask(tokens, MASK_ID, VOCAB, g, ratio=1.5),
        lambda: bert_mask(tokens, MASK_ID, VOCAB, g, ratio=-0.1),
        lambda: bert_mask(tokens, VOCAB, VOCAB, g),
        lambda: bert_mask(tokens, MASK_ID, 0, g),
        lambda: span_mask(tokens, MASK_ID, g, mean_span=0.5),
        lambda: span_mask(tokens, MASK_ID, g, max_span=0),
        lambda: span_mask(tokens, MASK_ID, g, ratio=1.0),
        lambda: random_mask((2, 10), 1.1, g),
        lambda: mae_shuffle(2, 10, 1.0, g),
        lambda: mae_shuffle(2, 10, 0.96, g),  # round(9.6) = 10 removes everything
        lambda: patchify(torch.zeros(1, 1, 4, 4), 0),
    ]
    for f in bad:
        with pytest.raises(ConfigError):
            f()


def test_bad_shapes_raise_value_error():
    g = gen(0)
    with pytest.raises(ValueError):
        bert_mask(torch.zeros(10, dtype=torch.int64), MASK_ID, VOCAB, g)
    with pytest.raises(ValueError):
        bert_mask(torch.zeros(2, 10), MASK_ID, VOCAB, g)  # float ids
    with pytest.raises(ValueError):
        causal_targets(torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 1, 5, 4), 2)
    with pytest.raises(ValueError):
        unpatchify(torch.zeros(1, 3, 4), 2)  # 3 patches are not square
    with pytest.raises(ValueError):
        bert_mask(_tokens(2, 10), MASK_ID, VOCAB, object())  # not a generator
