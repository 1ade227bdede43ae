"""Chain-of-thought prompting of a causal language model: ``fewshot icl cot``.

Methods (:data:`METHODS`), on the seeded reasoning tasks of :mod:`fewshot.data.reasoning`; every prompt is
``Q: <question>\\nA:`` after zero or more worked examples ``Q: …\\nA: … The answer is <a>.`` separated by a
blank line:

    ``zero-shot``         ``A: The answer (arabic numerals) is`` (Kojima et al. 2022's baseline; "(Yes or No)"
                          for yes/no tasks, nothing for letter strings), greedy;
    ``few-shot-K``        K examples answering directly, ``A: The answer is <a>.`` (Brown et al. 2020), then
                          ``A: The answer is``, greedy (``few-shot-2``, ``few-shot-8``);
    ``zero-shot-cot``     Kojima et al. 2022, two prompts: ``A: Let's think step by step.`` continued greedily
                          into a rationale r (stage 1), then ``A: Let's think step by step. r Therefore, the
                          answer (arabic numerals) is`` continued greedily (stage 2): the second prompt holds the
                          rationale the model generated, never the gold one;
    ``few-shot-cot``      Wei et al. 2022: the examples carry their gold rationales, ``A: <rationale> The answer
                          is <a>.``; the query's continuation is a rationale that ends with the answer (one
                          without "The answer is", e.g. cut off by the budget, has none);
    ``self-consistency``  Wang et al. 2023: the few-shot-CoT prompt, k rationales sampled at a temperature
                          (top-k), the answer extracted from each, then a majority vote (:func:`majority_vote`).

The examples' keys and values are computed once per method and task and shared by every query (and every
sample); queries of different lengths share one left-padded batch when the model takes an attention mask
and position ids (Hugging Face models), and are grouped by length otherwise (fewshot's GPT).

Answers are read by :func:`extract_answer` (numbers, yes/no, letter strings). An output with no answer in
it counts as wrong and is reported (``unextractable``), never dropped. Accuracy is the mean over items of
the 0/1 correctness, ± the 95% CI of :func:`fewshot.evaluate.runner.mean_ci95` over those Bernoulli values
(1.96·std/√n over items; a row with every item right, or every item wrong, has a CI of 0).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fewshot.data.reasoning import ANSWER_KINDS, REASONING_TASKS, ReasoningItem, generate_items
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.prompting import prefill
from fewshot.evaluate.runner import mean_ci95
from fewshot.generate import sample_next
from fewshot.models.causal_lm import Past, PromptLM

__all__ = [
    "METHODS", "STEP_BY_STEP", "cot_table", "direct_trigger", "evaluate_cot", "example_text", "extract_answer", "extraction_prompt",
    "generate_continuations", "majority_vote", "parse_method", "run_method",
]

METHODS = ("zero-shot", "few-shot-2", "few-shot-8", "zero-shot-cot", "few-shot-cot", "self-consistency")
STEP_BY_STEP = "Let's think step by step."
# Kojima et al.'s answer-format triggers, per answer kind (the letter strings have none).
_FORMAT = {"number": " (arabic numerals)", "yes-no": " (Yes or No)", "letters": ""}
# A rationale ends at a blank line or where the model starts a new question.
RATIONALE_STOPS = ("\n\n", "\nQ:")
ANSWER_STOPS = ("\n",)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_QUOTED = re.compile(r'"([^"]*)"')
_LETTERS = re.compile(r"[A-Za-z]+")
# The format hint of a trigger echoed by the model ("The answer (Yes or No) is", possibly cut short) is no answer.
_ECHOED_FORMAT = re.compile(r"answer\s*\([^)]*\)?", re.IGNORECASE)


# ----------------------------------------------------------------------------- answers


def extract_answer(text: str, kind: str, needs_trigger: bool = False) -> str | None:
    """The answer in a model's output, or None when there is none.

    The text after the last "answer is" (if the output has one: a few-shot-CoT rationale ends that way;
    with ``needs_trigger`` an output without one has no answer, as a rationale cut off by its budget),
    else the whole text, is searched for the first: number (commas dropped, "7.0" → "7"), for ``number``;
    yes / no (case-folded), for ``yes-no``; quoted string (spaces removed), else word, lower-cased, for
    ``letters``. Kojima et al. take the first such match of the answer-extraction output the same way.
    A format hint the model echoes, "answer (Yes or No)" or "answer (arabic numerals)", whole or cut
    short, is read as "answer" (its "Yes" is not a vote for yes).
    """
    if kind not in _FORMAT:
        raise ConfigError(f"unknown answer kind {kind!r}; choose from {', '.join(_FORMAT)}")
    text = _ECHOED_FORMAT.sub("answer", text)
    cut = text.lower().rfind("answer is")
    if cut >= 0:
        text = text[cut + len("answer is") :]
    elif needs_trigger:
        return None
    if kind == "number":
        m = _NUMBER.search(text)
        if m is None:
            return None
        number = m[0].replace(",", "")
        return number[: -len(".0")] if number.endswith(".0") else number
    if kind == "yes-no":
        m = _YES_NO.search(text)
        return m[1].lower() if m else None
    quoted = _QUOTED.search(text)
    if quoted and quoted[1].strip():
        return re.sub(r"\s+", "", quoted[1]).lower()
    m = _LETTERS.search(text)
    return m[0].lower() if m else None


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer (None votes are not counted; None if there are no others).

    Ties go to the tied answer that appears first in ``answers`` (the sample order), so the vote is a
    deterministic function of the samples.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


# ----------------------------------------------------------------------------- prompts


def direct_trigger(kind: str, shots: int) -> str:
    """What follows ``A:`` when the answer comes at once: Kojima's format trigger at zero shots, "The answer is" after examples."""
    return " The answer is" if shots > 0 else f" The answer{_FORMAT[kind]} is"


