"""Images in context: nonce names, the scene world's text corpus for a caption LM, and seeded image–text episodes.

Frozen's open-ended few-shot protocol (Tsimpoukelli et al. 2021, §4.2) on this project's data. An episode is
N classes ("ways"), ``shots`` distinct support images per class ("inner shots"), the support block shown
``1 + repeats`` times (each time in a fresh seeded order), then one query image of one of the classes. Each
support image is followed by ``this is a NAME.``; the query by ``q: what is this? a: this is a`` and the answer
is the query class's NAME. Names are nonce words (:data:`NONCE_NAMES`, bound to classes afresh in each
episode) or the classes' real names; task induction puts ``answer with dax or blicket.`` first. A prompt is a
list of pieces, each a text or the marker :data:`IMAGE`, and the images that fill the markers in order.

The Fast-VQA-style task: ``shots`` one-object images of each of 2 shapes named with nonce words, then a
two-object query scene (one object of each shape, in two different colours) and ``q: what colour is the dax?
a:``; the answer is the colour of the query's object of that shape. With 0 shots the name is unexplained and
only the colours of the query image can be guessed (chance 1/2 among them).

Texts are lowercase: the scene captions are, and a caption LM has never seen a capital letter.

The corpus of the caption LM (:func:`scene_corpus`): the pool's captions plus text-only binding episodes in the
very layout of the prompts, each image replaced by a description of its object ("a small red circle. this is a
zobi. ... a large blue circle. q: what is this? a: this is a zobi."), Fast-VQA in text, and "a red circle is a
dax ... what is the red circle? a dax" statements. Training episodes take their names from a generated glossary
(:func:`glossary`) and the evaluation's nonce names, each bound afresh in every episode (``evaluation_names=False``
leaves the latter out; then they are split into pieces the LM must copy one by one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fewshot.data.scenes import COLOURS, FEWSHOT_SHAPES, PRETRAIN_SHAPES, SIZES, Obj, Scene, _article, _one_object, _place, make_pool, render
from fewshot.errors import DataError
from fewshot.io import atomic_write

__all__ = [
    "CATEGORIES", "IMAGE", "NONCE_NAMES", "VLEpisode", "VLImages", "category_images", "count_images", "described", "fast_vqa_descriptions", "fast_vqa_episode", "glossary",
    "induction_text", "longest_naming_pieces", "naming_episode", "open_ended_episode", "question_episode", "real_words", "scene_corpus", "scene_texts",
    "write_scene_corpus",
]

IMAGE = "<image>"  # the marker a prompt piece uses for "one image goes here"
SUPPORT = "this is a {name}."
QUERY = "q: what is this? a: this is a"
VQA_QUERY = "q: what colour is the {name}? a:"
CATEGORIES = ("shapes", "colours", "novel-shapes", "omniglot")
OMNIGLOT_DEFAULT = "omniglot/images_background_small1.zip"


def _nonce_list() -> list[str]:
    return resources.files("fewshot.data").joinpath("words", "nonce.txt").read_text().split()


NONCE_NAMES: tuple[str, ...] = tuple(_nonce_list())  # dax, wug, blicket, zorp, toma, fep: the evaluation's made-up names


def real_words() -> frozenset[str]:
    """The words a made-up name must not be: ``words/english.txt`` (the real English words in :func:`glossary`'s
    shapes, curated, crude ones included) and the category word lists (animal, fruit, country, …)."""
    folder = resources.files("fewshot.data").joinpath("words")
    listed = [f for f in folder.iterdir() if f.name.endswith(".txt") and f.name != "nonce.txt"]
    return frozenset(w for f in listed for line in f.read_text().splitlines() if not line.startswith("#") for w in line.split())


def _candidate_names(seed: int) -> Iterator[str]:
    """Seeded word-like strings without end, repeats possible: CVC, CVCV, CVCVC or CCVCV over 14 consonants, 5 vowels
    and 6 onset clusters, each pattern drawn with probability 1/4."""
    consonants, vowels, clusters = "bdfgklmnprstvz", "aeiou", ("bl", "gr", "st", "tr", "fl", "sk")
    rng = np.random.default_rng([seed, 40])
    while True:
        pattern = ("cvc", "cvcv", "cvcvc", "kvcv")[int(rng.integers(4))]
        yield "".join(str(rng.choice(list(vowels))) if p == "v" else str(rng.choice(clusters)) if p == "k" else str(rng.choice(list(consonants)))
                      for p in pattern)


MAX_GLOSSARY = 20000  # made-up names one glossary may ask for


def glossary(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up words: the first ``n`` distinct candidates of :func:`_candidate_names` at ``seed`` that
    are no evaluation name, no word of the scene world and no real word (:func:`real_words`): the names of the
    corpus's training episodes."""
    if not 0 <= n <= MAX_GLOSSARY:
        # the four patterns make ≈ 76,000 distinct strings; far below that, drawing distinct ones stays quick
        raise DataError(f"a glossary holds 0 to {MAX_GLOSSARY:,} made-up names, not {n:,}")
    taken = set(NONCE_NAMES) | set(PRETRAIN_SHAPES) | set(FEWSHOT_SHAPES) | set(COLOURS) | set(SIZES) | real_words()
    words: list[str] = []
    candidates = _candidate_names(seed)
    while len(words) < n:
        word = next(candidates)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def induction_text(names: list[str]) -> str:
    """Frozen's task induction: ``answer with dax or blicket.`` (``a, b or c`` for more names)."""
    return f"answer with {', '.join(names[:-1])} or {names[-1]}."


