"""bench/pretrain_study.py reuses a cached row only for the same config, fine-tuning settings and code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """bench/<name>.py as a module (bench scripts import their neighbour omniglot.py)."""
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def study():
    return load_bench("pretrain_study")


@pytest.mark.parametrize("variant", ["config+code", "label only (the old cache)"])
def test_a_cached_row_is_reused_only_for_the_same_config_and_code(study, variant, monkeypatch):
    """The old cache keyed rows by label alone, so a changed recipe or changed code reused a stale row:
    the same assertions must fail for that variant."""
    if variant != "config+code":
        monkeypatch.setattr(study, "row_key", lambda config, episodes, steps, version: "SimCLR b256")
    config = study.row_config("reconstruction", "SimCLR b256", "simclr-omniglot", 256, [], 20)
    key = study.row_key(config, 100, 20, "commit-a")
    changed = {
        "config": study.row_key(study.row_config("reconstruction", "SimCLR b256", "simclr-omniglot", 256, ["method.temperature=0.5"], 20), 100, 20, "commit-a"),
        "fine-tuning": study.row_key(config, 100, 21, "commit-a"),
        "code": study.row_key(config, 100, 20, "commit-b"),
    }
    same_settings_elsewhere = study.row_key(config.model_copy(update={"name": "elsewhere", "out": "/tmp"}), 100, 20, "commit-a")
    distinct = {what: other != key for what, other in changed.items()}
    if variant == "config+code":
        assert all(distinct.values()), distinct
        assert same_settings_elsewhere == key  # where a run is written does not change its result
        assert study.row_key(config, 100, 20, None) is None  # no code version: nothing is reused
    else:
        assert not any(distinct.values())


def test_the_omniglot_ablation_is_the_full_grid_around_the_default_recipe():
    from fewshot.config import find_recipe, load_config

    ablation = load_bench("omniglot_ablation")
    recipe = load_config(find_recipe("nnclr-omniglot"))
    seen = set()
    for cell in ablation.CELLS:
        c = load_config(find_recipe("nnclr-omniglot"), ablation.cell_overrides(cell))
        seen.add((c.data.normalize, c.method.neighbor_prob > 0, c.method.clusters > 0))
        if cell == "norm+nn":  # the default cell is the recipe itself, only evaluated more narrowly
            assert c.model_dump() == recipe.model_dump()
    assert len(seen) == 8  # every combination of the three factors, once


def _fewshot_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from fewshot… import name` in a file, the ones inside functions too."""
    import ast

    tree = ast.parse(path.read_text())
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module and node.module.startswith("fewshot") for alias in node.names]


def _missing_imports(pairs: list[tuple[str, str]]) -> list[str]:
    missing = []
    for module, name in pairs:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    return missing


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_import_of_a_bench_script_resolves(script):
    # bench scripts run only by hand, and imports inside their functions fail only when reached:
    # a renamed module once broke bench/omniglot.py's purity table after an hour of training
    assert _missing_imports(_fewshot_imports(BENCH / script)) == []


def test_a_stale_bench_import_is_caught():
    assert _missing_imports([("fewshot.data.datasets", "load_source"), ("fewshot.data.registry", "no_such_name")]) == [
        "fewshot.data.datasets", "fewshot.data.registry.no_such_name"]


def test_the_lit_grid_cells_are_the_towers_they_are_named_after(tmp_path):
    """u = from scratch, U = pre-trained and tuned, L = pre-trained and locked; Lu is the lit-scenes recipe itself;
    the SimCLR tower keeps colour and is the encoder clip-scenes builds, so method.image.init accepts it."""
    import argparse

    from fewshot.config import find_recipe, load_config

    lit = load_bench("vl_lit")
    manifest, image_run = tmp_path / "manifest.tsv", tmp_path / "simclr"
    clip = lit.clip_config(argparse.Namespace(out=str(tmp_path), n=100, steps=40, seed=0), manifest)
    towers = {}
    for cell in lit.CELLS:
        m = lit.cell_config(cell, clip, image_run, seed=1).method
        towers[cell] = (m.image.init is not None, m.image.lock, m.text.name != "text-transformer", m.text.lock)
    assert towers == {"uu": (False, False, False, False), "Uu": (True, False, False, False),
                      "Lu": (True, True, False, False), "uL": (False, False, True, True)}
    ours = lit.cell_config("Lu", clip, image_run, seed=0)
    recipe = load_config(find_recipe("lit-scenes"), [f"data.path={manifest}", f"out={tmp_path}", f"name={ours.name}", "train.steps=40",
                                                     "train.warmup_steps=4", "train.checkpoint_every=40", f"method.image.init={image_run}"])
    assert ours.model_dump() == recipe.model_dump()
    simclr = lit.simclr_config(argparse.Namespace(out=str(tmp_path), simclr_steps=40, seed=0), clip, tmp_path / "images")
    assert (simclr.encoder, simclr.data.channels, simclr.data.image_size) == (clip.encoder, 3, clip.data.image_size)
    options = simclr.views.options
    assert simclr.views.name == "simclr" and options["jitter_prob"] == options["grayscale_prob"] == 0


