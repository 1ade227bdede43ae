"""Episode runs, confidence intervals, Lake's one-shot runs and the label-fraction probe."""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.classifiers import CLASSIFIERS, PrototypeClassifier
from fewshot.evaluate.episodes import EpisodeSampler
from fewshot.evaluate.probe import linear_probe_fractions
from fewshot.evaluate.runner import above_beyond_ci95, mean_ci95, run_episodes, score_lake_runs

ROW_KEYS = {"classifier", "way", "shot", "query", "episodes", "accuracy", "ci95"}


def clusters(n_classes, per_class, dim, spread, noise, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * spread
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    return centers[labels] + noise * rng.normal(size=(labels.size, dim)), labels


# --- mean_ci95 -------------------------------------------------------------------------------


def test_mean_ci95_against_a_hand_computation():
    mean, half = mean_ci95([0.5, 0.7, 0.6, 0.9])
    # mean 0.675; squared deviations .030625 + .000625 + .005625 + .050625 = .0875;
    # sample variance .0875 / 3; half width 1.96 * sqrt(.0875 / 3) / sqrt(4).
    assert mean == pytest.approx(0.675)
    assert half == pytest.approx(1.96 * math.sqrt(0.0875 / 3) / 2)
    assert half == pytest.approx(0.167367, abs=1e-6)


def test_mean_ci95_edge_cases():
    assert mean_ci95(np.full(10, 0.4)) == pytest.approx((0.4, 0.0))
    mean, half = mean_ci95([0.3])
    assert mean == 0.3 and math.isnan(half)
    with pytest.raises(DataError):
        mean_ci95([])


def intervals_disjoint_above(a, b):
    """The verdict read off the two intervals themselves: every point of a's above every point of b's."""
    a_lo, b_hi = a["accuracy"] - a["ci95"], b["accuracy"] + b["ci95"]
    return bool(np.linspace(a_lo, a["accuracy"] + a["ci95"], 5).min() > np.linspace(b["accuracy"] - b["ci95"], b_hi, 5).max())


def means_only(a, b):  # the broken variant: calls a win on the means alone, whatever the intervals
    return a["accuracy"] > b["accuracy"]


CELLS = [  # (a, b, a above b beyond both CIs?)
    ({"accuracy": 60.0, "ci95": 4.0}, {"accuracy": 50.0, "ci95": 3.0}, True),  # [56, 64] above [47, 53]
    ({"accuracy": 60.0, "ci95": 6.0}, {"accuracy": 50.0, "ci95": 5.0}, False),  # [54, 66] overlaps [45, 55]
    ({"accuracy": 60.0, "ci95": 5.0}, {"accuracy": 50.0, "ci95": 5.0}, False),  # [55, 65] touches [45, 55]: not beyond
    ({"accuracy": 60.0, "ci95": 5.0}, {"accuracy": 50.0, "ci95": 4.5}, True),  # just past the boundary
    ({"accuracy": 50.0, "ci95": 3.0}, {"accuracy": 60.0, "ci95": 4.0}, False),  # below
    ({"accuracy": 90.0, "ci95": math.nan}, {"accuracy": 10.0, "ci95": 1.0}, False),  # one value: no interval
]


@pytest.mark.parametrize("a, b, expected", CELLS)
def test_above_beyond_ci95_reads_the_intervals(a, b, expected):
    assert above_beyond_ci95(a, b) is expected
    assert above_beyond_ci95(b, a) is False or not expected  # never both ways
    if not math.isnan(a["ci95"]):
        assert intervals_disjoint_above(a, b) is expected


def test_a_means_only_verdict_fails_on_overlapping_intervals():
    """The negative control: calling a win on the means passes the disjoint case but not the overlapping ones."""
    assert [means_only(a, b) == expected for a, b, expected in CELLS] != [True] * len(CELLS)
    assert means_only(*CELLS[1][:2]) and not above_beyond_ci95(*CELLS[1][:2])


# --- run_episodes ----------------------------------------------------------------------------


def test_separable_features_are_classified_perfectly_by_every_classifier():
    X, y = clusters(10, 12, dim=16, spread=10.0, noise=0.1)
    rows = run_episodes(X, y, way=5, shot=1, query=5, episodes=50, seed=0)
    assert [r["classifier"] for r in rows] == list(CLASSIFIERS)
    for row in rows:
        assert set(row) == ROW_KEYS
        assert (row["way"], row["shot"], row["query"], row["episodes"]) == (5, 1, 5, 50)
        assert row["accuracy"] == 1.0 and row["ci95"] == 0.0


def test_noise_features_give_chance_accuracy():
    # Features independent of the labels: every classifier should score 1/way. Per episode the
    # accuracy over 75 queries has sd about sqrt(.2 * .8 / 75) = .046, so over 300 episodes the
    # mean has a standard error near .003 (a bit more, as episodes share examples). .03 is ten
    # standard errors: a classifier that peeks at the query labels, or queries that leak into
    # the support set (1-NN would then be perfect), lands far outside it.
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(20), 40)
    X = rng.normal(size=(y.size, 32))
    rows = run_episodes(X, y, way=5, shot=5, query=15, episodes=300, seed=1)
    for row in rows:
        assert abs(row["accuracy"] - 0.2) < 0.03, row
        assert 0.003 < row["ci95"] < 0.02, row


