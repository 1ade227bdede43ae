"""GPT + X: a language model helps an image–text run. Classification by description and Socratic captioning.

**Classification by description** (Menon & Vondrick 2023). A class c has a name n_c and descriptors
D(c) = {d_1 … d_M}, short phrases of what it looks like ("is red", "has a green stem"). Each descriptor
becomes a sentence s(n_c, d) = "{n_c}, which {d}" (:func:`descriptor_sentence`: "which is {d}" after an
article, "which has {d}" after a bare noun), and an image x is scored against c by the mean cosine

    score(x, c) = (1/M) Σ_{d ∈ D(c)} cos(x, text(s(n_c, d)))  =  x̂ · w_c,   w_c = (1/M) Σ_d normalise(text(s(n_c, d))),

w_c left unnormalised (:func:`descriptor_prototypes`), so the ranking is that of the mean cosine: a
:class:`~fewshot.evaluate.zeroshot.ZeroShotClassifier` with ``normalize_prototypes=False``. Without the name
(``with_name=False``) the sentence is "it {is|has} …". Descriptors come from a causal LM asked the paper's
question (:data:`DESCRIPTOR_PROMPT`, the answer's "- …" lines read by :func:`parse_descriptors`): fewshot's
GPT run, SmolLM2 or a Hugging Face folder; from a JSON table ``{class: [descriptors]}`` written by any LLM;
or from a Python callable ``name -> list[str]`` (:func:`resolve_descriptors`).

**The nonce-name protocol** (:func:`describe_run`). The classes are (colour, shape) pairs of the scene world
(:data:`CONCEPTS`); the image–text run sees each only under a made-up name ("a photo of a dax"), so the name
alone is near chance. Rows, on the scenes' single-object test images, all classes at once and as N-way
episodes (± 95% CI):

    ``name``             the nonce name in "a photo of a {}";
    ``lm``               the LM's descriptors: the LM is asked about a real-world concept that looks like the
                         class (red circle → "tomato", :data:`CONCEPTS`), never told the colour or shape;
    ``true``             the scene graph's words, "is red", "is a circle" (:func:`true_descriptors`);
    ``lm-deranged``,     each class scored with another class's descriptors (a seeded derangement,
    ``true-deranged``    :func:`derangement`): what averaging over sentences gives with the wrong content, the
                         control for the ensembling effect (Roth et al. 2023);
    ``real-name``        the class's own words as its name, "a photo of a red circle": the run's zero-shot.

**Socratic captioning** (Zeng et al. 2022), :func:`socratic_captions`: the run ranks the scene words for an
image (colours by "a {colour} shape", shapes by "a photo of a {shape}", counts by "there are {n} objects");
the LM drafts candidate captions from a prompt that names the top words (after one worked picture,
:data:`SOCRATIC_EXAMPLE`, by default); the run picks the candidate with the highest cosine. Scored with :func:`fewshot.evaluate.captions.caption_metrics` against the CLIP words alone
filled into the grammar and the LM's greedy draft without the pick.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.data.scenes import COLOURS, NUMBERS, PLURALS, PRETRAIN_SHAPES, single_object_test
from fewshot.data.vl_prompts import NONCE_NAMES, glossary
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.zeroshot import zero_shot_episodes, zero_shot_scores
from fewshot.models.causal_lm import PromptLM

__all__ = [
    "CONCEPTS", "DESCRIPTOR_PROMPT", "DESCRIPTOR_QUESTION", "DescriptorSource", "clean_caption", "derangement", "describe_run", "describe_table",
    "descriptor_prototypes", "descriptor_scores", "descriptor_sentence", "lm_descriptors", "nonce_names", "parse_descriptors",
    "SOCRATIC_EXAMPLE", "rank_scene_words", "read_descriptor_table", "resolve_descriptors", "socratic_captions", "socratic_prompt", "true_descriptors",
]

# Menon & Vondrick's question after one worked answer (their prompt has one too; this example is ours, about
# a thing that is no class here, in no colour or shape word of the scenes); the answer is read from the "- …" lines that follow.
DESCRIPTOR_EXAMPLE = ("Q: What are useful features for distinguishing a zebra in a photo?\n"
                      "A: There are several useful visual features to tell there is a zebra in a photo:\n"
                      "- four-legged animal\n- black stripes on a pale coat\n- short upright mane\n- hooves\n\n")
DESCRIPTOR_QUESTION = ("Q: What are useful features for distinguishing a {concept} in a photo?\n"
                       "A: There are several useful visual features to tell there is a {concept} in a photo:\n-")
DESCRIPTOR_PROMPT = DESCRIPTOR_EXAMPLE + DESCRIPTOR_QUESTION
DESCRIPTOR_STOPS = ("\n\n", "\nQ:", "\nA:")

# The scene class → a real-world thing that looks like it. Chosen by hand before any measurement, one per class
# that has an everyday look-alike; no concept's name holds a colour or shape word of the scene world, so the LM
# is never told the answer (it may know that limes are green: that is the knowledge being tested).
CONCEPTS: dict[str, str] = {
    "red circle": "tomato", "orange circle": "basketball", "yellow circle": "sun", "green circle": "lime",
    "blue circle": "planet earth", "purple circle": "grape", "white circle": "golf ball",
    "red triangle": "watermelon slice", "orange triangle": "traffic cone", "yellow triangle": "tortilla chip",
    "green triangle": "christmas tree", "white triangle": "sailboat sail",
    "orange square": "cheddar cheese slice", "yellow square": "sticky note", "white square": "sugar cube", "cyan square": "ice cube",
    "red cross": "first aid kit", "green cross": "pharmacy sign", "yellow star": "sheriff badge",
    "green ring": "christmas wreath", "yellow ring": "gold wedding band", "white ring": "lifebuoy",
    "yellow diamond": "road warning sign", "purple diamond": "amethyst", "white arrow": "mouse cursor",
}

DescriptorSource = Union[str, Path, Mapping[str, Sequence[str]], Callable[[str], Sequence[str]], PromptLM]

_VERB_LEADS = ("is", "are", "has", "have", "can", "may", "often", "usually", "typically", "looks", "appears", "contains")
_ARTICLES = ("a", "an", "the", "used")


# ----------------------------------------------------------------------------- descriptors → scores


def descriptor_sentence(name: str | None, descriptor: str) -> str:
    """``"{name}, which {descriptor}"`` when the descriptor starts with a verb ("is red", "has a stem"), ``"…, which is
    {descriptor}"`` after an article or "used" ("a circle"), ``"…, which has {descriptor}"`` otherwise ("green leaves");
    without a name the subject is "it": "it is red"."""
    d = " ".join(descriptor.split())
    first = d.split(" ", 1)[0].lower() if d else ""
    verb = "" if first in _VERB_LEADS else "is " if first in _ARTICLES else "has "
    return f"{name}, which {verb}{d}" if name is not None else f"it {verb}{d}"


def descriptor_prototypes(embed_texts: Callable[[list[str]], torch.Tensor], names: Sequence[str | None],
                          descriptors: Sequence[Sequence[str]], with_name: bool = True) -> torch.Tensor:
    """(C, D) float64: w_c = (1/M_c) Σ_d normalise(text(s(n_c, d))), the mean of the unit sentence embeddings,
    NOT renormalised, so x̂ · w_c is the mean cosine over the class's descriptors. One call of ``embed_texts``."""
    if len(names) != len(descriptors):
        raise DataError(f"{len(names)} class names for {len(descriptors)} descriptor lists")
    empty = [str(n) for n, d in zip(names, descriptors) if not d]
    if empty:
        raise DataError(f"class {empty[0]!r} has no descriptors; every class needs at least one")
    sentences = [descriptor_sentence(n if with_name else None, d) for n, ds in zip(names, descriptors) for d in ds]
    with torch.no_grad():
        embedded = F.normalize(torch.as_tensor(embed_texts(sentences)).detach().double().cpu(), dim=1)
    if embedded.shape[0] != len(sentences):
        raise DataError(f"embed_texts gave {embedded.shape[0]} embeddings for {len(sentences)} sentences")
    bounds = np.cumsum([0, *map(len, descriptors)])
    return torch.stack([embedded[a:b].mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:])])


