"""In-context regression: the closed forms against numpy / scikit-learn / autograd, the one-step error
formula against Monte Carlo, the seeded prompt generator and its curriculum, causality of every prompt
model (with a leaking variant that must fail), and one linear self-attention layer trained through the
one trainer until it predicts like one gradient step (von Oswald et al. 2023)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor

from fewshot.config import load_config
from fewshot.data.tasks import Curriculum, LinearRegressionTasks, regression_tasks, truncate_prompts
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.regression import (
    best_step,
    error_curves,
    gradient_step,
    gradient_step_error,
    least_squares,
    nearest_neighbors,
    prefix_predictions,
    ridge,
)
from fewshot.methods import build_method
from fewshot.methods.in_context import InterleavedRegressor, LinearSelfAttention, pair_tokens

REGRESSION = ["data.source=linear-regression", "method=icl-regression"]


def _prompts(b: int, k: int, d: int, m: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, d, generator=g), torch.randn(b, k, generator=g), torch.randn(b, m, d, generator=g)


# --------------------------------------------------------------------------- closed forms against references

@pytest.mark.parametrize("k", [3, 6, 12])  # fewer, as many and more pairs than dimensions
def test_least_squares_is_numpys_minimum_norm_lstsq(k):
    xs, ys, query = _prompts(4, k, 6)
    got = least_squares(xs, ys, query)
    for b in range(4):
        w = np.linalg.lstsq(xs[b].double().numpy(), ys[b].double().numpy(), rcond=None)[0]
        np.testing.assert_allclose(got[b].numpy(), query[b].double().numpy() @ w, atol=1e-5)


def test_the_lstsq_comparison_tells_minimum_norm_from_another_interpolant():
    """Negative control: with k < d every w + (null-space vector) fits the support exactly; such a
    predictor is not numpy's minimum-norm solution, and the comparison above must see it."""
    xs, ys, query = _prompts(1, 3, 6)
    w = torch.linalg.pinv(xs[0].double()) @ ys[0].double()
    null = torch.linalg.svd(xs[0].double()).Vh[-1]  # xs @ null = 0
    np.testing.assert_allclose((xs[0].double() @ (w + null)).numpy(), ys[0].double().numpy(), atol=1e-9)  # still interpolates
    reference = np.linalg.lstsq(xs[0].double().numpy(), ys[0].double().numpy(), rcond=None)[0]
    assert np.abs(query[0].double().numpy() @ (w + null).numpy() - query[0].double().numpy() @ reference).max() > 1e-2


@pytest.mark.parametrize("k", [2, 6, 12])
@pytest.mark.parametrize("lam", [0.01, 0.25, 3.0])
def test_ridge_is_scikit_learns_ridge_without_intercept(k, lam):
    xs, ys, query = _prompts(3, k, 6)
    got = ridge(lam)(xs, ys, query)
    for b in range(3):
        ref = Ridge(alpha=lam, fit_intercept=False, solver="svd").fit(xs[b].double().numpy(), ys[b].double().numpy())
        np.testing.assert_allclose(got[b].numpy(), ref.predict(query[b].double().numpy()), atol=1e-5)
    # and λ matters: another λ is not the same fit
    other = Ridge(alpha=lam * 10, fit_intercept=False).fit(xs[0].double().numpy(), ys[0].double().numpy())
    assert np.abs(got[0].numpy() - other.predict(query[0].double().numpy())).max() > 1e-3


@pytest.mark.parametrize("k", [1, 2, 3, 9])  # k < 3: every support point is a neighbour, as in Garg et al.
def test_three_nn_is_scikit_learns_kneighborsregressor(k):
    xs, ys, query = _prompts(3, k, 4, m=7)
    got = nearest_neighbors(3)(xs, ys, query)
    for b in range(3):
        ref = KNeighborsRegressor(n_neighbors=min(3, k), algorithm="brute").fit(xs[b].double().numpy(), ys[b].double().numpy())
        np.testing.assert_allclose(got[b].numpy(), ref.predict(query[b].double().numpy()), atol=1e-5)
    if k > 3:  # negative control: 1-NN is another predictor, and the comparison sees it
        one = nearest_neighbors(1)(xs, ys, query)
        ref = KNeighborsRegressor(n_neighbors=3, algorithm="brute").fit(xs[0].double().numpy(), ys[0].double().numpy())
        assert np.abs(one[0].numpy() - ref.predict(query[0].double().numpy())).max() > 1e-2