def example_text(item: ReasoningItem, with_rationale: bool) -> str:
    """One worked example, ``Q: …\\nA: [rationale ]The answer is <a>.`` and a blank line."""
    body = f"{item.rationale} The answer is {item.answer}." if with_rationale else f"The answer is {item.answer}."
    return f"Q: {item.question}\nA: {body}\n\n"


def question_text(item: ReasoningItem, lead: str) -> str:
    return f"Q: {item.question}\nA:{lead}"


def extraction_prompt(stage_one: str, rationale: str, kind: str) -> str:
    """Zero-shot CoT's second prompt (Kojima et al.): the first prompt, the rationale the model generated,
    then ``Therefore, the answer (arabic numerals) is`` (the format per answer kind)."""
    return f"{stage_one} {rationale.strip()}\nTherefore, the answer{_FORMAT[kind]} is"


def parse_method(name: str) -> tuple[str, int]:
    """(kind, shots) of a method name: ``few-shot-K`` for any K ≥ 1, or one of :data:`METHODS`."""
    if m := re.fullmatch(r"few-shot-(\d+)", name):
        if int(m[1]) < 1:
            raise ConfigError(f"{name}: few-shot needs K ≥ 1 examples")
        return "few-shot", int(m[1])
    if name in ("zero-shot", "zero-shot-cot"):
        return name, 0
    if name in ("few-shot-cot", "self-consistency"):
        return name, -1  # the CoT example count, set by evaluate_cot
    raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (or few-shot-K)")


# ----------------------------------------------------------------------------- generation


def _prefix_length(past: Past | None) -> int:
    return 0 if past is None else int(past[0][0].shape[2])