def count_images(pieces: list[str]) -> int:
    return sum(p == IMAGE for p in pieces)


# ----------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class VLEpisode:
    """One interleaved prompt: ``pieces`` (texts and :data:`IMAGE` markers), ``images`` (indices into the image
    set, one per marker, in order), the ``answer`` and the episode's ``names`` (what induction lists)."""

    pieces: tuple[str, ...]
    images: tuple[int, ...]
    answer: str
    names: tuple[str, ...]

    def answered(self) -> list[str]:
        """The pieces with the answer after the query (``… a: this is a dax.``): a training sequence."""
        return [*self.pieces[:-1], f"{self.pieces[-1]} {self.answer}."]


def described(pieces: Sequence[str], images: Sequence[int], descriptions: Sequence[str]) -> list[str]:
    """The text-only prompt: each image marker replaced by its image's description, in order."""
    shown = iter(images)
    return [descriptions[next(shown)] if p == IMAGE else p for p in pieces]


def _support_pieces(order: list[tuple[int, str]]) -> tuple[list[str], list[int]]:
    pieces, images = [], []
    for index, name in order:
        pieces += [IMAGE, SUPPORT.format(name=name)]
        images.append(index)
    return pieces, images


def open_ended_episode(labels: np.ndarray, class_names: list[str], way: int, shots: int, repeats: int, induction: bool,
                       nonce: bool, seed: int, i: int) -> VLEpisode:
    """Episode ``i`` of the seed: ``way`` classes drawn without replacement, ``shots`` support images and one query
    image per episode (support and query distinct), all from ``np.random.default_rng([seed, i, 41])``; so the
    same (seed, i) draws the same classes, images and names whatever ``repeats``, ``induction`` and ``nonce``.
    Nonce names are the first ``way`` of a seeded permutation of :data:`NONCE_NAMES`."""
    if way > len(NONCE_NAMES):
        raise DataError(f"{way}-way needs {way} nonce names, there are {len(NONCE_NAMES)}")
    if repeats < 0 or shots < 1:
        raise DataError(f"shots must be ≥ 1 and repeats ≥ 0, got {shots} and {repeats}")
    rng = np.random.default_rng([seed, i, 41])
    classes = np.unique(labels)
    if way > len(classes):
        raise DataError(f"{way}-way needs {way} classes, the image set has {len(classes)}")
    chosen = rng.choice(classes, size=way, replace=False)
    members = [np.flatnonzero(labels == c) for c in chosen]
    if min(len(m) for m in members) < shots + 1:
        raise DataError(f"{shots} shots and a query need {shots + 1} images per class, a class has {min(len(m) for m in members)}")
    target = int(rng.integers(way))
    picks = [rng.choice(m, size=shots + 1, replace=False) for m in members]
    nonce_names = [NONCE_NAMES[j] for j in rng.permutation(len(NONCE_NAMES))[:way]]
    names = nonce_names if nonce else [class_names[int(c)] for c in chosen]
    support = [(int(picks[c][s]), names[c]) for c in range(way) for s in range(shots)]
    pieces: list[str] = [induction_text(names)] if induction else []
    images: list[int] = []
    for block in range(1 + repeats):
        order = [support[j] for j in np.random.default_rng([seed, i, 42, block]).permutation(len(support))]
        p, im = _support_pieces(order)
        pieces += p
        images += im
    pieces += [IMAGE, QUERY]
    images.append(int(picks[target][shots]))
    return VLEpisode(tuple(pieces), tuple(images), names[target], tuple(names))


