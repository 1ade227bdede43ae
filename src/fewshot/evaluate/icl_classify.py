"""Scoring a meta-trained in-context classifier (:mod:`fewshot.methods.icl_classify`) on seeded prompts."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.evaluate.runner import mean_ci95

__all__ = ["prompt_accuracy", "support_baseline_accuracy"]


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


def support_baseline_accuracy(make_classifier, tasks, prompts: int, from_position: int) -> dict[str, object]:
    """The same score for a classifier fitted on each prompt's support, the closed-form rows beside the
    meta-trained model: for every position i ≥ ``from_position``, ``make_classifier()`` is fitted on samples
    0 … i − 1 of the prompt (as the model sees them) and predicts sample i; per prompt the mean over those
    positions, then mean ± 95% CI over prompts. A class absent from the support cannot be predicted."""
    per_prompt = []
    for start in range(0, prompts, 256):
        batch = tasks.batch(torch.arange(start, min(start + 256, prompts)))
        for xs, labels in zip(batch["xs"].numpy(), batch["labels"].numpy()):
            hits = []
            for i in range(from_position, len(labels)):
                if len(set(labels[:i].tolist())) < 2:  # one class so far: it is the only answer
                    hits.append(float(labels[i] == labels[0]))
                    continue
                hits.append(float(make_classifier().fit(xs[:i], labels[:i]).predict(xs[i : i + 1])[0] == labels[i]))
            per_prompt.append(sum(hits) / len(hits))
    accuracy, ci95 = mean_ci95(per_prompt)
    return {"accuracy": accuracy, "ci95": ci95, "prompts": prompts, "from_position": from_position}