def _truncate(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    # A stop counts only after the first letter or digit: "is:\n 7" is an answer on the next line, not none.
    first = next((i for i, ch in enumerate(text) if ch.isalnum()), None)
    if first is None:
        return text, False
    cuts = [j for j in (text.find(s, first) for s in stops) if j >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def _continue_rows(
    lm: PromptLM, past: Past | None, contexts: Sequence[list[int]], max_new_tokens: int, stops: Sequence[str],
    temperature: float, top_k: int | None, generator: torch.Generator | None,
) -> list[str]:
    # One batch: left-padded with a mask when the model takes one, else all contexts have one length.
    rows, width, start = len(contexts), max(len(c) for c in contexts), _prefix_length(past)
    pads = [width - len(c) for c in contexts]
    ids = torch.tensor([[0] * p + list(c) for p, c in zip(pads, contexts)], dtype=torch.long)
    kwargs: dict[str, torch.Tensor] = {}
    if any(pads):
        if not lm.takes_padding:
            raise ValueError("contexts of different lengths need a model that takes an attention mask")
        mask = torch.ones(rows, start + width, dtype=torch.long)
        for i, p in enumerate(pads):
            mask[i, start : start + p] = 0
        pad = torch.tensor(pads)[:, None]
        positions = (start + torch.arange(width)[None, :] - pad).clamp(min=start)
        kwargs = {"attention_mask": mask, "position_ids": positions}
    logits, kv = lm.step(ids, past, **kwargs)
    eos = getattr(getattr(lm, "tokenizer", None), "eos_token_id", None)
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    texts = [""] * rows
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], temperature, top_k, generator)
        for i, t in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if eos is not None and t == eos:
                done[i] = True
                continue
            generated[i].append(t)
            texts[i], done[i] = _truncate(lm.decode(generated[i]), stops)
        if all(done) or step == max_new_tokens - 1:
            break
        if kwargs:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], dim=1)
            kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
        logits, kv = lm.step(next_ids[:, None], kv, **kwargs)
    return texts


def generate_continuations(
    lm: PromptLM, past: Past | None, contexts: Sequence[list[int]], max_new_tokens: int, stops: Sequence[str] = RATIONALE_STOPS,
    temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None, rows_per_batch: int = 16,
) -> list[str]:
    """Each context continued after the cached prompt ``past`` for up to ``max_new_tokens`` ids, greedily
    (temperature 0) or sampled (:func:`fewshot.generate.sample_next`), cut at the first of ``stops`` (or the
    model's end-of-text id). Rows run ``rows_per_batch`` at a time (one batch holds a copy of the cache per row)."""
    out: list[str] = [""] * len(contexts)
    if lm.takes_padding:
        groups = [list(range(len(contexts)))]
    else:
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(contexts):
            by_length.setdefault(len(c), []).append(i)
        groups = list(by_length.values())
    for group in groups:
        for lo in range(0, len(group), rows_per_batch):
            rows = group[lo : lo + rows_per_batch]
            texts = _continue_rows(lm, past, [contexts[i] for i in rows], max_new_tokens, stops, temperature, top_k, generator)
            for i, t in zip(rows, texts):
                out[i] = t
    return out


# ----------------------------------------------------------------------------- methods


def _check_fits(lm: PromptLM, task: str, method: str, prompt: int, query: int, budget: int) -> None:
    need = prompt + query + budget
    if need > lm.context:
        raise DataError(
            f"the {method} prompt for {task} needs {need} positions (examples {prompt} + question {query} + {budget} generated) "
            f"but {lm.name} holds {lm.context}: {need - lm.context} too many; use fewer examples or a smaller --max-new-tokens"
        )