def naming_episode(names_pool: list[str], seed: int, i: int, size: int = 32, max_images: int = 16) -> tuple[VLEpisode, "VLImages"]:
    """Training episode ``i`` of the seed for an interleaved model: :func:`open_ended_episode`'s layout on freshly
    drawn one-object images, named from ``names_pool`` (a :func:`glossary`, never the evaluation's names) and bound by
    shape or by colour (either with probability 1/2; the other attribute random, so only the naming one is shared).
    Way 2, 2 or 3; shots 1, 1, 2, 3 or 5; repeats 0, 0, 0 or 1; task induction with probability 1/2 — then repeats and
    shots are lowered until the episode holds at most ``max_images`` images. Returns the episode (image indices
    into the returned set) and the image set (its class names are the episode's names); the answer is the query's name."""
    rng = np.random.default_rng([seed, i, 49])
    by_shape = rng.random() < 0.5
    way, shots, repeats = int(rng.choice([2, 2, 3])), int(rng.choice([1, 1, 2, 3, 5])), int(rng.choice([0, 0, 0, 1]))
    if way + 1 > max_images:
        raise DataError(f"a {way}-way episode needs at least {way + 1} images, max_images is {max_images}")
    while way * shots * (1 + repeats) + 1 > max_images:
        repeats, shots = (0, shots) if repeats else (0, shots - 1)
    values = PRETRAIN_SHAPES if by_shape else tuple(COLOURS)
    others = tuple(COLOURS) if by_shape else PRETRAIN_SHAPES
    classes = [values[j] for j in rng.choice(len(values), size=way, replace=False)]
    names = [names_pool[j] for j in rng.choice(len(names_pool), size=way, replace=False)]
    pairs = [(value, other) if by_shape else (other, value) for value in classes for other in others]
    images = _one_object_set(pairs, shots + 1, rng, size, "shape" if by_shape else "colour")
    images.class_names = names
    return open_ended_episode(images.labels, names, way, shots, repeats, bool(rng.random() < 0.5), False, seed, i), images


def longest_naming_pieces(names_pool: list[str], max_images: int, tokens: Callable[[str], int]) -> list[str]:
    """The answered pieces of the longest naming episode ``names_pool`` can make with ``max_images`` images, by
    ``tokens(name)`` (a name's token count): task induction over the three longest names, every image but the query
    named by the longest, the query answered by it. What a method checks against its LM's context before training."""
    longest = sorted(names_pool, key=tokens)[-3:]
    support = [IMAGE, SUPPORT.format(name=longest[-1])] * (max_images - 1)
    return [induction_text(longest), *support, IMAGE, f"{QUERY} {longest[-1]}."]