@pytest.mark.parametrize("eta", [None, 1.0, 0.3])
def test_gradient_step_is_one_autograd_step_from_zero(eta):
    xs, ys, query = _prompts(3, 7, 5)
    got = gradient_step(eta)(xs, ys, query)
    step = best_step(7, 5) if eta is None else eta
    for b in range(3):
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        loss = 0.5 * ((xs[b].double() @ w - ys[b].double()) ** 2).mean()  # (1/2k) Σ (w·x − y)²
        (grad,) = torch.autograd.grad(loss, w)
        torch.testing.assert_close(got[b].double(), query[b].double() @ (-step * grad), atol=1e-5, rtol=0)


def test_prefix_predictions_read_only_the_pairs_before():
    xs, ys, _ = _prompts(2, 6, 3)
    pred = prefix_predictions(least_squares, xs, ys)
    assert torch.equal(pred[:, 0], torch.zeros(2))  # no pair: the prior mean
    torch.testing.assert_close(pred[:, 4], least_squares(xs[:, :4], ys[:, :4], xs[:, 4:5])[:, 0])


def test_baselines_refuse_mismatched_shapes():
    xs, ys, query = _prompts(2, 4, 3)
    with pytest.raises(ValueError, match=r"expected support xs \(B, k, d\)"):
        least_squares(xs, ys, query[..., :2])
    with pytest.raises(ValueError, match="λ > 0"):
        ridge(0.0)


# --------------------------------------------------------------------------- the one-step error formula

