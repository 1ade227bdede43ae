"""CapFilt (Li et al. 2022, BLIP Sec. 3.3): bootstrap a noisy image–caption pool with a captioner and a filter.

The captioner (BLIP's image-grounded decoder, tuned on a small clean split) writes one nucleus-sampled synthetic
caption per image of the pool; the filter (BLIP's image-grounded encoder, tuned on the same split) scores every web
caption and every synthetic one with its ITM head, and a caption whose p(match) is below a threshold (0.5: the head
calls it unmatched) is dropped. The bootstrapped pool is the kept web captions and the kept synthetic ones, for
pre-training again. This module holds the decisions and the bookkeeping; the models run in :func:`fewshot.api.capfilt`.

On generated scenes every web row carries its noise label and a synthetic caption can be checked against its scene
graph (:func:`fewshot.data.scenes.caption_is_true`), so the filter's precision and recall are exact: on the web rows
through :func:`fewshot.data.filters.filter_report` (the rule ``capfilt``; its target kinds are the captions that
are false of their image, mismatched and near misses), and on the synthetic captions against the verifier.
"""

from __future__ import annotations

import numpy as np

from fewshot.data.filters import FilterResult
from fewshot.errors import DataError

__all__ = ["CAPFILT_RULE", "SYNTHETIC_FALSE", "SYNTHETIC_RULE", "capfilt_result", "synthetic_report"]

CAPFILT_RULE = "capfilt"  # a web caption the filter calls unmatched
SYNTHETIC_RULE = "capfilt_synthetic"  # a synthetic caption the filter calls unmatched
SYNTHETIC_FALSE = "synthetic_false"  # the noise label of a synthetic caption the verifier calls false


def capfilt_result(match: np.ndarray, threshold: float = 0.5) -> FilterResult:
    """The filter's decision on web rows with ITM p(match) ``match`` (R,): row r is dropped iff match_r < threshold."""
    match = np.asarray(match, dtype=np.float64)
    if match.ndim != 1 or not np.isfinite(match).all():
        raise DataError(f"the filter needs one finite p(match) per row, got shape {match.shape}")
    dropped = {int(r) for r in np.flatnonzero(match < threshold)}
    kept = [r for r in range(len(match)) if r not in dropped]
    return FilterResult(kept, {r: CAPFILT_RULE for r in sorted(dropped)}, {CAPFILT_RULE: dropped})


def synthetic_report(true: list[bool], kept: np.ndarray) -> dict:
    """Of the synthetic captions (their verifier truth ``true``, the filter's ``kept`` mask): how many were written
    and kept, the share true among all and among the kept, and the filter's precision (dropped ones that are false)
    and recall (false ones dropped) on them."""
    true_a, kept_a = np.asarray(true, dtype=bool), np.asarray(kept, dtype=bool)
    if true_a.shape != kept_a.shape:
        raise DataError(f"{true_a.size} verdicts for {kept_a.size} synthetic captions")
    dropped, false = ~kept_a, ~true_a
    share = lambda part, of: float(part.sum() / of.sum()) if of.sum() else None  # noqa: E731
    return {"written": int(true_a.size), "kept": int(kept_a.sum()), "true": share(true_a, np.ones_like(true_a)),
            "true_of_kept": share(true_a & kept_a, kept_a), "precision": share(dropped & false, dropped),
            "recall": share(dropped & false, false)}
