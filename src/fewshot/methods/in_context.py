"""Meta-trained in-context regression (Garg et al. 2022): a model that reads (x₁, y₁, …, x_k, y_k, x_q)
and predicts y_q with no gradient step, trained on seeded linear-regression prompts (:mod:`fewshot.data.tasks`).

The prompt model is the method's ``.encoder`` (what a run keeps and ``fewshot icl evaluate`` scores):
``model(xs (B, n, d), ys (B, n)) -> (B, n)``, where prediction i is made from x_i and the pairs before
it only. Three backbones, ``method.backbone``:

* ``transformer`` — Garg et al.'s: one linear read-in of x_i and of y_i embedded as (y_i, 0, …, 0),
  tokens interleaved x₁, y₁, …, x_n, y_n, learned positions, the shared token trunk under a causal
  mask, a linear read-out of the state at each x_i. ``method.slot_embedding`` adds a learned x-slot /
  y-slot embedding to each token (not in Garg et al.: with the shared read-in a y token (y, 0, …, 0)
  differs from an x token only by its position; the CPU recipe needs it to leave the loss plateau).
  ``method.tokens: paired`` writes one token per pair instead: token i = (x_i, y_{i−1}, [i = 1]) (the
  label of the previous example beside the current input, as in Santoro et al. 2016 and Kirsch et
  al.'s GPICL), so the prompt is half as long and the state at token i predicts y_i from x_i and the
  pairs before it.
* ``lstm`` — the same read-in and read-out around an LSTM, whose hidden size is all the state it
  carries from one pair to the next (Kirsch et al. 2022); a learned x-slot / y-slot embedding tells
  the two kinds of token apart, since an LSTM has no positions.
* ``linear-attention`` — one layer of linear self-attention (von Oswald et al. 2023) on tokens
  e_j = (x_j, y_j) ∈ R^{d+1}: the query token (x_i, 0) becomes
  e_i + W_PV Σ_{j<i} e_j (e_jᵀ W_Kᵀ W_Q e_i) / i, and ŷ_i is its last (y) coordinate. With
  W_Kᵀ W_Q = [[I, 0], [0, 0]] and the y-row of W_PV = (0, …, 0, η) this is one gradient step from 0.

The curriculum (``data.curriculum_*``) is applied here, the one place that knows the step
(a buffer, so it is checkpointed and a resumed run continues it).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fewshot.config import EncoderConfig, MethodConfig, RunConfig
from fewshot.data.tasks import RegressionDataConfig, curriculum_for, truncate_prompts
from fewshot.data.types import Batch
from fewshot.errors import ConfigError
from fewshot.methods.base import Method
from fewshot.models.language import gpt2_init
from fewshot.models.transformer import TokenTrunk
from fewshot.objectives.in_context import in_context_squared_error

Backbone = Literal["transformer", "lstm", "linear-attention"]
# The sizes a backbone gets when method.width / depth / heads are null: Garg et al.'s GPT-2 (12 layers,
# 256 wide, 8 heads); a one-layer LSTM as wide; one linear self-attention layer of width d + 1 (von Oswald).
BACKBONE_SIZES: dict[str, dict[str, int]] = {
    "transformer": {"width": 256, "depth": 12, "heads": 8},
    "lstm": {"width": 256, "depth": 1},
    "linear-attention": {},
}


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """x₁, (y₁, 0, …, 0), x₂, … : xs (B, n, d) and ys (B, n) → (B, 2n, d), as Garg et al.'s ``_combine``."""
    wide = torch.cat([ys.unsqueeze(-1), torch.zeros_like(xs[..., 1:])], dim=-1)
    return torch.stack([xs, wide], dim=2).flatten(1, 2)


