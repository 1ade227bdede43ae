"""Language-model pre-training: GPT (next token) and the masked LM (BERT), as mask(x) → (x̃, y) recipes.

Both take windows of text tokens from :class:`~fewshot.data.text.TokenSet`, corrupt or shift
them with :mod:`fewshot.data.masking`, and score cross-entropy on the targeted positions
(:func:`~fewshot.objectives.language.token_cross_entropy`). ``.encoder`` is the text tower from the
encoder registry (``encoder(tokens)`` gives r), ``.head`` the LM head before the tied decoder, and
``language_model()`` the two as one module whose forward gives logits (training, perplexity, generation).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field

from fewshot.data.types import Batch
from fewshot.config import MethodConfig, RunConfig
from fewshot.data.masking import bert_mask, causal_targets, span_mask
from fewshot.data.scratchpad import SOURCE as ARITHMETIC, ScratchpadDataConfig
from fewshot.data.token_ids import PAD_ID
from fewshot.data.tokenizer import BOS_ID, CLS_ID, MASK_ID, SPECIAL_TOKENS
from fewshot.errors import ConfigError
from fewshot.methods.base import Method
from fewshot.models.encoders import create_encoder
from fewshot.models.language import LanguageModel, TextTransformer, mlm_head, prepend
from fewshot.objectives.language import token_cross_entropy

TEXT_ENCODER = "text-transformer"
SPECIAL_IDS = tuple(range(len(SPECIAL_TOKENS)))


def build_text_tower(config: RunConfig, causal: bool) -> TextTransformer:
    """The registry's text tower sized by ``encoder.options`` {dim, depth, heads, mlp_ratio}; vocabulary and context from ``data``."""
    name = config.method.name
    if config.data.source != "text" and not (causal and config.data.source == ARITHMETIC):
        raise ConfigError(f"method '{name}' pre-trains on text; set data.source=text (got {config.data.source})")
    if config.encoder.name != TEXT_ENCODER:
        raise ConfigError(f"method '{name}' builds a {TEXT_ENCODER}; set encoder.name={TEXT_ENCODER} (got {config.encoder.name})")
    options = {k: v for k, v in config.encoder.options.items() if v is not None}
    try:
        # +1: the window plus its [BOS] / [CLS].
        return create_encoder(TEXT_ENCODER, vocab_size=config.data.vocab_size, max_len=config.data.seq_len + 1, causal=causal, **options)
    except (ConfigError, ValueError) as exc:  # an option the model does not take, or dim % heads
        raise ConfigError(f"encoder '{TEXT_ENCODER}' options {options}: {exc}") from None


class MLMConfig(MethodConfig):
    mlm_ratio: float = Field(0.15, gt=0, lt=1, description="fraction of tokens chosen for prediction (BERT: 0.15)")
    mlm_replace: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="of the chosen, fractions → [MASK], random token, unchanged (BERT 80/10/10; [0.8,0.2,0] = 80/20)"
    )
    mlm_masking: Literal["bert", "span"] = Field(
        "bert", description="bert (independent tokens, Devlin et al. 2019) or span (SpanBERT's geometric spans → [MASK], Joshi et al. 2020)"
    )


def shift_right(tokens: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row moved s_b places right, s_b uniform in 0..(its trailing [PAD] count): row'_t = row_{(t − s_b) mod T},
    so the wrapped-around padding lands in front (tokens [PAD], targets ignored)."""
    free = (tokens == PAD_ID).flip(1).long().cumprod(1).sum(1)  # trailing [PAD]s of each row
    shift = (torch.rand(len(tokens), generator=generator) * (free + 1).float()).long().clamp(max=free).to(tokens.device)
    source = (torch.arange(tokens.shape[1], device=tokens.device) - shift[:, None]) % tokens.shape[1]
    return tokens.gather(1, source), targets.gather(1, source)


class CausalLM(Method):
    """GPT (Radford et al. 2018): maximise Σ_t log p(x_t | x_<t). The window gets [BOS] first, so
    inputs [BOS], x_1..x_{L−1} predict x_1..x_L (``causal_targets``) under causal attention.

    On ``data.source=arithmetic`` the batch brings its own [BOS]-led inputs and targets (the prompt's
    positions ignored: :func:`fewshot.data.scratchpad.encode_example`), and with ``data.random_offsets``
    each row starts at a random position (:func:`shift_right`), its left padding masked out of attention."""

    inputs: tuple[str, ...] = ("tokens",)

    @classmethod
    def build_encoder(cls, config: RunConfig) -> TextTransformer:
        return build_text_tower(config, causal=True)

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.encoder = self.build_encoder(config)
        self.head = torch.nn.Identity()  # GPT's head is the tied decoder alone
        self.given_targets = isinstance(config.data, ScratchpadDataConfig)
        self.random_offsets = self.given_targets and config.data.random_offsets
        if self.given_targets:
            self.inputs = ("tokens", "targets")

    def language_model(self) -> LanguageModel:
        return LanguageModel(self.encoder, self.head)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch["tokens"]
        if self.given_targets:
            targets = batch["targets"]
            if self.random_offsets:
                tokens, targets = shift_right(tokens, targets, generator)
                return token_cross_entropy(self.language_model()(tokens, padding_mask=tokens == PAD_ID), targets), {}
            return token_cross_entropy(self.language_model()(tokens), targets), {}
        shifted = causal_targets(prepend(tokens, BOS_ID))
        return token_cross_entropy(self.language_model()(shifted.inputs), shifted.targets), {}


class MaskedLanguageModel(Method):
    """BERT's masked LM (Devlin et al. 2019): [CLS] + window; ``mlm_ratio`` of the non-special tokens
    chosen, of those ``mlm_replace`` = (→ [MASK], → random token, unchanged); predict the originals
    at the chosen positions only. ``mlm_masking=span`` masks SpanBERT spans instead (Joshi et al. 2020)."""

    inputs = ("tokens",)
    config_class = MLMConfig

    @classmethod
    def build_encoder(cls, config: RunConfig) -> TextTransformer:
        return build_text_tower(config, causal=False)

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        if any(p < 0 for p in m.mlm_replace) or not math.isclose(sum(m.mlm_replace), 1.0, abs_tol=1e-6):
            raise ConfigError(f"method.mlm_replace must be three fractions ≥ 0 that sum to 1, got {list(m.mlm_replace)}")
        self.encoder = self.build_encoder(config)
        self.head = mlm_head(self.encoder.dim)
        self.ratio, self.replace, self.masking = m.mlm_ratio, tuple(m.mlm_replace), m.mlm_masking
        self.vocab_size = config.data.vocab_size

    def mask(self, tokens: torch.Tensor, generator: torch.Generator):
        """(x̃, y, mask) for the [CLS]-prefixed windows; specials are never chosen."""
        seq = prepend(tokens, CLS_ID)
        if self.masking == "span":
            return span_mask(seq, MASK_ID, generator, self.ratio, special_ids=SPECIAL_IDS)
        return bert_mask(seq, MASK_ID, self.vocab_size, generator, self.ratio, self.replace, special_ids=SPECIAL_IDS)

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch["tokens"]
        masked = self.mask(tokens, generator)
        return token_cross_entropy(self.language_model()(masked.inputs), masked.targets), {}

    def language_model(self) -> LanguageModel:
        return LanguageModel(self.encoder, self.head)


LANGUAGE_METHODS: dict[str, Callable[[RunConfig], Method]] = {"gpt": CausalLM, "mlm": MaskedLanguageModel}