def test_the_cot_bench_calls_a_row_better_only_beyond_both_cis():
    cot = load_bench("cot")

    def cell(acc, ci):
        return {"accuracy": acc, "ci95": ci}

    methods = {"zero-shot": cell(0.2, 0.1), "few-shot-2": cell(0.3, 0.1), "few-shot-8": cell(0.3, 0.1),
               "zero-shot-cot": cell(0.45, 0.1), "few-shot-cot": cell(0.55, 0.1), "self-consistency": cell(0.5, 0.1)}
    got = cot.verdicts({"tasks": {"t": {"methods": methods}}})["t"]
    # 0.45 − 0.1 > 0.2 + 0.1; 0.55 − 0.1 = 0.45 > 0.3 + 0.1; the best CoT row (few-shot-cot) against the best direct one
    assert got == {"zero_shot_cot_beats_zero_shot": True, "few_shot_cot_beats_few_shot_8": True, "cot_helps": True, "cot_hurts": False}
    methods["few-shot-cot"] = cell(0.48, 0.1)  # 0.38 < 0.40: overlapping CIs are no verdict
    methods["self-consistency"] = cell(0.48, 0.1)
    got = cot.verdicts({"tasks": {"t": {"methods": methods}}})["t"]
    assert got["few_shot_cot_beats_few_shot_8"] is False and got["cot_helps"] is False and got["cot_hurts"] is False


def test_the_letter_match_rule_picks_the_candidate_with_the_scrambled_words_letters():
    bench = load_bench("icl_prompt")
    assert bench.letter_match("d.r,o w", ["wood", "word", "drew"]) == "word"  # marks and spaces dropped
    assert bench.letter_match("rdow", ["wood", "drew", "word"]) == "word"
    # no exact match: the fewest letters off wins, ties go to the first listed
    assert bench.letter_match("abcd", ["abxy", "abcx", "abcy"]) == "abcx"


def test_the_same_image_probe_shows_the_query_s_own_class_support_image():
    """bench/vl_same_image.py: the query (last image) becomes the first support image of its class; the rest is kept."""
    probe = load_bench("vl_same_image")
    labels = [0, 1, 1, 0, 1]  # support 0, 1, 2, 3; the query (index 4) is of class 1
    assert probe.same_image_query((0, 1, 2, 3, 4), labels) == [0, 1, 2, 3, 1]
    assert probe.same_image_query((3, 2, 4), labels) == [3, 2, 2]


def test_the_token_oracle_codes_are_consistent_per_attribute_and_the_control_is_not():
    """bench/vl_token_oracle.py: ``consistent`` gives every image of a colour one token and of a shape another; the
    ``random`` control gives two images with the same description different tokens."""
    import torch

    oracle = load_bench("vl_token_oracle")

    class Link:
        dim, vocab_size = 4, 5000

        def embed(self, ids):
            return torch.nn.functional.one_hot(ids % 4, 4).float() * (ids[..., None] + 1)

    descriptions = ["a small red circle.", "a large red star.", "a small blue circle.", "a large red circle."]
    consistent = oracle.token_prefixes(Link(), descriptions, "consistent")
    assert torch.equal(consistent[0, 0], consistent[1, 0]) and torch.equal(consistent[0, 1], consistent[2, 1])
    assert torch.equal(consistent[0], consistent[3]) and not torch.equal(consistent[0, 0], consistent[2, 0])
    random = oracle.token_prefixes(Link(), descriptions, "random")
    assert not torch.equal(random[0], random[3])


def test_the_tower_cluster_codes_give_one_token_per_cluster_and_purity_counts_majorities():
    """bench/vl_token_oracle.py's tower-clusters row: images in one k-means cluster share their prefix, other clusters
    differ; purity is the share of items in their cluster's commonest class."""
    import torch

    oracle = load_bench("vl_token_oracle")

    class Link:
        dim, vocab_size = 8, 5000

        def embed(self, ids):
            return torch.nn.functional.one_hot(ids % 8, 8).float() * (ids[..., None] + 1)

    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    clusters = oracle.cluster_codes(features, 2)
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]
    table = oracle.cluster_prefixes(Link(), clusters)
    assert torch.equal(table[0], table[1]) and not torch.equal(table[1, 1], table[2, 1]) and torch.equal(table[1, 0], table[2, 0])
    assert oracle.purity_of([0, 0, 1, 1], [5, 6, 7, 7]) == 0.75
