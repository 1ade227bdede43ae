"""Seeded reasoning tasks for chain-of-thought prompting: each item is (question, gold rationale, gold answer).

Tasks (:data:`REASONING_TASKS`):
    ``word-problems``  MultiArith-style word problems (Roy & Roth 2015): a person's count of things changed by
                       two or three operations on small numbers (bags of equal size ×, buying +, giving away −,
                       sharing equally or packing into boxes ÷), written from templates and a word list;
    ``last-letters``   last-letter concatenation (Kojima et al. 2022): the last letters of ``words`` names
                       (first and last names, alternating), concatenated;
    ``coin-flip``      coin flip (Kojima et al. 2022): a coin starts heads up, ``people`` people flip it or do not;
                       is it still heads up? (yes iff the number of flips is even);
    ``arithmetic``     multi-step sums and products, ``steps`` operations applied left to right and written with
                       brackets, e.g. ``((3 + 4) * 2) + 5``; the rationale is one line per step (a scratchpad).

Item i of split s is drawn from its own generator seeded by (seed, task, s, i): any subset of items is the
same on every machine, and the ``test`` and ``examples`` splits (queries and few-shot exemplars) are
different streams. :func:`solve` reads the answer back from the question text alone (a small parser per
task, independent of the generator's own arithmetic), so tests can check every generated answer.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fewshot.errors import ConfigError

__all__ = [
    "ANSWER_KINDS", "REASONING_TASKS", "ReasoningItem", "arithmetic_chain", "coin_flip", "generate_items", "last_letters", "solve",
    "word_problem",
]

FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Henry", "Irene", "Jacob", "Karen", "Leo", "Maria", "Nathan",
    "Olivia", "Peter", "Rosa", "Samuel", "Tina", "Victor", "Wendy", "Yusuf", "Zoe", "Omar", "Lucy", "Marco", "Nina", "Hugo",
)
LAST_NAMES = (
    "Smith", "Garcia", "Brown", "Miller", "Lopez", "Wilson", "Taylor", "Moore", "Clark", "Lewis", "Walker", "Young", "Allen",
    "King", "Wright", "Scott", "Green", "Baker", "Adams", "Nelson", "Hill", "Campbell", "Turner", "Parker", "Evans", "Collins",
)
THINGS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards", "balloons", "stamps", "toys", "flowers")

# Each task's answer is a number, "yes"/"no", or a string of letters: what the extractor looks for.
ANSWER_KINDS = {"word-problems": "number", "last-letters": "letters", "coin-flip": "yes-no", "arithmetic": "number"}
REASONING_TASKS = tuple(ANSWER_KINDS)
SPLITS = ("test", "examples")


@dataclass(frozen=True)
class ReasoningItem:
    """One question with its gold rationale (the steps, without the final answer sentence) and gold answer."""

    task: str
    question: str
    rationale: str
    answer: str


# ----------------------------------------------------------------------------- word problems

# (name, operations it performs): a start, 0+ changes, an end.
_STARTS = (("has", 0), ("bags", 1))
_ENDS = (("now", 0), ("share", 1), ("pack", 1))


def word_problem(rng: np.random.Generator, operations: int | None = None) -> ReasoningItem:
    """A MultiArith-style problem with ``operations`` (2 or 3; drawn when None) arithmetic operations."""
    n_ops = int(rng.integers(2, 4)) if operations is None else operations
    if n_ops < 1:
        raise ConfigError(f"a word problem needs ≥ 1 operation, got {n_ops}")
    shapes = [(s, e, n_ops - so - eo) for s, so in _STARTS for e, eo in _ENDS if n_ops - so - eo >= 0]
    for _ in range(100):  # redraw until the end's division comes out whole
        start, end, changes = shapes[int(rng.integers(len(shapes)))]
        name, friend = (str(x) for x in rng.choice(FIRST_NAMES, 2, replace=False))
        things = str(rng.choice(THINGS))
        sentences, steps = [], []
        if start == "has":
            value = int(rng.integers(3, 21))
            sentences.append(f"{name} has {value} {things}.")
            steps.append(f"{name} starts with {value}.")
        else:
            bags, each = int(rng.integers(2, 7)), int(rng.integers(2, 10))
            value = bags * each
            sentences.append(f"{name} has {bags} bags with {each} {things} in each bag.")
            steps.append(f"{bags} bags of {each}: {bags} * {each} = {value}.")
        for _ in range(changes):
            if value < 3 or rng.random() < 0.5:
                b = int(rng.integers(2, 16))
                verb = int(rng.integers(3))
                sentences.append((f"{name} buys {b} more {things}.", f"{friend} gives {name} {b} more {things}.",
                                  f"{name} finds {b} more {things}.")[verb])
                steps.append(f"{b} more: {value} + {b} = {value + b}.")
                value += b
            else:
                b = int(rng.integers(1, value))
                verb = int(rng.integers(3))
                sentences.append((f"{name} gives {b} {things} to {friend}.", f"{name} loses {b} {things}.",
                                  f"{name} sells {b} {things}.")[verb])
                steps.append(f"{b} fewer: {value} - {b} = {value - b}.")
                value -= b
        if end == "now":
            sentences.append(f"How many {things} does {name} have now?")
            return ReasoningItem("word-problems", " ".join(sentences), " ".join(steps), str(value))
        divisors = [c for c in range(2, 10) if value % c == 0 and value // c >= 1]
        if not divisors:
            continue
        c = int(rng.choice(divisors))
        if end == "share":
            sentences.append(f"{name} shares them equally among {c} friends. How many {things} does each friend get?")
            steps.append(f"Shared by {c}: {value} / {c} = {value // c}.")
        else:
            sentences.append(f"{name} packs them into boxes of {c}. How many boxes does {name} fill?")
            steps.append(f"Boxes of {c}: {value} / {c} = {value // c}.")
        return ReasoningItem("word-problems", " ".join(sentences), " ".join(steps), str(value // c))
    raise RuntimeError("no whole division found in 100 draws")  # unreachable: "now" ends always succeed


def _solve_word_problem(question: str) -> str:
    value: int | None = None
    for sentence in re.findall(r"[^.?]+[.?]", question):
        if m := re.search(r"has (\d+) bags with (\d+) ", sentence):
            value = int(m[1]) * int(m[2])
        elif m := re.search(r"has (\d+) ", sentence):
            value = int(m[1])
        elif m := re.search(r"(?:buys|finds|gives \w+) (\d+) more ", sentence):
            value = _need(value) + int(m[1])
        elif m := re.search(r"(?:gives|loses|sells) (\d+) ", sentence):
            value = _need(value) - int(m[1])
        elif m := re.search(r"equally among (\d+) |into boxes of (\d+)", sentence):
            divisor = int(m[1] or m[2])
            if _need(value) % divisor:
                raise ValueError(f"{value} does not divide by {divisor}")
            value = _need(value) // divisor
    return str(_need(value))


def _need(value: int | None) -> int:
    if value is None:
        raise ValueError("a change before any starting amount")
    return value


# ----------------------------------------------------------------------------- symbolic tasks


def last_letters(rng: np.random.Generator, words: int = 4) -> ReasoningItem:
    """Kojima et al.'s last-letter concatenation over ``words`` names (first, last, first, …)."""
    if words < 1:
        raise ConfigError(f"last-letter concatenation needs ≥ 1 word, got {words}")
    names = [str(rng.choice(FIRST_NAMES if i % 2 == 0 else LAST_NAMES)) for i in range(words)]
    answer = "".join(n[-1] for n in names)
    ends = [f'"{names[0]}" ends in "{names[0][-1]}"'] + [f'"{n}" in "{n[-1]}"' for n in names[1:]]
    steps = [", ".join(ends) + ".", f'Together: "{answer}".']
    question = f'Take the last letters of each word in "{" ".join(names)}" and concatenate them.'
    return ReasoningItem("last-letters", question, " ".join(steps), answer)


