"""Few-shot prompting of a causal language model (Brown et al. 2020, GPT-3): ``fewshot icl prompt``.

No gradient step: the K examples are written into the prompt, one ``input -> label`` line each,
after an optional task description, and the model continues ``query ->``. The prompt's ids are the
concatenation of each line's ids (each line encoded on its own), so a line boundary never merges
tokens and the cached and recomputed paths read the very same ids.

Scoring:
    rank classification  ŷ = argmax_c Σ_t log p(c_t | prompt, query ->, c_<t) over every candidate
                         label c (the label's summed log-likelihood, :func:`continuation_logprobs`);
    generation           greedy decoding up to the first newline; correct iff the line, stripped,
                         equals the target (exact match, :func:`greedy_lines`);
    multiple choice      (the scrambles with ``choices`` = m ≥ 2) rank classification among the query's
                         own m candidates: the target and m − 1 other vocabulary words of its length
                         (seeded per query), so that a model which cannot spell the word out can still
                         show whether the examples taught it the relation; chance 1/m.
The K examples' keys and values are computed once per draw and shared by every query.

``chat`` writes the same examples as a conversation in the model's own chat template (an instruct model's
training format; :func:`chat_pieces`): the description as the system turn, each example a user turn ``x``
answered by an assistant turn ``y``, the query a user turn with the assistant's reply opened; the labels are
then scored, or generated, as that reply (no leading space).

Tasks (:data:`TASKS`), all offline:
    ``categories``          words → their category (animal, fruit, colour, …; the word lists in
                            ``fewshot/data/words``);
    ``categories-nonce``    the same words with made-up labels (dax, wug, …) standing for the
                            categories: only the examples say which is which;
    ``categories-flipped``  the real labels permuted with no fixed point (Wei et al. 2023): scored
                            against the flipped labels, so it measures following the examples over
                            the model's prior; ``prior`` is the accuracy against the real labels;
    ``cycle-letters``, ``anagram1``, ``anagram2``, ``reversed-words``, ``random-insertion``
                            GPT-3's word scrambling on the tinyshakespeare vocabulary (words of 6–9
                            letters seen ≥ 3 times in ``$FEWSHOT_DATA/text/tinyshakespeare.txt``), the
                            scrambled word → the word, by greedy generation. ``spell`` writes both with their
                            letters separated by spaces ("t l o v e r -> r e v o l t"), so a BPE model sees
                            each letter as a token; an answer is then right when it has the target's letters
                            in order, spaces aside.

Each draw d of the seed takes its queries and a random order of the example pool (the first K
are the examples, so K's examples contain the smaller K's); the accuracy over draws is given as
mean ± 95% CI (:func:`fewshot.evaluate.runner.mean_ci95`).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.data.sources import resolve_data_path
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.runner import mean_ci95
from fewshot.models.causal_lm import Past, PromptLM, open_causal_lm

__all__ = [
    "CATEGORIES", "PromptTask", "TASKS", "anagram_inner", "build_prompt", "chat_pieces", "check_fits", "continuation_logprobs", "cycle_letters",
    "evaluate_prompting", "flipped_labels", "greedy_lines", "load_task", "nonce_clashes", "open_prompt_model", "prefill",
    "prompt_table", "random_insertion", "score_draw", "shakespeare_words", "word_choices", "word_lists",
]

CATEGORIES = ("animal", "fruit", "colour", "vehicle", "clothing", "country")
SHAKESPEARE = "text/tinyshakespeare.txt"
ARROW = " ->"


@dataclass(frozen=True)
class PromptTask:
    """A prompting task: the example pool, the disjoint query pool and how answers are scored.

    ``kind`` is "classify" (rank the ``labels``), "generate" (greedy, exact match) or "choice" (rank
    each query's own ``candidates``, aligned with ``queries``). ``prior`` (flipped labels only) is each
    query's real label.
    """

    name: str
    kind: str
    description: str
    examples: list[tuple[str, str]]
    queries: list[tuple[str, str]]
    labels: list[str]
    prior: list[str] | None = None
    warnings: tuple[str, ...] = ()
    candidates: list[list[str]] | None = None
    spelled: bool = False

    def answer_key(self, text: str) -> str:
        """What an answer is compared by: the stripped text (spaces dropped for a spelled task)."""
        return text.replace(" ", "") if self.spelled else text.strip()


# ----------------------------------------------------------------------------- word lists and tasks


def word_lists() -> dict[str, list[str]]:
    """The shipped category word lists (``fewshot/data/words/<category>.txt``) and ``nonce``."""
    folder = resources.files("fewshot.data").joinpath("words")
    return {name: folder.joinpath(f"{name}.txt").read_text().split() for name in (*CATEGORIES, "nonce")}


def nonce_clashes(lm: PromptLM | None, nonce: Sequence[str], words: Sequence[str]) -> list[str]:
    """Nonce labels that are not made up after all: one token of the model's vocabulary, or a listed word."""
    listed = set(words)
    return [w for w in nonce if w in listed or (lm is not None and lm.single_token(w))]


def flipped_labels(labels: Sequence[str], rng: np.random.Generator) -> dict[str, str]:
    """A permutation of ``labels`` without fixed points (every label moves), drawn by rejection."""
    while True:
        perm = rng.permutation(len(labels))
        if len(labels) < 2 or not (perm == np.arange(len(labels))).any():
            return {labels[i]: labels[int(j)] for i, j in enumerate(perm)}


def cycle_letters(word: str, rng: np.random.Generator) -> str:
    """GPT-3's cycled letters: ``word[i:] + word[:i]`` with i uniform in 1..len−1."""
    i = int(rng.integers(1, len(word)))
    return word[i:] + word[:i]


def anagram_inner(word: str, keep: int, rng: np.random.Generator) -> str:
    """GPT-3's anagrams: the first and last ``keep`` letters stay, the letters between are shuffled
    (redrawn a few times so that the result differs from the word when the letters allow it)."""
    inner = list(word[keep : len(word) - keep])
    for _ in range(10):
        shuffled = "".join(inner[int(i)] for i in rng.permutation(len(inner)))
        out = word[:keep] + shuffled + word[len(word) - keep :]
        if out != word:
            break
    return out


def random_insertion(word: str, rng: np.random.Generator, marks: str = " .,;:!?-/") -> str:
    """GPT-3's random insertion: one random punctuation mark or space between each pair of letters."""
    return "".join(letter + marks[int(rng.integers(len(marks)))] for letter in word[:-1]) + word[-1]


SCRAMBLES: dict[str, tuple[Callable[[str, np.random.Generator], str], str]] = {
    "cycle-letters": (cycle_letters, "Each line gives a word with its letters cycled; write the word."),
    "anagram1": (lambda w, rng: anagram_inner(w, 1, rng), "Each line gives a word with all but its first and last letters scrambled; write the word."),
    "anagram2": (lambda w, rng: anagram_inner(w, 2, rng), "Each line gives a word with all but its first two and last two letters scrambled; write the word."),
    "reversed-words": (lambda w, rng: w[::-1], "Each line gives a word spelled backwards; write the word."),
    "random-insertion": (random_insertion, "Each line gives a word with a mark between its letters; write the word."),
}
SPELLED = " Letters are written one by one, with spaces between them."
CATEGORY_TASKS = ("categories", "categories-nonce", "categories-flipped")
TASKS = (*CATEGORY_TASKS, *SCRAMBLES)


def shakespeare_words(text: str, min_len: int = 6, max_len: int = 9, min_count: int = 3) -> list[str]:
    """The distinct lower-case words of ``min_len``–``max_len`` letters seen at least ``min_count`` times
    in ``text``, sorted (GPT-3 took frequent words too: rare ones are mostly names and archaisms)."""
    counts = Counter(w for w in re.findall(r"[a-z]+", text.lower()) if min_len <= len(w) <= max_len)
    return sorted(w for w, n in counts.items() if n >= min_count)


def _split(pairs: list[Any], rng: np.random.Generator, cap: int) -> tuple[list[Any], list[Any]]:
    # Half examples, half queries, disjoint; large pools are capped (a draw needs few).
    order = rng.permutation(len(pairs))
    half = len(pairs) // 2
    return [pairs[int(i)] for i in order[:half][:cap]], [pairs[int(i)] for i in order[half:][:cap]]


def word_choices(word: str, vocabulary: Sequence[str], m: int, rng: np.random.Generator) -> list[str]:
    """``word`` and ``m`` − 1 other words of ``vocabulary`` of its length (fewer when there are fewer), in a random order."""
    others = [w for w in vocabulary if len(w) == len(word) and w != word]
    picked = [others[int(i)] for i in rng.choice(len(others), min(m - 1, len(others)), replace=False)] if others else []
    return [str(w) for w in rng.permutation([word, *picked])]


def load_task(
    name: str, seed: int = 0, lm: PromptLM | None = None, text_path: str | Path | None = None, cap: int = 500, choices: int = 0,
    spell: bool = False,
) -> PromptTask:
    """Task ``name`` (one of :data:`TASKS`), its pools split with ``seed``; ``lm`` is asked which nonce
    labels are single tokens of its vocabulary (a warning). ``choices`` = m ≥ 2 scores a scramble as
    multiple choice among m words (kind "choice"); 0 keeps greedy generation. ``spell`` writes a scramble's
    words letter by letter (the same words, split and draws as without it); the categories ignore it."""
    if choices == 1 or choices < 0:
        raise ConfigError(f"choices must be 0 (generate the word) or ≥ 2 (multiple choice), got {choices}")
    rng = np.random.default_rng([seed, TASKS.index(name) if name in TASKS else 0])
    if name in CATEGORY_TASKS:
        lists = word_lists()
        real = list(CATEGORIES)
        notes: tuple[str, ...] = ()
        if name == "categories-nonce":
            shown = dict(zip(real, lists["nonce"], strict=True))
            clashes = nonce_clashes(lm, lists["nonce"], [w for c in CATEGORIES for w in lists[c]])
            if clashes:
                notes = (f"nonce labels {', '.join(clashes)} are words already (one token of the model's vocabulary or a listed word)",)
                for note in notes:
                    warnings.warn(note, stacklevel=2)
        elif name == "categories-flipped":
            shown = flipped_labels(real, rng)
        else:
            shown = {c: c for c in real}
        labels = [shown[c] for c in real]
        examples, queries, prior = [], [], []
        for c in real:
            ex, qu = _split(lists[c], rng, cap)
            examples += [(w, shown[c]) for w in ex]
            queries += [(w, shown[c]) for w in qu]
            prior += [c] * len(qu)
        description = f"Classify each word as {', '.join(labels[:-1])} or {labels[-1]}."
        return PromptTask(name, "classify", description, examples, queries, labels, prior if name == "categories-flipped" else None, notes)
    if name in SCRAMBLES:
        scramble, description = SCRAMBLES[name]
        words = shakespeare_words(resolve_data_path(text_path, SHAKESPEARE).read_text(encoding="utf-8"))
        pairs = [(scramble(w, rng), w) for w in words]
        examples, queries = _split(pairs, rng, cap)
        candidates = [word_choices(w, words, choices, rng) for _, w in queries] if choices else None
        if spell:
            letters = " ".join
            examples, queries = [(letters(x), letters(y)) for x, y in examples], [(letters(x), letters(y)) for x, y in queries]
            candidates = [[letters(c) for c in row] for row in candidates] if candidates else None
            description += SPELLED
        return PromptTask(name, "choice" if choices else "generate", description, examples, queries, [], candidates=candidates, spelled=spell)
    raise ConfigError(f"unknown prompting task {name!r}; choose from {', '.join(TASKS)}")


# ----------------------------------------------------------------------------- the model


open_prompt_model = open_causal_lm  # smollm2, a Hugging Face causal LM folder or a fewshot gpt run


# ----------------------------------------------------------------------------- prompts and scoring


def build_prompt(lm: PromptLM, examples: Sequence[tuple[str, str]], description: str | None) -> list[int]:
    """Ids of the prompt before the query: start ids, the description line, one ``x -> y`` line per example."""
    ids = list(lm.start_ids)
    if description:
        ids += lm.encode(description + "\n")
    for x, y in examples:
        ids += lm.encode(f"{x}{ARROW} {y}\n")
    return ids


def chat_pieces(lm: PromptLM, examples: Sequence[tuple[str, str]], description: str | None, queries: Sequence[str]) -> tuple[str, list[str]]:
    """The chat prompt's text before the queries, and each query's own text after it: the model's chat template
    (:meth:`PromptLM.chat_text`) over a system turn (the description), a user turn ``x`` and an assistant turn
    ``y`` per example, then the query's user turn with the reply opened. The split is where the examples end, so
    their cache serves every query; a template that does not extend a conversation by appending is refused."""
    turns = [{"role": "system", "content": description}] if description else []
    for x, y in examples:
        turns += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    head = lm.chat_text(turns, False) if turns else ""
    tails = []
    for x in queries:
        whole = lm.chat_text(turns + [{"role": "user", "content": x}], True)
        if not whole.startswith(head):
            raise ConfigError(f"{lm.name}'s chat template rewrites earlier turns when one is added: its prompts cannot share a cache")
        tails.append(whole[len(head):])
    return head, tails


def prefill(lm: PromptLM, prompt: list[int]) -> Past | None:
    """The prompt's keys and values (computed once, shared by every query), or None for no prompt."""
    if not prompt:
        return None
    return lm.step(torch.tensor([prompt], dtype=torch.long), None)[1]


def continuation_logprobs(
    lm: PromptLM, past: Past | None, contexts: Sequence[list[int]], continuations: Sequence[list[int]], rows_per_batch: int = 48
) -> torch.Tensor:
    """log p(c | prompt, x) = Σ_{t} log softmax(z_{|x|+t−1})[c_t] for each row (context x, continuation c),
    z being the logits of the row read after the cached prompt ``past``. -> (rows,) float64.

    Rows are right-padded: a causal model's real positions never see the padding after them.
    """
    if len(contexts) != len(continuations):
        raise ValueError("one continuation per context")
    out = torch.empty(len(contexts), dtype=torch.float64)
    for lo in range(0, len(contexts), rows_per_batch):
        rows = [list(x) + list(c) for x, c in zip(contexts[lo : lo + rows_per_batch], continuations[lo : lo + rows_per_batch])]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        logp = torch.log_softmax(lm.step(ids, past)[0].double(), dim=-1)
        for i, (x, c) in enumerate(zip(contexts[lo : lo + rows_per_batch], continuations[lo : lo + rows_per_batch])):
            positions = torch.arange(len(x) - 1, len(x) + len(c) - 1)
            out[lo + i] = logp[i, positions, torch.tensor(c)].sum()
    return out


@torch.no_grad()
def greedy_lines(lm: PromptLM, past: Past | None, contexts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
    """Each context continued greedily (argmax) after the cached prompt, up to its first newline or
    ``max_new_tokens``; the first line of the generated text. Contexts of one length run as one batch."""
    out: list[str] = [""] * len(contexts)
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(contexts):
        by_length.setdefault(len(x), []).append(i)
    for rows in by_length.values():
        logits, kv = lm.step(torch.tensor([contexts[i] for i in rows], dtype=torch.long), past)
        generated: list[list[int]] = [[] for _ in rows]
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(dim=-1)
            for g, t in zip(generated, next_ids.tolist()):
                g.append(t)
            texts = [lm.decode(g) for g in generated]
            if all("\n" in t for t in texts) or step == max_new_tokens - 1:
                break
            logits, kv = lm.step(next_ids[:, None], kv)
        for i, t in zip(rows, texts):
            out[i] = t.split("\n")[0]
    return out


def check_fits(lm: PromptLM, task: PromptTask, prompt: list[int], queries: list[list[int]], labels: list[list[int]], new_tokens: int = 0) -> None:
    """A one-line DataError, saying by how many positions, unless prompt + the longest query + the longest label
    (or ``new_tokens`` generated) fits the model's context."""
    longest = len(prompt) + max(len(q) for q in queries) + (new_tokens if task.kind == "generate" else max(len(c) for c in labels))
    if longest > lm.context:
        raise DataError(
            f"the {task.name} prompt needs {longest} positions but {lm.name} holds {lm.context}: "
            f"{longest - lm.context} too many; use fewer examples (K)"
        )


def score_draw(
    lm: PromptLM, task: PromptTask, examples: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str]],
    describe: bool = True, prior: Sequence[str] | None = None, candidates: Sequence[Sequence[str]] | None = None,
    chat: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``lm`` on ``queries`` with ``examples`` in the prompt (and the prior accuracy
    against ``prior`` labels, when given); the prompt's cache is computed once. A "choice" task needs
    each query's ``candidates``; ``chat`` writes the prompt in the model's chat template."""
    description = task.description if describe else None
    if chat:  # the template writes whatever begins the model's conversations, so no start ids are added
        head, tails = chat_pieces(lm, examples, description, [x for x, _ in queries])
        prompt, query_ids, lead = lm.encode(head), [lm.encode(t) for t in tails], ""
    else:
        prompt, query_ids, lead = build_prompt(lm, examples, description), [lm.encode(f"{x}{ARROW}") for x, _ in queries], " "
    if task.kind == "choice":
        if candidates is None or len(candidates) != len(queries):
            raise ValueError("a multiple-choice task needs one candidate list per query")
        label_ids = [lm.encode(f"{lead}{c}") for row in candidates for c in row]
    else:
        label_ids = [lm.encode(f"{lead}{c}") for c in task.labels]
    new_tokens = 2 + max(len(lm.encode(f"{lead}{y}")) for _, y in task.examples + task.queries) if task.kind == "generate" else 0
    check_fits(lm, task, prompt, query_ids, label_ids or [[]], new_tokens)
    past = prefill(lm, prompt)
    if task.kind == "classify":
        contexts = [q for q in query_ids for _ in label_ids]
        scores = continuation_logprobs(lm, past, contexts, label_ids * len(query_ids)).view(len(queries), len(label_ids))
        answers = [task.labels[int(i)] for i in scores.argmax(dim=1)]
    elif task.kind == "choice":
        contexts = [q for q, row in zip(query_ids, candidates) for _ in row]
        scores = continuation_logprobs(lm, past, contexts, label_ids)
        answers, start = [], 0
        for row in candidates:
            answers.append(row[int(scores[start : start + len(row)].argmax())])
            start += len(row)
    else:
        answers = greedy_lines(lm, past, query_ids, new_tokens)
    key = task.answer_key
    out = {"accuracy": float(np.mean([key(a) == key(y) for a, (_, y) in zip(answers, queries)])), "prompt_tokens": len(prompt)}
    if prior is not None:
        out["prior"] = float(np.mean([a == p for a, p in zip(answers, prior)]))
    return out


def evaluate_prompting(
    lm: PromptLM, tasks: Sequence[str], shots: Sequence[int] = (0, 1, 2, 4, 8), draws: int = 5, queries: int = 20,
    seed: int = 0, describe: bool = True, text_path: str | Path | None = None, log: Callable[[str], None] | None = None,
    choices: int = 0, spell: bool = False, chat: bool = False,
) -> dict[str, Any]:
    """Accuracy ± 95% CI over ``draws`` seeded draws of the examples (and their order) and the queries,
    for each task and each K in ``shots``; ``choices`` ≥ 2 scores the scrambles as multiple choice; ``spell``
    writes the scrambles letter by letter; ``chat`` writes every prompt in the model's chat template."""
    if draws < 1 or queries < 1:
        raise ConfigError(f"draws and queries must be ≥ 1, got {draws} and {queries}")
    if any(k < 0 for k in shots):
        raise ConfigError(f"shots must be ≥ 0, got {list(shots)}")
    if chat:
        lm.chat_text([{"role": "user", "content": "x"}], True)  # a model without a chat template fails before any scoring
    loaded = [load_task(name, seed, lm, text_path, choices=choices, spell=spell) for name in tasks]  # unknown names fail before any scoring
    results: dict[str, Any] = {}
    for task in loaded:
        if max(shots) > len(task.examples):
            raise DataError(f"K={max(shots)} examples asked but task {task.name} has {len(task.examples)} in its example pool")
        if queries > len(task.queries):
            raise DataError(f"{queries} queries asked but task {task.name} has {len(task.queries)} in its query pool")
        per_k: dict[int, dict[str, list[float]]] = {k: {"accuracy": [], "prior": []} for k in shots}
        tokens: dict[int, int] = {}
        for d in range(draws):
            q_idx = np.random.default_rng([seed, d, 0]).choice(len(task.queries), queries, replace=False)
            order = np.random.default_rng([seed, d, 1]).permutation(len(task.examples))
            drawn = [task.queries[int(i)] for i in q_idx]
            prior = [task.prior[int(i)] for i in q_idx] if task.prior else None
            options = [task.candidates[int(i)] for i in q_idx] if task.candidates else None
            for k in shots:
                got = score_draw(lm, task, [task.examples[int(i)] for i in order[:k]], drawn, describe, prior, options, chat)
                per_k[k]["accuracy"].append(got["accuracy"])
                if "prior" in got:
                    per_k[k]["prior"].append(got["prior"])
                tokens[k] = max(tokens.get(k, 0), got["prompt_tokens"])
        if task.candidates:  # a word with few others of its length has fewer candidates
            chance = float(np.mean([1 / len(c) for c in task.candidates]))
        else:
            chance = 1 / len(task.labels) if task.labels else 0.0
        row: dict[str, Any] = {"kind": task.kind, "chance": chance, "warnings": list(task.warnings), "by_k": {}}
        for k in shots:
            mean, ci = mean_ci95(per_k[k]["accuracy"])
            cell = {"accuracy": mean, "ci95": ci, "draws": per_k[k]["accuracy"], "prompt_tokens": tokens[k]}
            if per_k[k]["prior"]:
                cell["prior"], cell["prior_ci95"] = mean_ci95(per_k[k]["prior"])
            row["by_k"][str(k)] = cell
        results[task.name] = row
        if log:
            log(f"{task.name}: " + "  ".join(f"K={k} {100 * row['by_k'][str(k)]['accuracy']:.1f}" for k in shots))
    return {"model": lm.name, "context": lm.context, "shots": list(shots), "draws": draws, "queries": queries,
            "seed": seed, "description": describe, "spell": spell, "chat": chat, "tasks": results}


def prompt_table(out: dict[str, Any]) -> str:
    """Accuracy (%) ± 95% CI, one row per task, one column per K."""
    shots = out["shots"]
    head = f"{'task':<20}" + "".join(f"{'K=' + str(k):>15}" for k in shots) + f"{'chance':>8}"
    lines = [head]
    for name, row in out["tasks"].items():
        cells = "".join(f"{100 * row['by_k'][str(k)]['accuracy']:>8.1f} ± {100 * row['by_k'][str(k)]['ci95']:<4.1f}" for k in shots)
        lines.append(f"{name:<20}{cells}{100 * row['chance']:>8.1f}")
        if any("prior" in row["by_k"][str(k)] for k in shots):
            prior = "".join(f"{100 * row['by_k'][str(k)]['prior']:>8.1f} ± {100 * row['by_k'][str(k)]['prior_ci95']:<4.1f}" for k in shots)
            lines.append(f"{'  (real labels)':<20}{prior}")
    return "\n".join(lines)
