"""Viewmaker views: the L1 distortion budget, the gradient reversal (checked against the same
loss computed without it), noise, and training + checkpoint/resume through the one trainer."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot import api
from fewshot.data.views.viewmaker import ViewmakerViews, l1_sphere
from fewshot.data.views import VIEW_RECIPES, make_views
from fewshot.errors import ConfigError
from fewshot.train.checkpoint import load_checkpoint
from conftest import resume_problems


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _viewmaker(c: int = 1, **opts) -> ViewmakerViews:
    torch.manual_seed(0)
    return make_views("viewmaker", 12, c, **{"width": 8, "depth": 2, **opts})


@pytest.mark.parametrize("c,budget", [(1, 0.05), (3, 0.05), (1, 0.2)])
def test_perturbation_lies_on_the_l1_sphere(c, budget) -> None:
    vm = _viewmaker(c, budget=budget)
    x = torch.rand(5, c, 12, 12, generator=gen(1))
    delta = vm.perturbation(x, gen(2))
    assert delta.shape == x.shape
    assert torch.allclose(delta.abs().sum(dim=(1, 2, 3)), torch.full((5,), budget * c * 12 * 12), rtol=1e-5)
    # The view is x + δ clamped to [0, 1], so it changes each image by at most the budget on average.
    view = vm(x, gen(2))
    assert torch.allclose(view, (x + delta).clamp(0, 1))
    assert ((view - x).abs().mean(dim=(1, 2, 3)) <= budget + 1e-6).all()


def test_l1_sphere_projection() -> None:
    t = torch.tensor([[[1.0, -3.0]], [[0.0, 0.0]]])
    out = l1_sphere(t, 0.5)  # budget 0.5 × 2 elements = L1 norm 1
    assert torch.allclose(out[0], torch.tensor([[0.25, -0.75]])) and torch.equal(out[1], torch.zeros(1, 2))


def test_two_views_of_one_image_differ_and_the_generator_decides() -> None:
    vm = _viewmaker()
    x = torch.rand(4, 1, 12, 12, generator=gen(3))
    v1, v2 = vm.two_views(x, gen(4))
    assert (v1 - v2).abs().flatten(1).sum(dim=1).min() > 0.1  # fresh noise per view
    w1, w2 = vm.two_views(x, gen(4))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_gradient_reversal_negates_the_viewmakers_gradients() -> None:
    """d loss(view)/dθ through the recipe = −(the same loss built from clamp(x + δ) without reversal)."""
    vm = _viewmaker(width=6)
    torch.manual_seed(1)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 100, 8))
    x = torch.rand(6, 1, 12, 12, generator=gen(5))

    def loss_of(views: torch.Tensor) -> torch.Tensor:
        z1, z2 = encoder(views).chunk(2)
        return ((z1 - z2) ** 2).sum() + encoder(views).pow(2).mean()

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        params = list(vm.parameters()) + list(encoder.parameters())
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    reversed_ = grads(loss_of(vm(torch.cat([x, x]), gen(6))))
    plain = grads(loss_of((torch.cat([x, x]) + vm.perturbation(torch.cat([x, x]), gen(6))).clamp(0, 1)))
    n_vm = len(list(vm.parameters()))
    assert n_vm > 0 and any(g.abs().sum() > 0 for g in plain[:n_vm])
    for r, p in zip(reversed_[:n_vm], plain[:n_vm]):
        torch.testing.assert_close(r, -p)
    for r, p in zip(reversed_[n_vm:], plain[n_vm:]):  # the encoder's own gradients are untouched
        torch.testing.assert_close(r, p)


@pytest.mark.parametrize(
    "opts,match",
    [({"budget": 0}, "budget"), ({"noise": 0}, "noise"), ({"depth": -1}, "depth"), ({"strength": 1}, "unknown option")],
)
def test_bad_options_are_config_errors(opts, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_views("viewmaker", 12, 1, **opts)


def test_registered() -> None:
    assert "viewmaker" in VIEW_RECIPES
    with pytest.raises(ValueError, match="3-channel"):
        make_views("viewmaker", 12, 3)(torch.rand(2, 1, 12, 12), gen())


# ----------------------------------------------------------------------------- through the trainer

TINY = ["data.image_size=16", "train.steps=6", "train.batch_size=32", "train.checkpoint_every=3", "train.log_every=1",
        "train.warmup_steps=2", "method.projection_hidden=32", "method.projection_dim=16", "encoder.options={width: 8}",
        "views=viewmaker", "views.options={width: 8, depth: 1, budget: 0.1}"]


def _config(tmp_path, name, *extra):
    return api.load_config(overrides=[f"out={tmp_path}", f"name={name}", *TINY, *extra])


@pytest.mark.parametrize("method", [[], ["method=byol", "method.predictor_hidden=32"]], ids=["simclr", "byol"])
def test_viewmaker_trains_checkpoints_and_resumes(tmp_path, monkeypatch, method) -> None:
    # Resume runs only the 3 steps left, from the checkpoint (an altered one changes the result): tests/conftest.py.
    assert resume_problems(monkeypatch, lambda name: _config(tmp_path, name, *method)) == []
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors")
    assert full.step == 6 and all(math.isfinite(h["loss"]) for h in full.meta["history"])
    weights = full.prefixed("model")
    views = {k: v for k, v in weights.items() if k.startswith("views.")}
    assert views and "views.head.weight" in views
    # The optimizer moved the viewmaker: its weights differ from the same seed's initial ones.
    torch.manual_seed(0)
    from fewshot.methods import build_method

    initial = build_method(_config(tmp_path, "init", *method)).state_dict()
    assert not torch.equal(initial["views.head.weight"], views["views.head.weight"])
