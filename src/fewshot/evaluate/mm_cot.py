"""Multimodal-CoT's rows on scene questions (Zhang et al. 2023): direct answering, rationale-then-answer, the gold
rationale given (an upper bound on what stage 1 could give stage 2), and the blind (text-only) model.

Stage 2 at test time reads the rationale stage 1 *generated*: :func:`rationale_then_answer` takes the questions and
images and nothing else of an item but its question, so a gold rationale cannot reach it. Answers are exact matches
of the generated text (stripped) to the gold answer; an empty output is counted wrong and reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewshot.data.scene_questions import QUESTION_KINDS, SceneQuestion, stage_text, evaluation_items
from fewshot.data.scenes import render
from fewshot.errors import ConfigError
from fewshot.evaluate.runner import mean_ci95

__all__ = ["ROWS", "answers_from_rationales", "direct_answers", "evaluate_mm_cot", "generate_rationales", "mm_cot_table",
           "open_mm_cot_run", "rationale_then_answer", "scene_images"]

# Row → the runs it needs: direct / blind answer after the question; the two stages; stage 2 on the gold rationale.
ROWS = {"direct": ("direct",), "rationale-then-answer": ("rationale", "answer"), "gold rationale": ("answer",), "blind": ("blind",)}


def scene_images(items: Sequence[SceneQuestion], size: int) -> torch.Tensor:
    """The items' scenes drawn at ``size`` px, float (N, 3, size, size) in [0, 1]."""
    return torch.from_numpy(render([item.scene for item in items], size)).float().div_(255)


def direct_answers(model: Any, images: torch.Tensor, items: Sequence[SceneQuestion]) -> list[str]:
    """The model's answer after ``q: <question> a:``."""
    return model.complete(images, [stage_text(item, "answer")[0] for item in items])


def generate_rationales(stage1: Any, images: torch.Tensor, items: Sequence[SceneQuestion]) -> list[str]:
    """Stage 1: the rationale the model writes after ``q: <question> reason:``."""
    return stage1.complete(images, [stage_text(item, "rationale")[0] for item in items])


def answers_from_rationales(stage2: Any, images: torch.Tensor, items: Sequence[SceneQuestion], rationales: Sequence[str]) -> list[str]:
    """Stage 2: the answer after ``q: <question> reason: <rationale> a:`` with the given ``rationales``."""
    if len(rationales) != len(items):
        raise ConfigError(f"{len(rationales)} rationales for {len(items)} questions")
    return stage2.complete(images, [stage_text(item, "answer-from-rationale", rationale=r)[0] for item, r in zip(items, rationales)])


def rationale_then_answer(stage1: Any, stage2: Any, images: torch.Tensor, items: Sequence[SceneQuestion]) -> tuple[list[str], list[str]]:
    """(generated rationales, answers): stage 2 reads stage 1's rationale, never the item's gold one."""
    rationales = generate_rationales(stage1, images, items)
    return rationales, answers_from_rationales(stage2, images, items, rationales)


def open_mm_cot_run(path: str | Path) -> Any:
    """The mm-cot method of a run folder, in eval mode."""
    from fewshot.run import Run

    run = Run.open(path)
    if run.config.method.name != "mm-cot":
        raise ConfigError(f"'{path}' is a {run.config.method.name} run, not an mm-cot run")
    return run.method().eval()


def _scored(answers: Sequence[str], items: Sequence[SceneQuestion]) -> dict[str, Any]:
    correct = [100.0 * (a == item.answer) for a, item in zip(answers, items)]
    accuracy, ci = mean_ci95(correct)
    by_kind = {}
    for kind in QUESTION_KINDS:
        mine = [c for c, item in zip(correct, items) if item.kind == kind]
        if mine:
            by_kind[kind] = dict(zip(("accuracy", "ci95"), mean_ci95(mine)))
    return {"accuracy": accuracy, "ci95": ci, "n": len(items), "empty": sum(not a for a in answers), "by_kind": by_kind,
            "answers": dict(Counter(answers).most_common(5))}


def evaluate_mm_cot(runs: dict[str, str | Path], n: int = 300, seed: int = 1, split_seed: int = 0) -> dict[str, Any]:
    """Each row of :data:`ROWS` whose runs are given (``runs``: direct, rationale, answer, blind → run folders) on ``n``
    fresh questions about scenes of seen pairs and ``n`` about scenes holding a held-out pair (stream ``seed``)."""
    unknown = set(runs) - {name for needs in ROWS.values() for name in needs}
    if unknown:
        raise ConfigError(f"unknown mm-cot run role(s) {', '.join(sorted(unknown))}; roles: direct, rationale, answer, blind")
    models = {name: open_mm_cot_run(path) for name, path in runs.items()}
    sizes = {model.image_size for model in models.values()}
    if len(sizes) > 1:
        raise ConfigError(f"the mm-cot runs draw images at different sizes {sorted(sizes)}; train them at one data.image_size")
    image_size = sizes.pop()
    out: dict[str, Any] = {"rows": {}, "rationales": {}}
    for compositions in ("seen", "held-out"):
        items = evaluation_items(n, seed, split_seed, compositions)
        images = scene_images(items, image_size)
        if "rationale" in models:
            rationales = generate_rationales(models["rationale"], images, items)
            exact = [100.0 * (r == item.rationale) for r, item in zip(rationales, items)]
            out["rationales"][compositions] = {"exact": dict(zip(("accuracy", "ci95"), mean_ci95(exact))),
                                               "example": {"question": items[0].question, "gold": items[0].rationale, "generated": rationales[0]}}
        for row, needs in ROWS.items():
            if not all(name in models for name in needs):
                continue
            if row == "rationale-then-answer":
                answers = answers_from_rationales(models["answer"], images, items, rationales)
            elif row == "gold rationale":
                answers = answers_from_rationales(models["answer"], images, items, [item.rationale for item in items])
            else:
                answers = direct_answers(models[needs[0]], images, items)
            out["rows"].setdefault(row, {})[compositions] = _scored(answers, items)
    return out


def mm_cot_table(out: dict[str, Any]) -> str:
    """Accuracy % ± 95% CI per row, on seen and held-out compositions, with each question kind's accuracy."""
    lines = [f"{'row':24} {'seen':>14} {'held-out':>14}   by kind (seen): " + " / ".join(QUESTION_KINDS)]
    for row, cells in out["rows"].items():
        text = "  ".join(f"{c['accuracy']:6.1f} ± {c['ci95']:4.1f}" for c in cells.values())
        kinds = " / ".join(f"{cells['seen']['by_kind'].get(k, {}).get('accuracy', float('nan')):.1f}" for k in QUESTION_KINDS)
        lines.append(f"{row:24} {text}   {kinds}")
    for compositions, r in out["rationales"].items():
        lines.append(f"stage-1 rationales equal to the gold one ({compositions}): {r['exact']['accuracy']:.1f} ± {r['exact']['ci95']:.1f}")
    return "\n".join(lines)
