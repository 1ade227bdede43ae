"""Episodic objectives (ProtoNet, R2-D2) against slow loops, closed forms and scikit-learn; the
protonet and r2d2 methods against the objectives called by hand; a few trainer steps each."""

import math

import pytest
import torch
from sklearn.linear_model import Ridge

from fewshot import api
from fewshot.config import load_config
from fewshot.errors import ConfigError
from fewshot.methods import build_method
from fewshot.objectives.episodic import (
    R2D2Head,
    prototypical_logits,
    prototypical_loss,
    r2d2_logits,
    r2d2_loss,
    ridge_regression_head,
)


def _episode(n=5, s=2, q=3, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s, d, generator=g, dtype=torch.float64), torch.randn(n, q, d, generator=g, dtype=torch.float64)


def _slow_proto_loss(support, query, metric, temperature):
    """Snell et al. (2017) written out: per query, per class distance to the class mean, log-softmax."""
    n, s, d = support.shape
    protos = [[sum(support[c, k, i].item() for k in range(s)) / s for i in range(d)] for c in range(n)]
    losses, hits = [], 0
    for c in range(n):
        for j in range(query.shape[1]):
            qv = query[c, j].tolist()
            logits = []
            for p in protos:
                if metric == "euclidean":
                    logits.append(-sum((a - b) ** 2 for a, b in zip(qv, p)))
                else:
                    dot = sum(a * b for a, b in zip(qv, p))
                    logits.append(dot / math.sqrt(sum(a * a for a in qv)) / math.sqrt(sum(b * b for b in p)) / temperature)
            log_z = math.log(sum(math.exp(v) for v in logits))
            losses.append(log_z - logits[c])
            hits += max(range(n), key=lambda k: logits[k]) == c
    return sum(losses) / len(losses), hits / len(losses)


@pytest.mark.parametrize("metric,temperature", [("euclidean", 1.0), ("cosine", 0.3)])
def test_prototypical_loss_matches_slow_loop(metric, temperature):
    support, query = _episode()
    loss, acc = prototypical_loss(support, query, metric, temperature)
    want_loss, want_acc = _slow_proto_loss(support, query, metric, temperature)
    assert loss.item() == pytest.approx(want_loss, rel=1e-10)
    assert acc.item() == pytest.approx(want_acc)
    assert 0 < want_acc < 1  # the episode is neither trivial nor hopeless, so accuracy is tested


def test_metrics_differ_and_cosine_ignores_scale():
    support, query = _episode()
    euclid, _ = prototypical_loss(support, query, "euclidean")
    cosine, _ = prototypical_loss(support, query, "cosine", 1.0)
    assert not torch.isclose(euclid, cosine)
    # Scaling the queries changes distances but not angles.
    assert torch.isclose(prototypical_loss(support, 3 * query, "cosine", 1.0)[0], cosine)
    assert not torch.isclose(prototypical_loss(support, 3 * query, "euclidean")[0], euclid)


def test_prototypical_rejects_bad_input():
    support, query = _episode()
    with pytest.raises(ConfigError, match="unknown prototype metric 'manhattan'"):
        prototypical_logits(support, query, "manhattan")
    with pytest.raises(ConfigError, match="temperature"):
        prototypical_logits(support, query, "cosine", 0.0)
    with pytest.raises(ValueError, match="agree on N and D"):
        prototypical_logits(support, query[:4])
    with pytest.raises(ValueError, match=r"\(N, S, D\)"):
        prototypical_logits(support[0], query)


@pytest.mark.parametrize("n,d", [(6, 10), (10, 6)], ids=["woodbury", "primal"])
def test_ridge_solution_is_the_closed_form_and_sklearn(n, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).double()
    lam = 0.7
    w = ridge_regression_head(x, y, lam)
    primal = torch.linalg.inv(x.T @ x + lam * torch.eye(d, dtype=torch.float64)) @ x.T @ y
    torch.testing.assert_close(w, primal)
    ridge = Ridge(alpha=lam, fit_intercept=False).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(w, torch.from_numpy(ridge.coef_.T.copy()))


def test_r2d2_logits_and_loss_match_sklearn_ridge():
    support, query = _episode(n=4, s=2, q=3, d=9)
    lam, scale, bias = 0.5, 4.0, 0.3
    x = support.reshape(8, 9).numpy()
    y = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4).double().numpy()
    w = torch.from_numpy(Ridge(alpha=lam, fit_intercept=False).fit(x, y).coef_.T.copy())
    want = scale * (query.reshape(12, 9) @ w) + bias
    torch.testing.assert_close(r2d2_logits(support, query, lam, scale, bias), want)
    labels = torch.arange(4).repeat_interleave(3)
    loss, acc = r2d2_loss(support, query, lam, scale, bias)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want, labels))
    assert acc.item() == pytest.approx((want.argmax(1) == labels).double().mean().item())
    # A scalar bias shifts every logit of a row alike: the loss cannot see it.
    torch.testing.assert_close(r2d2_loss(support, query, lam, scale, 5.0)[0], loss)
    # A larger λ shrinks W: with λ → ∞ every logit tends to the bias.
    assert r2d2_logits(support, query, 1e9, scale, bias).sub(bias).abs().max() < 1e-6


