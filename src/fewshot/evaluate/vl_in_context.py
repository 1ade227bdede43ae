"""Images in context: Frozen's open-ended few-shot protocol and the Fast-VQA-style task (``fewshot icl vl-eval``).

Any model that continues an interleaved image–text prompt plugs in through :class:`InterleavedModel`:

    next_text(images, pieces, max_tokens) -> str

``pieces`` are texts and :data:`~fewshot.data.vl_prompts.IMAGE` markers, ``images`` a list of (C, H, W) tensors in
[0, 1], one per marker in order; the model continues the prompt greedily. :class:`PrefixInContext` is a prefix
model's side (Frozen): each image's k prefix embeddings inline where its marker stands, each text piece's token
embeddings (``PrefixLM.embed``; every piece after the first begins with a space, as the words of the caption LM's
corpus do), all after the LM's start ids, as one embedding sequence; greedy decoding continues it over the KV cache
(``use_cache=False`` recomputes the whole sequence at every step; the two agree). A model may also offer
``next_texts(prompts, max_tokens) -> list[str]`` for many (images, pieces) at once (:func:`continue_prompts` uses it):
Frozen's and Flamingo's stack the prompts of one length with no padding, so each row computes what it would alone,
and read the LM's weights once a decoding step for them all.

Scoring is exact match: the generated text up to its first ``.``, ``?`` or newline, its first words against the
answer's words (``dax``; ``character 3``). Accuracy is the mean ± 95% CI (:func:`~fewshot.evaluate.runner.mean_ci95`)
over seeded episodes, one query each (:func:`~fewshot.data.vl_prompts.open_ended_episode`: the same seed and
episode draw the same classes and images in every setting). Baselines: test-blind (:class:`BlankImages`: every
image of the prompt replaced by a blank one) and train-blind (a run pre-trained with ``method.blind=true``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from fewshot.data.scenes import COLOURS
from fewshot.data.vl_prompts import (
    CATEGORIES, IMAGE, NONCE_NAMES, QUERY, VLImages, category_images, described, fast_vqa_descriptions, fast_vqa_episode, open_ended_episode,
)
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.runner import mean_ci95
from fewshot.models.prefix_lm import Past, PrefixLM, decode_steps, greedy_choice, interleaved_sequence, same_key_batches

__all__ = [
    "BlankImages", "DominantColour", "InterleavedModel", "NearestSupport", "PrefixInContext", "Setting", "answer_matches", "continue_prompts", "described", "evaluate_fast_vqa", "evaluate_open_ended",
    "feature_cosine", "frozen_columns", "interleaved_embeddings", "named_items", "nonce_warnings", "open_in_context_model", "vl_eval", "vl_table", "word_overlap",
]


class InterleavedModel(Protocol):
    """What the protocol asks of a model: a name, and the greedy continuation of an interleaved prompt."""

    name: str

    def next_text(self, images: Sequence[torch.Tensor], pieces: Sequence[str], max_tokens: int) -> str: ...


def interleaved_embeddings(link: PrefixLM, prefix: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor],
                           pieces: Sequence[str]) -> torch.Tensor:
    """The prompt as one embedding sequence (1, T, D) (:func:`~fewshot.models.prefix_lm.interleaved_sequence`)."""
    return interleaved_sequence(link, prefix, images, pieces)[0]


_STOPS = (".", "?", "\n")


class PrefixInContext:
    """A prefix model (Frozen: ``prefix`` = the trained encoder and linear map) over its frozen LM, as an
    :class:`InterleavedModel`; greedy decoding stops at EOS or once the text holds a ``.``, ``?`` or newline."""

    image_size = 32  # what its encoder reads; a run's own size when opened from a run

    def __init__(self, link: PrefixLM, prefix: Callable[[torch.Tensor], torch.Tensor], name: str, use_cache: bool = True) -> None:
        self.link, self.prefix, self.name, self.use_cache = link, prefix, name, use_cache

    @property
    def context(self) -> int:
        return self.link.context

    def single_token(self, word: str) -> bool:
        return len(self.link.tokenizer.encode(" " + word, add_special_tokens=False).ids) == 1

    def check_fits(self, length: int, max_tokens: int) -> None:
        need = length + max_tokens - 1  # the last generated token is never fed back
        if need > self.link.context:
            raise DataError(f"the interleaved prompt needs {need} positions ({length} prompt + {max_tokens - 1} generated) but "
                            f"{self.link.name} holds {self.link.context}: {need - self.link.context} too many; use fewer shots or repeats")

    @torch.no_grad()
    def logits(self, images: Sequence[torch.Tensor], pieces: Sequence[str], past: Past | None = None) -> tuple[torch.Tensor, Past]:
        """Next-token logits at every position of the prompt (1, T, V) and its cache."""
        return self.link.step(interleaved_embeddings(self.link, self.prefix, images, pieces), past)

    @torch.no_grad()
    def next_text(self, images: Sequence[torch.Tensor], pieces: Sequence[str], max_tokens: int) -> str:
        return self.next_texts([(images, pieces)], max_tokens)[0]

    @torch.no_grad()
    def next_texts(self, prompts: Sequence[tuple[Sequence[torch.Tensor], Sequence[str]]], max_tokens: int, batch: int = 32) -> list[str]:
        """:meth:`next_text` of each (images, pieces), prompts of one length run ``batch`` at a time (stacked with no
        padding: the LM's weights are read once a step for them all)."""
        sequences = [interleaved_embeddings(self.link, self.prefix, images, pieces) for images, pieces in prompts]
        for sequence in sequences:
            self.check_fits(sequence.shape[1], max_tokens)
        texts = [""] * len(prompts)
        for rows in same_key_batches([s.shape[1] for s in sequences], batch):
            start = torch.cat([sequences[r] for r in rows])
            past: list[Past] = []

            def next_logits(tokens: torch.Tensor) -> torch.Tensor:
                if not tokens.shape[1]:
                    logits, cache = self.link.step(start, last_only=self.use_cache)
                elif self.use_cache:
                    logits, cache = self.link.step(self.link.embed(tokens[:, -1:]).to(start.dtype), past[0])
                else:
                    logits, cache = self.link.step(torch.cat([start, self.link.embed(tokens).to(start.dtype)], dim=1))
                past[:] = [cache]
                return logits[:, -1]

            ends = lambda row: any(s in self.link.decode(row) for s in _STOPS)  # noqa: E731
            for r, out in zip(rows, decode_steps(next_logits, len(rows), max_tokens, self.link.eos_id, greedy_choice, start.device, ends=ends)):
                texts[r] = self.link.decode(out)
        return texts


class BlankImages:
    """The test-blind baseline: ``model`` given a blank (all-zero) image in place of every image of the prompt."""

    def __init__(self, model: InterleavedModel) -> None:
        self.model, self.name = model, f"{model.name} (test-blind)"

    def next_text(self, images: Sequence[torch.Tensor], pieces: Sequence[str], max_tokens: int) -> str:
        return self.model.next_text([torch.zeros_like(x) for x in images], pieces, max_tokens)

    def next_texts(self, prompts: Sequence[tuple[Sequence[torch.Tensor], Sequence[str]]], max_tokens: int) -> list[str]:
        # defined here, never reached through __getattr__: the model's own would see the real images
        return continue_prompts(self.model, [([torch.zeros_like(x) for x in images], pieces) for images, pieces in prompts], max_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match: the generated text up to its first ``.``, ``?`` or newline, its first words equal to the answer's."""
    cut = len(generated)
    for s in _STOPS:
        if s in generated:
            cut = min(cut, generated.index(s))
    words, target = generated[:cut].split(), answer.split()
    return words[: len(target)] == target


def nonce_warnings(model: InterleavedModel, names: Sequence[str] = NONCE_NAMES) -> list[str]:
    """A warning per nonce name that is one token of the model's vocabulary: a known word, not a made-up one."""
    single = getattr(model, "single_token", None)
    known = [w for w in names if single is not None and single(w)]
    notes = [f"nonce name '{w}' is a single token of {model.name}'s vocabulary: it may already be a known word" for w in known]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes


# ----------------------------------------------------------------------------- the simple baselines


def named_items(images: Sequence[Any], pieces: Sequence[str]) -> tuple[list[tuple[Any, str]], Any]:
    """The support of an open-ended prompt as (item, name) pairs and its query item, where an item is the image at an
    :data:`IMAGE` marker or, in a text-only prompt, the description in its place: each ``this is a NAME.`` names the
    item before it; the item before the query line is the query."""
    shown, last, named, query = iter(images), None, [], None
    for piece in pieces:
        if piece == IMAGE:
            last = next(shown)
        elif piece.startswith(QUERY):
            query = last
        elif piece.startswith("this is a ") and piece.endswith("."):
            named.append((last, piece[len("this is a "):-1]))
        else:
            last = piece  # a description standing for an image (text-only), or the task induction, replaced in turn
    if query is None or not named:
        raise DataError("not an open-ended prompt: no named support item or no query")
    return named, query


class NearestSupport:
    """The baseline a practitioner tries first: name the query after its nearest support item, no language model.
    ``similarity(query, items) → scores`` — cosine of an image encoder's features (1-NN), or, for text-only prompts,
    :func:`word_overlap` (the words a query description shares with each support description: a hand-made rule)."""

    def __init__(self, similarity: Callable[[Any, list[Any]], Sequence[float]], name: str) -> None:
        self.similarity, self.name = similarity, name

    def next_text(self, images: Sequence[Any], pieces: Sequence[str], max_tokens: int) -> str:
        named, query = named_items(images, pieces)
        scores = list(self.similarity(query, [item for item, _ in named]))
        return named[int(np.argmax(scores))][1]  # ties: the first shown


class DominantColour:
    """Fast-VQA's hand-made baseline, no language model: the palette colour that covers most of the query image (the
    last one), whatever name the question asks about. Each lit pixel (brightest channel > 0.5) is divided by its
    brightest channel, undoing shade and anti-aliasing, and goes to the nearest palette colour so scaled."""

    name = "dominant-colour rule"

    def __init__(self) -> None:
        self.names = list(COLOURS)
        palette = torch.tensor(list(COLOURS.values()))
        self.palette = palette / palette.amax(dim=1, keepdim=True)

    def next_text(self, images: Sequence[torch.Tensor], pieces: Sequence[str], max_tokens: int) -> str:
        pixels = images[-1].flatten(1).T.float()
        lit = pixels[pixels.amax(dim=1) > 0.5]
        if not len(lit):
            return ""  # a blank query: no colour to name
        nearest = torch.cdist(lit / lit.amax(dim=1, keepdim=True), self.palette).argmin(dim=1)
        return f" {self.names[int(torch.bincount(nearest, minlength=len(self.names)).argmax())]}."


def word_overlap(query: str, items: list[str]) -> list[int]:
    """How many distinct words each description shares with the query's."""
    words = set(query.rstrip(".").split())
    return [len(words & set(item.rstrip(".").split())) for item in items]


def feature_cosine(encoder: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, list[torch.Tensor]], list[float]]:
    """Cosine similarity of ``encoder``'s features (an image tower, in eval mode) between the query and each item."""
    @torch.no_grad()
    def similarity(query: torch.Tensor, items: list[torch.Tensor]) -> list[float]:
        f = torch.nn.functional.normalize(encoder(torch.stack([query, *items])).float(), dim=-1)
        return (f[1:] @ f[0]).tolist()
    return similarity


# ----------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Setting:
    """One cell of Frozen's table: N-way, inner shots, repeats, task induction, nonce or real names."""

    way: int
    shots: int
    repeats: int
    induction: bool
    nonce: bool = True

    @property
    def label(self) -> str:
        return f"{self.way}-way {'nonce' if self.nonce else 'real'} {'induction' if self.induction else 'no induction'} {self.shots} shot(s) {self.repeats} repeat(s)"


def frozen_columns(way: int, nonce: bool = True) -> list[Setting]:
    """Frozen's seven columns: no induction 1 shot; induction 1/3/5 shots; induction 1 shot with 1/3/5 repeats."""
    return [Setting(way, 1, 0, False, nonce), *(Setting(way, s, 0, True, nonce) for s in (1, 3, 5)),
            *(Setting(way, 1, r, True, nonce) for r in (1, 3, 5))]


def continue_prompts(model: InterleavedModel, prompts: Sequence[tuple[Sequence[torch.Tensor], Sequence[str]]], max_tokens: int) -> list[str]:
    """``model.next_text`` of each (images, pieces): through the model's batched ``next_texts`` when it has one."""
    batched = getattr(type(model), "next_texts", None)  # the class's own, not one forwarded by __getattr__
    if batched is not None:
        return batched(model, prompts, max_tokens)
    return [model.next_text(images, pieces, max_tokens) for images, pieces in prompts]


def _score(model: InterleavedModel, prompts: Sequence[tuple[list[torch.Tensor], Sequence[str], str]], max_tokens: int) -> dict[str, Any]:
    texts = continue_prompts(model, [(images, pieces) for images, pieces, _ in prompts], max_tokens)
    hits = [float(answer_matches(text, answer)) for text, (_, _, answer) in zip(texts, prompts)]
    mean, ci = mean_ci95(hits)
    return {"accuracy": 100 * mean, "ci95": 100 * ci, "episodes": len(hits)}


def evaluate_open_ended(model: InterleavedModel, data: VLImages, settings: Sequence[Setting], episodes: int, seed: int = 0,
                        max_tokens: int = 6, text_only: bool = False) -> dict[str, dict[str, Any]]:
    """Accuracy (%, mean ± 95% CI over ``episodes`` seeded episodes) of ``model`` in each setting on ``data``.
    ``text_only``: the same episodes with every image replaced by its description (:func:`described`), no image
    given: what the LM does when it is told, in its own words, what each image shows."""
    if text_only and data.descriptions is None:
        raise DataError("a text-only row needs the images' descriptions; this image set has none")
    out = {}
    for s in settings:
        drawn = [open_ended_episode(data.labels, data.class_names, s.way, s.shots, s.repeats, s.induction, s.nonce, seed, i)
                 for i in range(episodes)]
        prompts = [([], described(e.pieces, e.images, data.descriptions), e.answer) if text_only else
                   ([data.images[j] for j in e.images], e.pieces, e.answer) for e in drawn]
        out[s.label] = {**_score(model, prompts, max_tokens),
                        "way": s.way, "shots": s.shots, "repeats": s.repeats, "induction": s.induction, "names": "nonce" if s.nonce else "real"}
    return out


def evaluate_fast_vqa(model: InterleavedModel, shots: Sequence[int], episodes: int, seed: int = 0, size: int = 32,
                      max_tokens: int = 4, text_only: bool = False) -> dict[str, dict[str, Any]]:
    """Fast-VQA accuracy (%, ± 95% CI) at each number of shots per named shape. ``text_only``: the same episodes with
    every image replaced by its description (:func:`~fewshot.data.vl_prompts.fast_vqa_descriptions`), no image given."""
    out = {}
    for k in shots:
        prompts = []
        for i in range(episodes):
            if text_only:
                episode, descriptions = fast_vqa_descriptions(k, seed, i)
                prompts.append(([], described(episode.pieces, episode.images, descriptions), episode.answer))
                continue
            episode, images = fast_vqa_episode(k, seed, i, size)
            prompts.append(([images[j] for j in episode.images], episode.pieces, episode.answer))
        out[str(k)] = {**_score(model, prompts, max_tokens), "shots": k}
    return out


# ----------------------------------------------------------------------------- a run, the command


def open_in_context_model(path: str | Path) -> Any:
    """A Frozen / ClipCap / BLIP-2 run (an image prefix) or a Flamingo run folder as an :class:`InterleavedModel` (eval mode)."""
    from fewshot.run import Run

    from fewshot.methods.flamingo import Flamingo, FlamingoInContext
    from fewshot.methods.prefix_captioning import PrefixCaptioner

    run = Run.open(path)
    method = run.method().eval()
    name = f"{run.config.method.name} run {Path(path).name}"
    if isinstance(method, Flamingo):
        model: Any = FlamingoInContext(method, name)
    elif isinstance(method, PrefixCaptioner):
        model = PrefixInContext(method.language_model, method.prefix, name)
    else:
        raise ConfigError(f"'{path}' is a {run.config.method.name} run; icl vl-eval reads a run with an image prefix into a causal LM "
                          "(frozen, clipcap, blip2) or a flamingo run")
    model.image_size = run.config.data.image_size
    return model


def vl_eval(model: InterleavedModel, categories: Sequence[str] = CATEGORIES, ways: Sequence[int] = (2, 5), shots: Sequence[int] = (1, 3, 5),
            repeats: Sequence[int] = (0, 1, 3, 5), induction: Sequence[bool] = (True, False), names: Sequence[str] = ("nonce", "real"),
            episodes: int = 100, seed: int = 0, test_blind: bool = True, vqa_shots: Sequence[int] = (0, 1, 3, 5),
            per_class: int = 12, size: int = 32, grid: str = "frozen") -> dict[str, Any]:
    """The protocol on each category (Omniglot skipped, with the reason, when absent) and Fast-VQA, for ``model`` and,
    with ``test_blind``, the same model on blank images. ``grid="frozen"`` keeps Frozen's seven columns among the
    given shots / repeats / induction values; ``"product"`` runs every combination."""
    if grid not in ("frozen", "product"):
        raise ConfigError(f"unknown grid '{grid}'; choose frozen or product")
    unknown = [n for n in names if n not in ("nonce", "real")]
    if unknown:
        raise ConfigError(f"unknown names '{unknown[0]}'; choose nonce or real")
    settings = [Setting(w, s, r, i, n == "nonce") for w in ways for n in names for i in induction for s in shots for r in repeats]
    if grid == "frozen":
        keep = {c for w in ways for n in names for c in frozen_columns(w, n == "nonce")}
        settings = [s for s in settings if s in keep]
    models = {"model": model, **({"test-blind": BlankImages(model)} if test_blind else {})}
    out: dict[str, Any] = {"model": model.name, "episodes": episodes, "seed": seed, "warnings": nonce_warnings(model),
                           "categories": {}, "skipped": {}, "fast_vqa": {}}
    for category in categories:
        try:
            data = category_images(category, per_class, size, seed)
        except DataError as exc:
            if category != "omniglot":
                raise
            out["skipped"][category] = str(exc)
            continue
        usable = [s for s in settings if s.nonce or category != "omniglot"]  # Omniglot characters have no real names
        out["categories"][category] = {row: evaluate_open_ended(m, data, usable, episodes, seed) for row, m in models.items()}
    if vqa_shots:
        out["fast_vqa"] = {row: evaluate_fast_vqa(m, vqa_shots, episodes, seed, size) for row, m in models.items()}
    return out


def vl_table(out: dict[str, Any]) -> str:
    """One line per (category, row, setting) and per Fast-VQA row: accuracy ± CI."""
    lines = [f"{out['model']}: exact-match accuracy (%, mean ± 95% CI over {out['episodes']} episodes, seed {out['seed']})"]
    for category, rows in out["categories"].items():
        for row, cells in rows.items():
            for label, cell in cells.items():
                lines.append(f"  {category:12s} {row:10s} {label:55s} {cell['accuracy']:5.1f} ± {cell['ci95']:4.1f}")
    for category, reason in out["skipped"].items():
        lines.append(f"  {category:12s} skipped: {reason}")
    for row, cells in out["fast_vqa"].items():
        lines.append(f"  fast-vqa     {row:10s} " + "  ".join(f"{k} shot(s) {c['accuracy']:5.1f} ± {c['ci95']:4.1f}" for k, c in cells.items()))
    lines += [f"warning: {w}" for w in out["warnings"]]
    return "\n".join(lines)