def _vqa_scene(rng: np.random.Generator, shapes: list[str], colours: list[str]) -> Scene | None:
    sizes = [("small", "large")[int(rng.integers(2))] for _ in shapes]
    centres = _place(rng, sizes)
    return None if centres is None else Scene([Obj(s, c, z, x, y) for s, c, z, (x, y) in zip(shapes, colours, sizes, centres)])


def fast_vqa_episode(shots: int, seed: int, i: int, size: int = 32, way: int = 2) -> tuple[VLEpisode, torch.Tensor]:
    """Fast-VQA episode ``i``: ``way`` pre-training shapes named with nonce words by ``shots`` one-object images each
    (random colours), then a ``way``-object query scene of those shapes in distinct random colours and the question
    about one name. Returns the episode (image indices into the returned images) and the images (M, 3, S, S) in [0, 1]."""
    episode, images, _ = _evaluation_vqa_episode(shots, seed, i, size, way)
    return episode, images


def fast_vqa_descriptions(shots: int, seed: int, i: int, way: int = 2) -> tuple[VLEpisode, list[str]]:
    """:func:`fast_vqa_episode` ``i`` and each of its images' description in the corpus's words ("a small red
    circle."; the query scene "a red circle and a blue star."): the episode in text, with :func:`described`."""
    episode, _, descriptions = _evaluation_vqa_episode(shots, seed, i, 8, way)  # images unused: 8 px
    return episode, descriptions


def _evaluation_vqa_episode(shots: int, seed: int, i: int, size: int, way: int) -> tuple[VLEpisode, torch.Tensor, list[str]]:
    return _vqa_episode(shots, np.random.default_rng([seed, i, 43]), size, way, NONCE_NAMES)


def question_episode(names_pool: Sequence[str], seed: int, i: int, size: int = 32) -> tuple[VLEpisode, VLImages]:
    """Training episode ``i`` of the seed in :func:`fast_vqa_episode`'s layout (2 shapes, 1–3 shots each), named from
    ``names_pool`` (a :func:`glossary`, never the evaluation's names), with each image's description ("a small red
    circle."; the query scene "a red circle and a blue star." as the corpus's text Fast-VQA words it)."""
    rng = np.random.default_rng([seed, i, 50])
    episode, images, descriptions = _vqa_episode(int(rng.integers(1, 4)), rng, size, 2, names_pool)
    return episode, VLImages(images, np.arange(len(images)), list(episode.names), descriptions)


def _vqa_episode(shots: int, rng: np.random.Generator, size: int, way: int,
                 names_pool: Sequence[str]) -> tuple[VLEpisode, torch.Tensor, list[str]]:
    shapes = [PRETRAIN_SHAPES[j] for j in rng.choice(len(PRETRAIN_SHAPES), size=way, replace=False)]
    names = [names_pool[j] for j in rng.permutation(len(names_pool))[:way]]
    palette = list(COLOURS)
    support = [(_one_object(rng, s, palette[int(rng.integers(len(palette)))]), names[c]) for c, s in enumerate(shapes) for _ in range(shots)]
    support = [support[j] for j in rng.permutation(len(support))]
    query = None
    while query is None:
        colours = [palette[j] for j in rng.choice(len(palette), size=way, replace=False)]
        query = _vqa_scene(rng, shapes, colours)
    target = int(rng.integers(way))
    pieces, _ = _support_pieces([(k, name) for k, (_, name) in enumerate(support)])
    pieces += [IMAGE, VQA_QUERY.format(name=names[target])]
    scenes = [s for s, _ in support] + [query]
    images = torch.from_numpy(render(scenes, size).astype(np.float32) / 255)
    descriptions = [_describe(s.objects[0]) for s, _ in support]
    descriptions.append(" and ".join(f"a {o.colour} {o.shape}" for o in query.objects) + ".")
    return VLEpisode(tuple(pieces), tuple(range(len(scenes))), colours[target], tuple(names)), images, descriptions


