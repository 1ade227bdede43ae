"""Time-contrastive learning: the R3M loss against a slow loop, the frame sampler's rule
over many draws, and the method through the one trainer (and evaluate) on moving shapes."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot import api
from fewshot.config import load_config
from fewshot.data.sequences import moving_shapes
from fewshot.errors import ConfigError
from fewshot.methods import build_method
from fewshot.methods.time_contrastive import TimeContrastive, sample_frame_triplets
from fewshot.objectives.contrastive import time_contrastive_loss
from fewshot.train.trainer import pretrain

# ----------------------------------------------------------------------------- the loss


def slow_time_contrastive(anchor, positive, negatives, temperature, cross_sequence, l2_reg) -> float:
    """R3M eq. 1 written out term by term in float64 Python arithmetic."""
    a, p = anchor.double().tolist(), positive.double().tolist()
    n = [] if negatives is None else negatives.double().tolist()
    b = len(a)

    def sim(u, v):
        return -sum((x - y) ** 2 for x, y in zip(u, v)) / temperature

    total = 0.0
    for i in range(b):
        num = math.exp(sim(a[i], p[i]))
        den = num
        for neg in (n[i] if n else []):
            den += math.exp(sim(a[i], neg))
        if cross_sequence:
            for j in range(b):
                if j != i:
                    den += math.exp(sim(a[i], a[j]))
        total += -math.log(num / den)
    reg = sum(sum(x * x for x in row) for row in a + p) / (2 * b)
    return total / b + l2_reg * reg


@pytest.mark.parametrize(
    "b,m,tau,cross,l2",
    [(5, 2, 1.0, True, 0.0), (4, 1, 0.5, False, 0.0), (3, 0, 2.0, True, 0.1), (6, 3, 0.7, True, 1e-2), (1, 2, 1.0, True, 0.0)],
)
def test_loss_matches_slow_loop(b, m, tau, cross, l2) -> None:
    g = torch.Generator().manual_seed(b * 10 + m)
    anchor = torch.randn(b, 4, generator=g) * 0.7
    positive = anchor + 0.3 * torch.randn(b, 4, generator=g)
    negatives = torch.randn(b, m, 4, generator=g) if m else None
    got = time_contrastive_loss(anchor, positive, negatives, tau, cross, l2)
    assert got.item() == pytest.approx(slow_time_contrastive(anchor, positive, negatives, tau, cross, l2), rel=1e-5, abs=1e-6)


def test_loss_closed_forms() -> None:
    """Positive on the anchor and every negative at squared distance d: ℓ = log(1 + K·e^{−d/τ})."""
    anchor = torch.zeros(1, 3)
    negatives = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, math.sqrt(2)]]])  # both at ‖·‖² = 2
    got = time_contrastive_loss(anchor, anchor.clone(), negatives, temperature=0.5)
    assert got.item() == pytest.approx(math.log(1 + 2 * math.exp(-2 / 0.5)), rel=1e-5)
    # A negative as close as the positive gives log 2 whatever the scale.
    far = torch.full((1, 3), 5.0)
    assert time_contrastive_loss(anchor, far, far[:, None]).item() == pytest.approx(math.log(2), rel=1e-6)


def test_loss_rejects_bad_inputs() -> None:
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="at least one negative"):
        time_contrastive_loss(a, a, None, cross_sequence=False)
    with pytest.raises(ValueError, match="at least one negative"):
        time_contrastive_loss(a[:1], a[:1])
    with pytest.raises(ValueError, match=r"\(3, M, 4\)"):
        time_contrastive_loss(a, a, torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="same shape"):
        time_contrastive_loss(a, a[:2])
    with pytest.raises(ConfigError, match="temperature"):
        time_contrastive_loss(a, a, temperature=0.0)


# ----------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("frames,window,gap", [(16, 2, 4), (5, 2, 4), (8, 3, 1), (30, 6, 10), (3, 1, 1)])
def test_sampler_keeps_its_rule_over_many_draws(frames, window, gap) -> None:
    a, p, n = sample_frame_triplets(20_000, frames, window, gap, torch.Generator().manual_seed(0))
    d_pos, d_neg = (p - a).abs(), (n - a).abs()
    for idx in (a, p, n):
        assert idx.dtype == torch.long and idx.min() >= 0 and idx.max() <= frames - 1
    assert d_pos.min() >= 1 and d_pos.max() <= window  # positives within the window
    assert (d_neg >= gap).all() and (d_neg > d_pos).all()  # negatives past the gap and farther than the positive
    assert (torch.sign(p - a) == torch.sign(n - a)).all()  # one side of the anchor
    # Every allowed offset is drawn, and negatives come after the anchor about as often as before.
    assert set(d_pos.tolist()) == set(range(1, window + 1))
    after = (n > a).double().mean().item()
    assert 0.47 < after < 0.53
    assert set(d_neg.tolist()) == set(range(max(gap, 2), frames))


def test_sampler_is_deterministic_and_checks_length() -> None:
    draw = lambda seed: torch.stack(sample_frame_triplets(64, 12, 2, 4, torch.Generator().manual_seed(seed)))  # noqa: E731
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    with pytest.raises(ConfigError, match="at least 5 frames"):
        sample_frame_triplets(4, 4, 2, 4, torch.Generator())
    with pytest.raises(ConfigError, match="at least 7 frames"):
        sample_frame_triplets(4, 6, 5, 2, torch.Generator())


# ----------------------------------------------------------------------------- the method

TINY = ["data.source=moving-shapes", "data.sequences=40", "data.frames=8", "data.image_size=16", "method=time-contrastive",
        "views=none", "train.steps=5", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1",
        "train.checkpoint_every=5", "method.projection_hidden=32", "method.projection_dim=16", "encoder.options={width: 8}",
        "method.temperature=1.0", "method.l2_reg=1e-3"]


def test_method_picks_the_sampled_frames() -> None:
    """The loss the method returns is the TCN loss of the frames the sampler picks (same generator state)."""
    cfg = load_config(overrides=TINY)
    method = build_method(cfg).eval()
    assert isinstance(method, TimeContrastive) and method.views_per_sample == 3
    seqs = moving_shapes(6, 8, 16, seed=5).frames
    loss, _ = method({"frames": seqs}, torch.Generator().manual_seed(9))
    a, p, n = sample_frame_triplets(6, 8, 2, 4, torch.Generator().manual_seed(9))
    rows = torch.arange(6)
    embed = lambda idx: method.projector(method.encoder(seqs[rows, idx]))  # noqa: E731
    expected = time_contrastive_loss(embed(a), embed(p), embed(n)[:, None], 1.0, True, 1e-3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="sequences"):
        method({"frames": seqs[:, 0]}, torch.Generator())


def test_trains_through_the_trainer_and_evaluates(tmp_path) -> None:
    cfg = load_config(overrides=[*TINY, f"out={tmp_path}", "name=tc", "views=characters"])
    data = moving_shapes(20, 8, 16, seed=0)
    result = pretrain(cfg, data, progress=False)
    assert result.step == 5 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[0]["views_per_s"] > 0
    # The API's path: moving-shapes run data, then evaluate on the held-out shapes' middle frames.
    run = api.pretrain(load_config(overrides=[*TINY, f"out={tmp_path}", "name=api"]), progress=False)
    report = api.evaluate_run(run.run_dir, ["eval.episodes=10", "eval.shots=[1]", "eval.queries=2",
                                            "eval.probe_fractions=[]", "eval.classifiers=[proto-cosine]"])
    assert {r["encoder"] for r in report.results} == {"pixels", "random", "pretrained"}
    assert all(r["way"] == 5 and 0 <= r["accuracy"] <= 1 for r in report.results)


def test_short_sequences_are_a_config_error(tmp_path) -> None:
    cfg = load_config(overrides=[*TINY, f"out={tmp_path}", "name=short", "method.negative_gap=9"])
    with pytest.raises(ConfigError, match="too short"):
        pretrain(cfg, moving_shapes(16, 8, 16), progress=False)
