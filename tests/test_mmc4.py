"""MMC4's assignment: equal to a brute-force search over every partial matching on small matrices (a greedy
per-image argmax, the negative control, is not); the floor leaves an unrelated image unassigned; generated documents
through `fewshot data filter mode=mmc4` with a tiny CLIP run, and precision / recall against a hand count."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from fewshot.data.documents import Document, assign_images, assignment_report, make_documents, read_documents
from fewshot.errors import DataError


def brute_force(similarity: np.ndarray, floor: float) -> tuple[float, set[tuple[int, int]]]:
    """The best total over every partial matching of allowed pairs (s ≥ floor), searched exhaustively."""
    n, m = similarity.shape
    best, best_pairs = 0.0, set()
    for size in range(1, min(n, m) + 1):
        for images in itertools.combinations(range(n), size):
            for sentences in itertools.permutations(range(m), size):
                pairs = list(zip(images, sentences))
                if all(similarity[i, j] >= floor for i, j in pairs):
                    total = sum(similarity[i, j] for i, j in pairs)
                    if total > best + 1e-12:
                        best, best_pairs = total, set(pairs)
    return best, best_pairs


def greedy_argmax(similarity: np.ndarray, floor: float) -> list[tuple[int, int]]:
    """Negative control: each image to its most similar sentence, not one-to-one."""
    return [(i, int(row.argmax())) for i, row in enumerate(similarity) if row.max() >= floor]


@pytest.mark.parametrize("assign", [assign_images, greedy_argmax], ids=["assignment", "greedy argmax (broken)"])
def test_the_assignment_equals_a_brute_force_search(assign) -> None:
    rng = np.random.default_rng(0)
    agree = []
    for shape in [(3, 4), (4, 3), (4, 4), (2, 5), (5, 2)]:
        for _ in range(6):
            s = rng.uniform(-0.2, 1.0, size=shape)
            for floor in (0.0, 0.3, 0.6):
                _, expected = brute_force(s, floor)
                agree.append(set(assign(s, floor)) == expected)
    assert all(agree) == (assign is assign_images)


def test_the_floor_leaves_an_unrelated_image_unassigned() -> None:
    s = np.array([[0.9, 0.1, 0.2],   # illustrates sentence 0
                  [0.2, 0.1, 0.8],   # illustrates sentence 2
                  [0.12, 0.14, 0.1]])  # unrelated: like nothing, yet sentence 1 is free
    assert assign_images(s, 0.0) == [(0, 0), (1, 2), (2, 1)]  # without a floor it takes the free sentence
    assert assign_images(s, 0.15) == [(0, 0), (1, 2)]
    doc = Document("d", ["a", "b", "c"], ["x", "y", "z"], [0, 2, None])
    report = assignment_report([doc], [assign_images(s, 0.15)])
    assert (report["precision"], report["recall"], report["unrelated_unassigned"]) == (1.0, 1.0, 1.0)
    report = assignment_report([doc], [assign_images(s, 0.0)])
    assert (report["precision"], report["recall"], report["unrelated_unassigned"]) == (2 / 3, 1.0, 0.0)


def test_documents_through_the_filter_command(tmp_path: Path, monkeypatch) -> None:
    from fewshot import api
    from fewshot.data.scenes import write_scenes

    file = make_documents(tmp_path / "docs", 6, size=16, seed=0, sentences=(2, 3))
    docs = read_documents(file)
    assert len(docs) == 6 and all(sum(t is None for t in d.truth) == 1 and 1 <= len(d.images) - 1 <= len(d.sentences) for d in docs)
    for d in docs:  # each image's truth names one of its document's sentences, each at most once
        shown = [t for t in d.truth if t is not None]
        assert len(set(shown)) == len(shown)
    write_scenes(tmp_path / "pool", 30, size=16, objects=(1, 2), seed=0, fewshot_per_shape=1)
    corpus = tmp_path / "play.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 20)
    config = api.load_config(overrides=[
        "method=clip", f"data.corpus={corpus}", "data.source=pairs", f"data.path={tmp_path / 'pool' / 'manifest.tsv'}",
        "data.vocab_size=300", "data.seq_len=24", "data.image_size=16", "encoder.name=conv4", "train.steps=2", "train.batch_size=8",
        f"out={tmp_path}", "name=clip", "method.text.dim=32", "method.text.depth=1", "method.text.heads=2", "method.embed_dim=16"])
    run_dir = api.pretrain(config, progress=False).run_dir
    import fewshot.data.documents as documents

    seen = []

    def shifted(similarity, floor):  # a two-step run's cosines may all be < 0: shifted, every pair is allowed
        seen.append(similarity)
        return assign_images(similarity + 2, floor)

    monkeypatch.setattr(documents, "assign_images", shifted)
    summary = api.filter_pairs(file, tmp_path / "pairs.tsv", ["mode=mmc4", f"clip_run={run_dir}", "floor=0"])
    report = summary["report"]
    assert [s.shape for s in seen] == [(len(d.images), len(d.sentences)) for d in docs]
    assert report["assigned"] == sum(min(s.shape) for s in seen)  # every pair allowed: a complete matching
    rows = (tmp_path / "pairs.tsv").read_text().splitlines()[1:]
    assert len(rows) == summary["pairs"] == report["assigned"]
    correct = sum(row.split("\t")[2] == "" for row in rows)
    assert report["precision"] == pytest.approx(correct / len(rows))
    assert report["recall"] == pytest.approx(correct / sum(t is not None for d in docs for t in d.truth))
    with pytest.raises(DataError, match="set clip_run"):
        api.filter_pairs(file, tmp_path / "other.tsv", ["mode=mmc4"])
    with pytest.raises(DataError, match="unknown filter mode"):
        api.filter_pairs(file, tmp_path / "other.tsv", ["mode=mmc5"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentences": ["a"], "images": ["x.png"], "truth": [3]}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        read_documents(bad)


def test_the_documents_command_and_its_one_line_errors(tmp_path: Path, capsys) -> None:
    from fewshot.cli import main

    assert main(["data", "documents", "--n", "2", "--size", "16", "--out", str(tmp_path / "docs")]) == 0
    assert len(read_documents(tmp_path / "docs" / "documents.jsonl")) == 2
    assert main(["data", "documents", "--n", "2", "--out", str(tmp_path / "docs")]) != 0  # exists
    assert main(["data", "filter", str(tmp_path / "docs" / "documents.jsonl"), "--out", str(tmp_path / "p.tsv"), "mode=mmc4"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "already exists" in err and "set clip_run" in err


@pytest.mark.parametrize("action, expected", [("documents", 1000), ("scenes", 50000)])
def test_each_data_action_has_its_own_default_count(tmp_path: Path, monkeypatch, action, expected) -> None:
    """Without --n, documents default to 1,000 (not the 50,000 images of `data scenes`), scenes to 50,000."""
    import fewshot.data.documents as documents
    import fewshot.data.scenes as scenes
    from fewshot.cli import main

    seen = {}

    def record(out, n, *args, **kwargs):  # note the count, then stop before anything is written
        seen["n"] = n
        raise DataError("recorded")

    monkeypatch.setattr(documents, "make_documents", record)
    monkeypatch.setattr(scenes, "write_scenes", record)
    assert main(["data", action, "--out", str(tmp_path / "x")]) != 0
    assert seen["n"] == expected