# ----------------------------------------------------------------------------- evaluation images


@dataclass
class VLImages:
    """An image set for episodes: images (N, 3, S, S) float in [0, 1], labels (N,), each class's real name, and for
    scenes each image's description in the corpus's words ("a small red circle.": the text-only upper bound)."""

    images: torch.Tensor
    labels: np.ndarray
    class_names: list[str]
    descriptions: list[str] | None = None


def _one_object_set(pairs: list[tuple[str, str]], per_class: int, rng: np.random.Generator, size: int, by: str) -> VLImages:
    """``per_class`` one-object images of each class (a shape or a colour, ``by``, in order of first appearance in
    ``pairs``), each drawn from that class's (shape, colour) pairs."""
    scenes, labels = [], []
    classes = sorted({s if by == "shape" else c for s, c in pairs}, key=[s if by == "shape" else c for s, c in pairs].index)
    for k, name in enumerate(classes):
        options = [p for p in pairs if (p[0] if by == "shape" else p[1]) == name]
        for _ in range(per_class):
            s, c = options[int(rng.integers(len(options)))]
            scenes.append(_one_object(rng, s, c))
            labels.append(k)
    return VLImages(torch.from_numpy(render(scenes, size).astype(np.float32) / 255), np.array(labels), classes,
                    [_describe(scene.objects[0]) for scene in scenes])


def category_images(category: str, per_class: int, size: int = 32, seed: int = 0, omniglot: str | os.PathLike[str] | None = None,
                    omniglot_classes: int = 20) -> VLImages:
    """The classes of one evaluation category, ``per_class`` one-object images each: ``shapes`` (the 8 pre-training
    shapes, any colour), ``colours`` (the 8 colours, any pre-training shape), ``novel-shapes`` (the 8 reserved shapes,
    never drawn nor named in pre-training), ``omniglot`` (the first ``omniglot_classes`` characters of
    ``$FEWSHOT_DATA/omniglot/images_background_small1.zip`` (or ``omniglot``), ink white on black, grey in all 3
    channels; real names "character N"). Raises DataError when Omniglot is absent."""
    if category == "shapes":
        return _one_object_set([(s, c) for s in PRETRAIN_SHAPES for c in COLOURS], per_class, np.random.default_rng([seed, 44]), size, "shape")
    if category == "colours":
        return _one_object_set([(s, c) for s in PRETRAIN_SHAPES for c in COLOURS], per_class, np.random.default_rng([seed, 45]), size, "colour")
    if category == "novel-shapes":
        return _one_object_set([(s, c) for s in FEWSHOT_SHAPES for c in COLOURS], per_class, np.random.default_rng([seed, 46]), size, "shape")
    if category == "omniglot":
        from fewshot.data.sources import load_omniglot, resolve_data_path

        chars = load_omniglot(resolve_data_path(omniglot, OMNIGLOT_DEFAULT), size)
        keep = np.flatnonzero(chars.labels.numpy() < omniglot_classes)
        rng = np.random.default_rng([seed, 47])
        idx = np.concatenate([rng.permutation(keep[chars.labels.numpy()[keep] == c])[:per_class] for c in range(omniglot_classes)])
        images = chars.images[torch.from_numpy(idx)].float()
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return VLImages(images.contiguous(), chars.labels.numpy()[idx], [f"character {c + 1}" for c in range(omniglot_classes)])
    raise DataError(f"unknown category '{category}'; known: {', '.join(CATEGORIES)}")


# ----------------------------------------------------------------------------- the caption LM's corpus


def _describe(o: Obj) -> str:
    return f"{_article(o.size)} {o.size} {o.colour} {o.shape}."


