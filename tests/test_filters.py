"""Filtering pairs: each rule against the planted noise of a generated pool (precision and recall from the labels),
near-duplicate search against a brute-force scan, a reason for every dropped row, one-line errors, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fewshot.cli import main
from fewshot.data.filters import FilterConfig, filter_config, filter_manifest, filter_pairs, near_duplicates
from fewshot.data.pairs import read_manifest
from fewshot.data.scenes import NoiseConfig, make_pool, write_scenes
from fewshot.errors import DataError

NOISE = NoiseConfig(mismatched=0.05, near_miss=0.05, boilerplate=0.05, shared_alt=0.05, near_duplicate=0.1)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("filters") / "pool"
    write_scenes(out, 300, size=16, objects=(1, 3), seed=4, noise=NOISE)
    return out


def brute_force_duplicates(images: np.ndarray, tolerance: int) -> dict[int, int]:
    """Every image against every earlier kept one, pixel by pixel."""
    x = images.reshape(len(images), -1).astype(int)
    copies: dict[int, int] = {}
    for i in range(len(x)):
        for j in range(i):
            if j not in copies and np.abs(x[i] - x[j]).max() <= tolerance:
                copies[i] = j
                break
    return copies


def test_near_duplicates_equal_a_brute_force_scan() -> None:
    pool = make_pool(200, size=16, objects=(1, 2), seed=1, noise=NoiseConfig(near_duplicate=0.15))
    found = near_duplicates(pool.images, 4)
    assert found == brute_force_duplicates(pool.images, 4)
    assert found == {i: d for i, d in enumerate(pool.duplicate_of) if d >= 0}  # the planted ones, each to its source
    # Negative control: below the planted ±3 grey levels the search misses copies.
    assert len(near_duplicates(pool.images, 1)) < len(found)


def test_each_rule_against_the_planted_noise(pool_dir: Path, tmp_path: Path) -> None:
    summary = filter_manifest(pool_dir / "manifest.tsv", tmp_path / "kept.tsv")
    report = summary["report"]
    # Boilerplate alt-text is a file name (every one caught, nothing else); the shared alt-text is on more than
    # ten images (every one caught); every planted near-duplicate image, and no original, is found.
    assert report["filename"]["recall"] == 1.0 and report["filename"]["precision"] == 1.0
    assert report["shared_alt"]["recall"] == 1.0
    assert report["near_duplicate"]["recall"] == 1.0 and report["near_duplicate"]["precision"] == 1.0
    assert report["all"]["recall_by_kind"]["boilerplate"] == 1.0
    # Text rules cannot see a mismatched or near-miss caption: those stay for a CLIP-score filter.
    assert report["all"]["recall_by_kind"]["near_miss"] < 0.5
    manifest = read_manifest(pool_dir / "manifest.tsv")
    kept = read_manifest(tmp_path / "kept.tsv")
    with open(tmp_path / "kept.dropped.tsv", newline="") as f:
        dropped = list(csv.DictReader(f, delimiter="\t"))
    assert len(kept) + len(dropped) == len(manifest) == summary["rows"] and summary["dropped"] == len(dropped)
    by_line = dict(zip(manifest.lines, manifest.captions))
    assert all(by_line[int(d["line"])] == d["title"] and d["reason"] for d in dropped)
    assert sum(1 for d in dropped if d["reason"] == "near_duplicate") == report["near_duplicate"]["dropped"]
    assert "boilerplate" not in kept.noise and "near_duplicate" not in kept.noise and "shared_alt" not in kept.noise


def test_text_rules() -> None:
    captions = ["IMG_0423.jpg", "a red", "a red circle", "big big big red circle", "red red blue blue red blue", "DSC01234", "a photo of a ring"]
    result = filter_pairs(captions, list(range(len(captions))), None, FilterConfig(rules=("filename", "length", "unique_words", "repetition")))
    assert result.reasons == {0: "filename", 1: "length", 3: "repetition", 4: "unique_words", 5: "filename"}
    assert result.kept == [2, 6] and result.flags["length"] == {1, 5}  # "IMG_0423.jpg" is three words: img, 0423, jpg


def test_bad_filter_input_is_one_line(pool_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError, match="keeps none"):
        filter_manifest(pool_dir / "manifest.tsv", tmp_path / "k.tsv", FilterConfig(min_words=40, rules=("length",)))
    with pytest.raises(DataError, match="unknown filter rule"):
        FilterConfig(rules=("blur",))
    with pytest.raises(DataError, match="needs clip_run"):
        FilterConfig(rules=("length", "clip_score"))
    with pytest.raises(DataError, match="unknown filter option"):
        filter_config(["max_share=3"])
    assert filter_config(["max_shared=3", "rules=[length,shared_alt]"]) == FilterConfig(rules=("length", "shared_alt"), max_shared=3)
    code = main(["data", "filter", str(pool_dir / "manifest.tsv"), "--out", str(tmp_path / "cli.tsv"), "--json", "max_shared=10"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] + out["dropped"] == out["rows"] and out["report"]["shared_alt"]["recall"] == 1.0
    assert main(["data", "filter", str(pool_dir / "manifest.tsv"), "--out", str(tmp_path / "cli.tsv")]) == 2  # never over a file
    assert main(["data", "filter", str(pool_dir / "manifest.tsv"), "--out", str(tmp_path / "x.tsv"), "min_words=40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "already exists" in err and "keeps none" in err


def test_clip_score_rule_scores_each_row_with_the_run(pool_dir: Path, tmp_path: Path) -> None:
    """LAION's rule: api.clip_scores equals the cosine of each row's image and caption embedded one at a time, and the
    rule drops exactly the rows under the threshold (a run of two steps: the mechanics, not a trained model's precision)."""
    import torch

    from fewshot import api
    from fewshot.data.pairs import load_pairs

    corpus = tmp_path / "play.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 20)
    config = api.load_config(overrides=[
        "method=clip", "data.source=pairs", f"data.path={pool_dir / 'manifest.tsv'}", f"data.corpus={corpus}", "data.vocab_size=300",
        "data.seq_len=24", "data.image_size=16", "encoder.name=conv4", "train.steps=2", "train.batch_size=8", f"out={tmp_path}",
        "name=clip", "method.text.dim=32", "method.text.depth=1", "method.text.heads=2", "method.embed_dim=16",
    ])
    run_dir = api.pretrain(config, progress=False).run_dir
    scores = api.clip_scores(run_dir, pool_dir / "manifest.tsv", batch_size=7)
    run = api.open_run(run_dir)
    method = run.method().eval()
    pairs = load_pairs(pool_dir / "manifest.tsv", run.tokenizer(), 24, 16)
    with torch.no_grad():
        for r in range(0, len(pairs), 37):
            image = method.embed_images(pairs.batch(torch.tensor([r]))["images"])[0].double()
            text = method.embed_texts(pairs.tokens[r][None])[0].double()
            assert abs(float(image @ text / (image.norm() * text.norm())) - scores[r]) < 1e-5
    threshold = float(np.median(scores))
    summary = api.filter_pairs(pool_dir / "manifest.tsv", tmp_path / "kept.tsv", [f"clip_run={run_dir}", f"clip_threshold={threshold}",
                                                                                  "rules=[clip_score]"])
    assert summary["report"]["clip_score"]["flagged"] == int((scores < threshold).sum()) == summary["dropped"]
    assert summary["report"]["clip_score"]["target"] == "mismatched+near_miss"
