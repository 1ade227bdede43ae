"""Captioned scenes: one seed gives the same scenes and captions (hash pinned); every caption is true of its
scene and every near miss false (the verifier parses captions, it never sees their templates); held-out
(shape, colour) pairs never reach the pool; planted noise counts are exact; the evaluation sets; the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter

import numpy as np
import pytest

from fewshot.cli import main
from fewshot.data.scenes import (
    COLOURS, FEWSHOT_SHAPES, NOISE_KINDS, PRETRAIN_SHAPES, SHARED_ALT_TEXT, SIZES, NoiseConfig, Obj, Scene, caption_is_true,
    captions_for, fewshot_shape_images, heldout_pairs, make_pool, named_pairs, near_miss, noise_config, object_range, parse_caption, read_scenes, render,
    sample_scenes, seen_pairs, single_object_test, swap_test, two_object_test, write_scenes,
)
from fewshot.errors import DataError

NOISE = NoiseConfig(mismatched=0.1, near_miss=0.15, boilerplate=0.05, shared_alt=0.07, near_duplicate=0.2)


def pool_digest(pool) -> str:
    h = hashlib.sha256(pool.images.tobytes())
    h.update("\n".join(f"{i}\t{c}\t{k}" for i, c, k in zip(pool.row_image, pool.row_caption, pool.row_noise)).encode())
    return h.hexdigest()


def test_one_seed_gives_the_same_scenes_and_captions() -> None:
    pool = make_pool(40, size=32, objects=(1, 3), seed=0, noise=NOISE)
    # Pinned: the scene, caption, noise and pixel streams on every machine (numpy's PCG64; uint8 pixels).
    assert pool_digest(pool) == "73d7febd3a38a33ec4da2c7653c83e443cad605daf0e7fb27e1188a35ed19412"
    again = make_pool(40, size=32, objects=(1, 3), seed=0, noise=NOISE)
    assert pool_digest(again) == pool_digest(pool)
    assert pool_digest(make_pool(40, size=32, objects=(1, 3), seed=1, noise=NOISE)) != pool_digest(pool)
    # The captions do not depend on drawing: a pool without images has the same rows.
    blind = make_pool(40, size=32, objects=(1, 3), seed=0, noise=NOISE, draw=False)
    assert (blind.row_caption, blind.row_noise, blind.row_image) == (pool.row_caption, pool.row_noise, pool.row_image)


def test_every_caption_is_true_and_every_near_miss_false_on_10k_scenes() -> None:
    heldout = heldout_pairs(0)
    scenes = sample_scenes(np.random.default_rng(5), 10_000, (1, 4), seen_pairs(heldout))
    rng = np.random.default_rng(6)
    kinds: Counter = Counter()
    for scene in scenes:
        captions = captions_for(scene, rng)
        assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
        for caption in captions:
            assert caption_is_true(caption, scene), (caption, scene)
            kinds[parse_caption(caption).kind] += 1
        miss = near_miss(scene, rng, heldout)
        assert parse_caption(miss) is not None and not caption_is_true(miss, scene), (miss, scene)
    # The grammar's three kinds of sentence are all exercised, each thousands of times.
    assert min(kinds[k] for k in ("exists", "count", "relation")) > 1000, kinds


def test_verifier_catches_one_changed_attribute_and_relation() -> None:
    """Negative control: captions edited by hand (not by the near-miss generator) in one word turn false."""
    scene = Scene([Obj("circle", "red", "large", 0.25, 0.3), Obj("star", "blue", "small", 0.7, 0.75)])
    true = ["a large red circle and a small blue star", "a red circle is left of a blue star", "a blue star is below a red circle",
            "a red circle is bigger than a blue star", "there are two objects", "there is one red shape", "two objects: a red circle and a star"]
    edited = ["a large green circle and a small blue star", "a large red square and a small blue star", "a small red circle and a small blue star",
              "a red circle is right of a blue star", "a blue star is above a red circle", "a red circle is smaller than a blue star",
              "there are three objects", "there are two red shapes", "three objects: a red circle, a star and a star"]
    assert all(caption_is_true(c, scene) for c in true)
    assert not any(caption_is_true(c, scene) for c in edited)
    # Distinct objects: one red circle cannot stand for two; text outside the grammar is never true.
    assert not caption_is_true("a red circle and a red circle", scene)
    assert not caption_is_true("IMG_0423.jpg", scene) and not caption_is_true(SHARED_ALT_TEXT, scene)
    assert parse_caption("a red circle is near a blue star") is None and parse_caption("there are one circle") is None


def heldout_violations(pool) -> list[str]:
    """Every place a held-out pair reaches the pool: an object of a scene graph, or a pair named by a caption."""
    found = [f"image {i}: {o.colour} {o.shape}" for i, s in enumerate(pool.scenes) for o in s.objects if (o.shape, o.colour) in pool.heldout]
    found += [f"row {r}: {c!r}" for r, c in enumerate(pool.row_caption) if named_pairs(c) & pool.heldout]
    return found


def test_heldout_pairs_never_reach_the_pool_and_the_check_sees_a_planted_one() -> None:
    heldout = heldout_pairs(0)
    assert len(heldout) == 16 and heldout != heldout_pairs(1)
    # CoGenT: every shape and every colour is held out exactly twice, so each is still seen six times.
    assert Counter(s for s, _ in heldout) == {s: 2 for s in PRETRAIN_SHAPES}
    assert Counter(c for _, c in heldout) == {c: 2 for c in COLOURS}
    pool = make_pool(3000, objects=(1, 3), seed=0, noise=NOISE, draw=False)
    assert pool.heldout == heldout and heldout_violations(pool) == []
    drawn = {(o.shape, o.colour) for s in pool.scenes for o in s.objects}
    assert drawn == set(seen_pairs(heldout))  # all 48 seen pairs, none of the 16 held out
    named = set().union(*(named_pairs(c) for c in pool.row_caption))
    assert named and named <= set(seen_pairs(heldout))
    assert not {w for c in pool.row_caption for w in c.split()} & set(FEWSHOT_SHAPES)
    # Negative control: one planted held-out object and one caption naming a held-out pair are both reported.
    shape, colour = sorted(heldout)[0]
    pool.scenes[7].objects[0].colour, pool.scenes[7].objects[0].shape = colour, shape
    pool.row_caption[11] = f"a {colour} {shape} is left of a red shape"
    assert len(heldout_violations(pool)) == 2


def test_planted_noise_counts_are_exact_and_labelled() -> None:
    pool = make_pool(300, size=16, objects=(1, 3), seed=2, noise=NOISE)
    rows, counts = len(pool.row_caption), Counter(pool.row_noise)
    for kind in NOISE_KINDS[:4]:
        assert counts[kind] == round(getattr(NOISE, kind) * rows), kind
    dups = [i for i, d in enumerate(pool.duplicate_of) if d >= 0]
    assert len(dups) == round(NOISE.near_duplicate * 300)
    assert counts["near_duplicate"] == sum(pool.row_image.count(i) for i in dups)
    assert counts[""] == rows - sum(counts[k] for k in NOISE_KINDS)
    for i in dups:  # a near copy of an original image, never byte-identical, never of another duplicate
        src = pool.duplicate_of[i]
        diff = np.abs(pool.images[i].astype(int) - pool.images[src].astype(int))
        assert src < i and pool.duplicate_of[src] == -1 and 0 < diff.max() <= 3
        assert pool.scenes[i] == pool.scenes[src]
    for r, (i, caption, kind) in enumerate(zip(pool.row_image, pool.row_caption, pool.row_noise)):
        scene = pool.scenes[i]
        if kind in ("", "near_duplicate"):
            assert caption_is_true(caption, scene)
        elif kind in ("mismatched", "near_miss"):
            assert parse_caption(caption) is not None and not caption_is_true(caption, scene)
        else:
            assert parse_caption(caption) is None
    assert {c for c, k in zip(pool.row_caption, pool.row_noise) if k == "shared_alt"} == {SHARED_ALT_TEXT}
    # A mismatched caption is false here but true of another image.
    assert all(any(caption_is_true(c, s) for s in pool.scenes) for c, k in zip(pool.row_caption, pool.row_noise) if k == "mismatched")
    with pytest.raises(DataError, match="add up to 1"):
        NoiseConfig(mismatched=0.5, near_miss=0.5)


def test_render_puts_each_object_where_its_graph_says_in_its_colour() -> None:
    """Independent of the sprite code: the ink centroid of a point-symmetric shape lies at (x, y)·size (of any shape,
    within its radius), and fully covered pixels have the object's colour times its shade."""
    rng = np.random.default_rng(0)
    symmetric = ("circle", "square", "cross", "ring", "diamond", "hourglass", "frame")
    r = SIZES["large"] * 64
    for shape, colour in itertools.product(PRETRAIN_SHAPES + FEWSHOT_SHAPES, ["red", "blue", "white"]):
        scene = Scene([Obj(shape, colour, "large", float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)), 0.9)])
        image = render([scene], 64)[0].astype(float) / 255
        ink = image.max(axis=0)
        ys, xs = np.mgrid[:64, :64] + 0.5
        cx, cy = (ink * xs).sum() / ink.sum(), (ink * ys).sum() / ink.sum()
        o = scene.objects[0]
        tol = 0.05 * r if shape in symmetric else 0.5 * r
        assert abs(cx - o.x * 64) < tol and abs(cy - o.y * 64) < tol, (shape, cx, cy, o)
        solid = image[:, ink >= ink.max() - 1e-9].mean(axis=1)
        assert np.allclose(solid, np.asarray(COLOURS[colour]) * 0.9, atol=1 / 255), (shape, colour, solid)
    masks = {s: render([Scene([Obj(s, "white", "large", 0.5, 0.5)])], 32)[0, 0] for s in PRETRAIN_SHAPES + FEWSHOT_SHAPES}
    assert len({m.tobytes() for m in masks.values()}) == 16  # 16 different drawings