def test_all_classifiers_see_the_same_episodes():
    # With one shot, 1-NN by cosine and the nearest cosine prototype are the same rule, so on
    # the same episodes their accuracies must be identical (on different ones they would not).
    X, y = clusters(8, 10, dim=6, spread=1.0, noise=1.0, seed=3)
    rows = run_episodes(X, y, 4, 1, 3, episodes=100, classifiers=("proto-cosine", "knn"), seed=4)
    assert 0.3 < rows[0]["accuracy"] < 0.95  # not a trivial task
    assert rows[0]["accuracy"] == rows[1]["accuracy"]
    assert rows[0]["ci95"] == rows[1]["ci95"]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_batched_prototypes_agree_with_the_classifier_episode_by_episode(metric):
    X, y = clusters(7, 9, dim=5, spread=1.0, noise=1.0, seed=6)
    X = X.astype(np.float32)
    accuracies = []
    for e in EpisodeSampler(y, 3, 2, 4, seed=9).episodes(80):
        clf = PrototypeClassifier(metric).fit(X[e.support], e.support_labels)
        accuracies.append(float((clf.predict(X[e.query]) == e.query_labels).mean()))
    (row,) = run_episodes(X, y, 3, 2, 4, episodes=80, classifiers=(f"proto-{metric}",), seed=9)
    expected = mean_ci95(accuracies)
    assert row["accuracy"] == pytest.approx(expected[0], abs=1e-12)
    assert row["ci95"] == pytest.approx(expected[1], abs=1e-12)


def test_run_episodes_is_reproducible_and_seeded():
    X, y = clusters(8, 10, dim=6, spread=1.0, noise=1.5, seed=2)
    a = run_episodes(torch.as_tensor(X), torch.as_tensor(y), 3, 1, 2, 40, ("logreg",), seed=0)
    b = run_episodes(X, y, 3, 1, 2, 40, ("logreg",), seed=0)
    c = run_episodes(X, y, 3, 1, 2, 40, ("logreg",), seed=1)
    assert a == b
    assert a[0]["accuracy"] != c[0]["accuracy"]


def test_run_episodes_errors():
    X, y = clusters(4, 5, dim=3, spread=1.0, noise=1.0)
    with pytest.raises(ConfigError, match="proto-cosine"):
        run_episodes(X, y, 2, 1, 1, 5, classifiers=("svm",))
    with pytest.raises(ConfigError):
        run_episodes(X, y, 2, 1, 1, 0)
    with pytest.raises(DataError, match="5 labels"):
        run_episodes(X[:-1], y[:5], 2, 1, 1, 5)
    with pytest.raises(DataError, match="6-way needs 6 classes, the evaluation set has 4"):
        run_episodes(X, y, 6, 1, 1, 5)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        run_episodes(bad, y, 2, 1, 1, 5)


