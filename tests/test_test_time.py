"""Test-time options: CSLS against its formula, the one-to-one assignment against all permutations,
TTA with identity views, and the evaluator keeping these rows apart (transductive flagged)."""

import itertools

import numpy as np
import pytest
import torch

from fewshot.config import load_config
from fewshot.evaluate.evaluator import evaluate, random_encoder
from fewshot.evaluate.test_time import csls_scores, hungarian_predict, predict, tta_embed


def test_csls_equals_its_formula():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in p] for a in q])
    k = 3
    r_q = [np.mean(sorted(cos[:, c])[-k:]) for c in range(5)]
    r_p = [np.mean(sorted(cos[i])[-k:]) for i in range(6)]
    expected = np.array([[2 * cos[i, c] - r_p[i] - r_q[c] for c in range(5)] for i in range(6)])
    np.testing.assert_allclose(csls_scores(q, p, k), expected, rtol=1e-12)


def test_hub_correction_demotes_a_hub():
    protos = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.6, 0.6]])  # the third is near everything
    queries = np.array([[1.0, 0.1, 0.9], [0.1, 1.0, 0.9], [0.2, 0.2, 1.0]])  # truths 0, 1, 2
    assert predict("cosine", queries, protos).tolist() == [2, 2, 2]
    assert predict("hub", queries, protos).tolist() == [0, 1, 2]


def test_hungarian_is_the_best_permutation():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 4))
    best = max(itertools.permutations(range(4)), key=lambda p: sum(scores[i, p[i]] for i in range(4)))
    assert hungarian_predict(scores).tolist() == list(best)
    two_each = hungarian_predict(rng.normal(size=(6, 3)), per_class=2)
    assert np.bincount(two_each).tolist() == [2, 2, 2]


def test_tta_with_identity_views_is_the_normalised_embedding():
    embed = lambda x: x.flatten(1) * 3.0  # noqa: E731
    x = torch.rand(5, 1, 4, 4)
    out = tta_embed(embed, lambda v, g: v, n=3)(x)
    torch.testing.assert_close(out, torch.nn.functional.normalize(x.flatten(1), dim=1))


def test_evaluator_reports_test_time_rows_apart(monkeypatch):
    import fewshot.evaluate.evaluator as ev
    from tests.test_evaluator import TINY, _fake_runs

    monkeypatch.setattr(ev, "load_lake_runs", lambda path, size: _fake_runs(classes=6))
    monkeypatch.setattr(ev, "resolve_data_path", lambda path, default: path)
    cfg = load_config(overrides=[*TINY, "eval.baselines=false", "eval.test_time=[tta, hub, hungarian]", "eval.tta_views=2"])
    cfg.eval.ways, cfg.eval.queries = [5], 1
    report = evaluate(cfg, random_encoder(cfg), None, lake_runs_path="fake")
    assert set(report.lake_runs) == {"pretrained", "pretrained+tta", "pretrained+hub", "pretrained+hungarian"}
    assert report.lake_runs["pretrained+hub"]["transductive"] and not report.lake_runs["pretrained+tta"]["transductive"]
    assert report.to_json()["lake_runs"]["encoder"] == "pretrained"  # the headline stays inductive
    flags = {r["encoder"]: r.get("transductive", False) for r in report.results}
    assert flags == {"pretrained": False, "pretrained+tta": False, "pretrained+hub": True, "pretrained+hungarian": True}
