"""``data.source=arithmetic``: multi-step sums and products for training a GPT from scratch, with or without a
scratchpad (Nye et al. 2021) in the targets.

Each training sequence is ``[BOS] prompt target [EOS]`` in characters (:data:`CHARS`, after the special ids), where
the prompt is ``Q: What is ((3 + 4) * 2) + 5?\\nA:`` and the target is either the answer alone,
``" The answer is 19."``, or the scratchpad then the answer, ``" 3 + 4 = 7. 7 * 2 = 14. 14 + 5 = 19. The answer is
19."`` (one intermediate result per step: the item's gold rationale from :func:`~fewshot.data.reasoning.arithmetic_chain`),
the same layout as a few-shot chain-of-thought example (``fewshot.evaluate.cot.example_text``). The loss is taken on
the target tokens and the [EOS] only: the question is given, never predicted.

The two variants (``data.scratchpad``) are built from the same problems in the same order (item i is drawn from
(split_seed, i) whatever the variant), padded to the same window (``data.seq_len``), so under one seed and one
``train.steps × train.batch_size`` they differ only in what the target holds.

Held-out problems: a question is held out when the SHA-256 of (split_seed, question) falls in the first
``heldout_fraction`` of its range (:func:`is_heldout`); training never sees one and :func:`heldout_items` draws
only those, at any number of steps, so the evaluation is disjoint from training by construction, also at one
step where there are only 99 distinct problems.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from pydantic import Field, model_validator

from fewshot.config import DataConfig
from fewshot.data.reasoning import REASONING_TASKS, SPLITS, ReasoningItem, arithmetic_chain
from fewshot.data.registry import RunData, register_source
from fewshot.data.token_ids import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, SPECIAL_TOKENS
from fewshot.errors import DataError

__all__ = [
    "CHARS", "SOURCE", "ScratchpadDataConfig", "ScratchpadSet", "VOCAB_SIZE", "decode_chars", "encode_chars", "encode_example",
    "format_example", "heldout_items", "is_heldout", "training_items",
]

SOURCE = "arithmetic"
# Every character the prompts and targets use; ids follow the special tokens, so [PAD]=0 … [CLS]=5 as in BPE runs.
CHARS = "\n ()*+.:=?0123456789AQTWaehinrstw"
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)
_CHAR_ID = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(CHARS)}
_TASK = REASONING_TASKS.index("arithmetic")


def encode_chars(text: str) -> list[int]:
    """One id per character of ``text`` (a character outside :data:`CHARS` is a DataError)."""
    try:
        return [_CHAR_ID[c] for c in text]
    except KeyError as exc:
        raise DataError(f"character {exc.args[0]!r} is not in the arithmetic alphabet {CHARS!r}") from None


def decode_chars(ids: list[int]) -> str:
    """Text of ``ids``; special ids are dropped."""
    first = len(SPECIAL_TOKENS)
    return "".join(CHARS[i - first] for i in ids if first <= i < first + len(CHARS))


def format_example(item: ReasoningItem, scratchpad: bool) -> tuple[str, str]:
    """(prompt, target): ``Q: <question>\\nA:`` and ``" [<rationale> ]The answer is <answer>."``."""
    body = f"{item.rationale} The answer is {item.answer}." if scratchpad else f"The answer is {item.answer}."
    return f"Q: {item.question}\nA:", " " + body


def encode_example(prompt: str, target: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (seq_len,), of ``x = [BOS] prompt target [EOS]`` right-padded with [PAD]:

        inputs_t = x_t,   targets_t = x_{t+1} if x_{t+1} is a target character or the [EOS], else IGNORE_INDEX

    so the loss covers exactly the target's |target| + 1 next-token predictions, never the prompt's.
    """
    p, t = encode_chars(prompt), encode_chars(target) + [EOS_ID]
    x = [BOS_ID, *p, *t]
    if len(x) - 1 > seq_len:
        raise DataError(f"an example of {len(x) - 1} tokens does not fit data.seq_len={seq_len}")
    inputs = torch.full((seq_len,), PAD_ID, dtype=torch.long)
    targets = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    inputs[: len(x) - 1] = torch.tensor(x[:-1])
    targets[len(p) : len(x) - 1] = torch.tensor(t)  # position len(p) holds the prompt's last character
    return inputs, targets