@pytest.mark.parametrize("eta, noise", [(None, 0.0), (1.0, 0.0), (None, 0.5), (0.3, 0.5)])
def test_gradient_step_error_formula_matches_monte_carlo(eta, noise):
    d, k, n = 5, 8, 20000
    g = torch.Generator().manual_seed(3)
    xs, ws = torch.randn(n, k + 1, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    ys = torch.einsum("bkd,bd->bk", xs, ws) + noise * torch.randn(n, k + 1, generator=g, dtype=torch.float64)
    pred = gradient_step(eta, noise)(xs[:, :k], ys[:, :k], xs[:, k:])[:, 0]
    err = (pred - ys[:, k]) ** 2 / d
    sem = float(err.std() / n**0.5)
    assert abs(float(err.mean()) - gradient_step_error(k, d, eta, noise)) < 4 * sem
    # negative control: the formula at another step is not within the same bound of this estimate
    other = 1.0 if eta is None else None
    assert abs(float(err.mean()) - gradient_step_error(k, d, other, noise)) > 4 * sem


def test_best_step_is_the_least_expected_error_and_averaging_is_d_plus_one_over_k():
    d, k = 10, 10
    assert best_step(k, d) == pytest.approx(10 / 21)
    assert gradient_step_error(k, d) == pytest.approx((d + 1) / (k + d + 1))  # ≈ 0.524
    assert gradient_step_error(k, d, 1.0) == pytest.approx((d + 1) / k)
    grid = np.linspace(0.05, 1.5, 300)
    assert abs(grid[np.argmin([gradient_step_error(k, d, e) for e in grid])] - best_step(k, d)) < 0.01


# --------------------------------------------------------------------------- the seeded generator

def _digest(batch) -> str:
    return hashlib.sha256(b"".join(batch[key].numpy().tobytes() for key in ("xs", "ys", "ws"))).hexdigest()[:16]


def test_same_seed_same_prompts_in_any_order_and_a_pinned_hash():
    tasks = LinearRegressionTasks(dim=3, points=4, noise=0.1, seed=7)
    a, b = tasks.batch(torch.tensor([5, 2, 9])), LinearRegressionTasks(dim=3, points=4, noise=0.1, seed=7).batch(torch.tensor([9, 5]))
    torch.testing.assert_close(a["xs"][[2, 0]], b["xs"], rtol=0, atol=0)
    torch.testing.assert_close(a["ys"][[2, 0]], b["ys"], rtol=0, atol=0)
    torch.testing.assert_close(a["ys"], torch.einsum("bkd,bd->bk", a["xs"], a["ws"]), atol=0.5, rtol=0)  # y = w·x + small noise
    assert _digest(tasks.batch(torch.arange(3))) == "d4d54adf5ddbb35d"  # same prompts on every machine
    assert _digest(LinearRegressionTasks(3, 4, 0.1, seed=8).batch(torch.arange(3))) != "d4d54adf5ddbb35d"
    evaluation = LinearRegressionTasks(3, 4, 0.1, seed=7, eval_seed=0).batch(torch.arange(3))
    assert not torch.equal(evaluation["xs"], tasks.batch(torch.arange(3))["xs"])  # evaluation prompts are not training ones


def test_a_task_pool_repeats_its_tasks_in_training_and_evaluation():
    pooled = LinearRegressionTasks(dim=3, points=2, pool=4, seed=1)
    ws = pooled.batch(torch.arange(60))["ws"]
    assert len(torch.unique(ws, dim=0)) == 4
    evaluation = LinearRegressionTasks(dim=3, points=2, pool=4, seed=1, eval_seed=5).batch(torch.arange(60))["ws"]
    assert set(map(tuple, torch.unique(evaluation, dim=0).tolist())) == set(map(tuple, torch.unique(ws, dim=0).tolist()))
    assert len(torch.unique(LinearRegressionTasks(dim=3, points=2, seed=1).batch(torch.arange(60))["ws"], dim=0)) == 60


def test_the_curriculum_follows_garg_et_al():
    c = Curriculum(dim=20, points=41, dims_start=5, points_start=11, every=2000)
    assert [c.at(s) for s in (0, 1999, 2000, 4000, 29999, 30000, 10**6)] == [
        (5, 11), (5, 11), (6, 13), (7, 15), (19, 39), (20, 41), (20, 41)]
    assert Curriculum(dim=20, points=41).at(0) == (20, 41)


def test_truncated_prompts_are_prompts_of_fewer_dimensions():
    batch = LinearRegressionTasks(dim=6, points=9, noise=0.0, seed=2).batch(torch.arange(5))
    xs, ys = truncate_prompts(batch["xs"], batch["ys"], batch["ws"], dims=4, points=7)
    assert xs.shape == (5, 7, 6) and torch.equal(xs[..., 4:], torch.zeros(5, 7, 2))
    torch.testing.assert_close(ys, torch.einsum("bkd,bd->bk", batch["xs"][:, :7, :4], batch["ws"][:, :4]))


def test_the_regression_source_is_a_registered_data_source(tmp_path):
    from fewshot.data.registry import load_run_data

    config = load_config(overrides=[*REGRESSION, "data.dim=3", "data.points=5", "data.curriculum_dims=null", "data.curriculum_points=null"])
    data = load_run_data(config.data, None, None)
    assert data.evaluation is None and data.pretrain.keys == {"xs", "ys", "ws"}
    with pytest.raises(ConfigError, match=r"data.curriculum_dims=5 starts above data.dim=3; set it to at most 3"):
        load_config(overrides=[*REGRESSION, "data.dim=3"])
    with pytest.raises(ConfigError, match="unknown config key 'data.seq_len'"):
        load_config(overrides=[*REGRESSION, "data.seq_len=4"])


# --------------------------------------------------------------------------- causality of the prompt models

def _leaks(model: torch.nn.Module, i: int = 3) -> bool:
    """Whether the prediction at position i changes when y_i (its own target) is changed."""
    torch.manual_seed(0)
    xs, ys = torch.randn(2, 6, 4), torch.randn(2, 6)
    bumped = ys.clone()
    bumped[:, i] += 5.0
    with torch.no_grad():
        a, b = model(xs, ys), model(xs, bumped)
    assert torch.equal(a[:, :i], b[:, :i])  # earlier positions never see a later pair
    assert not torch.allclose(a[:, i + 1 :], b[:, i + 1 :])  # later positions do read y_i
    return not torch.equal(a[:, i], b[:, i])


@pytest.mark.parametrize("make", [
    lambda causal: InterleavedRegressor(4, 6, "transformer", width=16, depth=2, heads=2, causal=causal),
    lambda causal: InterleavedRegressor(4, 6, "transformer", width=16, depth=2, heads=2, causal=causal, slot_embedding=True),
    lambda causal: InterleavedRegressor(4, 6, "transformer", width=16, depth=2, heads=2, causal=causal, tokens="paired"),
    lambda causal: LinearSelfAttention(4, causal=causal),
], ids=["transformer", "transformer-with-slots", "transformer-paired", "linear-attention"])
def test_a_prediction_never_sees_its_own_target_and_a_leaking_variant_does(make):
    assert not _leaks(make(True))
    torch.manual_seed(1)
    leaky = make(False)
    with torch.no_grad():
        a = leaky(torch.ones(1, 6, 4), torch.zeros(1, 6))
        b = leaky(torch.ones(1, 6, 4), torch.tensor([[0, 0, 0, 5.0, 0, 0]]))
    assert not torch.equal(a[:, 3], b[:, 3])  # negative control: without the mask, y_i reaches ŷ_i


@pytest.mark.parametrize("tokens", ["interleaved", "paired"])
def test_the_lstm_never_sees_its_own_target(tokens):
    assert not _leaks(InterleavedRegressor(4, 6, "lstm", width=8, depth=1, tokens=tokens))


def test_paired_tokens_hold_each_input_beside_the_previous_label():
    xs, ys = torch.randn(2, 3, 4), torch.randn(2, 3)
    tokens = pair_tokens(xs, ys)
    for i in range(3):  # loop transcription of (x_i, y_{i−1}, [i = 1])
        previous = ys[:, i - 1] if i else torch.zeros(2)
        torch.testing.assert_close(tokens[:, i], torch.cat([xs[:, i], previous[:, None], torch.full((2, 1), float(i == 0))], dim=1))


# --------------------------------------------------------------------------- the method and its recipe

def test_the_method_refuses_other_data_foreign_sizes_and_an_empty_loss():
    with pytest.raises(ConfigError, match="set data.source=linear-regression"):
        build_method(load_config(overrides=["method=icl-regression"]))
    with pytest.raises(ConfigError, match="backbone=linear-attention has no width"):
        build_method(load_config(overrides=[*REGRESSION, "method.backbone=linear-attention", "method.width=8"]))
    with pytest.raises(ConfigError, match="backbone=lstm has no heads"):
        build_method(load_config(overrides=[*REGRESSION, "method.backbone=lstm", "method.heads=2"]))
    with pytest.raises(ConfigError, match="leave encoder.* at its defaults"):
        build_method(load_config(overrides=[*REGRESSION, "encoder=vit-tiny"]))
    with pytest.raises(ConfigError, match="slot_embedding is an option of interleaved transformer tokens"):
        build_method(load_config(overrides=[*REGRESSION, "method.backbone=lstm", "method.slot_embedding=true"]))
    with pytest.raises(ConfigError, match="slot_embedding is an option of interleaved transformer tokens"):
        build_method(load_config(overrides=[*REGRESSION, "method.tokens=paired", "method.slot_embedding=true"]))
    with pytest.raises(ConfigError, match="method.tokens is not an option of backbone=linear-attention"):
        build_method(load_config(overrides=[*REGRESSION, "method.backbone=linear-attention", "method.tokens=paired"]))
    with pytest.raises(ConfigError, match="min_context=11 leaves no position"):
        build_method(load_config(overrides=[*REGRESSION, "method.min_context=11"]))


def _tiny(tmp_path, name, *overrides):
    return load_config(overrides=[
        *REGRESSION, f"out={tmp_path}", f"name={name}", "data.dim=4", "data.points=9", "data.curriculum_dims=2",
        "data.curriculum_points=5", "data.curriculum_every=2", "method.width=16", "method.depth=1", "method.heads=2",
        "train.steps=6", "train.batch_size=8", "train.warmup_steps=1", "train.checkpoint_every=3", "train.channels_last=false", "train.log_every=1",
        *overrides])


def test_the_curriculum_grows_with_the_step_and_survives_a_resume(tmp_path, monkeypatch):
    from conftest import resume_problems

    from fewshot import api

    result = api.pretrain(_tiny(tmp_path, "grow"), progress=False)
    assert [(h["step"], h["dims"], h["points"]) for h in result.history] == [(s, 2 + (s - 1) // 2, 5 + 2 * ((s - 1) // 2)) for s in range(1, 7)]
    assert resume_problems(monkeypatch, lambda name: _tiny(tmp_path, name)) == []


def test_a_curriculum_step_left_out_of_the_checkpoint_breaks_the_resume(tmp_path, monkeypatch):
    """Negative control for the test above: when the step is not checkpointed, a resumed run starts its
    curriculum again from step 0, and the resume check must see it."""
    from conftest import resume_problems

    from fewshot.methods.in_context import ICLRegression

    real_init = ICLRegression.__init__

    def forgetful(self, config):
        real_init(self, config)
        del self.step
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)

    monkeypatch.setattr(ICLRegression, "__init__", forgetful)
    assert resume_problems(monkeypatch, lambda name: _tiny(tmp_path, name)) != []


def test_linear_self_attention_learns_one_gradient_step(tmp_path):
    """von Oswald et al. 2023: one linear self-attention layer trained on d = k = 10 prompts reaches the
    error of one gradient step at η* = k/(k+d+1), (d+1)/(k+d+1) ≈ 0.524, and predicts like it."""
    from fewshot import api
    from fewshot.run import Run

    d = k = 10
    config = load_config(overrides=[
        *REGRESSION, f"out={tmp_path}", "name=lsa", f"data.dim={d}", f"data.points={k + 1}", "data.curriculum_dims=null",
        "data.curriculum_points=null", "method.backbone=linear-attention", f"method.min_context={k}", "train.steps=400",
        "train.batch_size=128", "train.lr=0.01", "train.warmup_steps=20", "train.weight_decay=0", "train.channels_last=false",
        "train.checkpoint_every=400"])
    api.pretrain(config, progress=False)
    model = Run.open(tmp_path / "lsa").encoder()
    batch = regression_tasks(config.data, eval_seed=0).prompts_for(10000)
    xs, ys = batch["xs"], batch["ys"]
    with torch.no_grad():
        pred = model(xs, ys)[:, k].double()
    error = float(((pred - ys[:, k].double()) ** 2).mean() / d)
    assert abs(error - (d + 1) / (k + d + 1)) < 0.03

    def cosine(a: torch.Tensor) -> float:
        gd = gradient_step(None)(xs[:, :k], ys[:, :k], xs[:, k:])[:, 0].double()
        return float(torch.nn.functional.cosine_similarity(a.double(), gd, dim=0))

    assert cosine(pred) >= 0.99
    # negative controls: the untrained layer and least squares (another learner) fail the bound
    torch.manual_seed(0)
    with torch.no_grad():
        assert cosine(LinearSelfAttention(d)(xs, ys)[:, k]) < 0.99
    assert cosine(least_squares(xs[:, :k], ys[:, :k], xs[:, k:])[:, 0]) < 0.99
    averaging = float(((gradient_step(1.0)(xs[:, :k], ys[:, :k], xs[:, k:])[:, 0] - ys[:, k]) ** 2).mean() / d)
    assert abs(averaging - (d + 1) / (k + d + 1)) > 0.03  # and the error bound tells η = 1 from η*


# --------------------------------------------------------------------------- fewshot icl evaluate

def test_icl_evaluate_prints_the_curves_and_writes_the_plot(tmp_path, capsys):
    from fewshot import api
    from fewshot.cli import main

    api.pretrain(_tiny(tmp_path, "run", "data.noise=0.5"), progress=False)
    assert main(["icl", "evaluate", str(tmp_path / "run"), "--prompts", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["error"]) == {"model", "least-squares", "ridge", "gd-step", "averaging", "3-nn", "zero"}
    assert [row["k"] for row in out["error"]["model"]] == list(range(9)) and out["prompts"] == 50
    assert set(out["difference"]) == set(out["error"]) - {"model"}
    assert (tmp_path / "run" / "evaluations").is_dir() and out["plot"].endswith(".png")
    # the closed forms in the table are the functions above on the same seeded prompts
    batch = regression_tasks(_tiny(tmp_path, "run", "data.noise=0.5").data, eval_seed=0).prompts_for(50)
    again = error_curves(None, batch["xs"], batch["ys"], 0.5)["error"]["least-squares"]
    assert [r["mean"] for r in again] == pytest.approx([r["mean"] for r in out["error"]["least-squares"]])
    assert main(["icl", "evaluate", str(tmp_path / "run"), "--prompts", "50"]) == 0
    assert "least-squares" in capsys.readouterr().out


def test_icl_evaluate_refuses_a_prompt_longer_than_the_context(tmp_path, capsys):
    from fewshot import api
    from fewshot.cli import main

    api.pretrain(_tiny(tmp_path, "run", "train.steps=1"), progress=False)
    assert main(["icl", "evaluate", str(tmp_path / "run"), "--points", "12"]) == 2
    assert "12 points is 3 longer than the model's context of 9 points" in capsys.readouterr().err
    with pytest.raises(DataError, match="at least 2 prompts"):
        from fewshot.evaluate.regression import evaluate_regression_run

        evaluate_regression_run(tmp_path / "run", prompts=1)


# --------------------------------------------------------------------------- classification prompts (GPICL)

def _digit_tasks(**kwargs):
    from fewshot.data.sources import load_digits
    from fewshot.data.tasks import ClassificationTasks, image_features, standardise

    digits = load_digits(8)
    inputs, _, _ = standardise(image_features(digits.images))
    return ClassificationTasks(inputs, digits.labels, **{"ways": 5, "points": 12, **kwargs})


def test_classification_prompts_project_and_relabel_each_task_consistently():
    tasks = _digit_tasks(seed=4)
    assert tasks.inputs.shape == (1797, 64)
    torch.testing.assert_close(tasks.inputs.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    batch = tasks.batch(torch.tensor([3, 8]))
    assert batch["xs"].shape == (2, 12, 64) and batch["labels"].shape == (2, 12)
    for row, i in enumerate((3, 8)):
        samples, projection, order = tasks.prompt(i)
        torch.testing.assert_close(batch["xs"][row].double(), tasks.inputs[samples].double() @ torch.from_numpy(projection).T)
        source = tasks.labels[samples]
        assert set(source.tolist()) <= set(order.tolist())
        # one label per class within the prompt, and the label is the class's place in the task's order
        assert all(batch["labels"][row, j] == order.tolist().index(int(c)) for j, c in enumerate(source))
    same = _digit_tasks(seed=4).batch(torch.tensor([8, 3]))
    assert torch.equal(same["xs"], batch["xs"][[1, 0]]) and torch.equal(same["labels"], batch["labels"][[1, 0]])


def test_classification_projections_are_n_0_1_over_d_and_a_pool_repeats_its_tasks():
    fresh = _digit_tasks(seed=0)
    projections = np.stack([fresh.prompt(i)[1] for i in range(40)])
    assert abs(projections.mean()) < 0.005 and abs(projections.var() * 64 - 1) < 0.03  # A_ij ~ N(0, 1/d)
    assert len({p.tobytes() for p in projections}) == 40  # a fresh task per prompt
    pooled = _digit_tasks(seed=0, pool=4)
    tasks = {(pooled.prompt(i)[1].tobytes(), pooled.prompt(i)[2].tobytes()) for i in range(60)}
    assert len(tasks) == 4  # 2^p tasks with p = 2, and their label orders go with them
    with pytest.raises(DataError, match="11-way tasks need 11 classes; the set has 10"):
        _digit_tasks(ways=11)