def _solve_last_letters(question: str) -> str:
    quoted = re.search(r'"([^"]+)"', question)
    if quoted is None:
        raise ValueError("no quoted words")
    return "".join(w[-1] for w in quoted[1].split()).lower()


def coin_flip(rng: np.random.Generator, people: int = 4) -> ReasoningItem:
    """Kojima et al.'s coin flip: ``people`` people each flip the heads-up coin or not (probability ½ each)."""
    if people < 1:
        raise ConfigError(f"coin flip needs ≥ 1 person, got {people}")
    names = [str(n) for n in rng.choice(FIRST_NAMES, people, replace=False)]
    heads, sentences, steps = True, ["A coin is heads up."], []
    for name in names:
        if rng.random() < 0.5:
            heads = not heads
            sentences.append(f"{name} flips the coin.")
            steps.append(f"{name} flips it: {'heads' if heads else 'tails'}.")
        else:
            sentences.append(f"{name} does not flip the coin.")
            steps.append(f"{name} does not: {'heads' if heads else 'tails'}.")
    steps.append(f"It ends {'heads' if heads else 'tails'} up.")
    sentences.append('Is the coin still heads up? Note that "flip" here means "reverse".')
    return ReasoningItem("coin-flip", " ".join(sentences), " ".join(steps), "yes" if heads else "no")