def is_heldout(question: str, seed: int, fraction: float) -> bool:
    """Whether ``question`` is in the held-out part: SHA-256(seed, question) read as a number in [0, 1) is < fraction."""
    digest = hashlib.sha256(f"{seed}\0{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def training_items(n: int, min_steps: int, max_steps: int, seed: int, heldout_fraction: float) -> list[ReasoningItem]:
    """``n`` training problems: draw i from (seed, arithmetic, "train", i), steps uniform in min_steps..max_steps;
    held-out questions are skipped (the next draw takes their place)."""
    items, i = [], 0
    while len(items) < n:
        rng = np.random.default_rng([seed, _TASK, len(SPLITS), i])
        item = arithmetic_chain(rng, int(rng.integers(min_steps, max_steps + 1)))
        if not is_heldout(item.question, seed, heldout_fraction):
            items.append(item)
        i += 1
    return items


def heldout_items(n: int, steps: int, seed: int, heldout_fraction: float) -> list[ReasoningItem]:
    """Up to ``n`` distinct held-out problems of ``steps`` steps, draw i from (seed, arithmetic, "test", steps, i), in at
    most 50·n draws (fewer problems when there are not that many: one step has 99 problems, about 20% of them held out)."""
    items: dict[str, ReasoningItem] = {}
    for i in range(50 * n):
        if len(items) == n:
            break
        item = arithmetic_chain(np.random.default_rng([seed, _TASK, SPLITS.index("test"), steps, i]), steps)
        if is_heldout(item.question, seed, heldout_fraction):
            items.setdefault(item.question, item)
    return list(items.values())


class ScratchpadDataConfig(DataConfig):
    """``data.source=arithmetic``: the training problems, their lengths and the target format."""

    scratchpad: bool = Field(True, description="arithmetic: the target is the rationale (one intermediate result per step) "
                             "then the answer (Nye et al. 2021); false = the answer only")
    min_steps: int = Field(1, ge=1, description="arithmetic: fewest operations in a training problem")
    max_steps: int = Field(3, ge=1, description="arithmetic: most operations in a training problem (longer ones are beyond training)")
    problems: int = Field(20_000, ge=1, description="arithmetic: training problems (steps uniform in min_steps..max_steps)")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="arithmetic: share of all questions kept out of training for evaluation")
    seq_len: int = Field(192, ge=8, description="arithmetic: the window every sequence is padded to (the model's context is "
                         "seq_len + 1); the same for both target formats, so their compute is equal")
    random_offsets: bool = Field(False, description="arithmetic: each training sequence starts at a random position of "
                                 "the window (left padding, masked out of attention), so positions beyond the training "
                                 "lengths are trained as in a pre-trained LM; the method draws the shift each step")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @model_validator(mode="after")
    def _steps_in_order(self) -> ScratchpadDataConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"data.min_steps={self.min_steps} exceeds data.max_steps={self.max_steps}")
        return self


class ScratchpadSet:
    """Encoded training problems as the trainer's TrainingData: ``{"tokens", "targets"}``, each (B, seq_len)."""

    labeled = False
    keys = frozenset({"tokens", "targets"})

    def __init__(self, items: list[ReasoningItem], scratchpad: bool, seq_len: int) -> None:
        pairs = [encode_example(*format_example(item, scratchpad), seq_len) for item in items]
        self.items = items
        self.tokens = torch.stack([p[0] for p in pairs])
        self.targets = torch.stack([p[1] for p in pairs])

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[idx], "targets": self.targets[idx]}


def load_arithmetic(data: ScratchpadDataConfig, eval_path: str | None, tokenizer: object = None) -> RunData:
    """``data.source=arithmetic``: the training problems; the held-out ones are drawn by :func:`heldout_items`."""
    if eval_path is not None:
        raise DataError("data.source=arithmetic draws its own held-out problems; remove eval.data_path")
    items = training_items(data.problems, data.min_steps, data.max_steps, data.split_seed, data.heldout_fraction)
    return RunData(ScratchpadSet(items, data.scratchpad, data.seq_len), None)


register_source(SOURCE, load_arithmetic, ScratchpadDataConfig)
