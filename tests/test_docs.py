"""The figures the docs quote about the code's own set-up, checked against the code: the quickstart's
class split and the epochs of the default Omniglot run. Each pin comes with a variant that must
not match it, so the check is not vacuous."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fewshot.config import find_recipe, load_config
from fewshot.data.registry import load_run_data
from fewshot.data.splits import split_classes

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (REPO_ROOT / name).read_text() for name in ("README.md", "docs/benchmarks.md")}
PRETRAIN_DIGITS, HELD_OUT_DIGITS = [0, 1, 5, 8, 9], [2, 3, 4, 6, 7]  # as README and docs/benchmarks.md say
OMNIGLOT_IMAGES = 2720  # images_background_small1: 136 characters × 20 drawers


def _braces(digits: list[int]) -> str:
    return "{" + ", ".join(map(str, digits)) + "}"


@pytest.mark.parametrize("split_seed", [0, 1])
def test_the_quickstart_split_is_the_one_the_docs_name(split_seed):
    """Seed 0 is the recipe's and must give the documented split; seed 1 (another split) must not."""
    config = load_config(find_recipe("quickstart"), [f"data.split_seed={split_seed}"])
    data = load_run_data(config.data, config.eval.data_path)
    got = ([int(c) for c in data.pretrain.classes], [int(c) for c in data.evaluation.classes])
    assert got == split_classes(10, 5, split_seed)
    if split_seed == load_config(find_recipe("quickstart")).data.split_seed:
        assert got == (PRETRAIN_DIGITS, HELD_OUT_DIGITS)
    else:
        assert got != (PRETRAIN_DIGITS, HELD_OUT_DIGITS)


@pytest.mark.parametrize("name", sorted(DOCS))
def test_the_docs_name_the_quickstart_split_and_no_other(name):
    text = DOCS[name]
    assert _braces(PRETRAIN_DIGITS) in text and _braces(HELD_OUT_DIGITS) in text
    assert not re.search(r"digits (0[–-]4|5[–-]9)", text), "a contiguous digit range the split does not have"


def test_the_default_omniglot_run_epochs_in_the_docs():
    """The default run's epochs as the studies define them (steps × batch / images: 3,000 × 256 / 2,720
    ≈ 282); twice that (565) counts both views of every image as a pass, and must not appear."""
    train = load_config(find_recipe("simclr-omniglot")).train
    epochs = round(train.steps * train.batch_size / OMNIGLOT_IMAGES)
    views_counted = round(2 * train.steps * train.batch_size / OMNIGLOT_IMAGES)
    text = DOCS["docs/benchmarks.md"]
    assert f"{train.steps:,} steps (≈ {epochs} epochs" in text
    assert f"≈ {views_counted} epochs" not in text