def run_method(
    lm: PromptLM, method: str, items: Sequence[ReasoningItem], examples: Sequence[ReasoningItem], *, max_new_tokens: int = 64,
    answer_tokens: int = 8, samples: int = 5, temperature: float = 0.7, top_k: int | None = 40, seed: int = 0, rows_per_batch: int = 16,
) -> dict[str, Any]:
    """One method on ``items`` with ``examples`` as the worked examples (few-shot-K takes the first K;
    few-shot-cot and self-consistency take them all). Returns the predictions, the raw outputs and the score."""
    kind_name, shots = parse_method(method)
    if kind_name == "self-consistency" and samples < 1:
        raise ConfigError(f"self-consistency needs k ≥ 1 sampled rationales, got {samples}")
    if max_new_tokens < 1 or answer_tokens < 1:
        raise ConfigError(f"max_new_tokens and answer_tokens must be ≥ 1, got {max_new_tokens} and {answer_tokens}")
    if not items:
        raise DataError("no items to evaluate")
    task = items[0].task
    kind = ANSWER_KINDS[task]
    if shots < 0:
        shots = len(examples)
    if shots > len(examples):
        raise DataError(f"{method} needs {shots} examples but {len(examples)} were given")
    with_rationale = kind_name in ("few-shot-cot", "self-consistency")
    prompt = list(lm.start_ids) + (lm.encode("".join(example_text(e, with_rationale) for e in examples[:shots])) if shots else [])
    past = prefill(lm, prompt)
    prefix = len(prompt)
    generator = torch.Generator().manual_seed(seed)
    kw = {"rows_per_batch": rows_per_batch}

    if kind_name in ("zero-shot", "few-shot"):
        queries = [lm.encode(question_text(it, direct_trigger(kind, shots))) for it in items]
        _check_fits(lm, task, method, prefix, max(map(len, queries)), answer_tokens)
        outputs = generate_continuations(lm, past, queries, answer_tokens, ANSWER_STOPS, **kw)
        predictions = [extract_answer(o, kind) for o in outputs]
        record = [{"output": o} for o in outputs]
    elif kind_name == "zero-shot-cot":
        firsts = [question_text(it, " " + STEP_BY_STEP) for it in items]
        queries = [lm.encode(f) for f in firsts]
        trigger = len(lm.encode(extraction_prompt("", "", kind)))
        _check_fits(lm, task, method, prefix, max(map(len, queries)), max_new_tokens + trigger + 1 + answer_tokens)
        rationales = generate_continuations(lm, past, queries, max_new_tokens, RATIONALE_STOPS, **kw)
        seconds = [lm.encode(extraction_prompt(f, r, kind)) for f, r in zip(firsts, rationales)]
        outputs = generate_continuations(lm, past, seconds, answer_tokens, ANSWER_STOPS, **kw)
        predictions = [extract_answer(o, kind) for o in outputs]
        record = [{"rationale": r, "output": o} for r, o in zip(rationales, outputs)]
    elif kind_name == "few-shot-cot":
        queries = [lm.encode(question_text(it, "")) for it in items]
        _check_fits(lm, task, method, prefix, max(map(len, queries)), max_new_tokens)
        outputs = generate_continuations(lm, past, queries, max_new_tokens, RATIONALE_STOPS, **kw)
        predictions = [extract_answer(o, kind, needs_trigger=True) for o in outputs]
        record = [{"output": o} for o in outputs]
    else:  # self-consistency: k samples per item, item-major
        queries = [lm.encode(question_text(it, "")) for it in items]
        _check_fits(lm, task, method, prefix, max(map(len, queries)), max_new_tokens)
        repeated = [q for q in queries for _ in range(samples)]
        outputs = generate_continuations(lm, past, repeated, max_new_tokens, RATIONALE_STOPS, temperature, top_k, generator, **kw)
        votes = [[extract_answer(o, kind, needs_trigger=True) for o in outputs[i * samples : (i + 1) * samples]] for i in range(len(items))]
        predictions = [majority_vote(v) for v in votes]
        record = [{"samples": outputs[i * samples : (i + 1) * samples], "votes": v} for i, v in enumerate(votes)]

    correct = [float(p is not None and p == it.answer) for p, it in zip(predictions, items)]
    accuracy, ci = mean_ci95(correct)
    # A model that gives one answer to every question scores that answer's share of the golds: say so.
    mode, mode_count = Counter(predictions).most_common(1)[0]
    return {
        "most_common_prediction": mode, "most_common_share": mode_count / len(items),
        "accuracy": accuracy, "ci95": ci, "correct": correct, "predictions": predictions,
        "unextractable": sum(p is None for p in predictions), "prompt_tokens": prefix, "shots": shots,
        "records": [{"question": it.question, "gold": it.answer, "prediction": p, **r} for it, p, r in zip(items, predictions, record)],
    }


