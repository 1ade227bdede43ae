"""Scoring a meta-trained in-context classifier (:mod:`fewshot.methods.icl_classify`) on seeded prompts."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.evaluate.runner import mean_ci95

__all__ = ["prompt_accuracy"]


@torch.no_grad()
def prompt_accuracy(model: nn.Module, tasks, prompts: int, from_position: int | None = None, batch_size: int = 256) -> dict[str, object]:
    """Accuracy of a prompt model on the first ``prompts`` prompts of ``tasks`` (a ClassificationTasks).

    ``accuracy`` ± ``ci95``: per prompt, the mean accuracy over positions ≥ ``from_position`` (default the
    last: ``points − 1`` labeled samples before it), then mean and 95% CI over prompts; ``by_position``:
    the accuracy at each position i (i labeled samples before it)."""
    correct = []
    model.eval()
    for start in range(0, prompts, batch_size):
        batch = tasks.batch(torch.arange(start, min(start + batch_size, prompts)))
        correct.append((model(batch["xs"], batch["labels"]).argmax(-1) == batch["labels"]).float())
    hits = torch.cat(correct).numpy()  # (prompts, points)
    first = hits.shape[1] - 1 if from_position is None else from_position
    accuracy, ci95 = mean_ci95(hits[:, first:].mean(1))
    return {"accuracy": accuracy, "ci95": ci95, "prompts": prompts, "from_position": first, "by_position": hits.mean(0).tolist()}