# --- score_lake_runs -------------------------------------------------------------------------


@dataclass
class FakeRun:
    name: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    answers: torch.Tensor


def make_runs(n_runs, seed=0, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    runs = []
    for r in range(n_runs):
        train = torch.rand(20, 1, 8, 8, generator=g)
        perm = torch.randperm(20, generator=g)
        test = train[perm] + noise * torch.randn(20, 1, 8, 8, generator=g)
        runs.append(FakeRun(f"run{r + 1:02d}", train, test, perm))
    return runs


def flatten(x):
    assert not torch.is_grad_enabled()  # called under no_grad
    return x.flatten(1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_lake_runs_perfect_when_test_items_are_noisy_copies(metric):
    result = score_lake_runs(flatten, make_runs(3), metric=metric)
    assert result["accuracy"] == 1.0
    assert result["per_run"] == {"run01": 1.0, "run02": 1.0, "run03": 1.0}
    assert result["metric"] == metric


def test_lake_runs_score_matches_the_permutation():
    # Test item i is an exact copy of training image source[i] (a shuffle), but the answer key
    # claims the identity: only the shuffle's fixed points count as correct.
    g = torch.Generator().manual_seed(1)
    runs, expected = [], {}
    for r, n_fixed in enumerate([0, 5, 12]):
        # Items 0..n_fixed-1 stay put; the rest move along one random cycle (no fixed points).
        source = torch.arange(20)
        cycle = n_fixed + torch.randperm(20 - n_fixed, generator=g)
        source[cycle] = cycle.roll(-1)
        train = torch.rand(20, 1, 6, 6, generator=g)
        runs.append(FakeRun(f"r{r}", train, train[source], torch.arange(20)))
        expected[f"r{r}"] = float((source == torch.arange(20)).float().mean())
    assert expected == pytest.approx({"r0": 0.0, "r1": 0.25, "r2": 0.6})
    result = score_lake_runs(lambda x: x.flatten(1), runs)
    assert result["per_run"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx((0 + 5 + 12) / 60)


def test_lake_runs_metric_changes_the_match():
    train = torch.tensor([[10.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    test = torch.tensor([[2.0, 0.1]]).reshape(1, 1, 1, 2)
    run = FakeRun("r", train, test, torch.tensor([0]))
    assert score_lake_runs(flatten, [run], "cosine")["accuracy"] == 1.0
    assert score_lake_runs(flatten, [run], "euclidean")["accuracy"] == 0.0


def test_lake_runs_uses_the_embedding():
    # An embedding that maps every image to the same vector cannot tell items apart; ties go
    # to training image 0, so only test items whose answer is 0 are right.
    runs = make_runs(2)
    result = score_lake_runs(lambda x: torch.ones(len(x), 3), runs, metric="euclidean")
    assert result["accuracy"] == pytest.approx(2 / 40)


def test_lake_runs_errors():
    runs = make_runs(1)
    with pytest.raises(ConfigError, match="cosine"):
        score_lake_runs(flatten, runs, metric="l1")
    with pytest.raises(DataError):
        score_lake_runs(flatten, [])
    with pytest.raises(DataError, match="rows"):
        score_lake_runs(lambda x: x.flatten(1)[:5], runs)
    with pytest.raises(DataError, match="named"):
        score_lake_runs(flatten, runs + runs)


# --- linear_probe_fractions ------------------------------------------------------------------


def test_probe_uses_the_right_number_of_examples_per_fraction():
    # Class sizes 10, 21, 7. Half to test (rounded half up): 5, 11, 4; train 5, 10, 3.
    # 10%: 0.5, 1.0, 0.3 -> 1, 1, 1 (at least one each) = 3; 50%: 2.5, 5, 1.5 -> 3, 5, 2 = 10;
    # 100%: 5 + 10 + 3 = 18.
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat([0, 1, 2], [10, 21, 7]))
    X = rng.normal(size=(y.size, 4)) + y[:, None]
    rows = linear_probe_fractions(X, y, fractions=(0.1, 0.5, 1.0), test_fraction=0.5, seed=0)
    assert [r["fraction"] for r in rows] == [0.1, 0.5, 1.0]
    assert [r["train_examples"] for r in rows] == [3, 10, 18]
    for r in rows:
        assert set(r) == {"fraction", "train_examples", "accuracy"}
        assert (r["accuracy"] * 20) == pytest.approx(round(r["accuracy"] * 20))  # 20 test items


def test_probe_accuracy_grows_with_the_labels():
    X, y = clusters(10, 200, dim=20, spread=1.0, noise=1.2, seed=4)
    rows = linear_probe_fractions(X, y, fractions=(0.01, 0.1, 1.0), seed=0)
    assert [r["train_examples"] for r in rows] == [10, 100, 1000]
    acc = [r["accuracy"] for r in rows]
    assert acc[0] > 0.2  # better than chance (0.1) even from one example per class
    assert acc[1] > acc[0] + 0.05
    assert acc[2] >= acc[1] - 0.01
    assert acc[2] > 0.8
    assert rows == linear_probe_fractions(X, y, fractions=(0.01, 0.1, 1.0), seed=0)


def test_probe_errors():
    X, y = clusters(3, 4, dim=2, spread=1.0, noise=1.0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="fractions"):
            linear_probe_fractions(X, y, fractions=(bad,))
    with pytest.raises(ConfigError, match="test_fraction"):
        linear_probe_fractions(X, y, test_fraction=1.0)
    with pytest.raises(DataError, match="at least 2 classes"):
        linear_probe_fractions(X, np.zeros_like(y))
    y_single = y.copy()
    y_single[0] = 7  # class 7 has one example
    with pytest.raises(DataError, match="class 7 has 1 example"):
        linear_probe_fractions(X, y_single)


# --- a real score, pinned ----------------------------------------------------------------------

# Raw pixels on Lake et al.'s 20 runs (400 test items), measured with
#   load_lake_runs("omniglot/all_runs.zip", size) + score_lake_runs(lambda x: x.flatten(1), runs, metric):
# 105 px, euclidean 1-NN: 76/400 = 19.0%, the pixel baseline of Lake's original demo; 28 px (the
# default size, area-resampled), cosine 1-NN: 87/400 = 21.75%.
PINNED_LAKE_PIXELS = [(105, "euclidean", 76), (28, "cosine", 87)]


@pytest.mark.data
@pytest.mark.parametrize("variant", ["as released", "train images in lexical order"])
@pytest.mark.parametrize("size, metric, correct", PINNED_LAKE_PIXELS)
def test_pixel_scores_on_lakes_runs_are_pinned(shared_data, size, metric, correct, variant):
    """The second variant reads each run's training images in lexical order (class1, class10, class11, …)
    instead of by number, so the answer key points at the wrong images: the pin must catch it."""
    from fewshot.data.lake import load_lake_runs

    path = shared_data / "omniglot" / "all_runs.zip"
    if not path.exists():
        pytest.skip(f"{path} is absent; set FEWSHOT_DATA to the folder holding omniglot/all_runs.zip")
    runs = load_lake_runs(path, size)
    if variant != "as released":
        lexical = sorted(range(20), key=lambda i: f"class{i + 1:d}")
        runs = [dataclasses.replace(r, train_images=r.train_images[lexical]) for r in runs]
    result = score_lake_runs(lambda x: x.flatten(1), runs, metric)
    if variant == "as released":
        assert round(result["accuracy"] * 400) == correct and result["accuracy"] == correct / 400
    else:
        assert round(result["accuracy"] * 400) != correct