def test_r2d2_head_learns_lambda_and_scale():
    support, query = _episode(n=4, s=1, q=2, d=16)
    head = R2D2Head(lambda_init=2.0, scale_init=5.0).double()
    assert head.lam.item() == pytest.approx(2.0) and head.scale.item() == pytest.approx(5.0)
    loss, _ = head(support, query)
    torch.testing.assert_close(loss, r2d2_loss(support, query, 2.0, 5.0, 0.0)[0])
    loss.backward()
    for p in (head.log_lambda, head.log_scale):
        assert torch.isfinite(p.grad) and p.grad.abs() > 0
    # The gradient with respect to λ is the true one (finite differences, float64).
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: r2d2_loss(support, query, t, 3.0)[0], (lam,))


# --------------------------------------------------------------------------- methods

TINY = ["data.image_size=16", "method.projection_hidden=16", "method.projection_dim=8", "encoder.options={width: 8}",
        "train.channels_last=false"]


def _batch(n=10):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(n, dtype=torch.long)


def test_protonet_is_prototypical_loss_on_views_of_each_image():
    cfg = load_config(overrides=["method=protonet", "method.support_views=2", "method.support_is_original=false", "method.query_views=2",
                                 "method.proto_metric=cosine", "method.temperature=0.4", *TINY])
    method = build_method(cfg)
    x, y = _batch()
    loss, logs = method({"images": x, "labels": y}, torch.Generator().manual_seed(3))
    assert method.views_per_sample == 4
    # By hand: the recipe on the batch repeated 4 times gives block k = view k of every image.
    views = method.views(x.repeat(4, 1, 1, 1), torch.Generator().manual_seed(3))
    z = method.projector(method.encoder(views))
    b = x.shape[0]
    support = torch.stack([torch.stack([z[k * b + i] for k in (0, 1)]) for i in range(b)])
    query = torch.stack([torch.stack([z[k * b + i] for k in (2, 3)]) for i in range(b)])
    want, acc = prototypical_loss(support, query, "cosine", 0.4)
    torch.testing.assert_close(loss, want)
    assert logs["episode_acc"] == pytest.approx(acc.item())


def test_identical_views_make_an_easy_episode():
    """With no augmentation every query equals its own image's support: the episode is solved
    (for ridge regression once the 10 support rows can be interpolated: D = 16 ≥ 10, small λ)."""
    for name, extra in (("protonet", []), ("r2d2", ["method.projection_dim=16", "method.r2d2_lambda_init=0.001"])):
        method = build_method(load_config(overrides=[f"method={name}", "views=none", *TINY, *extra]))
        loss, logs = method(dict(zip(("images", "labels"), _batch())), torch.Generator().manual_seed(0))
        assert logs["episode_acc"] == 1.0, name


def test_support_is_original_uses_the_image_itself():
    cfg = load_config(overrides=["method=r2d2", "method.support_is_original=true", "method.query_views=2", *TINY])
    method = build_method(cfg).eval()  # eval: BatchNorm per sample, so parts can be embedded apart
    x, y = _batch()
    loss, _ = method({"images": x, "labels": y}, torch.Generator().manual_seed(4))
    embed = lambda v: method.projector(method.encoder(v))  # noqa: E731
    support = embed(x)[:, None]
    query = embed(method.views(x.repeat(2, 1, 1, 1), torch.Generator().manual_seed(4))).reshape(2, 10, -1).transpose(0, 1)
    head = method.objective
    torch.testing.assert_close(loss, r2d2_loss(support, query, head.lam, head.scale)[0])
    with pytest.raises(ConfigError, match="support_views=1"):
        build_method(load_config(overrides=["method=protonet", "method.support_is_original=true", "method.support_views=2", *TINY]))


@pytest.mark.parametrize("name", ["protonet", "r2d2"])
def test_trains_through_the_trainer(tmp_path, name):
    cfg = api.load_config(overrides=[f"out={tmp_path}", f"name={name}", f"method={name}", "data.image_size=16",
                                     "train.steps=12", "train.batch_size=32", "train.log_every=1", "train.warmup_steps=2",
                                     "train.lr=0.005", "method.projection_hidden=32", "method.projection_dim=16",
                                     "encoder.options={width: 8}"])
    result = api.pretrain(cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert all(0 <= h["episode_acc"] <= 1 for h in result.history)
    assert sum(losses[-3:]) / 3 < losses[0]
    assert result.views_per_second > 0
