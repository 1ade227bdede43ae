"""bench/vl_noise.py: the noisy pool has exactly the asked fraction of noisy rows, and the filter table counts right."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.data.scenes import NoiseConfig, make_pool
from test_bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("vl_noise")


def test_apportion_is_exact_and_within_one_of_each_quota(bench):
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = dict(zip("abcde", rng.uniform(0.01, 1, 5)))
        total = int(rng.integers(0, 5000))
        counts = bench.apportion(total, shares)
        quotas = {k: total * s / sum(shares.values()) for k, s in shares.items()}
        assert sum(counts.values()) == total
        assert all(abs(counts[k] - quotas[k]) < 1 for k in shares)
        # Hamilton: the kinds rounded up are those with the largest fractional parts
        up = [k for k in shares if counts[k] > np.floor(quotas[k])]
        down = [k for k in shares if counts[k] == np.floor(quotas[k]) and quotas[k] != np.floor(quotas[k])]
        assert not up or not down or min(quotas[k] % 1 for k in up) >= max(quotas[k] % 1 for k in down)


def test_rounding_each_share_alone_misses_the_total():
    # the negative control for apportion: three equal shares of 100 round to 33 each
    assert sum(round(100 * s) for s in (1 / 3, 1 / 3, 1 / 3)) != 100


@pytest.mark.parametrize("mix", ["noise_mix", "broken: the rate split by share, near-duplicates as rows"])
@pytest.mark.parametrize("n, rate", [(300, 0.5), (257, 0.3)])
def test_the_noisy_pool_has_exactly_the_asked_noisy_rows(bench, mix, n, rate):
    if mix == "noise_mix":
        noise = bench.noise_mix(n, 3, rate)
    else:
        noise = NoiseConfig(**{k: rate * s for k, s in bench.NOISE_SHARES.items()})
    pool = make_pool(n, 32, (1, 2), 3, noise, bench.SPLIT_SEED, draw=False)
    noisy = sum(bool(k) for k in pool.row_noise)
    exact = noisy == round(rate * len(pool.row_noise))
    assert exact == (mix == "noise_mix")
    if mix == "noise_mix":  # and the caption kinds in the asked proportions
        caption_rows = noisy - pool.row_noise.count("near_duplicate")
        shares = {k: s for k, s in bench.NOISE_SHARES.items() if k != "near_duplicate"}
        assert {k: pool.row_noise.count(k) for k in shares} == bench.apportion(caption_rows, shares)


def test_removal_counts_against_a_row_loop(bench):
    rng = np.random.default_rng(1)
    kinds = ["", "mismatched", "near_miss", "boilerplate", "shared_alt", "near_duplicate"]
    noise = [kinds[i] for i in rng.integers(0, len(kinds), 500)]
    kept_rows = [r for r in range(500) if rng.random() < 0.6]
    out = bench.removal(noise, [noise[r] for r in kept_rows])
    dropped = [r for r in range(500) if r not in kept_rows]
    assert out["dropped"] == len(dropped)
    assert out["precision"] == pytest.approx(sum(noise[r] != "" for r in dropped) / len(dropped))
    for k in kinds:
        assert out["recall"][k] == pytest.approx(sum(noise[r] == k for r in dropped) / sum(x == k for x in noise))