def pair_tokens(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(x_i, y_{i−1}, [i = 1]) for i = 1 … n: xs (B, n, d) and ys (B, n) → (B, n, d + 2); y₀ = 0 and the
    flag marks the first token, whose "previous label" is no label."""
    previous = torch.cat([torch.zeros_like(ys[:, :1]), ys[:, :-1]], dim=1)
    first = torch.zeros_like(ys)
    first[:, 0] = 1.0
    return torch.cat([xs, previous.unsqueeze(-1), first.unsqueeze(-1)], dim=-1)


def _check_prompt(xs: torch.Tensor, ys: torch.Tensor, dim: int) -> None:
    if xs.ndim != 3 or ys.shape != xs.shape[:2] or xs.shape[2] != dim:
        raise ValueError(f"expected xs (B, n, {dim}) and ys (B, n), got {tuple(xs.shape)} and {tuple(ys.shape)}")


class InterleavedRegressor(nn.Module):
    """Read-in → causal backbone over x₁, y₁, …, x_n, y_n → read-out at the x tokens: (B, n) predictions.

    ``backbone``: transformer (learned positions for ``points`` pairs + the token trunk, causal unless
    ``causal=False``, which exists to show what a leak looks like) or lstm. ``tokens="paired"``: one
    token (x_i, y_{i−1}, [i = 1]) per pair (:func:`pair_tokens`) and the read-out at every token."""

    def __init__(
        self, dim: int, points: int, backbone: str, width: int, depth: int, heads: int | None = None, causal: bool = True,
        slot_embedding: bool = False, tokens: str = "interleaved",
    ) -> None:
        super().__init__()
        if tokens not in ("interleaved", "paired"):
            raise ValueError(f"unknown token layout '{tokens}'; choose interleaved or paired")
        self.dim, self.points, self.backbone, self.tokens = dim, points, backbone, tokens
        paired = tokens == "paired"
        self.read_in = nn.Linear(dim + 2 if paired else dim, width)
        if backbone == "transformer":
            self.pos_emb = nn.Parameter(torch.zeros(1, points if paired else 2 * points, width))
            self.trunk = TokenTrunk(width, depth, heads or 1, causal=causal)
            if slot_embedding:
                self.slot_emb = nn.Parameter(torch.zeros(2, width))
        elif backbone == "lstm":
            if not paired:  # an x token and a y token (y, 0, …, 0) differ by nothing else without positions
                self.slot_emb = nn.Parameter(torch.zeros(2, width))
            self.lstm = nn.LSTM(width, width, num_layers=depth, batch_first=True)
        else:
            raise ValueError(f"unknown interleaved backbone '{backbone}'; choose transformer or lstm")
        self.read_out = nn.Linear(width, 1)
        for module in (self.read_in, self.read_out, getattr(self, "trunk", None)):
            if module is not None:
                module.apply(gpt2_init)
        for embedding in (getattr(self, "pos_emb", None), getattr(self, "slot_emb", None)):
            if embedding is not None:
                nn.init.normal_(embedding, std=0.02)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        _check_prompt(xs, ys, self.dim)
        n = xs.shape[1]
        if n > self.points:
            raise ValueError(f"a prompt of {n} pairs is {n - self.points} longer than the model's {self.points}")
        paired = self.tokens == "paired"
        h = self.read_in(pair_tokens(xs, ys) if paired else interleave(xs, ys))  # (B, n or 2n, width)
        if hasattr(self, "slot_emb"):
            h = h + self.slot_emb.repeat(n, 1)  # x, y, x, y, …
        if self.backbone == "transformer":
            h = self.trunk(h + self.pos_emb[:, : h.shape[1]])
        else:
            h, _ = self.lstm(h)
        # the state at x_i, which has seen x_i and the pairs before it
        return self.read_out(h if paired else h[:, 0::2]).squeeze(-1)


class LinearSelfAttention(nn.Module):
    """One layer of linear self-attention (von Oswald et al. 2023, eq. 7 with one head):
    query token q_i = (x_i, 0), context tokens e_j = (x_j, y_j), j < i;
    ŷ_i = [W_PV Σ_{j<i} e_j (W_K e_j)·(W_Q q_i) / i]_y (0 with no context). W_PV is P·W_V as one matrix.

    ``causal=False`` lets every query attend to every token, its own pair included (a leak, for tests)."""

    def __init__(self, dim: int, causal: bool = True) -> None:
        super().__init__()
        self.dim, self.causal = dim, causal
        self.q, self.k, self.v = (nn.Linear(dim + 1, dim + 1, bias=False) for _ in range(3))

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        _check_prompt(xs, ys, self.dim)
        n = xs.shape[1]
        tokens = torch.cat([xs, ys.unsqueeze(-1)], dim=-1)  # (B, n, d+1): e_j
        queries = torch.cat([xs, torch.zeros_like(ys).unsqueeze(-1)], dim=-1)  # (B, n, d+1): q_i
        scores = self.q(queries) @ self.k(tokens).transpose(1, 2)  # (B, n, n): (W_Q q_i)·(W_K e_j)
        if self.causal:
            scores = scores.tril(diagonal=-1)  # j < i
            count = torch.arange(n, device=xs.device).clamp(min=1).to(xs.dtype)  # i context tokens (1 when none: the sum is 0)
        else:
            count = torch.full((n,), float(n), device=xs.device, dtype=xs.dtype)
        update = scores @ self.v(tokens) / count[:, None]  # (B, n, d+1)
        return update[..., -1]  # the query's y coordinate was 0


def prompt_model(method: ICLRegressionConfig, data: RegressionDataConfig, causal: bool = True) -> nn.Module:
    """The prompt model ``method`` describes, for prompts of ``data.points`` pairs in ``data.dim`` dimensions."""
    sizes = backbone_sizes(method)
    if method.backbone == "linear-attention":
        return LinearSelfAttention(data.dim, causal)
    return InterleavedRegressor(
        data.dim, data.points, method.backbone, causal=causal, slot_embedding=method.slot_embedding, tokens=method.tokens, **sizes
    )


def backbone_sizes(method: ICLRegressionConfig) -> dict[str, int]:
    """The backbone's sizes: its defaults (:data:`BACKBONE_SIZES`) with the recipe's non-null values; a size
    the backbone does not have is an error, not silently ignored."""
    defaults = BACKBONE_SIZES[method.backbone]
    given = {k: getattr(method, k) for k in ("width", "depth", "heads") if getattr(method, k) is not None}
    foreign = sorted(set(given) - set(defaults))
    if foreign:
        raise ConfigError(
            f"method.backbone={method.backbone} has no {', '.join(foreign)} (it takes: {', '.join(defaults) or 'no sizes; its width is d + 1'}); "
            f"remove method.{foreign[0]}"
        )
    sizes = {**defaults, **given}
    if "heads" in sizes and sizes["width"] % sizes["heads"]:
        raise ConfigError(f"method.width={sizes['width']} is not divisible by method.heads={sizes['heads']}")
    return sizes


class ICLRegressionConfig(MethodConfig):
    backbone: Backbone = Field(
        "transformer", description="transformer (Garg et al. 2022), lstm (its hidden size is its state) or linear-attention "
        "(one linear self-attention layer, von Oswald et al. 2023)"
    )
    width: int | None = Field(None, ge=1, description="transformer width or LSTM hidden size; null = 256 (Garg et al.)")
    depth: int | None = Field(None, ge=1, description="transformer blocks or LSTM layers; null = 12 (Garg et al.) or 1 (LSTM)")
    heads: int | None = Field(None, ge=1, description="transformer attention heads; null = 8 (Garg et al.)")
    slot_embedding: bool = Field(
        False, description="transformer: add a learned x-slot / y-slot embedding to each token (not in Garg et al., whose y token "
        "(y, 0, …, 0) differs from an x token only by its position; the LSTM always has one)"
    )
    tokens: Literal["interleaved", "paired"] = Field(
        "interleaved", description="interleaved: x₁, (y₁, 0, …, 0), x₂, … (Garg et al.); paired: one token (x_i, y_{i−1}, [i = 1]) per pair "
        "(Santoro et al. 2016, Kirsch et al. 2022), half as many positions"
    )
    min_context: int = Field(
        0, ge=0, description="positions with fewer in-context examples are left out of the loss: 0 = every position (Garg et al.); "
        "data.points − 1 = the last query only (von Oswald et al.)"
    )


class ICLRegression(Method):
    """``method=icl-regression``: the squared error of the prompt model at every query position
    (:func:`~fewshot.objectives.in_context.in_context_squared_error`) on ``data.source=linear-regression``
    prompts, truncated by the curriculum at the current step."""

    config_class = ICLRegressionConfig
    inputs = ("xs", "ys", "ws")

    @classmethod
    def build_encoder(cls, config: RunConfig) -> nn.Module:
        if not isinstance(config.data, RegressionDataConfig):
            raise ConfigError(f"method '{config.method.name}' trains on regression prompts; set data.source=linear-regression (got {config.data.source})")
        if config.encoder != EncoderConfig():
            raise ConfigError(
                f"method '{config.method.name}' builds its prompt model from method.backbone / width / depth / heads; "
                f"leave encoder.* at its defaults (got encoder.name={config.encoder.name}, options={config.encoder.options})"
            )
        if config.method.slot_embedding and (config.method.backbone != "transformer" or config.method.tokens != "interleaved"):
            raise ConfigError(
                f"method.slot_embedding is an option of interleaved transformer tokens (method.backbone={config.method.backbone}, "
                f"method.tokens={config.method.tokens}); remove it"
            )
        if config.method.tokens == "paired" and config.method.backbone == "linear-attention":
            raise ConfigError("method.tokens is not an option of backbone=linear-attention (its tokens are (x_j, y_j) already); remove it")
        return prompt_model(config.method, config.data)

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.encoder = self.build_encoder(config)
        self.curriculum = curriculum_for(config.data)
        self.min_context = config.method.min_context
        first_points = self.curriculum.at(0)[1]
        if self.min_context >= first_points:
            raise ConfigError(
                f"method.min_context={self.min_context} leaves no position in the loss of {first_points}-point prompts; "
                f"set it below {first_points} (data.points, or data.curriculum_points at the start)"
            )
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # checkpointed: a resumed run keeps its curriculum

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        dims, points = self.curriculum.at(int(self.step))
        xs, ys = truncate_prompts(batch["xs"], batch["ys"], batch["ws"], dims, points)
        loss = in_context_squared_error(self.encoder(xs, ys), ys, self.min_context)
        return loss, {"dims": float(dims), "points": float(points)}

    def after_step(self, step: int, total_steps: int) -> None:
        self.step.fill_(step + 1)


__all__ = ["ICLRegression", "ICLRegressionConfig", "InterleavedRegressor", "LinearSelfAttention", "interleave", "pair_tokens", "prompt_model"]