def _text_episode(rng: np.random.Generator, names_pool: list[str], drill: float = 0.0, uniform: float = 0.0) -> str:
    """One open-ended episode in text: each image replaced by its object's description. With probability ``drill`` the
    episode is a copy drill: its support block is shown 2–4 times in one order, so every token of a repeat is
    predictable by copying what followed the same token before (the induction behaviour binding builds on). With
    probability ``uniform`` every support item of a class has one description, so a name follows the very description
    it followed before: binding by exact match, before the match on one attribute."""
    by = ("shape", "colour")[int(rng.integers(2))]
    way, shots, repeats = int(rng.choice([2, 2, 3, 5])), int(rng.choice([1, 1, 2, 3, 5])), int(rng.choice([0, 0, 0, 1, 3]))
    same_order = rng.random() < drill
    if same_order:
        repeats = int(rng.integers(1, 4))
    values = PRETRAIN_SHAPES if by == "shape" else tuple(COLOURS)
    classes = [values[j] for j in rng.choice(len(values), size=way, replace=False)]
    real = rng.random() < 0.2
    names = classes if real else [names_pool[j] for j in rng.choice(len(names_pool), size=way, replace=False)]

    def obj(c: str) -> Obj:
        other = PRETRAIN_SHAPES if by == "colour" else tuple(COLOURS)
        o = str(other[int(rng.integers(len(other)))])
        shape, colour = (c, o) if by == "shape" else (o, c)
        return Obj(shape, colour, ("small", "large")[int(rng.integers(2))], 0.5, 0.5)

    if rng.random() < uniform:
        look = [obj(c) for c in classes]
        support = [(look[k], names[k]) for k in range(way) for _ in range(shots)]
    else:
        support = [(obj(c), names[k]) for k, c in enumerate(classes) for _ in range(shots)]
    parts = [induction_text(names)] if rng.random() < 0.5 else []
    order = rng.permutation(len(support))
    for _ in range(1 + repeats):
        for j in order:
            parts += [_describe(support[j][0]), SUPPORT.format(name=support[j][1])]
        order = order if same_order else rng.permutation(len(support))
    target = int(rng.integers(way))
    # a third of the queries repeat a support item's very description: plain induction (match, then copy the name)
    # is learned first, and the rest ask for the match on the naming attribute alone
    exact = [o for o, n in support if n == names[target]]
    query = exact[int(rng.integers(len(exact)))] if rng.random() < 1 / 3 else obj(classes[target])
    parts += [_describe(query), f"{QUERY} {names[target]}."]
    return " ".join(parts)


def _text_vqa(rng: np.random.Generator, names_pool: list[str]) -> str:
    """Fast-VQA in text: named shapes, then a two-object description and the colour question."""
    shots = int(rng.integers(1, 4))
    shapes = [PRETRAIN_SHAPES[j] for j in rng.choice(len(PRETRAIN_SHAPES), size=2, replace=False)]
    names = [names_pool[j] for j in rng.choice(len(names_pool), size=2, replace=False)]
    palette = list(COLOURS)
    support = [(Obj(s, palette[int(rng.integers(8))], ("small", "large")[int(rng.integers(2))], 0.5, 0.5), names[k])
               for k, s in enumerate(shapes) for _ in range(shots)]
    parts = []
    for j in rng.permutation(len(support)):
        parts += [_describe(support[j][0]), SUPPORT.format(name=support[j][1])]
    colours = [palette[j] for j in rng.choice(8, size=2, replace=False)]
    order = rng.permutation(2)
    parts.append(f"a {colours[order[0]]} {shapes[order[0]]} and a {colours[order[1]]} {shapes[order[1]]}.")
    target = int(rng.integers(2))
    parts.append(f"{VQA_QUERY.format(name=names[target])} {colours[target]}.")
    return " ".join(parts)