def _solve_coin_flip(question: str) -> str:
    return "yes" if len(re.findall(r"\bflips the coin\b", question)) % 2 == 0 else "no"


# ----------------------------------------------------------------------------- multi-step arithmetic


def arithmetic_chain(rng: np.random.Generator, steps: int = 3) -> ReasoningItem:
    """``steps`` operations (+ a number in 1..9, or * a number in 2..3) applied left to right from a number in 1..9."""
    if steps < 1:
        raise ConfigError(f"an arithmetic chain needs ≥ 1 step, got {steps}")
    value = int(rng.integers(1, 10))
    text, lines = str(value), []
    for i in range(steps):
        if rng.random() < 0.5:
            b, op = int(rng.integers(1, 10)), "+"
            new = value + b
        else:
            b, op = int(rng.integers(2, 4)), "*"
            new = value * b
        text = f"({text} {op} {b})" if i < steps - 1 else f"{text} {op} {b}"
        lines.append(f"{value} {op} {b} = {new}.")
        value = new
    return ReasoningItem("arithmetic", f"What is {text}?", " ".join(lines), str(value))


_BINARY: dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Mult: operator.mul}


def _solve_arithmetic(question: str) -> str:
    m = re.fullmatch(r"What is (.+)\?", question)
    if m is None:
        raise ValueError("not an arithmetic question")

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"unexpected expression {ast.dump(node)}")

    return str(value(ast.parse(m[1], mode="eval").body))


# ----------------------------------------------------------------------------- items and solver

_MAKERS: dict[str, Callable[..., ReasoningItem]] = {
    "word-problems": word_problem, "last-letters": last_letters, "coin-flip": coin_flip, "arithmetic": arithmetic_chain,
}
_SOLVERS: dict[str, Callable[[str], str]] = {
    "word-problems": _solve_word_problem, "last-letters": _solve_last_letters, "coin-flip": _solve_coin_flip,
    "arithmetic": _solve_arithmetic,
}


def generate_items(task: str, n: int, seed: int = 0, split: str = "test", **options: int) -> list[ReasoningItem]:
    """Items 0..n−1 of ``task``'s ``split`` ("test" or "examples"), each drawn from (seed, task, split, i);
    ``options`` go to the task's maker (``operations``, ``words``, ``people``, ``steps``)."""
    if task not in _MAKERS:
        raise ConfigError(f"unknown reasoning task {task!r}; choose from {', '.join(REASONING_TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if n < 0:
        raise ConfigError(f"the number of items must be ≥ 0, got {n}")
    t, s = REASONING_TASKS.index(task), SPLITS.index(split)
    return [_MAKERS[task](np.random.default_rng([seed, t, s, i]), **options) for i in range(n)]


def solve(task: str, question: str) -> str:
    """The answer read from the question text by the task's own parser (independent of the generator)."""
    if task not in _SOLVERS:
        raise ConfigError(f"unknown reasoning task {task!r}; choose from {', '.join(REASONING_TASKS)}")
    return _SOLVERS[task](question)
