"""The evaluator: baselines next to the encoder on the same episodes, Lake's pool, report files."""

import torch

from fewshot.config import load_config
from fewshot.data.lake import LakeRun
from fewshot.data.types import ImageSet
from fewshot.evaluate.evaluator import embed_images, evaluate, lake_pool, random_encoder
from fewshot.report import plot_accuracy_vs_shots, results_table

TINY = ["data.image_size=16", "encoder.options={width: 8}", "eval.episodes=30", "eval.queries=2", "eval.shots=[1]",
        "eval.probe_fractions=[]", "eval.classifiers=[proto-cosine]"]


def _fake_runs(n_runs=2, classes=6, size=16):
    g = torch.Generator().manual_seed(0)
    runs = []
    for r in range(n_runs):
        train = torch.rand(classes, 1, size, size, generator=g)
        answers = torch.randperm(classes, generator=g)
        runs.append(LakeRun(f"run{r + 1:02d}", train, train[answers] + 0.01, answers))
    return runs


def test_lake_pool_pairs_each_training_image_with_its_test_item():
    runs = _fake_runs()
    pool = lake_pool(runs)
    assert len(pool.classes) == 12 and pool.labels.bincount().tolist() == [2] * 12
    for c in range(12):
        a, b = pool.images[pool.labels == c]
        assert torch.allclose(a + 0.01, b)  # the test item is its own class's drawing


def test_same_episodes_for_every_encoder_and_the_pixel_baseline_is_pixels():
    cfg = load_config(overrides=TINY)
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 1, 16, 16, generator=g)
    images = (protos.repeat_interleave(5, 0) + 0.05 * torch.randn(20, 1, 16, 16, generator=g)).clamp(0, 1)
    eval_set = ImageSet(images, torch.arange(4).repeat_interleave(5), list("abcd"))
    cfg.eval.ways = [4]
    report = evaluate(cfg, random_encoder(cfg), eval_set)
    by = {r["encoder"]: r for r in report.results}
    assert set(by) == {"pixels", "random", "pretrained"}
    assert by["pixels"]["accuracy"] == 1.0  # well-separated prototypes in pixel space
    # the untrained "pretrained" encoder is the random encoder: identical numbers on identical episodes
    assert by["random"]["accuracy"] == by["pretrained"]["accuracy"]


def test_embed_images_restores_training_mode_and_batches():
    enc = random_encoder(load_config(overrides=TINY)).train()
    x = torch.rand(7, 1, 16, 16)
    full = embed_images(enc, x, batch_size=100)
    torch.testing.assert_close(embed_images(enc, x, batch_size=3), full)
    assert enc.training


def test_lake_runs_in_report_json(tmp_path, monkeypatch):
    cfg = load_config(overrides=[*TINY, "eval.baselines=false"])
    import fewshot.evaluate.evaluator as ev

    monkeypatch.setattr(ev, "load_lake_runs", lambda path, size: _fake_runs(classes=6))
    monkeypatch.setattr(ev, "resolve_data_path", lambda path, default: path)
    cfg.eval.ways, cfg.eval.queries = [5], 1
    report = evaluate(cfg, random_encoder(cfg), None, lake_runs_path="fake")
    out = report.to_json()
    assert out["lake_runs"]["encoder"] == "pretrained" and 0 <= out["lake_runs"]["accuracy"] <= 1
    assert {r["way"] for r in out["results"]} == {5}  # episodes drawn from Lake's pool
    path = plot_accuracy_vs_shots(report.results, tmp_path / "p.png")
    assert path.stat().st_size > 0
    assert "5-way 1-shot" in results_table(report.results)