def test_evaluation_sets() -> None:
    single = single_object_test(2, size=16, seed=0, split_seed=0)
    assert single.images.shape == (128, 3, 16, 16) and len(single.classes) == 64
    assert single.groups.count("held-out") == 16 and single.classes[0] == "red circle"
    heldout = heldout_pairs(0)
    for scene, label in zip(single.scenes, single.labels):
        (o,) = scene.objects
        assert f"{o.colour} {o.shape}" == single.classes[label]
        assert (single.groups[label] == "held-out") == ((o.shape, o.colour) in heldout)
    images = single.image_set()
    assert images.labeled and images.images.shape == (128, 3, 16, 16) and float(images.images.max()) <= 1.0
    pairs = two_object_test(20, size=16, seed=0)
    assert all(len(s.objects) == 2 and all((o.shape, o.colour) not in heldout for o in s.objects) for s in pairs.scenes)
    assert all(caption_is_true(c, s) for s, cs in zip(pairs.scenes, pairs.captions) for c in cs)
    unseen = two_object_test(10, size=16, seed=0, heldout=True)
    assert all((o.shape, o.colour) in heldout for s in unseen.scenes for o in s.objects)
    few = fewshot_shape_images(3, size=16).image_set()
    assert few.classes == list(FEWSHOT_SHAPES) and few.labels.bincount().tolist() == [3] * 8