def _statement(rng: np.random.Generator, names_pool: list[str]) -> str:
    """The glossary's binding statements: "a red circle is a dax. a blue star is a blicket. what is the red circle? a dax."."""
    way = int(rng.integers(2, 5))
    pairs = [(str(PRETRAIN_SHAPES[s]), palette) for s, palette in zip(rng.choice(8, size=way, replace=False),
                                                                     [list(COLOURS)[j] for j in rng.choice(8, size=way)])]
    names = [names_pool[j] for j in rng.choice(len(names_pool), size=way, replace=False)]
    parts = [f"a {c} {s} is a {n}." for (s, c), n in zip(pairs, names)]
    k = int(rng.integers(way))
    parts.append(f"what is the {pairs[k][1]} {pairs[k][0]}? a {names[k]}.")
    return " ".join(parts)


def _recall(rng: np.random.Generator, names_pool: list[str]) -> str:
    """An associative-recall drill: 2–8 distinct keys (scene words or names), each listed with a name, then 2–4 of the
    keys asked again, each followed by the name listed with it: "recall: red dax, circle wug, zobi fep. circle wug. zobi
    fep.". Every asked value is predictable only by finding the key earlier in the line and copying the token after it
    (an induction head's match-and-copy), over the very tokens the episodes bind."""
    keys_pool = list(PRETRAIN_SHAPES) + list(COLOURS) + names_pool
    n = int(rng.integers(2, 9))
    keys = [keys_pool[j] for j in rng.choice(len(keys_pool), size=n, replace=False)]
    values = [names_pool[j] for j in rng.choice(len(names_pool), size=n, replace=False)]
    asked = rng.choice(n, size=min(n, int(rng.integers(2, 5))), replace=False)
    listed = ", ".join(f"{k} {v}" for k, v in zip(keys, values))
    return f"recall: {listed}. " + " ".join(f"{keys[j]} {values[j]}." for j in asked)


def _keyed_episode(rng: np.random.Generator, names_pool: list[str]) -> str:
    """The open-ended layout with each description replaced by one random key word (a scene word or a name): 2–5 keys
    each named ("red. this is a dax. zobi. this is a wug."), then 1–3 of them asked in the query's words ("zobi. q: what
    is this? a: this is a wug."). The answer is found only by matching the key and copying the name that stands five
    tokens after it: the evaluation's match-and-copy at its very offsets, on an exact match of one token."""
    keys_pool = list(PRETRAIN_SHAPES) + list(COLOURS) + names_pool
    n = int(rng.integers(2, 6))
    keys = [keys_pool[j] for j in rng.choice(len(keys_pool), size=n, replace=False)]
    values = [names_pool[j] for j in rng.choice(len(names_pool), size=n, replace=False)]
    parts = [f"{k}. {SUPPORT.format(name=v)}" for k, v in zip(keys, values)]
    parts += [f"{keys[j]}. {QUERY} {values[j]}." for j in rng.integers(n, size=int(rng.integers(1, 4)))]
    return " ".join(parts)


def _repeat(rng: np.random.Generator, names_pool: list[str]) -> str:
    """A repeated random span: 4–24 words drawn from the scene words and names, shown twice ("repeat: wug red zobi
    star. wug red zobi star."); the second showing is predictable token by token only by copying the first."""
    words = list(PRETRAIN_SHAPES) + list(COLOURS) + list(SIZES) + names_pool
    span = " ".join(words[j] for j in rng.integers(len(words), size=int(rng.integers(4, 25))))
    return f"repeat: {span}. {span}."


