"""In-context classification (Kirsch et al. 2022): the token layout, the loss against a loop, causality with a
leaking variant as its negative control, the episode-runner classifier, the data split and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot import api
from fewshot.data.classification_prompts import ClassificationPromptsConfig, prompt_images
from fewshot.errors import ConfigError, DataError, FewshotError
from fewshot.evaluate.episodes import EpisodeSampler
from fewshot.evaluate.runner import fit_predict_episodes
from fewshot.methods import build_method
from fewshot.methods.icl_classify import InContextClassifier, SupportQueryClassifier, in_context_cross_entropy, support_query_tokens


def _model(backbone: str = "transformer", dim: int = 6, ways: int = 3, points: int = 8) -> SupportQueryClassifier:
    torch.manual_seed(0)
    return SupportQueryClassifier(dim, ways, points, backbone, width=16, depth=2, heads=2).eval()


def test_each_sample_is_a_query_token_then_a_support_token():
    xs, labels = torch.randn(2, 4, 6), torch.tensor([[0, 2, 1, 2], [1, 1, 0, 2]])
    tokens = support_query_tokens(xs, labels, ways=3)
    assert tokens.shape == (2, 8, 9)
    for b in range(2):
        for i in range(4):
            assert torch.equal(tokens[b, 2 * i], torch.cat([xs[b, i], torch.zeros(3)]))
            assert torch.equal(tokens[b, 2 * i + 1], torch.cat([xs[b, i], F.one_hot(labels[b, i], 3).float()]))


@pytest.mark.parametrize("min_context", [0, 2])
def test_the_loss_equals_a_loop_over_positions(min_context):
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    terms = [-torch.log_softmax(logits[b, i], 0)[labels[b, i]] for b in range(3) for i in range(min_context, 5)]
    torch.testing.assert_close(in_context_cross_entropy(logits, labels, min_context), torch.stack(terms).mean())
    with pytest.raises(ValueError, match="leaves no position"):
        in_context_cross_entropy(logits, labels, 5)


def _leaks(model: SupportQueryClassifier) -> bool:
    """Whether the logits for sample i change with y_i or anything after sample i."""
    torch.manual_seed(2)
    xs, labels = torch.randn(1, 8, 6), torch.randint(0, 3, (1, 8))
    base = model(xs, labels)
    for i in range(7):
        other_x, other_y = xs.clone(), labels.clone()
        other_y[0, i:] = (other_y[0, i:] + 1) % 3
        other_x[0, i + 1 :] = torch.randn(7 - i, 6)
        if not torch.allclose(model(other_x, other_y)[0, : i + 1], base[0, : i + 1], atol=1e-6):
            return True
    return False


@pytest.mark.parametrize("backbone", ["transformer", "lstm"])
def test_a_prediction_never_sees_its_own_label_or_later_samples(backbone):
    assert not _leaks(_model(backbone))


def test_negative_control_a_non_causal_trunk_leaks():
    model = _model()
    for block in model.trunk.blocks:
        block.attn.causal = False
    assert _leaks(model)


def test_the_episode_classifier_is_the_model_on_support_then_query():
    model = _model(points=8)
    rng = np.random.default_rng(0)
    support, support_y = rng.standard_normal((6, 6)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2])
    queries = rng.standard_normal((4, 6)).astype(np.float32)
    clf = InContextClassifier(model, seed=3, project=False).fit(support, support_y)
    assert sorted(clf.support_labels.tolist()) == sorted(support_y.tolist())  # shuffled, not lost
    scores = clf.decision_function(queries)
    for q in range(4):  # one prompt per query, by hand
        xs = torch.cat([clf.support, torch.from_numpy(queries[q : q + 1])])[None]
        for placeholder in (0, 2):  # the query's own label slot is never read
            labels = torch.cat([clf.support_labels, torch.tensor([placeholder])])[None]
            torch.testing.assert_close(torch.from_numpy(scores[q]), model(xs, labels)[0, -1, :3])
    assert np.array_equal(InContextClassifier(model, seed=3, project=False).fit(support, support_y).decision_function(queries), scores)
    with pytest.raises(DataError, match="exceed the model's prompts of 8"):
        InContextClassifier(model).fit(np.zeros((8, 6)), np.arange(8) % 3)
    with pytest.raises(DataError, match="4-way episode needs a model of at least 4 ways"):
        InContextClassifier(model).fit(np.zeros((4, 6)), np.arange(4))


def test_the_model_is_a_classifier_row_of_the_episode_runner():
    model = _model(points=8)
    features, labels = torch.randn(30, 6), torch.arange(30) % 3
    sampler = EpisodeSampler(labels, way=3, shot=2, query=2, seed=0)
    drawn = [sampler.episode(i) for i in range(4)]
    accuracies, _, first = fit_predict_episodes(lambda i: InContextClassifier(model, seed=i), features, drawn)
    assert len(accuracies) == 4 and all(0 <= a <= 1 for a in accuracies) and first.way == 3


def test_prompt_images_split_each_class_and_standardise_with_the_training_part():
    data = ClassificationPromptsConfig(source="classification-prompts", heldout_images=0.25)
    split = prompt_images(data)
    assert split.train.shape[1] == 64 and len(split.train) + len(split.heldout) == 1797
    for c in range(10):
        n_held, n_all = int((split.heldout_labels == c).sum()), int((split.heldout_labels == c).sum() + (split.train_labels == c).sum())
        assert n_held == round(0.25 * n_all)
    torch.testing.assert_close(split.train.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    assert split.heldout.mean(0).abs().max() > 1e-3  # the held-out part is scaled by the training statistics, not its own
    assert torch.equal(prompt_images(data).heldout, split.heldout)  # seeded
    with pytest.raises(ValueError, match="leaves no query"):
        ClassificationPromptsConfig(source="classification-prompts", ways=5, points=5)


def test_a_run_trains_and_bad_configs_are_one_line_errors(tmp_path):
    overrides = ["data.points=8", "data.ways=3", "method.width=16", "method.depth=1", "method.heads=2", "train.steps=3",
                 "train.batch_size=4", "train.warmup_steps=1", f"out={tmp_path}", "name=tiny"]
    config = api.load_config(api.find_recipe("icl-classify"), overrides)
    run_dir = api.pretrain(config, progress=False).run_dir
    model = api.open_run(run_dir).encoder()
    assert isinstance(model, SupportQueryClassifier) and model.ways == 3 and model.points == 8
    with pytest.raises(ConfigError, match="set data.source=classification-prompts"):
        build_method(api.load_config(overrides=["method=icl-classify"]))
    with pytest.raises(FewshotError, match="not divisible by method.heads"):
        build_method(api.load_config(api.find_recipe("icl-classify"), ["method.width=10", "method.heads=4"]))


def test_prompt_accuracy_equals_a_loop_over_prompts_and_positions():
    from fewshot.data.tasks import ClassificationTasks
    from fewshot.evaluate.runner import mean_ci95
    from fewshot.evaluate.icl_classify import prompt_accuracy

    torch.manual_seed(3)
    tasks = ClassificationTasks(torch.randn(60, 6), torch.arange(60) % 4, ways=3, points=8, seed=1, eval_seed=0)
    model = _model(points=8)
    out = prompt_accuracy(model, tasks, prompts=10, from_position=5, batch_size=3)
    per_prompt = []
    for i in range(10):
        b = tasks.batch(torch.tensor([i]))
        predicted = model(b["xs"], b["labels"])[0].argmax(-1)
        per_prompt.append(float(np.mean([predicted[j] == b["labels"][0, j] for j in range(5, 8)])))
    assert (out["accuracy"], out["ci95"]) == pytest.approx(mean_ci95(per_prompt))
    assert len(out["by_position"]) == 8 and out["from_position"] == 5


def test_support_baselines_fit_on_the_samples_before_each_query():
    from fewshot.data.tasks import ClassificationTasks
    from fewshot.evaluate.classifiers import make_classifier
    from fewshot.evaluate.icl_classify import support_baseline_accuracy

    centres = torch.eye(6)[:4] * 10  # four far-apart classes: 1-NN is right once a class has been seen
    inputs, labels = centres.repeat(15, 1) + 0.01 * torch.randn(60, 6), torch.arange(60) % 4
    tasks = ClassificationTasks(inputs, labels, ways=3, points=8, seed=1, eval_seed=0)
    out = support_baseline_accuracy(lambda: make_classifier("knn"), tasks, prompts=12, from_position=4)
    expected = []
    for i in range(12):
        b = tasks.batch(torch.tensor([i]))
        ys = b["labels"][0].tolist()
        expected.append(float(np.mean([ys[j] in ys[:j] for j in range(4, 8)])))  # right exactly when seen before
    assert out["accuracy"] == pytest.approx(float(np.mean(expected)))
    assert out["accuracy"] < 1.0  # some queries' classes are not in their support yet: those cannot be right