def descriptor_scores(image_embeddings: torch.Tensor | np.ndarray, prototypes: torch.Tensor) -> torch.Tensor:
    """(N, C): score(x, c) = normalise(x) · w_c, the mean cosine of each image with each class's descriptor sentences."""
    x = F.normalize(torch.as_tensor(image_embeddings).double(), dim=1)
    return x @ torch.as_tensor(prototypes).double().T


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation π of 0..n−1 with π(i) ≠ i for every i (class i takes class π(i)'s descriptors)."""
    if n < 2:
        raise ConfigError(f"a derangement needs at least 2 classes, got {n}")
    rng = np.random.default_rng([seed, 50])
    while True:  # about e tries on average
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return [int(i) for i in order]


def true_descriptors(class_name: str) -> list[str]:
    """The scene graph's words of a "<colour> <shape>" class: ``["is red", "is a circle"]``."""
    colour, _, shape = class_name.partition(" ")
    if colour not in COLOURS or shape not in PLURALS:
        raise ConfigError(f"{class_name!r} is not a '<colour> <shape>' class of the scene world")
    return [f"is {colour}", f"is {'an' if shape[0] in 'aeiou' else 'a'} {shape}"]


# ----------------------------------------------------------------------------- descriptor sources


_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


def parse_descriptors(text: str, limit: int = 8, complete: bool = True) -> list[str]:
    """The descriptors in an LM's answer to :data:`DESCRIPTOR_PROMPT` (``text`` is what follows its final "-"):
    the first line and every later bullet line ("- ", "* ", "1. "), up to a blank line or a new "Q:"; each
    stripped of the bullet, surrounding quotes and a final full stop, lower-cased; empty and repeated ones
    dropped; at most ``limit``. A later line that is no bullet ends the list (the model left the format).
    ``complete=False`` (the generation budget ran out) drops the last line, cut mid-way, unless it is the first."""
    stopped = False
    for stop in DESCRIPTOR_STOPS:
        cut = text.find(stop)
        if cut >= 0:
            text, stopped = text[:cut], True
    lines = text.split("\n")
    if not complete and not stopped and len(lines) > 1:
        lines = lines[:-1]
    out: list[str] = []
    for k, line in enumerate(lines):
        if k > 0 and not _BULLET.match(line):
            break
        d = _BULLET.sub("", line).strip().strip("\"'").rstrip(".;,").strip().lower()
        if d and d not in out:
            out.append(d)
    return out[:limit]


def lm_descriptors(lm: PromptLM, concepts: Mapping[str, str], max_new_tokens: int = 48, rows_per_batch: int = 8,
                   example: bool | None = None) -> dict[str, dict[str, Any]]:
    """Ask ``lm`` :data:`DESCRIPTOR_PROMPT` about each class's concept, greedily; returns ``{class: {"concept",
    "answer", "descriptors", "example"}}``, the raw answer kept for the record. ``example`` None: the worked
    example goes first when the prompt still fits the model's context (a short-context GPT gets the question alone)."""
    from fewshot.evaluate.cot import generate_continuations

    classes = list(concepts)

    def contexts_for(with_example: bool) -> list[list[int]]:
        template = DESCRIPTOR_PROMPT if with_example else DESCRIPTOR_QUESTION
        return [list(lm.start_ids) + lm.encode(template.format(concept=concepts[c])) for c in classes]

    contexts = contexts_for(example is not False)
    if example is None and max(map(len, contexts)) + max_new_tokens > lm.context:
        example, contexts = False, contexts_for(False)
    longest = max(map(len, contexts)) + max_new_tokens
    if longest > lm.context:
        raise DataError(f"the descriptor prompt needs {longest} positions but {lm.name} holds {lm.context}; use a smaller max_new_tokens")
    answers = generate_continuations(lm, None, contexts, max_new_tokens, DESCRIPTOR_STOPS, rows_per_batch=rows_per_batch)
    # An answer that used the whole budget was cut mid-line: its last line is dropped (unless it is the only one).
    cut = [len(lm.encode(a)) >= max_new_tokens - 1 for a in answers]
    return {c: {"concept": concepts[c], "answer": a, "descriptors": parse_descriptors(a, complete=not k), "example": example is not False}
            for c, a, k in zip(classes, answers, cut)}


def _checked_table(table: Mapping[str, Any], classes: Sequence[str], where: str) -> dict[str, list[str]]:
    unknown = [k for k in table if k not in classes]
    if unknown:
        raise DataError(f"{where} names unknown class {unknown[0]!r}; the classes are {', '.join(classes[:4])}, …")
    missing = [c for c in classes if c not in table]
    if missing:
        raise DataError(f"{where} has no descriptors for class {missing[0]!r}")
    out: dict[str, list[str]] = {}
    for c in classes:
        values = table[c]
        if isinstance(values, str) or not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
            raise DataError(f"{where}: the descriptors of {c!r} must be a list of strings, got {values!r}")
        kept = [" ".join(v.split()) for v in values if v.strip()]
        if not kept:
            raise DataError(f"{where}: class {c!r} has an empty descriptor list")
        out[c] = kept
    return out


def read_descriptor_table(path: str | Path, classes: Sequence[str]) -> dict[str, list[str]]:
    """A JSON file ``{class: [descriptor, …]}`` (from any LLM) covering exactly ``classes``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"descriptor table {path} does not exist")
    try:
        table = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"descriptor table {path} is not JSON: {error}") from None
    if not isinstance(table, dict):
        raise DataError(f"descriptor table {path} must be a JSON object {{class: [descriptors]}}, got {type(table).__name__}")
    return _checked_table(table, classes, f"descriptor table {path}")


def resolve_descriptors(source: DescriptorSource, classes: Sequence[str], concepts: Mapping[str, str] | None = None,
                        max_new_tokens: int = 48) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Descriptors for every class and a record of where they came from.

    ``source``: a mapping ``{class: [descriptors]}``; a callable ``name -> list[str]`` (called with the class);
    a ``.json`` file (:func:`read_descriptor_table`); ``"smollm2"``, a Hugging Face causal LM folder or a fewshot
    gpt run (opened with :func:`fewshot.models.causal_lm.open_causal_lm`), or an opened :class:`PromptLM`, asked
    about ``concepts[class]`` (:func:`lm_descriptors`)."""
    classes = list(classes)
    if isinstance(source, Mapping):
        return _checked_table(source, classes, "the descriptor table"), {"source": "table"}
    if callable(source) and not isinstance(source, PromptLM):
        return _checked_table({c: source(c) for c in classes}, classes, f"descriptor function {getattr(source, '__name__', source)!r}"), \
            {"source": "callable"}
    if isinstance(source, (str, Path)) and str(source).endswith(".json"):
        return read_descriptor_table(source, classes), {"source": str(source)}
    if isinstance(source, (str, Path)) and str(source).lower() != "smollm2" and not Path(source).exists():
        raise DataError(f"descriptor source {str(source)!r} does not exist: give smollm2, a .json table, a gpt run or a Hugging Face folder")
    concepts = dict(CONCEPTS if concepts is None else concepts)
    missing = [c for c in classes if c not in concepts]
    if missing:
        raise ConfigError(f"no concept for class {missing[0]!r}: an LM is asked about a look-alike concept of each class")
    if isinstance(source, PromptLM):
        lm = source
    else:
        from fewshot.models.causal_lm import open_causal_lm

        lm = open_causal_lm(source)
    asked = lm_descriptors(lm, {c: concepts[c] for c in classes}, max_new_tokens)
    empty = [c for c in classes if not asked[c]["descriptors"]]
    # An answer with no descriptor in it falls back to the concept itself ("tomato"), and is counted.
    table = {c: asked[c]["descriptors"] or [concepts[c]] for c in classes}
    return table, {"source": lm.name, "answers": {c: asked[c]["answer"] for c in classes}, "empty_answers": empty,
                   "worked_example": asked[classes[0]]["example"]}


# ----------------------------------------------------------------------------- the nonce-name protocol


def nonce_names(n: int) -> list[str]:
    """``n`` made-up class names: the evaluation's nonce words (dax, wug, …), then generated ones (seed 2)."""
    names = list(NONCE_NAMES[:n])
    return names + glossary(n - len(names), seed=2) if n > len(names) else names


def describe_run(
    path: str | Path, source: DescriptorSource | None = "smollm2", classes: Sequence[str] | None = None, concepts: Mapping[str, str] | None = None,
    way: int = 5, episodes: int = 600, query: int = 15, per_class: int = 30, seed: int = 0, with_name: bool = True,
    max_new_tokens: int = 48, batch_size: int = 512,
) -> dict[str, Any]:
    """The nonce-name protocol on an image–text run (module docstring). ``source`` None: the rows without an LM
    (name, true, true-deranged, real-name). Each row: all-class accuracy and mean recall over ``per_class``
    single-object test images per class (seed ``seed``), and ``way``-way zero-shot episodes (``episodes``, ``query``
    queries per class) ± 95% CI. Returns ``{"run_dir", "classes", "names", "descriptors", "derangement", "chance",
    "rows", "truncated", "source"}``."""
    from fewshot.evaluate.image_text import ImageTextRun

    classes = list(classes or CONCEPTS)
    if len(set(classes)) != len(classes):
        raise ConfigError("the classes must be distinct")
    for c in classes:
        true_descriptors(c)  # one-line error for a class outside the scene world
    if not 2 <= way <= len(classes):
        raise ConfigError(f"{way}-way episodes need 2 ≤ way ≤ {len(classes)} classes")
    if per_class < query + 1:
        raise ConfigError(f"per_class={per_class} test images leave none for {query} queries (and 1 ignored support) per class")
    model = ImageTextRun(path, batch_size)
    test = single_object_test(per_class, model.run.config.data.image_size, seed)
    index = {c: i for i, c in enumerate(test.classes)}
    keep = np.isin(test.labels, [index[c] for c in classes])
    relabel = {index[c]: k for k, c in enumerate(classes)}
    labels = np.array([relabel[int(y)] for y in test.labels[keep]])
    images = model.images(test.images[keep])

    names = nonce_names(len(classes))
    swap = derangement(len(classes), seed)
    truth = [true_descriptors(c) for c in classes]
    tables: dict[str, list[list[str]]] = {"true": truth, "true-deranged": [truth[j] for j in swap]}
    record: dict[str, Any] = {"source": None}
    if source is not None:
        table, record = resolve_descriptors(source, classes, concepts, max_new_tokens)
        lm_rows = [table[c] for c in classes]
        tables = {"lm": lm_rows, "lm-deranged": [lm_rows[j] for j in swap], **tables}

    def row(kind: str, prototypes: torch.Tensor, normalize: bool) -> dict[str, Any]:
        everything = zero_shot_scores(images, labels, prototypes, normalize)
        episodic = zero_shot_episodes(images, labels, prototypes, way, query, episodes, seed, normalize)
        return {"row": kind, "accuracy": everything["accuracy"], "ci95": everything["ci95"], "mean_recall": everything["mean_recall"],
                "mean_recall_ci95": everything["mean_recall_ci95"], "images": everything["images"], "way": way,
                "episode_accuracy": episodic["accuracy"], "episode_ci95": episodic["ci95"], "episodes": episodic["episodes"]}

    rows = [row("name", F.normalize(model.texts([f"a photo of a {n}" for n in names]).double(), dim=1), True)]
    for kind, descriptors in tables.items():
        rows.append(row(kind, descriptor_prototypes(model.texts, names, descriptors, with_name), False))
    rows.append(row("real-name", F.normalize(model.texts([f"a photo of a {c}" for c in classes]).double(), dim=1), True))
    model.report_truncated("descriptor sentences")
    return {"run_dir": str(model.run.path), "step": model.run.step, "classes": classes, "names": names, "with_name": with_name,
            "descriptors": {kind: dict(zip(classes, d)) for kind, d in tables.items()}, "derangement": swap,
            "chance": 1 / len(classes), "episode_chance": 1 / way, "rows": rows, "truncated": model.truncated, "source": record}


def describe_table(out: dict[str, Any]) -> str:
    lines = [f"Classification by description on nonce class names ({len(out['classes'])} classes, chance {100 * out['chance']:.1f}%; "
             f"{out['rows'][0]['way']}-way episodes, chance {100 * out['episode_chance']:.1f}%), % ± 95% CI:",
             f"{'row':<15} {'all classes':>14} {'mean recall':>14} {'episodes':>14}"]
    for r in out["rows"]:
        lines.append(f"{r['row']:<15} {100 * r['accuracy']:6.1f} ± {100 * r['ci95']:4.1f}  {100 * r['mean_recall']:6.1f} ± "
                     f"{100 * r['mean_recall_ci95']:4.1f}  {100 * r['episode_accuracy']:6.1f} ± {100 * r['episode_ci95']:4.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Socratic captioning


def _count_text(n: int) -> str:
    return f"there is {NUMBERS[n]} object" if n == 1 else f"there are {NUMBERS[n]} objects"


def rank_scene_words(image_embeddings: torch.Tensor, embed_texts: Callable[[list[str]], torch.Tensor], max_objects: int = 2) -> list[dict[str, Any]]:
    """For each image, the run's ranking of the scene words: ``{"count", "colours", "shapes"}``, the count the
    best of "there is one object" … ("there are {n} objects", n ≤ ``max_objects``), colours by "a {colour} shape"
    and shapes by "a photo of a {shape}", each list best first and cut to the count."""
    x = F.normalize(torch.as_tensor(image_embeddings).double(), dim=1)
    families = {"count": [_count_text(n) for n in range(1, max_objects + 1)], "colours": [f"a {c} shape" for c in COLOURS],
                "shapes": [f"a photo of a{'n' if s[0] in 'aeiou' else ''} {s}" for s in PRETRAIN_SHAPES]}
    scores = {k: x @ F.normalize(torch.as_tensor(embed_texts(v)).double(), dim=1).T for k, v in families.items()}
    out = []
    for i in range(len(x)):
        n = int(scores["count"][i].argmax()) + 1
        out.append({"count": n, "colours": [list(COLOURS)[j] for j in scores["colours"][i].argsort(descending=True)[:n].tolist()],
                    "shapes": [PRETRAIN_SHAPES[j] for j in scores["shapes"][i].argsort(descending=True)[:n].tolist()]})
    return out


SOCRATIC_LEAD = "I am a bot that writes short captions of simple pictures of shapes on a black background.\n"
# One worked picture before the query, so a small LM answers in a caption's form; its words are fixed, not the image's.
SOCRATIC_EXAMPLE = {"count": 2, "colours": ["blue", "white"], "shapes": ["star", "square"], "caption": "a blue star and a white square"}


def _seen(words: Mapping[str, Any]) -> str:
    return (f"In this picture {_count_text(words['count'])}. Colours I see: {', '.join(words['colours'])}. "
            f"Shapes I see: {', '.join(words['shapes'])}.\nA short caption of this picture is:")


def socratic_prompt(words: Mapping[str, Any], example: bool = True) -> str:
    """The LM's prompt from the run's words (Zeng et al.'s shape: what the vision model saw, then the request), after
    :data:`SOCRATIC_EXAMPLE` answered (``example=False``: the request alone, as Zeng et al. prompt GPT-3)."""
    shown = f"{_seen(SOCRATIC_EXAMPLE)} {SOCRATIC_EXAMPLE['caption']}\n\n" if example else ""
    return SOCRATIC_LEAD + shown + _seen(words)


def clean_caption(text: str) -> str:
    """The first line, lower case, without surrounding quotes and a final full stop (the scene grammar has neither)."""
    line = text.strip().split("\n", 1)[0].strip().strip("\"'").strip()
    return line.rstrip(".!").strip().lower()


def _template_caption(words: Mapping[str, Any]) -> str:
    parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in zip(words["colours"], words["shapes"])]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def socratic_captions(image_embeddings: torch.Tensor, embed_texts: Callable[[list[str]], torch.Tensor], lm: PromptLM,
                      samples: int = 4, max_new_tokens: int = 16, temperature: float = 0.7, top_k: int | None = 40, seed: int = 0,
                      max_objects: int = 2, example: bool = True) -> dict[str, Any]:
    """Zeng et al.'s loop: words by the run (:func:`rank_scene_words`), ``1 + samples`` drafts by the LM (greedy, then
    sampled at ``temperature`` / ``top_k`` with ``seed``), the run picks the draft of highest cosine with the image.
    Returns ``{"words", "template", "greedy", "socratic", "candidates"}``, one entry per image."""
    from fewshot.evaluate.cot import generate_continuations

    if samples < 0:
        raise ConfigError(f"samples must be ≥ 0, got {samples}")
    words = rank_scene_words(image_embeddings, embed_texts, max_objects)
    contexts = [list(lm.start_ids) + lm.encode(socratic_prompt(w, example)) for w in words]
    if max(map(len, contexts)) + max_new_tokens > lm.context:
        raise DataError(f"the Socratic prompt needs {max(map(len, contexts)) + max_new_tokens} positions but {lm.name} holds {lm.context}")
    greedy = [clean_caption(t) for t in generate_continuations(lm, None, contexts, max_new_tokens, ("\n",))]
    generator = torch.Generator().manual_seed(seed)
    sampled = generate_continuations(lm, None, [c for c in contexts for _ in range(samples)], max_new_tokens, ("\n",), temperature,
                                     top_k, generator) if samples else []
    candidates = [list(dict.fromkeys([g, *(clean_caption(t) for t in sampled[i * samples : (i + 1) * samples])])) for i, g in enumerate(greedy)]
    x = F.normalize(torch.as_tensor(image_embeddings).double(), dim=1)
    flat = [c or "-" for cs in candidates for c in cs]
    t = F.normalize(torch.as_tensor(embed_texts(flat)).double(), dim=1)
    picked, k = [], 0
    for i, cs in enumerate(candidates):
        picked.append(cs[int((t[k : k + len(cs)] @ x[i]).argmax())])
        k += len(cs)
    return {"words": words, "template": [_template_caption(w) for w in words], "greedy": greedy, "socratic": picked, "candidates": candidates}


def socratic_rows(result: Mapping[str, Any], scenes: Sequence[Any], references: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """caption_metrics of the three caption lists of :func:`socratic_captions` ("template": the run's words alone in
    the grammar; "greedy": the LM's draft without the pick; "socratic")."""
    from fewshot.evaluate.captions import caption_metrics

    return [{"row": kind, **caption_metrics(result[kind], scenes, references)} for kind in ("template", "greedy", "socratic")]