@pytest.mark.parametrize("kind", ["binding", "relation"])
def test_swap_tests_hold_one_true_and_one_false_caption_of_the_same_words(kind: str) -> None:
    test = swap_test(kind, 200, size=16, seed=0)
    seen = set(seen_pairs(heldout_pairs(0)))
    for scene, (true, swapped) in zip(test.scenes, test.captions):
        assert caption_is_true(true, scene) and not caption_is_true(swapped, scene), (true, swapped, scene)
        assert sorted(true.split()) == sorted(swapped.split())  # a bag of words cannot tell them apart
        assert named_pairs(true) | named_pairs(swapped) <= seen
    assert test.images.shape == (200, 3, 16, 16)


def test_write_scenes_folder_and_cli(tmp_path, capsys) -> None:
    out = tmp_path / "pool"
    code = main(["data", "scenes", "--n", "30", "--size", "16", "--objects", "1-2", "--seed", "0", "--out", str(out),
                 "--noise", "near_miss=0.1", "near_duplicate=0.1", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 30 and info["noise_rows"]["near_miss"] == round(0.1 * info["rows"])
    assert sorted(p.name for p in out.iterdir()) == ["fewshot-shapes", "images", "manifest.jsonl", "manifest.tsv", "scenes.json", "scenes.jsonl"]
    assert len(list((out / "images").iterdir())) == 30
    assert sorted(p.name for p in (out / "fewshot-shapes").iterdir()) == sorted(FEWSHOT_SHAPES)
    assert all(len(list(p.iterdir())) == 40 for p in (out / "fewshot-shapes").iterdir())
    graphs = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert sum(g["duplicate_of"] >= 0 for g in graphs) == 3
    # The scene graphs read back are the pool's, and every clean caption of the manifest is true of its image's.
    scenes = read_scenes(out)
    assert list(scenes.values()) == make_pool(30, objects=(1, 2), seed=0, noise=noise_config(["near_miss=0.1", "near_duplicate=0.1"]), draw=False).scenes
    rows = [line.split("\t") for line in (out / "manifest.tsv").read_text().splitlines()[1:]]
    assert all(caption_is_true(title, scenes[path]) == (noise in ("", "near_duplicate")) for path, title, noise in rows)
    # Never into a folder that holds files; bad options are one line.
    assert main(["data", "scenes", "--n", "5", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["data", "scenes", "--n", "5", "--objects", "0-9", "--out", str(tmp_path / "x")]) == 2
    assert main(["data", "scenes", "--n", "5", "--noise", "blur=0.1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "objects per scene" in err and "blur" in err
    assert object_range("2") == (2, 2)
    with pytest.raises(DataError):
        write_scenes(out, 5)


def test_the_near_miss_check_fails_a_verifier_blind_to_colour(monkeypatch) -> None:
    """Negative control for the 10⁴-scene check: a verifier whose noun phrases ignore colour calls near misses true."""
    from fewshot.data import scenes as module

    heldout = heldout_pairs(0)
    scenes = sample_scenes(np.random.default_rng(5), 500, (1, 4), seen_pairs(heldout))
    rng = np.random.default_rng(6)
    misses = [near_miss(s, rng, heldout) for s in scenes]
    assert not any(caption_is_true(m, s) for m, s in zip(misses, scenes))
    real = module._matches
    monkeypatch.setattr(module, "_matches", lambda desc, o: real((desc[0], None, desc[2]), o))
    assert sum(caption_is_true(m, s) for m, s in zip(misses, scenes)) > 20
