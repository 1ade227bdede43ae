"""``data.source=scene-questions``: questions about captioned scenes that need a reasoning step, each with a
rationale written from the scene graph, for Multimodal-CoT (Zhang et al. 2023).

Kinds (:data:`QUESTION_KINDS`), on scenes of 2–4 objects:

    ``count``     "how many red shapes are there?" — rationale: the matching objects, left to right, then their
                  number ("i see a small red circle and a large red star. that is two."); answer: the number word;
    ``size``      "is the red circle bigger than the blue square?" — rationale: each object's size ("the red
                  circle is small. the blue square is large."); answer yes / no, drawn half and half;
    ``relation``  "what colour is the shape left of the blue square?" — rationale: which object that is ("the
                  shape left of the blue square is a small red circle."); answer: its colour. Asked only when
                  exactly one object lies on that side of the reference, and by more than the caption margin.

Stages (``data.target``, :data:`TARGETS`), each a (prompt, target) pair of lowercase text:

    ``answer``                 ``q: <question> a:``                    → `` <answer>``  (direct answering)
    ``rationale``              ``q: <question> reason:``               → `` <rationale>``  (stage 1)
    ``answer-from-rationale``  ``q: <question> reason: <rationale> a:`` → `` <answer>``  (stage 2; trained on the
                               gold rationale, tested on the one stage 1 generates)

Training scenes draw their objects from the seen (shape, colour) pairs of the CoGenT split
(:func:`~fewshot.data.scenes.heldout_pairs` of ``data.split_seed``); :func:`evaluation_items` draws fresh scenes of seen
pairs, or scenes holding at least one held-out pair ("held-out compositions", reported apart). Item i of a stream
comes from its own generator (seed, stream, i). The answers are checked in the tests by the scene world's own
caption parser (:func:`~fewshot.data.scenes.caption_is_true`), independent of this generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fewshot.config import DataConfig
from fewshot.data.registry import RunData, register_source
from fewshot.data.scenes import (
    COLOURS, MARGIN, NUMBERS, PLURALS, PRETRAIN_SHAPES, Scene, _holds, _listing, _np, _unique_description, heldout_pairs,
    object_range, render, sample_scenes, seen_pairs,
)
from fewshot.data.token_ids import PAD_ID
from fewshot.errors import DataError

__all__ = [
    "ANSWERS", "QUESTION_KINDS", "SOURCE", "SceneQuestion", "SceneQuestionSet", "SceneQuestionsDataConfig", "TARGETS", "ask",
    "encode_stage", "stage_text", "evaluation_items", "training_items",
]

SOURCE = "scene-questions"
QUESTION_KINDS = ("count", "size", "relation")
TARGETS = ("answer", "rationale", "answer-from-rationale")
_STREAMS = {"train": 40, "seen": 41, "held-out": 42}
_SIDES = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


@dataclass(frozen=True)
class SceneQuestion:
    """One question about ``scene`` with its gold rationale and answer (``kind`` in :data:`QUESTION_KINDS`)."""

    kind: str
    question: str
    rationale: str
    answer: str
    scene: Scene


def _the(desc: tuple[str | None, str | None, str | None]) -> str:
    return "the " + " ".join(w for w in desc if w)


def _ask_count(scene: Scene, rng: np.random.Generator, n: int) -> SceneQuestion | None:
    """A question whose answer is ``n``: a colour or a shape of which the scene holds exactly n objects."""
    kinds = [("colour", c) for c in sorted({o.colour for o in scene.objects})] + [("shape", s) for s in sorted({o.shape for o in scene.objects})]
    kinds = [(by, v) for by, v in kinds if sum(getattr(o, by) == v for o in scene.objects) == n]
    if not kinds:
        return None
    by, value = kinds[int(rng.integers(len(kinds)))]
    matching = sorted((o for o in scene.objects if getattr(o, by) == value), key=lambda o: o.x)
    question = f"how many {value} shapes are there?" if by == "colour" else f"how many {PLURALS[value]} are there?"
    rationale = f"i see {_listing([_np(p.size, p.colour, p.shape) for p in matching])}. that is {NUMBERS[n]}."
    return SceneQuestion("count", question, rationale, NUMBERS[n], scene)


def _ask_size(scene: Scene, rng: np.random.Generator, want: bool) -> SceneQuestion | None:
    """A question whose answer is yes when ``want``, else no."""
    # objects named by colour and shape alone: a description with a size would give the answer away
    described = [(i, d) for i, d in enumerate(_unique_description(scene, i) for i in range(len(scene.objects))) if d is not None and d[0] is None]
    pairs = [(a, b) for a in described for b in described if a[0] != b[0]
             and (scene.objects[a[0]].size == "large" and scene.objects[b[0]].size == "small") == want]
    if not pairs:
        return None
    (i, da), (j, db) = pairs[int(rng.integers(len(pairs)))]
    a, b = scene.objects[i], scene.objects[j]
    question = f"is {_the(da)} bigger than {_the(db)}?"
    rationale = f"{_the(da)} is {a.size}. {_the(db)} is {b.size}."
    return SceneQuestion("size", question, rationale, "yes" if want else "no", scene)


def _ask_relation(scene: Scene, rng: np.random.Generator, colour: str) -> SceneQuestion | None:
    """A question whose answer is ``colour``."""
    options = []
    for j, b in enumerate(scene.objects):
        db = _unique_description(scene, j)
        if db is None:
            continue
        for phrase, rel in _SIDES.items():
            side = [o for k, o in enumerate(scene.objects) if k != j and _holds(rel, o, b)]
            if len(side) == 1 and side[0].colour == colour and _holds(rel, side[0], b, MARGIN):
                options.append((db, phrase, side[0]))
    if not options:
        return None
    db, phrase, a = options[int(rng.integers(len(options)))]
    question = f"what colour is the shape {phrase} {_the(db)}?"
    rationale = f"the shape {phrase} {_the(db)} is {_np(a.size, a.colour, a.shape)}."
    return SceneQuestion("relation", question, rationale, a.colour, scene)


_ASK = {"count": _ask_count, "size": _ask_size, "relation": _ask_relation}


# What each kind's answer is drawn from, uniformly, before its scene: the answers are balanced by construction.
ANSWERS = {"count": (1, 2, 3), "size": (True, False), "relation": tuple(COLOURS)}


def ask(scene: Scene, kind: str, rng: np.random.Generator, answer: object) -> SceneQuestion | None:
    """A question of ``kind`` about ``scene`` whose answer is ``answer`` (one of :data:`ANSWERS`), or None when the
    scene has no such question."""
    if kind not in _ASK:
        raise DataError(f"unknown question kind '{kind}'; known: {', '.join(QUESTION_KINDS)}")
    return _ASK[kind](scene, rng, answer)


def _draw(seed: int, stream: str, i: int, objects: tuple[int, int], pairs: list[tuple[str, str]],
          needs: frozenset[tuple[str, str]] | None) -> SceneQuestion:
    """Item i of ``stream``: a scene (holding a pair of ``needs`` when given) and a question of a uniform kind."""
    rng = np.random.default_rng([seed, _STREAMS[stream], i])
    kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    answer = ANSWERS[kind][int(rng.integers(len(ANSWERS[kind])))]
    while True:  # a scene without such a question is redrawn from the same stream
        scene = sample_scenes(rng, 1, objects, pairs)[0]
        if needs is not None and not any((o.shape, o.colour) in needs for o in scene.objects):
            continue
        item = ask(scene, kind, rng, answer)
        if item is not None:
            return item


def training_items(n: int, seed: int, split_seed: int, objects: tuple[int, int] = (2, 4)) -> list[SceneQuestion]:
    """``n`` training questions on scenes of the seen (shape, colour) pairs of ``split_seed``'s CoGenT split."""
    pairs = seen_pairs(heldout_pairs(split_seed))
    return [_draw(seed, "train", i, objects, pairs, None) for i in range(n)]


