"""The one step that fits an adapter on a Hugging Face causal LM's answers (loss on the answer tokens only), shared by
``fewshot icl tune-lm`` (:mod:`fewshot.adapt.lm_tuning`) and ICL-against-fine-tuning (:mod:`fewshot.evaluate.icl_compare`).
It sits here, below both, because evaluate/ may not import adapt/ (ARCHITECTURE.md's layers)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from fewshot.data.token_ids import IGNORE_INDEX
from fewshot.models.hf_text import require
from fewshot.objectives.language import token_cross_entropy

__all__ = ["answer_step", "label_targets", "with_adapter"]


def label_targets(context: Sequence[int], label: Sequence[int], width: int) -> list[int]:
    """Next-token targets of the row ``context + label`` right-padded to ``width``: position t targets
    token t+1 only where that token is a label token, t ∈ [|x|−1, |x|+|c|−1); ``IGNORE_INDEX`` elsewhere,
    so the loss −Σ_t log p(c_t | x, c_<t) is the label's negative log-likelihood, as rank classification scores it."""
    row = [IGNORE_INDEX] * width
    for t, token in enumerate(label):
        row[len(context) - 1 + t] = int(token)
    return row


def with_adapter(model: Any, adapter_config: Any, seed: int) -> Any:
    """A copy of the HF ``model`` wrapped by PEFT with ``adapter_config`` (seeded: PEFT draws LoRA's A from the global
    generator), in eval mode: no dropout, so a fit is a function of its rows and seed."""
    peft = require("peft")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(copy.deepcopy(model), adapter_config).eval()


def answer_step(model: Any, optimizer: torch.optim.Optimizer, batch: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """One optimizer step on (context ids, answer ids) rows, right-padded into one batch; the loss is the mean
    cross-entropy of the answer tokens alone (:func:`label_targets`). The loss before the step."""
    width = max(len(c) + len(a) for c, a in batch)
    ids = torch.tensor([[*c, *a] + [0] * (width - len(c) - len(a)) for c, a in batch])
    mask = torch.tensor([[1] * (len(c) + len(a)) + [0] * (width - len(c) - len(a)) for c, a in batch])
    targets = torch.tensor([label_targets(c, a, width) for c, a in batch])
    loss = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()
