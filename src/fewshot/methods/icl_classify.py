"""Meta-trained in-context classification (Kirsch et al. 2022, GPICL): a sequence model reads labeled
examples and classifies the next input with no gradient step, trained on ``data.source=classification-prompts``.

The prompt model (the method's ``.encoder``) reads a prompt of n samples as 2n tokens, each sample twice:
first as a query token (x_i, 0) and then as a support token (x_i, one-hot y_i), with a linear read-in of
the concatenation. Under a causal mask the query token of sample i sees the support tokens of the samples
before it (and their query tokens), never y_i; a linear read-out at each query token gives the logits
of y_i. The loss is the cross-entropy at every query token (Kirsch et al.: every position of the
sequence), ``model(xs (B, n, d), labels (B, n)) -> logits (B, n, ways)``.

Backbones (``method.backbone``): ``transformer`` (learned positions + the shared token trunk) or
``lstm``, whose hidden size is all the state it carries between samples (Kirsch et al.'s state-size
argument: a learner needs memory to hold the examples).

:class:`InContextClassifier` puts a trained model in the episode runner as one more classifier: each
query is classified from a prompt of the episode's support (in a seeded order) followed by that query.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.config import EncoderConfig, MethodConfig, RunConfig
from fewshot.data.classification_prompts import ClassificationPromptsConfig
from fewshot.data.types import Batch
from fewshot.errors import ConfigError, DataError
from fewshot.methods.base import Method
from fewshot.models.language import gpt2_init
from fewshot.models.transformer import TokenTrunk

__all__ = ["ICLClassify", "ICLClassifyConfig", "InContextClassifier", "SupportQueryClassifier", "support_query_tokens", "in_context_cross_entropy"]


def support_query_tokens(xs: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """(x₁, 0), (x₁, e_{y₁}), (x₂, 0), … : xs (B, n, d), labels (B, n) → (B, 2n, d + ways)."""
    query = torch.cat([xs, xs.new_zeros(*xs.shape[:2], ways)], dim=-1)
    support = torch.cat([xs, F.one_hot(labels, ways).to(xs.dtype)], dim=-1)
    return torch.stack([query, support], dim=2).flatten(1, 2)


def in_context_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, min_context: int = 0) -> torch.Tensor:
    """Mean cross-entropy at every query position (Kirsch et al. 2022):

        L = −1/(B · (n − c)) Σ_b Σ_{i=c}^{n−1} log softmax(ŷ_{b,i})[y_{b,i}]

    where ŷ_{b,i} are the logits for sample i made from the i labeled samples before it and c =
    ``min_context`` leaves out positions with fewer examples. logits (B, n, ways), labels (B, n)."""
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, n, ways) and labels (B, n), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not 0 <= min_context < labels.shape[1]:
        raise ValueError(f"min_context={min_context} leaves no position of a {labels.shape[1]}-sample prompt in the loss")
    return F.cross_entropy(logits[:, min_context:].flatten(0, 1), labels[:, min_context:].flatten())


class SupportQueryClassifier(nn.Module):
    """Read-in of (x, label slot) → causal transformer or LSTM over the 2n tokens → read-out at the query tokens."""

    def __init__(self, dim: int, ways: int, points: int, backbone: str, width: int, depth: int, heads: int | None = None) -> None:
        super().__init__()
        self.dim, self.ways, self.points, self.backbone = dim, ways, points, backbone
        self.read_in = nn.Linear(dim + ways, width)
        if backbone == "transformer":
            self.pos_emb = nn.Parameter(torch.zeros(1, 2 * points, width))
            self.trunk = TokenTrunk(width, depth, heads or 1, causal=True)
            self.trunk.apply(gpt2_init)
            nn.init.normal_(self.pos_emb, std=0.02)
        elif backbone == "lstm":
            self.lstm = nn.LSTM(width, width, num_layers=depth, batch_first=True)
        else:
            raise ValueError(f"unknown backbone '{backbone}'; choose transformer or lstm")
        self.read_out = nn.Linear(width, ways)
        self.read_in.apply(gpt2_init)
        self.read_out.apply(gpt2_init)

    def forward(self, xs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if xs.ndim != 3 or xs.shape[2] != self.dim or labels.shape != xs.shape[:2]:
            raise ValueError(f"expected xs (B, n, {self.dim}) and labels (B, n), got {tuple(xs.shape)} and {tuple(labels.shape)}")
        n = xs.shape[1]
        if n > self.points:
            raise ValueError(f"a prompt of {n} samples is {n - self.points} longer than the model's {self.points}")
        h = self.read_in(support_query_tokens(xs, labels, self.ways))
        if self.backbone == "transformer":
            h = self.trunk(h + self.pos_emb[:, : 2 * n])
        else:
            h, _ = self.lstm(h)
        return self.read_out(h[:, 0::2])  # (B, n, ways): the query tokens


class ICLClassifyConfig(MethodConfig):
    backbone: Literal["transformer", "lstm"] = Field("transformer", description="transformer or lstm (its hidden size is its state)")
    width: int = Field(128, ge=1, description="transformer width or LSTM hidden size")
    depth: int = Field(4, ge=1, description="transformer blocks or LSTM layers")
    heads: int = Field(4, ge=1, description="transformer attention heads")
    min_context: int = Field(0, ge=0, description="positions with fewer labeled samples before them are left out of the loss")


class ICLClassify(Method):
    """``method=icl-classify``: in-context cross-entropy of the prompt model on classification prompts."""

    config_class = ICLClassifyConfig
    inputs = ("xs", "labels")

    @classmethod
    def build_encoder(cls, config: RunConfig) -> nn.Module:
        data, m = config.data, config.method
        if not isinstance(data, ClassificationPromptsConfig):
            raise ConfigError(f"method 'icl-classify' trains on classification prompts; set data.source=classification-prompts (got {data.source})")
        if config.encoder != EncoderConfig():
            raise ConfigError("method 'icl-classify' builds its prompt model from method.backbone / width / depth / heads; leave encoder.* at its defaults")
        if m.backbone == "transformer" and m.width % m.heads:
            raise ConfigError(f"method.width={m.width} is not divisible by method.heads={m.heads}")
        dim = data.input_size**2  # one channel: digits and Omniglot are grayscale
        return SupportQueryClassifier(dim, data.ways, data.points, m.backbone, m.width, m.depth, m.heads)

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.encoder = self.build_encoder(config)
        self.min_context = config.method.min_context
        if self.min_context >= config.data.points:
            raise ConfigError(f"method.min_context={self.min_context} leaves no position of a {config.data.points}-sample prompt in the loss")

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.encoder(batch["xs"], batch["labels"])
        loss = in_context_cross_entropy(logits, batch["labels"], self.min_context)
        last = (logits[:, -1].argmax(-1) == batch["labels"][:, -1]).float().mean()
        return loss, {"last_accuracy": float(last)}


class InContextClassifier:
    """A trained prompt model as an estimator for the episode runner (``fit`` stores the support, no step).

    Each query is classified from one prompt: the support in a seeded random order, then the query; the
    logits of the episode's ``way`` first labels decide. ``project``: multiply every input of the episode by
    one random A (A_ij ~ N(0, 1/d)), as training tasks are (a fresh task, seeded by ``seed``)."""

    def __init__(self, model: nn.Module, seed: int = 0, project: bool = True, batch_size: int = 256) -> None:
        self.model, self.seed, self.project, self.batch_size = model.eval(), seed, project, batch_size

    def fit(self, X, y) -> InContextClassifier:
        X = torch.as_tensor(np.asarray(X), dtype=torch.float32)
        y = torch.as_tensor(np.array(y), dtype=torch.long)
        rng = np.random.default_rng([self.seed, 41])
        self.way = int(y.max()) + 1
        if self.way > self.model.ways:
            raise DataError(f"a {self.way}-way episode needs a model of at least {self.way} ways; this one has {self.model.ways}")
        if len(y) + 1 > self.model.points:
            raise DataError(f"{len(y)} support samples + 1 query exceed the model's prompts of {self.model.points} samples")
        d = X.shape[1]
        self.projection = torch.from_numpy(rng.standard_normal((d, d)) / np.sqrt(d)).float() if self.project else None
        order = torch.from_numpy(rng.permutation(len(y)))
        self.support, self.support_labels = self._project(X[order]), y[order]
        self.classes_ = np.arange(self.way)
        return self

    def _project(self, X: torch.Tensor) -> torch.Tensor:
        return X if self.projection is None else X @ self.projection.T

    @torch.no_grad()
    def decision_function(self, X) -> np.ndarray:
        queries = self._project(torch.as_tensor(np.asarray(X), dtype=torch.float32))
        scores = []
        for start in range(0, len(queries), self.batch_size):
            q = queries[start : start + self.batch_size]
            xs = torch.cat([self.support.expand(len(q), -1, -1), q[:, None]], dim=1)
            labels = torch.cat([self.support_labels.expand(len(q), -1), torch.zeros(len(q), 1, dtype=torch.long)], dim=1)
            scores.append(self.model(xs, labels)[:, -1, : self.way])  # the query's label slot is never read: it is its own support token
        return torch.cat(scores).numpy()

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(1)

