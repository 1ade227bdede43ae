"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): prompt tuning of a CLIP
run's text side for few-shot classification, both towers frozen.

The hand prompt "a picture of a red circle" becomes M learned vectors followed by the class name,

    prompt_c = [CLS] [V]_1 … [V]_M [CLASS_c],        t_c = normalise(P · text(prompt_c)),

where [V]_m live in the text tower's token-embedding space, [CLASS_c] are the name's own token
embeddings, text(·) is the frozen text tower (its [CLS] state: this project's tower is bidirectional
and pools at the start token, CLIP's is causal and pools at [EOS]) and P the frozen text projection.
An image x is scored against every class as CLIP scores a caption,

    logit_c(x) = exp(s) · cos(f(x), t_c),        s = the run's learned logit scale (clamped at ln 100),

f = the frozen image tower and projection, and only the context vectors train, by cross-entropy on
the K-shot support. Unified context (one [V]_1…[V]_M for every class, the paper's default) or
class-specific context (``class_specific``: C × M vectors). The context starts at the token
embeddings of a lead such as "a picture of a" when M equals its length, so zero steps is the
zero-shot classifier of that single template; otherwise at N(0, 0.02²), as the paper's code.

The prompt enters the tower through its ``prefix`` input ([CLS] and the context as embeddings at
positions 0…M, the name's ids after them), so no second path through the text trunk exists.

Departures from the paper, for CPUs and tiny supports: full-batch AdamW (the adaptation package's
:func:`~fewshot.adapt.heads.fit_steps`) instead of SGD at batch 32 with a cosine schedule; the image
embeddings of the support are computed once (the image tower is frozen). The class name always ends
the prompt (the paper also tries it in the middle and at the front).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.adapt.heads import fit_steps
from fewshot.adapt.prompts import check_int
from fewshot.data.token_ids import PAD_ID
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.episodes import as_feature_matrix, as_label_vector
from fewshot.evaluate.zeroshot import prompts
from fewshot.models.language import TextTransformer

__all__ = ["DEFAULT_LEAD", "CONTEXT_STD", "CoOp", "CoOpClassifier", "name_tokens"]

DEFAULT_LEAD = "a picture of a"  # one of the caption grammar's leads, so the init is a prompt the run learned from
CONTEXT_STD = 0.02  # the paper's random context init, N(0, 0.02²)
DEFAULT_STEPS, DEFAULT_LR = 300, 1e-2  # chosen on a validation draw of bench/vl_probes.py (support seed 200, queries 300)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def name_tokens(tokenizer: Any, class_names: Sequence[str], lead: str = DEFAULT_LEAD) -> tuple[list[int], torch.Tensor]:
    """(the lead's ids, (C, T) ids of each class name as it reads after the lead, PAD-padded).

    A name is tokenized inside its prompt ``f"{lead} {name}"`` (a byte-level BPE spells a word after a
    space differently from one at the start) and the lead's ids are cut off its front."""
    prompts(class_names, [lead + " {}"])  # one-line errors for repeated or missing names
    head = _ids(tokenizer, lead)
    rows = []
    for name in class_names:
        ids = _ids(tokenizer, f"{lead} {name}")
        if ids[: len(head)] != head or len(ids) == len(head):
            raise DataError(f"the tokenizer does not read '{lead} {name}' as the lead '{lead}' followed by '{name}'")
        rows.append(ids[len(head) :])
    table = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for c, row in enumerate(rows):
        table[c, : len(row)] = torch.tensor(row)
    return head, table


class CoOp(nn.Module):
    """Learned context + class names through a CLIP run's frozen text tower: image embeddings → logits.

    ``method``: a CLIP method (``embed_images``, ``text_encoder`` a text-transformer, ``text_projection``,
    ``logit_scale``); it is frozen in place and kept in eval mode as ``.base``. ``tokenizer``: the run's
    BPE tokenizer. ``n_context``: M (None: the lead's length, initialised from it). Only ``context``
    trains: (1, M, dim) unified or (C, M, dim) class-specific.
    """

    def __init__(
        self, method: nn.Module, tokenizer: Any, class_names: Sequence[str], *, n_context: int | None = None,
        lead: str = DEFAULT_LEAD, class_specific: bool = False, generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        tower = getattr(method, "text_encoder", None)
        if not isinstance(tower, TextTransformer) or tower.causal or not hasattr(method, "text_projection"):
            raise ConfigError("CoOp needs a CLIP run with its own text-transformer tower (method=clip, method.text.name="
                              f"text-transformer); this run's text tower is {type(tower).__name__}")
        if not isinstance(class_specific, bool):
            raise ConfigError(f"CoOp: class_specific must be true or false, got {class_specific!r}")
        head, names = name_tokens(tokenizer, class_names, lead)
        m = len(head) if n_context is None else check_int("CoOp", "n_context", n_context, 1)
        if 1 + m + names.shape[1] > tower.max_len:
            raise ConfigError(f"CoOp: [CLS] + {m} context vectors + the longest class name ({names.shape[1]} tokens) "
                              f"exceed the text tower's context of {tower.max_len}: use fewer context vectors")
        method.requires_grad_(False)
        self.base = method.eval()
        self.class_names = list(class_names)
        self.register_buffer("names", names, persistent=False)
        shape = (len(names) if class_specific else 1, m, tower.dim)
        if m == len(head):  # the lead's own embeddings: zero steps is its zero-shot classifier
            with torch.no_grad():
                start = tower.tok_emb(torch.tensor(head)).detach().clone()
            self.context = nn.Parameter(start.expand(shape).clone())
        else:
            self.context = nn.Parameter(torch.randn(shape, generator=generator) * CONTEXT_STD)

    def train(self, mode: bool = True) -> "CoOp":
        super().train(mode)
        self.base.eval()  # frozen means frozen: no BatchNorm statistics drift, no dropout
        return self

    def prompt_prefix(self) -> torch.Tensor:
        """(C, 1 + M, dim): the embeddings of [CLS] [V]_1 … [V]_M, before each class name's tokens."""
        tower = self.base.text_encoder
        c, m = len(self.names), self.context.shape[1]
        start = tower.tok_emb.weight[tower.start_id].expand(c, 1, -1)
        return torch.cat([start, self.context.expand(c, m, -1)], dim=1)

    def class_weights(self) -> torch.Tensor:
        """t_c, (C, embed_dim) unit rows: the projected [CLS] state of each learned prompt."""
        tower, prefix = self.base.text_encoder, self.prompt_prefix()
        padding = torch.cat([torch.zeros(prefix.shape[:2], dtype=torch.bool, device=prefix.device), self.names == PAD_ID], dim=1)
        states = tower.hidden(self.names, prefix=prefix, padding_mask=padding if bool(padding.any()) else None)
        return F.normalize(self.base.text_projection(states[:, 0]), dim=1)

    def scale(self) -> torch.Tensor:
        """exp(s): the run's learned logit scale, clamped as CLIP clamps it."""
        return self.base.logit_scale.detach().clamp(max=self.base.max_logit_scale).exp()

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) = exp(s) · cos(image embedding, t_c) for projected image embeddings (B, embed_dim)."""
        return self.scale() * F.normalize(image_embeddings.float(), dim=1) @ self.class_weights().t()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The frozen image side: projected embeddings (N, embed_dim) of images (N, C, H, W) in [0, 1]."""
        return torch.cat([self.base.embed_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])

    def fit(self, image_embeddings: torch.Tensor, labels: torch.Tensor, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> list[float]:
        """``steps`` full-batch AdamW steps of cross-entropy on the support; labels index ``class_names``.
        Returns the losses. Trains every parameter that requires a gradient (the context alone)."""
        steps = check_int("CoOp", "steps", steps, 0)
        features = image_embeddings.detach()
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise DataError(f"CoOp: labels must index the {len(self.class_names)} class names, got {int(labels.min())}..{int(labels.max())}")
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.train()
        losses = fit_steps(lambda: features, self, labels, [{"params": trainable, "lr": lr}], steps)
        self.eval()
        return losses


class CoOpClassifier:
    """CoOp with the fit/predict shape of the episode runner's classifiers, on projected image embeddings.

    ``make()`` gives a fresh :class:`CoOp` (its context at the start); ``fit(X, y)`` trains it on the
    support embeddings X with labels y indexing its class names; ``predict(X)`` gives class indices."""

    def __init__(self, make: Any, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> None:
        self.make, self.steps, self.lr = make, steps, lr

    def fit(self, X: Any, y: Any) -> "CoOpClassifier":
        features = torch.from_numpy(as_feature_matrix(X, "X")).float()
        self.model_ = self.make()
        self.losses_ = self.model_.fit(features, torch.from_numpy(as_label_vector(y, len(features))), self.steps, self.lr)
        return self

    @torch.no_grad()
    def decision_function(self, X: Any) -> np.ndarray:
        return self.model_(torch.from_numpy(as_feature_matrix(X, "X")).float()).numpy()

    def predict(self, X: Any) -> np.ndarray:
        return np.argmax(self.decision_function(X), axis=1)
