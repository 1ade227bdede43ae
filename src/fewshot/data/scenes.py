"""Captioned scenes: a ShapeWorld-like world with known ground truth, for vision–language pre-training.

Every image is drawn from a scene graph (plain dataclasses, JSON-serialisable) and keeps 3–5
paraphrased captions from a small grammar. :func:`caption_is_true` *parses* a caption with its own
recursive-descent parser and evaluates the parse on the scene graph: it never looks at the template
that produced the caption, so it is an independent check of the generator.

The world (Kuhnle & Copestake 2017, ShapeWorld; Johnson et al. 2017, CLEVR's CoGenT split):

* 16 shapes: :data:`PRETRAIN_SHAPES` appear in pre-training; :data:`FEWSHOT_SHAPES` are kept for
  few-shot episodes and never drawn or named in the pool. 8 colours, 2 sizes, position and shade jitter.
* Relations between two objects: left of / right of (centre x), above / below (centre y, y down),
  bigger / smaller than (size). Counts: exactly N objects, or exactly N objects of a kind.
* A CoGenT-style split (:func:`heldout_pairs`): a seeded quarter of the 64 shape–colour pairs of the
  pre-training shapes is never drawn nor named in the pool, while every shape and colour is seen
  (each shape loses 2 colours and each colour 2 shapes, so 6 of 8 stay seen on both sides).
* Labelled noise with exact counts (:class:`NoiseConfig`): mismatched captions, near misses (one
  attribute, relation or count wrong), boilerplate alt-text, one alt-text shared by many images, and
  near-duplicate images; each row carries its label.

Semantics the verifier applies (the generator keeps a margin so that what is true is also visible):
an article ("a red circle") is existential; the objects of a list ("a red circle and a blue star")
are distinct objects; a number is exact ("there are two circles": exactly two); a relation holds
between *some* two distinct objects matching its noun phrases. A caption outside the grammar
(alt-text such as "IMG_0423.jpg") is true of no scene.

Images are drawn with numpy alone: each (shape, size, quarter-pixel offset) is rasterised once at
4×4 samples per pixel (an even-odd point-in-polygon test) into a coverage sprite, and a scene is
the sprites alpha-blended in their colours onto black, rounded to uint8 (so a PNG round trip is exact).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.data.types import ImageSet
from fewshot.errors import DataError
from fewshot.io import atomic_write

__all__ = [
    "COLOURS", "FEWSHOT_SHAPES", "NOISE_KINDS", "PRETRAIN_SHAPES", "SHAPES", "SIZES", "NoiseConfig", "Obj", "Parse", "Scene",
    "LabelledScenes", "ScenePool", "caption_is_true", "captions_for", "fewshot_shape_images", "heldout_pairs", "make_pool", "named_pairs", "object_words",
    "near_miss", "noise_config", "object_range", "parse_caption", "read_scenes", "render", "sample_scenes", "scene_from_json", "seen_pairs", "single_object_test", "swap_test", "two_object_test", "write_scenes",
]

# ----------------------------------------------------------------------------- the world


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    outer, inner_pts = _regular(points), _regular(points, inner, -math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


Polygon = list[tuple[float, float]]
# Each shape: polygons in unit coordinates (radius about 1, y down) drawn in order, 1 = ink, 0 = cut out.
# Scenes never rotate, so a square and a diamond are different shapes.
SHAPES: dict[str, list[tuple[Polygon, int]]] = {
    "circle": [(_regular(40, 0.95), 1)],
    "square": [(_rect(-0.8, -0.8, 0.8, 0.8), 1)],
    "triangle": [(_regular(3), 1)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 1)],
    "star": [(_star(5, 0.42), 1)],
    "ring": [(_regular(40, 1.0), 1), (_regular(40, 0.5), 0)],
    "diamond": [([(0, -1), (1, 0), (0, 1), (-1, 0)], 1)],
    "arrow": [([(0, -1), (0.85, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1), (-0.85, -0.1)], 1)],
    # kept for few-shot episodes
    "ell": [([(-0.75, -1), (-0.2, -1), (-0.2, 0.45), (0.75, 0.45), (0.75, 1), (-0.75, 1)], 1)],
    "tee": [([(-1, -0.85), (1, -0.85), (1, -0.3), (0.28, -0.3), (0.28, 1), (-0.28, 1), (-0.28, -0.3), (-1, -0.3)], 1)],
    "half-disc": [([(math.cos(a), 0.45 - math.sin(a)) for a in np.linspace(0, math.pi, 25)], 1)],
    "hourglass": [([(-0.85, -1), (0.85, -1), (0.12, 0), (0.85, 1), (-0.85, 1), (-0.12, 0)], 1)],
    "crescent": [(_regular(40, 1.0), 1), ([(x + 0.55, y - 0.2) for x, y in _regular(40, 0.85)], 0)],
    "chevron": [([(-1, -0.2), (0, -1), (1, -0.2), (1, 0.55), (0, -0.25), (-1, 0.55)], 1)],
    "frame": [(_rect(-0.9, -0.9, 0.9, 0.9), 1), (_rect(-0.45, -0.45, 0.45, 0.45), 0)],
    "pentagon": [(_regular(5, 1.0), 1)],
}

def _bounded(shape: list[tuple[Polygon, int]]) -> list[tuple[Polygon, int]]:
    """The shape scaled so its farthest ink vertex lies at radius 1: objects placed as discs of their radius never overlap."""
    reach = max(math.hypot(x, y) for points, fill in shape if fill for x, y in points)
    return [([(x / reach, y / reach) for x, y in points], fill) for points, fill in shape]


SHAPES = {name: _bounded(parts) for name, parts in SHAPES.items()}
PRETRAIN_SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "arrow")
FEWSHOT_SHAPES = ("ell", "tee", "half-disc", "hourglass", "crescent", "chevron", "frame", "pentagon")
PLURALS = {s: s + ("es" if s.endswith(("ss", "sh", "ch", "x")) else "s") for s in SHAPES}
# Base colours (RGB in [0, 1]); each object scales its colour by a shade in [0.8, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.16), "orange": (0.96, 0.58, 0.12), "yellow": (0.94, 0.90, 0.20), "green": (0.20, 0.75, 0.27),
    "cyan": (0.20, 0.82, 0.86), "blue": (0.20, 0.35, 0.95), "purple": (0.63, 0.27, 0.86), "white": (0.95, 0.95, 0.95),
}
# Object radius as a fraction of the canvas side: at 32 px, about 3.5 and 5.4 px.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.17}
SHADE_RANGE = (0.8, 1.0)
GAP = 0.03  # free space between two objects' discs (canvas fractions)
MARGIN = 0.08  # a relation is stated only when the centres differ by this much on its axis (≈ 2.5 px at 32)
MAX_OBJECTS = 5
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass
class Obj:
    """One object of a scene: centre (x, y) as fractions of the canvas (y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    shade: float = 1.0


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def scene_from_json(data: dict) -> Scene:
    return Scene([Obj(**o) for o in data["objects"]])


def heldout_pairs(seed: int, shapes: tuple[str, ...] = PRETRAIN_SHAPES, colours: tuple[str, ...] = tuple(COLOURS)) -> frozenset[tuple[str, str]]:
    """A quarter of the (shape, colour) pairs, seeded: shape π(i) loses colours σ(i) and σ(i+1)
    (indices mod 8), so each shape and each colour is held out exactly twice and seen six times."""
    if len(shapes) != len(colours) or len(shapes) < 3:
        raise DataError(f"the CoGenT split needs as many shapes as colours (≥ 3), got {len(shapes)} and {len(colours)}")
    rng = np.random.default_rng([seed, 1])
    pi, sigma = rng.permutation(len(shapes)), rng.permutation(len(colours))
    n = len(shapes)
    return frozenset((shapes[pi[i]], colours[sigma[(i + j) % n]]) for i in range(n) for j in (0, 1))


def seen_pairs(heldout: frozenset[tuple[str, str]], shapes: tuple[str, ...] = PRETRAIN_SHAPES) -> list[tuple[str, str]]:
    return [(s, c) for s in shapes for c in COLOURS if (s, c) not in heldout]


# ----------------------------------------------------------------------------- scene graphs


def _place(rng: np.random.Generator, sizes: list[str]) -> list[tuple[float, float]] | None:
    """Centres with every object inside the canvas and discs apart by GAP; None after 100 tries."""
    placed: list[tuple[float, float, float]] = []
    for size in sizes:
        r = SIZES[size]
        for _ in range(100):
            x, y = rng.uniform(r, 1 - r, 2)
            if all(math.hypot(x - px, y - py) >= r + pr + GAP for px, py, pr in placed):
                placed.append((round(float(x), 4), round(float(y), 4), r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def sample_scenes(
    rng: np.random.Generator, n: int, objects: tuple[int, int], pairs: list[tuple[str, str]]
) -> list[Scene]:
    """``n`` scenes of ``objects[0]..objects[1]`` objects, each a (shape, colour) drawn uniformly from ``pairs``."""
    lo, hi = objects
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise DataError(f"objects per scene must satisfy 1 <= min <= max <= {MAX_OBJECTS}, got {lo}-{hi}")
    if not pairs:
        raise DataError("no (shape, colour) pairs to draw scenes from")
    scenes = []
    while len(scenes) < n:
        k = int(rng.integers(lo, hi + 1))
        kinds = [pairs[i] for i in rng.integers(0, len(pairs), k)]
        sizes = [("small", "large")[i] for i in rng.integers(0, 2, k)]
        shades = rng.uniform(*SHADE_RANGE, k)
        centres = _place(rng, sizes)
        if centres is None:
            continue
        scenes.append(Scene([Obj(s, c, z, x, y, round(float(h), 4)) for (s, c), z, (x, y), h in zip(kinds, sizes, centres, shades)]))
    return scenes


# ----------------------------------------------------------------------------- captions (the generator)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" or word == "hourglass" else "a"


def _np(size: str | None, colour: str | None, shape: str | None) -> str:
    words = [w for w in (size, colour, shape or "shape") if w]
    return f"{_article(words[0])} {' '.join(words)}"


def _count_phrase(n: int, colour: str | None = None, shape: str | None = None) -> str:
    noun = shape or "object"
    noun = noun if n == 1 else PLURALS.get(noun, noun + "s")
    verb = "is" if n == 1 else "are"
    return f"there {verb} {NUMBERS[n]} {' '.join(w for w in (colour, noun) if w)}"


def _listing(descriptions: list[str]) -> str:
    return descriptions[0] if len(descriptions) == 1 else f"{', '.join(descriptions[:-1])} and {descriptions[-1]}"


_LEADS = ("", "a picture of ", "a photo of ", "an image of ", "there is ")
_RELATIONS = {  # phrase → the relation it states (tested by _holds)
    "left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right",
    "above": "above", "below": "below", "bigger than": "bigger", "larger than": "bigger", "smaller than": "smaller",
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "bigger": "smaller", "smaller": "bigger"}
_PHRASES = {rel: [p for p, r in _RELATIONS.items() if r == rel] for rel in _OPPOSITE}


def _holds(rel: str, a: Obj, b: Obj, margin: float = 0.0) -> bool:
    if rel == "left":
        return a.x < b.x - margin
    if rel == "right":
        return a.x > b.x + margin
    if rel == "above":
        return a.y < b.y - margin
    if rel == "below":
        return a.y > b.y + margin
    if rel == "bigger":
        return a.size == "large" and b.size == "small"
    return a.size == "small" and b.size == "large"  # smaller


def _unique_description(scene: Scene, i: int) -> tuple[str | None, str | None, str | None] | None:
    """The shortest (size?, colour, shape) description that matches object ``i`` alone, or None."""
    o = scene.objects[i]
    for desc in ((None, o.colour, o.shape), (o.size, o.colour, o.shape)):
        if sum(_matches(desc, p) for p in scene.objects) == 1:
            return desc
    return None


def _matches(desc: tuple[str | None, str | None, str | None], o: Obj) -> bool:
    size, colour, shape = desc
    return (size is None or o.size == size) and (colour is None or o.colour == colour) and (shape is None or o.shape == shape)


def _relation_facts(scene: Scene) -> list[tuple[tuple, str, tuple]]:
    """(description a, relation, description b) for each ordered pair of uniquely described objects whose relation holds with the margin."""
    facts = []
    for i, j in itertools.permutations(range(len(scene.objects)), 2):
        da, db = _unique_description(scene, i), _unique_description(scene, j)
        if da is None or db is None:
            continue
        a, b = scene.objects[i], scene.objects[j]
        facts += [(da, rel, db) for rel in _OPPOSITE if _holds(rel, a, b, MARGIN)]
    return facts


def _relation_text(da: tuple, rel: str, db: tuple, rng: np.random.Generator) -> str:
    phrases = _PHRASES[rel]
    return f"{_np(*da)} is {phrases[int(rng.integers(len(phrases)))]} {_np(*db)}"


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """3–5 distinct true captions of ``scene`` (paraphrases from the grammar), drawn from ``rng``."""
    objs = scene.objects
    k = len(objs)
    full = [_np(o.size, o.colour, o.shape) for o in objs]
    plain = [_np(None, o.colour, o.shape) for o in objs]
    lead = _LEADS[int(rng.integers(len(_LEADS)))]
    candidates = [_listing(plain)]
    if k > 1:
        candidates.append(f"{NUMBERS[k]} objects: {_listing(full)}")
    candidates.append(_count_phrase(k))
    o = objs[int(rng.integers(k))]
    candidates += [f"there is {_np(None, o.colour, o.shape)}", f"a photo of {_np(o.size, None, o.shape)}",
                   f"{_np(None, o.colour, None)} on a black background"]
    shape_count = sum(p.shape == o.shape for p in objs)
    colour_count = sum(p.colour == o.colour for p in objs)
    candidates += [_count_phrase(shape_count, shape=o.shape), _count_phrase(colour_count, colour=o.colour, shape="shape")]
    facts = _relation_facts(scene)
    relations = [_relation_text(*facts[f], rng) for f in rng.permutation(len(facts))[:3]]
    others = list(dict.fromkeys(c for c in candidates if c != lead + _listing(full)))
    others = [others[i] for i in rng.permutation(len(others))]
    # A full description first, then 2-4 paraphrases in a seeded order, one relation among them when there is one.
    return [lead + _listing(full), *(relations[:1] + others + relations[1:])[: int(rng.integers(2, 5))]]


def near_miss(scene: Scene, rng: np.random.Generator, forbidden: frozenset[tuple[str, str]] = frozenset(),
              shapes: tuple[str, ...] = PRETRAIN_SHAPES) -> str:
    """A caption of ``scene`` with one attribute, relation or count wrong, false by construction from the
    scene graph: an object description changed in one attribute to one no object has; a relation between two
    uniquely described objects stated the other way round; the number of objects off by one. A changed
    description never names a (shape, colour) pair in ``forbidden`` (the held-out pairs)."""
    objs = scene.objects
    kinds = ["attribute", "count"] + (["relation"] if _relation_facts(scene) else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "relation":
        facts = _relation_facts(scene)
        da, rel, db = facts[int(rng.integers(len(facts)))]
        return _relation_text(da, _OPPOSITE[rel], db, rng)
    if kind == "count":
        k = len(objs)
        wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
        return _count_phrase(wrong)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    options = []
    for attr, values in (("size", tuple(SIZES)), ("colour", tuple(COLOURS)), ("shape", shapes)):
        for v in values:
            desc = {"size": o.size, "colour": o.colour, "shape": o.shape, attr: v}
            if v == getattr(o, attr) or (desc["shape"], desc["colour"]) in forbidden:
                continue
            if any(_matches((desc["size"], desc["colour"], desc["shape"]), p) for p in objs):
                continue
            options.append((desc["size"], desc["colour"], desc["shape"]))
    desc = options[int(rng.integers(len(options)))]  # never empty: 7 other colours, few objects
    parts = [_np(p.size, p.colour, p.shape) for p in objs]
    parts[i] = _np(*desc)
    return _listing(parts)


# ----------------------------------------------------------------------------- the verifier (a parser)

Desc = tuple[str | None, str | None, str | None]  # (size, colour, shape); None matches anything


@dataclass
class Parse:
    """A caption's logical form. kind: "exists" (distinct objects match ``phrases``; with ``total``, the
    scene has exactly that many objects), "count" (exactly ``number`` objects match ``phrases[0]``) or
    "relation" (distinct a, b with a ⊨ phrases[0], b ⊨ phrases[1] and ``relation``(a, b))."""

    kind: str
    phrases: list[Desc]
    number: int | None = None
    relation: str | None = None


class _NotInGrammar(Exception):
    pass


_WORD = re.compile(r"[a-z][a-z\-]*|[,:]")
_SHAPE_OF_PLURAL = {p: s for s, p in PLURALS.items()}
_ANY_NOUNS = ("shape", "object")


class _Parser:
    def __init__(self, caption: str) -> None:
        text = caption.strip().lower()
        if _WORD.sub("", text).strip():  # anything but words, commas and colons: not a caption of the grammar
            raise _NotInGrammar
        self.words, self.i = _WORD.findall(text), 0

    def peek(self, k: int = 0) -> str | None:
        return self.words[self.i + k] if self.i + k < len(self.words) else None

    def take(self, *words: str) -> bool:
        if tuple(self.words[self.i : self.i + len(words)]) == words:
            self.i += len(words)
            return True
        return False

    def expect(self, *words: str) -> None:
        if not self.take(*words):
            raise _NotInGrammar

    def phrase(self) -> Desc:
        """("a" | "an") [size] [colour] (shape | "shape" | "object")"""
        if not (self.take("a") or self.take("an")):
            raise _NotInGrammar
        return self.modifiers(plural=False)

    def modifiers(self, plural: bool) -> Desc:
        size = self.peek() if self.peek() in SIZES else None
        self.i += size is not None
        colour = self.peek() if self.peek() in COLOURS else None
        self.i += colour is not None
        noun = self.peek()
        self.i += 1
        if plural:
            if noun in _SHAPE_OF_PLURAL:
                return size, colour, _SHAPE_OF_PLURAL[noun]
            if noun in ("shapes", "objects"):
                return size, colour, None
        else:
            if noun in SHAPES:
                return size, colour, noun
            if noun in _ANY_NOUNS:
                return size, colour, None
        raise _NotInGrammar

    def phrase_list(self) -> list[Desc]:
        """phrase ("," phrase)* ["and" phrase]"""
        out = [self.phrase()]
        while self.take(","):
            out.append(self.phrase())
        if self.take("and"):
            out.append(self.phrase())
        elif len(out) > 1:
            raise _NotInGrammar  # "a, b" without "and"
        return out

    def number(self) -> int | None:
        word = self.peek()
        if word in NUMBERS[1:]:
            self.i += 1
            return NUMBERS.index(word)
        return None

    def caption(self) -> Parse:
        if self.take("there"):
            verb = "is" if self.take("is") else "are" if self.take("are") else None
            if verb is None:
                raise _NotInGrammar
            n = self.number()
            if n is not None:  # there is one object / there are two red circles
                if (n == 1) != (verb == "is"):
                    raise _NotInGrammar
                parse = Parse("count", [self.modifiers(plural=n > 1)], number=n)
            elif verb == "is":
                parse = Parse("exists", self.phrase_list())
            else:
                raise _NotInGrammar
        else:
            for lead in (("a", "picture", "of"), ("a", "photo", "of"), ("an", "image", "of")):
                if self.take(*lead):
                    break
            n = self.number()
            if n is not None:  # "three objects: a ..., a ... and a ..."
                self.expect("objects" if n > 1 else "object")
                self.expect(":")
                parse = Parse("exists", self.phrase_list(), number=n)
                if len(parse.phrases) != n:
                    raise _NotInGrammar
            else:
                first = self.phrase()
                if self.take("is"):
                    rel = next((r for p, r in sorted(_RELATIONS.items(), key=lambda kv: -len(kv[0])) if self.take(*p.split())), None)
                    if rel is None:
                        raise _NotInGrammar
                    parse = Parse("relation", [first, self.phrase()], relation=rel)
                else:
                    rest = []
                    if self.take(","):
                        rest = self.phrase_list()
                    elif self.take("and"):
                        rest = [self.phrase()]
                    parse = Parse("exists", [first, *rest])
        self.take("on", "a", "black", "background")
        if self.i != len(self.words):
            raise _NotInGrammar
        return parse


def parse_caption(caption: str) -> Parse | None:
    """The logical form of ``caption``, or None when it is not a sentence of the scene grammar."""
    try:
        return _Parser(caption).caption()
    except _NotInGrammar:
        return None


def _distinct_match(phrases: list[Desc], objs: list[Obj]) -> bool:
    return any(all(_matches(d, objs[j]) for d, j in zip(phrases, chosen)) for chosen in itertools.permutations(range(len(objs)), len(phrases)))


def caption_is_true(caption: str, scene: Scene) -> bool:
    """Whether ``caption`` is true of ``scene``: parsed by the grammar's own parser and evaluated on the
    scene graph (semantics in the module docstring); a caption outside the grammar is never true."""
    parse = parse_caption(caption)
    if parse is None:
        return False
    objs = scene.objects
    if parse.kind == "count":
        return sum(_matches(parse.phrases[0], o) for o in objs) == parse.number
    if parse.kind == "exists":
        if parse.number is not None and len(objs) != parse.number:
            return False
        return len(parse.phrases) <= len(objs) and _distinct_match(parse.phrases, objs)
    da, db = parse.phrases
    return any(_holds(parse.relation, a, b) for a, b in itertools.permutations(objs, 2) if _matches(da, a) and _matches(db, b))


def named_pairs(caption: str) -> set[tuple[str, str]]:
    """The (shape, colour) pairs a caption names together in one noun phrase (empty when it is outside the grammar)."""
    parse = parse_caption(caption)
    if parse is None:
        return set()
    return {(shape, colour) for _, colour, shape in parse.phrases if shape and colour}


def object_words(caption: str) -> tuple[str | None, str | None] | None:
    """The (colour, shape) a caption says of the one object it is about — "a photo of a small red circle" → ("red",
    "circle"), "a purple shape on a black background" → ("purple", None) — or None when it is not about exactly one
    described object: listings of several, counts ("there is one triangle" allows other objects beside it), relations,
    and captions outside the grammar. A single-phrase caption may still pick one object of several ("there is a cyan
    square" in a two-object scene), so the words are the caption's, not a count of the scene's objects."""
    parse = parse_caption(caption)
    if parse is None or parse.kind != "exists" or len(parse.phrases) != 1 or (parse.number or 1) != 1:
        return None
    _, colour, shape = parse.phrases[0]
    return None if colour is None and shape is None else (colour, shape)


# ----------------------------------------------------------------------------- rendering

SUPERSAMPLE = 4  # 4×4 samples per pixel; centres on a quarter-pixel grid


def _inside(polygon: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to +x crosses the polygon's edges an odd number of times."""
    inside = np.zeros(px.shape, dtype=bool)
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        if ay == by:
            continue
        crosses = (ay > py) != (by > py)
        x_cross = ax + (py - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (px < x_cross)
    return inside


@lru_cache(maxsize=None)
def _sprite(shape: str, radius_px: float, fx: float, fy: float) -> tuple[int, np.ndarray]:
    """(h, coverage (2h+1, 2h+1) float32) of ``shape`` centred at (h + fx, h + fy) pixels of the sprite."""
    h = int(math.ceil(radius_px)) + 1  # shapes reach radius 1 (_bounded)
    ss = (np.arange((2 * h + 1) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    px, py = np.meshgrid((ss - h - fx) / radius_px, (ss - h - fy) / radius_px)
    ink = np.zeros(px.shape, dtype=bool)
    for points, fill in SHAPES[shape]:
        hit = _inside(np.asarray(points, dtype=np.float64), px, py)
        ink = ink | hit if fill else ink & ~hit
    cov = ink.reshape(2 * h + 1, SUPERSAMPLE, 2 * h + 1, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)
    return h, cov


def render(scenes: list[Scene], size: int) -> np.ndarray:
    """(N, 3, size, size) uint8 images of ``scenes``: objects alpha-blended in order onto black."""
    if not isinstance(size, int) or size < 8:
        raise DataError(f"scene images must be at least 8 pixels, got size={size!r}")
    out = np.zeros((len(scenes), 3, size, size), dtype=np.uint8)
    for n, scene in enumerate(scenes):
        canvas = np.zeros((3, size, size), dtype=np.float32)
        for o in scene.objects:
            cx, cy = round(o.x * size * SUPERSAMPLE) / SUPERSAMPLE, round(o.y * size * SUPERSAMPLE) / SUPERSAMPLE
            ix, iy = math.floor(cx), math.floor(cy)
            h, cov = _sprite(o.shape, SIZES[o.size] * size, cx - ix, cy - iy)
            x0, y0 = ix - h, iy - h
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + 2 * h + 1, size), min(y0 + 2 * h + 1, size)
            alpha = cov[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            colour = np.asarray(COLOURS[o.colour], dtype=np.float32) * np.float32(o.shade)
            region = canvas[:, cy0:cy1, cx0:cx1]
            canvas[:, cy0:cy1, cx0:cx1] = region * (1 - alpha) + colour[:, None, None] * alpha
        out[n] = np.rint(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- the pre-training pool

NOISE_KINDS = ("mismatched", "near_miss", "boilerplate", "shared_alt", "near_duplicate")
SHARED_ALT_TEXT = "click to enlarge this image"


@dataclass
class NoiseConfig:
    """Fractions of planted noise. Caption noise (the first four) is a fraction of the rows, placed on rows of
    images that are not near-duplicates; ``near_duplicate`` is a fraction of the images. Counts are
    ``round(fraction × total)`` exactly."""

    mismatched: float = 0.0
    near_miss: float = 0.0
    boilerplate: float = 0.0
    shared_alt: float = 0.0
    near_duplicate: float = 0.0

    def __post_init__(self) -> None:
        for kind in NOISE_KINDS:
            value = getattr(self, kind)
            if not 0 <= value < 1:
                raise DataError(f"noise fraction {kind}={value} must lie in [0, 1)")
        if self.mismatched + self.near_miss + self.boilerplate + self.shared_alt >= 1:
            raise DataError("the caption-noise fractions add up to 1 or more: no clean row would be left")


@dataclass
class ScenePool:
    """The pre-training pool: one row per (image, caption), as in open_clip's CSV.

    images: (N, 3, S, S) uint8. row_image[r] is the image of row r, row_caption[r] its text, row_noise[r] ""
    (clean) or one of :data:`NOISE_KINDS`. duplicate_of[i]: the image a near-duplicate copies, else -1.
    """

    scenes: list[Scene]
    images: np.ndarray
    row_image: list[int]
    row_caption: list[str]
    row_noise: list[str]
    duplicate_of: list[int]
    heldout: frozenset[tuple[str, str]]


def _boilerplate(rng: np.random.Generator) -> str:
    k = int(rng.integers(4))
    n = int(rng.integers(10000))
    return (f"IMG_{n:04d}.jpg", f"DSC{n:05d}.JPG", f"image{n}.png", f"photo_{n}")[k]


def make_pool(
    n: int,
    size: int = 32,
    objects: tuple[int, int] = (1, 3),
    seed: int = 0,
    noise: NoiseConfig | None = None,
    split_seed: int | None = None,
    draw: bool = True,
) -> ScenePool:
    """``n`` pre-training scenes of the pre-training shapes in seen (shape, colour) pairs only, their 3–5
    captions, and planted noise. The held-out pairs come from ``split_seed`` (default ``seed``). Separate
    streams (``SeedSequence([seed, k])``) draw the scenes, captions, noise and pixel jitter, so the captions do
    not depend on ``size`` and ``draw=False`` (no images; ``images`` is empty) gives the same rows."""
    if not isinstance(n, int) or n < 1:
        raise DataError(f"the number of scenes must be a positive integer, got {n!r}")
    noise = noise or NoiseConfig()
    heldout = heldout_pairs(seed if split_seed is None else split_seed)
    scene_rng, caption_rng, noise_rng, pixel_rng = (np.random.default_rng([seed, k]) for k in (10, 11, 12, 13))
    n_dup = round(noise.near_duplicate * n)
    if n_dup >= n:
        raise DataError(f"near_duplicate={noise.near_duplicate} of {n} images leaves no original image")
    dup_slots = set((1 + noise_rng.permutation(n - 1)[:n_dup]).tolist())  # image 0 is always an original
    originals = [i for i in range(n) if i not in dup_slots]
    ordered: list[Scene] = [None] * n  # type: ignore[list-item]
    for i, scene in zip(originals, sample_scenes(scene_rng, len(originals), objects, seen_pairs(heldout))):
        ordered[i] = scene
    # A near-duplicate copies an earlier original's scene (its captions are drawn afresh) and perturbs its pixels a
    # little; the copy always comes later, as a re-upload does, so "keep the first" keeps the original.
    duplicate_of = [-1] * n
    for slot in sorted(dup_slots):
        earlier = originals[: bisect.bisect_left(originals, slot)]
        duplicate_of[slot] = earlier[int(noise_rng.integers(len(earlier)))]
        ordered[slot] = scene_from_json(ordered[duplicate_of[slot]].to_json())
    row_image, row_caption, row_noise = [], [], []
    for i, scene in enumerate(ordered):
        for caption in captions_for(scene, caption_rng):
            row_image.append(i)
            row_caption.append(caption)
            row_noise.append("near_duplicate" if duplicate_of[i] >= 0 else "")
    rows = len(row_image)
    clean_rows = [r for r in range(rows) if not row_noise[r]]
    counts = {kind: round(getattr(noise, kind) * rows) for kind in NOISE_KINDS[:4]}
    if sum(counts.values()) > len(clean_rows):
        raise DataError(f"{sum(counts.values())} noisy captions asked for, but only {len(clean_rows)} rows are not near-duplicates")
    chosen = noise_rng.permutation(clean_rows)
    start = 0
    for kind in NOISE_KINDS[:4]:
        for r in chosen[start : start + counts[kind]]:
            r = int(r)
            scene = ordered[row_image[r]]
            if kind == "mismatched":
                for _ in range(1000):  # another image's caption that is false here
                    donor = int(noise_rng.integers(rows))
                    if not row_noise[donor] and not caption_is_true(row_caption[donor], scene):
                        break
                else:
                    raise DataError(f"no caption of another image is false of image {row_image[r]}: too few scenes for mismatched captions")
                row_caption[r] = row_caption[donor]
            elif kind == "near_miss":
                row_caption[r] = near_miss(scene, noise_rng, heldout)
            elif kind == "boilerplate":
                row_caption[r] = _boilerplate(noise_rng)
            else:
                row_caption[r] = SHARED_ALT_TEXT
            row_noise[r] = kind
        start += counts[kind]
    images = np.zeros((0, 3, size, size), dtype=np.uint8)
    if draw:
        images = render(ordered, size)
        for i, src in enumerate(duplicate_of):
            if src >= 0:  # ±3 grey levels of pixel noise: a near copy, never a byte-identical one
                jitter = pixel_rng.integers(-3, 4, images[i].shape)
                images[i] = np.clip(images[src].astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    return ScenePool(ordered, images, row_image, row_caption, row_noise, duplicate_of, heldout)


# ----------------------------------------------------------------------------- evaluation sets


@dataclass
class LabelledScenes:
    """Test scenes with labels: images (N, 3, S, S) uint8, labels (N,) into ``classes``; ``groups[c]`` says
    whether class c is a "seen" or "held-out" pair (empty for shapes); ``captions`` per image when asked."""

    scenes: list[Scene]
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    groups: list[str]
    captions: list[list[str]]

    def image_set(self) -> ImageSet:
        """As an :class:`~fewshot.data.types.ImageSet` (float in [0, 1]) for the episode evaluator."""
        return ImageSet(torch.from_numpy(self.images.astype(np.float32) / 255), torch.from_numpy(self.labels.astype(np.int64)),
                        list(self.classes), list(self.groups) or None)


def _one_object(rng: np.random.Generator, shape: str, colour: str) -> Scene:
    size = ("small", "large")[int(rng.integers(2))]
    r = SIZES[size]
    x, y = rng.uniform(r, 1 - r, 2)
    return Scene([Obj(shape, colour, size, round(float(x), 4), round(float(y), 4), round(float(rng.uniform(*SHADE_RANGE)), 4))])


def single_object_test(per_pair: int, size: int = 32, seed: int = 0, split_seed: int = 0) -> LabelledScenes:
    """``per_pair`` one-object scenes of each of the 64 (pre-training shape, colour) pairs, labelled by the pair
    ("red circle"); ``groups`` marks each class "seen" or "held-out" under the split of ``split_seed``. Drawn
    from a stream of their own (``[seed, 20]``), apart from any pool's."""
    heldout = heldout_pairs(split_seed)
    rng = np.random.default_rng([seed, 20])
    pairs = [(s, c) for s in PRETRAIN_SHAPES for c in COLOURS]
    scenes = [_one_object(rng, s, c) for s, c in pairs for _ in range(per_pair)]
    labels = np.repeat(np.arange(len(pairs)), per_pair)
    return LabelledScenes(scenes, render(scenes, size), labels, [f"{c} {s}" for s, c in pairs],
                          ["held-out" if p in heldout else "seen" for p in pairs], [])


def two_object_test(n: int, size: int = 32, seed: int = 0, split_seed: int = 0, heldout: bool = False) -> LabelledScenes:
    """``n`` two-object scenes with their captions, for retrieval (labels: the image index). Objects come from
    the seen pairs (``heldout=True``: from the held-out pairs) of the pre-training shapes."""
    pairs = heldout_pairs(split_seed)
    pool = sorted(pairs) if heldout else seen_pairs(pairs)
    rng = np.random.default_rng([seed, 21])
    scenes = sample_scenes(rng, n, (2, 2), pool)
    captions = [captions_for(s, rng) for s in scenes]
    return LabelledScenes(scenes, render(scenes, size), np.arange(n), [str(i) for i in range(n)], [], captions)


def fewshot_shape_images(per_shape: int, size: int = 32, seed: int = 0) -> LabelledScenes:
    """``per_shape`` one-object scenes of each of the 8 reserved shapes in any colour, labelled by shape:
    the classes of few-shot episodes (none of them is ever drawn or named in the pool)."""
    rng = np.random.default_rng([seed, 22])
    scenes = [_one_object(rng, s, tuple(COLOURS)[int(rng.integers(len(COLOURS)))]) for s in FEWSHOT_SHAPES for _ in range(per_shape)]
    return LabelledScenes(scenes, render(scenes, size), np.repeat(np.arange(len(FEWSHOT_SHAPES)), per_shape), list(FEWSHOT_SHAPES), [], [])


SWAP_KINDS = ("binding", "relation")


def swap_test(kind: str, n: int, size: int = 32, seed: int = 0, split_seed: int = 0) -> LabelledScenes:
    """``n`` two-object scenes, each with ``captions[i] = [true, swapped]``: the same words in another order,
    so only a model that binds attributes to objects (or arguments to a relation) tells them apart; chance is 50%.

    ``binding``: two objects of different shapes and colours, all four (shape, colour) combinations seen pairs;
    "a red circle and a blue square" against "a blue circle and a red square". ``relation``: two uniquely
    described objects apart by the margin on one axis; "a red circle is left of a blue square" against "a blue
    square is left of a red circle". Labels: the image index."""
    if kind not in SWAP_KINDS:
        raise DataError(f"unknown swap test '{kind}'; known: {', '.join(SWAP_KINDS)}")
    seen = set(seen_pairs(heldout_pairs(split_seed)))
    rng = np.random.default_rng([seed, 23 + SWAP_KINDS.index(kind)])
    scenes: list[Scene] = []
    captions: list[list[str]] = []
    while len(scenes) < n:
        (scene,) = sample_scenes(rng, 1, (2, 2), sorted(seen))
        a, b = scene.objects
        if kind == "binding":
            if a.shape == b.shape or a.colour == b.colour or (a.shape, b.colour) not in seen or (b.shape, a.colour) not in seen:
                continue
            pair = [f"{_np(None, a.colour, a.shape)} and {_np(None, b.colour, b.shape)}",
                    f"{_np(None, b.colour, a.shape)} and {_np(None, a.colour, b.shape)}"]
        else:
            facts = [f for f in _relation_facts(scene) if f[1] in ("left", "right", "above", "below")]
            if not facts:
                continue
            da, rel, db = facts[int(rng.integers(len(facts)))]
            phrase = _PHRASES[rel][0]
            pair = [f"{_np(*da)} is {phrase} {_np(*db)}", f"{_np(*db)} is {phrase} {_np(*da)}"]
        scenes.append(scene)
        captions.append(pair)
    return LabelledScenes(scenes, render(scenes, size), np.arange(n), [str(i) for i in range(n)], [], captions)

# ----------------------------------------------------------------------------- on disk

POOL_INFO = "scenes.json"  # what made the folder: arguments, held-out pairs, noise counts
SCENE_GRAPHS = "scenes.jsonl"  # one scene graph per image, in image order, with duplicate_of
FEWSHOT_FOLDER = "fewshot-shapes"  # SHAPE/NNN.png: the reserved shapes, class per folder, for few-shot episodes


def write_scenes(
    out: str | os.PathLike[str],
    n: int,
    size: int = 32,
    objects: str | tuple[int, int] = (1, 3),
    seed: int = 0,
    noise: NoiseConfig | None = None,
    split_seed: int | None = None,
    fewshot_per_shape: int = 40,
) -> dict:
    """Generate a pool (:func:`make_pool`) into the new folder ``out``: ``images/NNNNNN.png``, the manifest in
    open_clip's layout twice (``manifest.tsv``; ``manifest.jsonl``), each with a ``noise`` column, the scene
    graphs (``scenes.jsonl``), ``scenes.json``, and ``fewshot-shapes/SHAPE/NNN.png``: ``fewshot_per_shape``
    one-object scenes of each reserved shape (:func:`fewshot_shape_images`), the class-per-folder set that
    few-shot episodes of a run trained on this pool are drawn from. Returns the summary in ``scenes.json``."""
    from fewshot.data.pairs import write_manifest

    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"'{root}' already exists and is not an empty folder; scenes are written into a new folder")
    noise = noise or NoiseConfig()
    objects = object_range(objects)
    pool = make_pool(n, size, objects, seed, noise, split_seed)
    width = max(6, len(str(n - 1)))
    names = [f"images/{i:0{width}d}.png" for i in range(n)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, pool.images):
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(root / name, optimize=False)
    few = fewshot_shape_images(fewshot_per_shape, size, seed)
    for k, (image, label) in enumerate(zip(few.images, few.labels)):
        folder = root / FEWSHOT_FOLDER / few.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(folder / f"{k % fewshot_per_shape:03d}.png")
    paths = [names[i] for i in pool.row_image]
    write_manifest(root / "manifest.tsv", paths, pool.row_caption, pool.row_noise)
    write_manifest(root / "manifest.jsonl", paths, pool.row_caption, pool.row_noise)
    graphs = "".join(json.dumps({"image": names[i], **s.to_json(), "duplicate_of": pool.duplicate_of[i]}) + "\n" for i, s in enumerate(pool.scenes))
    atomic_write(root / SCENE_GRAPHS, lambda tmp: tmp.write_text(graphs))
    counts = {kind: pool.row_noise.count(kind) for kind in NOISE_KINDS}
    info = {
        "images": n, "rows": len(pool.row_caption), "size": size, "objects": list(objects), "seed": seed,
        "split_seed": seed if split_seed is None else split_seed, "noise_fractions": asdict(noise), "noise_rows": counts,
        "near_duplicate_images": sum(d >= 0 for d in pool.duplicate_of), "clean_rows": pool.row_noise.count(""),
        "heldout_pairs": sorted(f"{c} {s}" for s, c in pool.heldout), "pretrain_shapes": list(PRETRAIN_SHAPES),
        "fewshot_shapes": list(FEWSHOT_SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
        "fewshot_images": len(few.labels), "manifest": str(root / "manifest.tsv"), "out": str(root),
    }
    atomic_write(root / POOL_INFO, lambda tmp: tmp.write_text(json.dumps(info, indent=1) + "\n"))
    return info


def read_scenes(folder: str | os.PathLike[str]) -> dict[str, Scene]:
    """The scene graph of each image of a folder that :func:`write_scenes` wrote, by the image's manifest path
    (``images/000000.png``): what a caption can be checked against (:func:`caption_is_true`)."""
    path = Path(folder) / SCENE_GRAPHS
    if not path.is_file():
        raise DataError(f"no scene graphs at '{path}': a folder from fewshot data scenes holds {SCENE_GRAPHS}")
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            out[row["image"]] = scene_from_json(row)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path} line {number}: not a scene graph ({exc})") from None
    return out


def object_range(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """``"1-3"`` → (1, 3); ``"2"`` or 2 → (2, 2)."""
    if isinstance(text, tuple):
        lo, hi = text
    else:
        parts = str(text).split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise DataError(f"objects per scene '{text}' must be N or MIN-MAX with 1 <= MIN <= MAX <= {MAX_OBJECTS}, e.g. 1-3")
    return lo, hi


def noise_config(options: list[str] | dict[str, float] | None) -> NoiseConfig:
    """A :class:`NoiseConfig` from ``["near_miss=0.1", ...]`` (the CLI's ``--noise``) or a mapping."""
    if isinstance(options, dict):
        items = list(options.items())
    else:
        items = []
        for text in options or []:
            key, sep, value = str(text).partition("=")
            if not sep:
                raise DataError(f"noise option '{text}' is not KIND=FRACTION, e.g. near_miss=0.1")
            try:
                items.append((key.strip().replace("-", "_"), float(value)))
            except ValueError:
                raise DataError(f"noise option '{text}': '{value}' is not a number") from None
    unknown = [k for k, _ in items if k not in NOISE_KINDS]
    if unknown:
        raise DataError(f"unknown noise kind(s) {', '.join(unknown)}; known: {', '.join(NOISE_KINDS)}")
    return NoiseConfig(**dict(items))
