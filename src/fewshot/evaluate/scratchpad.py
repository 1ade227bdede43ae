"""Scoring a GPT trained on multi-step arithmetic (``data.source=arithmetic``): greedy answers on held-out problems,
exact accuracy ± 95% CI against the number of steps, inside and beyond the training lengths (issue 18, Nye et al. 2021).

Each held-out problem's prompt (``[BOS] Q: … ?\\nA:``) is continued greedily with the KV cache until [EOS] or the
end of the model's context; the answer is read by chain-of-thought's extractor (the number after the last
"answer is"; an output without one, such as a scratchpad cut off by the context, has no answer and counts as wrong,
and the number of such outputs is reported per length).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from fewshot.data.reasoning import ReasoningItem
from fewshot.data.scratchpad import decode_chars, encode_chars, format_example, heldout_items
from fewshot.data.token_ids import BOS_ID, EOS_ID
from fewshot.evaluate.cot import extract_answer
from fewshot.evaluate.runner import mean_ci95
from fewshot.models.language import LanguageModel

__all__ = ["ERRORS", "first_error", "greedy_continuations", "plot_accuracy_by_steps", "score_items", "steps_table", "accuracy_by_steps"]


@torch.no_grad()
def greedy_continuations(model: LanguageModel, prompts: torch.Tensor, stop_id: int = EOS_ID) -> list[list[int]]:
    """Greedy continuations of equally long prompts (B, P) ([BOS] first), one batch with the KV cache: each row's
    ids up to (not including) its first ``stop_id``, or up to the end of the model's context."""
    was_training = model.training
    model.eval()
    logits, past = model(prompts, return_kv=True)
    new: list[torch.Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    for position in range(prompts.shape[1], model.max_len + 1):
        token = logits[:, -1].argmax(dim=-1)
        new.append(token)
        done |= token == stop_id
        if bool(done.all()) or position == model.max_len:
            break
        logits, past = model(token[:, None], past=past, return_kv=True)
    model.train(was_training)
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(len(prompts))]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in rows]


def score_items(model: LanguageModel, items: Sequence[ReasoningItem], batch_size: int = 100) -> list[dict[str, Any]]:
    """Per item: the generated text, the extracted answer (None when there is none) and whether it equals the gold one.
    Items are batched by prompt length (all problems of one number of steps have one length)."""
    device = next(model.parameters()).device
    prompts = [[BOS_ID, *encode_chars(format_example(item, False)[0])] for item in items]
    results: list[dict[str, Any] | None] = [None] * len(items)
    for length in sorted({len(p) for p in prompts}):
        index = [i for i, p in enumerate(prompts) if len(p) == length]
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            outputs = greedy_continuations(model, torch.tensor([prompts[i] for i in chunk], device=device))
            for i, ids in zip(chunk, outputs):
                text = decode_chars(ids)
                answer = extract_answer(text, "number", needs_trigger=True)
                results[i] = {"output": text, "answer": answer, "correct": answer == items[i].answer}
    return [r for r in results if r is not None]


ERRORS = ("none", "malformed", "operand", "copy", "arithmetic", "too few steps", "too many steps", "answer")
_LINE = re.compile(r"(\d+) ([+*]) (\d+) = (\d+)\.?")


def first_error(item: ReasoningItem, output: str) -> str:
    """The first thing a scratchpad output gets wrong, walking the gold steps in order (one of :data:`ERRORS`):
    ``malformed`` (a line that is not ``a op b = c.``), ``operand`` (op or b not the question's next operation),
    ``copy`` (a not the line's own previous result, or not the start), ``arithmetic`` (a op b ≠ c),
    ``too few steps`` / ``too many steps``, ``answer`` (the answer is not the last result), else ``none``."""
    gold = [_LINE.fullmatch(line).groups() for line in re.split(r"(?<=\.) ", item.rationale)]
    steps_text = output.split(" The answer is")[0].strip()
    lines = re.split(r"(?<=\.) ", steps_text) if steps_text else []
    previous = gold[0][0]
    for k, line in enumerate(lines):
        m = _LINE.fullmatch(line)
        if m is None:
            return "malformed"
        if k >= len(gold):
            return "too many steps"
        a, op, b, c = m.groups()
        if (op, b) != (gold[k][1], gold[k][2]):
            return "operand"
        if a != previous:
            return "copy"
        if int(c) != (int(a) + int(b) if op == "+" else int(a) * int(b)):
            return "arithmetic"
        previous = c
    if len(lines) < len(gold):
        return "too few steps"
    return "none" if extract_answer(output, "number", needs_trigger=True) == previous else "answer"


def accuracy_by_steps(model: LanguageModel, steps: Sequence[int], n: int, seed: int, heldout_fraction: float) -> list[dict[str, Any]]:
    """One row per number of steps: held-out items (:func:`~fewshot.data.scratchpad.heldout_items`), accuracy % ± 95% CI
    over items (each right or wrong), outputs without an answer, and the first item's output as an example."""
    rows = []
    for s in steps:
        items = heldout_items(n, s, seed, heldout_fraction)
        scored = score_items(model, items)
        accuracy, ci = mean_ci95([100.0 * r["correct"] for r in scored])
        rows.append({"steps": s, "items": len(items), "correct": sum(r["correct"] for r in scored), "accuracy": accuracy, "ci95": ci,
                     "no_answer": sum(r["answer"] is None for r in scored), "example": scored[0]["output"],
                     "first_errors": dict(Counter(first_error(item, r["output"]) for item, r in zip(items, scored)))})
    return rows


def steps_table(curves: dict[str, list[dict[str, Any]]], max_train_steps: int) -> str:
    """Accuracy % ± CI per number of steps (rows) and variant (columns); steps beyond training marked."""
    names = list(curves)
    lines = ["steps  items  " + "  ".join(f"{name:>22}" for name in names)]
    for k, row in enumerate(curves[names[0]]):
        mark = "*" if row["steps"] > max_train_steps else " "
        cells = "  ".join(f"{c[k]['accuracy']:6.1f} ± {c[k]['ci95']:4.1f} ({c[k]['no_answer']:3d} none)" for c in curves.values())
        lines.append(f"{row['steps']:4d}{mark}  {row['items']:5d}  {cells}")
    lines.append(f"* beyond the training lengths (1 … {max_train_steps}); 'none': outputs with no 'answer is <number>'")
    return "\n".join(lines)


def plot_accuracy_by_steps(curves: dict[str, list[dict[str, Any]]], train_steps: tuple[int, int], path: str, title: str = "") -> str:
    """Accuracy ± 95% CI against the number of steps, one line per variant, the training lengths shaded."""
    from fewshot.report import plt, save_figure  # matplotlib (Agg) only when a plot is drawn

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axvspan(train_steps[0] - 0.5, train_steps[1] + 0.5, color="0.9", label="training lengths")
    for name, rows in curves.items():
        x = [r["steps"] for r in rows]
        y = [r["accuracy"] for r in rows]
        ax.errorbar(x, y, yerr=[r["ci95"] for r in rows], marker="o", capsize=3, label=name)
    ax.set_xlabel("number of steps in the problem")
    ax.set_ylabel("exact accuracy on held-out problems (%)")
    ax.set_ylim(-3, 103)
    ax.set_xticks(sorted({r["steps"] for rows in curves.values() for r in rows}))
    ax.set_title(title)
    ax.legend()
    return str(save_figure(fig, path))