def evaluation_items(n: int, seed: int, split_seed: int, compositions: Literal["seen", "held-out"] = "seen",
               objects: tuple[int, int] = (2, 4)) -> list[SceneQuestion]:
    """``n`` test questions from a stream apart from training: scenes of seen pairs, or (``held-out``) scenes of all
    the pre-training pairs that hold at least one pair training never drew."""
    if compositions not in ("seen", "held-out"):
        raise DataError(f"compositions must be seen or held-out, got {compositions!r}")
    heldout = heldout_pairs(split_seed)
    if compositions == "seen":
        return [_draw(seed, "seen", i, objects, seen_pairs(heldout), None) for i in range(n)]
    every = [(s, c) for s in PRETRAIN_SHAPES for c in COLOURS]
    return [_draw(seed, "held-out", i, objects, every, heldout) for i in range(n)]


def stage_text(item: SceneQuestion, target: str, rationale: str | None = None) -> tuple[str, str]:
    """(prompt, target text) of ``item`` for stage ``target`` (:data:`TARGETS`). ``answer-from-rationale`` reads
    ``rationale`` when given (stage 1's output at test time), else the gold one (training)."""
    if target == "answer":
        return f"q: {item.question} a:", f" {item.answer}"
    if target == "rationale":
        return f"q: {item.question} reason:", f" {item.rationale}"
    if target == "answer-from-rationale":
        return f"q: {item.question} reason: {item.rationale if rationale is None else rationale} a:", f" {item.answer}"
    raise DataError(f"unknown data.target '{target}'; choose {', '.join(TARGETS)}")