def evaluate_cot(
    lm: PromptLM, tasks: Sequence[str] = ("word-problems", "last-letters", "coin-flip"), methods: Sequence[str] = METHODS,
    items: int = 40, seed: int = 0, max_new_tokens: int = 64, answer_tokens: int = 8, samples: int = 5, temperature: float = 0.7,
    top_k: int | None = 40, cot_shots: int = 8, rows_per_batch: int = 16, keep: int = 3, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy ± 95% CI (over the ``items`` seeded test items, each right or wrong) of every method on every task.

    The worked examples come from the task's ``examples`` split (never a test question); few-shot-K takes
    the first K, few-shot-cot and self-consistency the first ``cot_shots``. ``keep`` outputs per cell are kept.
    """
    if items < 1:
        raise ConfigError(f"items must be ≥ 1, got {items}")
    if cot_shots < 1:
        raise ConfigError(f"cot_shots must be ≥ 1, got {cot_shots}")
    if "self-consistency" in methods and samples < 1:
        raise ConfigError(f"self-consistency needs k ≥ 1 sampled rationales, got {samples}")
    for task in tasks:
        if task not in REASONING_TASKS:
            raise ConfigError(f"unknown reasoning task {task!r}; choose from {', '.join(REASONING_TASKS)}")
    shots = {m: parse_method(m)[1] for m in methods}
    needed = max([cot_shots if k < 0 else k for k in shots.values()] + [0])
    results: dict[str, Any] = {}
    for t_i, task in enumerate(tasks):
        test = generate_items(task, items, seed, "test")
        asked = {it.question for it in test}
        pool = [e for e in generate_items(task, needed + items, seed, "examples") if e.question not in asked][:needed]
        row: dict[str, Any] = {"kind": ANSWER_KINDS[task], "methods": {}}
        for m_i, method in enumerate(methods):
            k = shots[method]
            got = run_method(lm, method, test, pool[: cot_shots if k < 0 else k], max_new_tokens=max_new_tokens, answer_tokens=answer_tokens,
                             samples=samples, temperature=temperature, top_k=top_k, seed=seed * 1000 + t_i * 10 + m_i,
                             rows_per_batch=rows_per_batch)
            got["records"] = got["records"][:keep]
            row["methods"][method] = got
            if log:
                log(f"{task} {method}: {100 * got['accuracy']:.1f} ± {100 * got['ci95']:.1f} ({got['unextractable']} unextractable)")
        results[task] = row
    return {"model": lm.name, "context": lm.context, "items": items, "seed": seed, "methods": list(methods), "max_new_tokens": max_new_tokens,
            "answer_tokens": answer_tokens, "samples": samples, "temperature": temperature, "top_k": top_k, "cot_shots": cot_shots,
            "tasks": results}


def cot_table(out: dict[str, Any]) -> str:
    """Accuracy (%) ± 95% CI: one row per method, one column per task (the lecture's layout); unextractable answers in brackets."""
    tasks = list(out["tasks"])
    lines = [f"{'method':<18}" + "".join(f"{t:>24}" for t in tasks)]
    for method in out["methods"]:
        cells = []
        for t in tasks:
            c = out["tasks"][t]["methods"][method]
            cells.append(f"{100 * c['accuracy']:>9.1f} ± {100 * c['ci95']:<4.1f} [{c['unextractable']:>3}]")
        lines.append(f"{method:<18}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)