def scene_corpus(captions: int, episodes: int, seed: int = 0, glossary_size: int = 100, evaluation_names: bool = True,
                 open_ended: float = 0.5, drill: float = 0.0, uniform: float = 0.0, recall: float = 0.0, repeat: float = 0.0,
                 keyed: float = 0.0, statements: float | None = None) -> str:
    """The caption LM's corpus, one line each, shuffled: ``captions`` captions of a scene pool (1–2 objects, seen
    pairs only, no images drawn) and ``episodes`` text episodes (a share ``open_ended`` open-ended, the rest half
    Fast-VQA, half binding statements) named from :func:`glossary` and, with ``evaluation_names``, :data:`NONCE_NAMES`
    too (as the issue's own "a red circle is a dax" does): a name is bound afresh in every episode, so the LM learns
    that names are copied from the context, never what a dax is; and its tokenizer then keeps each name one token.
    ``drill`` and ``uniform``: the shares of open-ended episodes that are copy drills or show one description per name
    (:func:`_text_episode`). ``recall`` and ``repeat``: the shares of the text episodes that are associative-recall
    drills (:func:`_recall`) and repeated random spans (:func:`_repeat`), a synthetic warm-up for the match-and-copy
    circuit; ``keyed``: the share of open-ended episodes keyed by one random word (:func:`_keyed_episode`);
    ``statements``: the share of binding statements (default: half of what the other kinds leave), Fast-VQA takes the rest."""
    for label, share in (("open_ended", open_ended), ("drill", drill), ("uniform", uniform), ("recall", recall), ("repeat", repeat),
                         ("keyed", keyed), ("statements", 0.0 if statements is None else statements)):
        if not 0 <= share <= 1:
            raise DataError(f"scene corpus: {label} must be a share in [0, 1], got {share}")
    rest = 1 - open_ended - recall - repeat - keyed
    statement_share = rest / 2 if statements is None else statements
    if rest - statement_share < -1e-9:
        raise DataError(f"scene corpus: the shares open_ended, recall, repeat, keyed and statements add up to "
                        f"{open_ended + recall + repeat + keyed + statement_share:g}, more than 1")
    pool = make_pool(max(1, captions // 3), objects=(1, 2), seed=seed, draw=False)
    lines = list(pool.row_caption[:captions])
    names = glossary(glossary_size, seed) + (list(NONCE_NAMES) if evaluation_names else [])
    rng = np.random.default_rng([seed, 48])
    shares = np.array([open_ended, max(0.0, rest - statement_share), statement_share, recall, repeat, keyed])
    kinds = rng.choice(len(shares), size=episodes, p=shares / shares.sum())
    makers = (lambda r, n: _text_episode(r, n, drill, uniform), _text_vqa, _statement, _recall, _repeat, _keyed_episode)
    lines += [makers[k](rng, names) for k in kinds]
    return "\n".join(lines[j] for j in rng.permutation(len(lines))) + "\n"


def scene_texts(seed: int = 0, episodes: int = 200) -> list[str]:
    """What the scene world says, for a vocabulary trimmed to it (``fewshot icl shrink-lm --vocabulary scenes``): the
    caption LM's corpus (captions; open-ended, Fast-VQA and statement episodes with glossary and evaluation names),
    every scene category's class names and descriptions, ``episodes`` of its open-ended prompts with nonce and with real
    names in words, Fast-VQA questions with their answers, and Omniglot's real names."""
    lines = scene_corpus(20000, 8000, seed).splitlines()
    for category in CATEGORIES[:3]:  # Omniglot's images have no descriptions, only names
        data = category_images(category, 2, seed=seed)
        lines += [*data.class_names, *data.descriptions]
        for nonce in (True, False):
            for i in range(episodes):
                e = open_ended_episode(data.labels, data.class_names, min(5, len(data.class_names)), 1, 0, True, nonce, seed, i)
                lines.append(" ".join([*described(e.pieces, e.images, data.descriptions), e.answer]))
    for i in range(episodes):
        e = fast_vqa_episode(1, seed, i, size=8)[0]
        lines.append(" ".join([*(p for p in e.pieces if p != IMAGE), e.answer]))
    return lines + [f"character {c + 1}" for c in range(100)]


def write_scene_corpus(out: str | os.PathLike[str], captions: int = 30000, episodes: int = 20000, seed: int = 0) -> dict[str, object]:
    """:func:`scene_corpus` written to ``out`` (a new file); what was written."""
    path = Path(out)
    if path.exists():
        raise DataError(f"'{path}' exists; the corpus goes to a new file")
    text = scene_corpus(captions, episodes, seed)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return {"out": str(path), "captions": captions, "episodes": episodes, "characters": len(text), "seed": seed}