def encode_stage(tokenizer, item: SceneQuestion, target: str, seq_len: int) -> tuple[list[int], int]:
    """(prompt ⊕ target ids, prompt length) with the LM's ``tokenizer``; a DataError when they and the EOS
    the method appends need more than ``seq_len`` positions."""
    prompt, answer = stage_text(item, target)
    p = tokenizer.encode(prompt, add_special_tokens=False).ids
    t = tokenizer.encode(answer, add_special_tokens=False).ids
    if len(p) + len(t) + 1 > seq_len:
        raise DataError(f"a {target} example needs {len(p) + len(t) + 1} tokens with its EOS, {len(p) + len(t) + 1 - seq_len} "
                        f"more than data.seq_len={seq_len}: '{prompt}{answer}'")
    return p + t, len(p)


class SceneQuestionsDataConfig(DataConfig):
    """``data.source=scene-questions``: generated scenes with reasoning questions (Multimodal-CoT)."""

    image_size: int = Field(32, ge=8, le=512, description="scene images are drawn at image_size × image_size")
    channels: Literal[3] = Field(3, description="scene images are RGB")
    questions: int = Field(8000, ge=1, description="scene-questions: training questions, one scene each")
    objects: str = Field("2-4", description="scene-questions: objects per scene, 'min-max'")
    target: Literal["answer", "rationale", "answer-from-rationale"] = Field(
        "answer", description="scene-questions: what the model learns to write — the answer after the question (direct), "
        "the rationale (Multimodal-CoT stage 1), or the answer after question and gold rationale (stage 2)")
    seq_len: int = Field(64, ge=4, description="scene-questions: prompt + target + EOS tokens a row holds (padded with [PAD])")
    seed: int = Field(0, description="scene-questions: seed of the training scenes and questions (the split is data.split_seed's)")


class SceneQuestionSet:
    """Rendered questions as the trainer's TrainingData: ``images`` (B, 3, S, S) in [0, 1], ``tokens`` (B, T) prompt ⊕
    target padded with [PAD], ``prompt_lengths`` (B,) — the loss is on the target and its EOS only."""

    labeled = False
    keys = frozenset({"images", "tokens", "prompt_lengths"})

    def __init__(self, items: list[SceneQuestion], tokenizer, target: str, seq_len: int, image_size: int) -> None:
        rows = [encode_stage(tokenizer, item, target, seq_len) for item in items]
        self.items = items
        self.images = torch.from_numpy(render([item.scene for item in items], image_size))
        self.tokens = torch.full((len(items), seq_len - 1), PAD_ID, dtype=torch.long)  # the EOS takes the last place
        for r, (ids, _) in enumerate(rows):
            self.tokens[r, : len(ids)] = torch.tensor(ids)
        self.prompt_lengths = torch.tensor([n for _, n in rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"images": self.images[idx].float().div_(255), "tokens": self.tokens[idx], "prompt_lengths": self.prompt_lengths[idx]}


def load_scene_questions(data: SceneQuestionsDataConfig, eval_path: str | None, tokenizer: object = None) -> RunData:
    """The training questions, tokenized with the method's LM tokenizer; test questions come from :func:`evaluation_items`."""
    if eval_path is not None:
        raise DataError("data.source=scene-questions draws its own test questions; remove eval.data_path")
    if tokenizer is None:
        raise DataError("data.source=scene-questions is tokenized with the method's language model (method mm-cot)")
    items = training_items(data.questions, data.seed, data.split_seed, object_range(data.objects))
    return RunData(SceneQuestionSet(items, tokenizer, data.target, data.seq_len, data.image_size), None)


register_source(SOURCE, load_scene_questions, SceneQuestionsDataConfig)
