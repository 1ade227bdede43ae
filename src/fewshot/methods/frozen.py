"""Frozen (Tsimpoukelli et al. 2021, "Multimodal Few-Shot Learning with Frozen Language Models"): an image encoder
trained from scratch, through a frozen causal LM, to caption; its output is linearly mapped to k prefix embeddings.

    prefix(x) = reshape_k(W f(x) + b),   f: the run's encoder (``encoder.name``, from scratch), W: dim(f) → k·D

with D the LM's embedding width and k = ``method.prefix_length`` = 2 (the paper's choice: an NF-ResNet-50's
pooled output mapped to 2 tokens). The loss is ClipCap's captioning cross-entropy
(:mod:`fewshot.methods.prefix_captioning`): start ids ⊕ prefix ⊕ caption ⊕ EOS, on the caption and EOS only.
Unlike ClipCap, the encoder itself learns; the LM (``method.lm.init``: a fewshot gpt run, a Hugging Face causal LM
folder or ``smollm2``) is always frozen — no gradient, eval mode (no dropout), and its weights bit-identical after
training: a run whose LM moved is refused before it is saved.

``method.image.init`` starts the encoder from another run's image tower (e.g. a clip-scenes run's conv4) and trains it
on, as the paper starts from an NF-ResNet-50 pre-trained on ImageNet; ``method.image.lock=true`` freezes it (then
only W and b learn).

``method.blind=true`` is the train-blind baseline: every training image is replaced by a blank (all-zero) one, so
the encoder learns only a constant prefix, the captions' prior.

``method.episodes`` > 0 (a departure: the paper trains on captions only) adds that many naming episodes to each batch
(:func:`~fewshot.data.vl_prompts.naming_episode`: fresh one-object images named with glossary words, never the
evaluation's, laid out exactly as the evaluation lays out a prompt, with the answer), through the same frozen LM:

    L = (Σ caption tokens' NLL + Σ episode text tokens' NLL) / (number of those tokens)

so the prefix is asked not only to say what an image shows but to make two images of one kind look alike to the
LM's match-and-copy, which is what naming in context needs and captioning never asks. ``method.episode_targets=answer``
counts only each episode's answer (the name after the query) instead of all its text. ``method.standardise_prefix``
(not the paper's either) standardises each prefix coordinate over the batch and scales it to the LM's median token
norm s / √D, so no direction is shared by every image's prefix. ``method.vocab_prefix`` (after LQAE, Liu et al. 2023;
not the paper's) draws each prefix row from the LM's own token embeddings, a softmax mixture over them by cosine
(``soft``) or the nearest one with the mixture's gradient (``hard``): the LM then reads an image as words, and two
images mapped to the same token give it the same input, which is what its match-and-copy keys on.
``method.vocab_usage`` = λ adds λ·(log V − H(ā)) (ā: the step's prefixes' mean token weights), so a hard prefix does
not collapse onto one token for every image:

    L = L_captions(+episodes) + λ · (log V − H(ā))

``method.prefix_codes`` = C > 0 (not the paper's either) makes the prefix discrete without the LM's vocabulary: the
map gives logits over C learned code embeddings per prefix position, and each image takes one code per position
(:func:`~fewshot.models.prefix_lm.code_prefix`: Gumbel-softmax with temperature ``code_temperature``,
straight-through; the most likely code at evaluation). The codes start as C random token rows of the LM and learn;
``vocab_usage`` = λ then applies the same usage term to the code probabilities p = softmax(l), and ``code_information`` = μ
adds μ·(log C − I(image; code)) (:func:`~fewshot.models.prefix_lm.code_information_gap`): codes used evenly *and* each
image's code certain, so the usage is not bought by making every image's distribution flat.

``method.word_targets`` = β (not the paper's either; needs ``vocab_prefix``) asks the prefix to be the caption's own
words: for a training caption about one object (:func:`~fewshot.data.scenes.object_words`: "a photo of a small red
circle"), prefix position 1's vocabulary weights are trained towards the token of its colour and position 2's towards
its shape (:func:`~fewshot.models.prefix_lm.word_target_loss`; a word the caption leaves unsaid gives no target):

    L = L_captions(+episodes) + β · CE(softmax_v(cos(q_j, E_v) / τ), token(word_j))

The supervision is still the captions alone, but it reaches the map directly instead of through the frozen LM's
loss, which has never sorted a discrete prefix by class here: a hard prefix then gives every image of one shape the
same token, the input the LM's in-context copy keys on.

Departures, for small data and CPUs: a conv4 encoder at 32 px (the paper: NF-ResNet-50 at 224 px), fewshot's
small caption-trained GPT as the default LM (the paper: a 7B transformer trained on C4).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fewshot.config import RunConfig
from fewshot.data.scenes import object_words
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.data.types import Batch
from fewshot.data.vl_prompts import count_images, glossary, longest_naming_pieces, naming_episode
from fewshot.errors import ConfigError
from fewshot.methods.prefix_captioning import PrefixCaptioner, open_caption_lm
from fewshot.methods.vision_language import ImageTowerConfig, NamingEpisodesConfig, image_tower
from fewshot.models.prefix_lm import code_information_gap, code_prefix, gumbel_noise, interleaved_sequence, usage_entropy_gap, vocabulary_prefix, vocabulary_weights, word_target_loss
from fewshot.objectives.captioning import caption_loss, token_weighted_mean

__all__ = ["Frozen", "FrozenConfig"]


class FrozenLM(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    init: str | None = Field(None, description="the frozen causal LM: a fewshot gpt run folder, a Hugging Face causal LM folder, or smollm2")


class FrozenConfig(NamingEpisodesConfig):
    prefix_length: int = Field(2, ge=1, description="k prefix embeddings the encoder's output is mapped to (Tsimpoukelli et al. 2021: 2)")
    blind: bool = Field(False, description="the train-blind baseline: the encoder sees only blank images")
    episode_targets: Literal["text", "answer"] = Field("text", description="what a naming episode's loss counts: all its text, or only "
                                                       "the answer after the query (the one place an image must be matched)")
    standardise_prefix: bool = Field(False, description="standardise each prefix coordinate over the batch (BatchNorm, no affine; running "
                                     "statistics at evaluation) and scale it to the LM's median token-embedding norm: no shared direction")
    vocab_prefix: Literal["off", "soft", "hard"] = Field("off", description="draw each prefix embedding from the LM's own token "
                                                         "embeddings (LQAE): a softmax mixture over them (soft), or the nearest one "
                                                         "with the mixture's gradient (hard, straight-through); off: the paper's linear map")
    vocab_temperature: float = Field(0.1, gt=0, description="τ of vocab_prefix's softmax over cosine similarities to the token embeddings")
    vocab_usage: float = Field(0.0, ge=0, description="weight λ of the codebook-usage term λ·(log V − H(mean token weights)) over a "
                               "step's prefixes: keeps a hard vocab_prefix (or prefix_codes) from collapsing onto one token")
    vocab_from: Literal["lm", "captions"] = Field("lm", description="the tokens vocab_prefix may use: the LM's whole vocabulary, or only "
                                                  "those the training captions have used so far (kept with the run)")
    prefix_codes: int = Field(0, ge=0, description="C > 0: each prefix embedding is one of C learned codes per position, picked "
                              "by Gumbel-softmax (straight-through; the likeliest at evaluation); 0: the paper's linear map")
    code_temperature: float = Field(1.0, gt=0, description="τ of prefix_codes' Gumbel-softmax")
    code_information: float = Field(0.0, ge=0, description="weight μ of μ·(log C − I(image; code)) over a step's prefix_codes "
                                    "probabilities: codes used evenly and each image's code certain (IMSAT)")
    word_targets: float = Field(0.0, ge=0, description="weight β of the cross-entropy that asks a vocab_prefix to be the "
                                "caption's colour and shape words (position 1, 2), on captions about one object (scene-grammar captions: "
                                "any other caption gives no target); 0: off")
    lm: FrozenLM = Field(default_factory=FrozenLM)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)


class Frozen(PrefixCaptioner):
    """Image encoder (trained) → linear map → k prefix embeddings → a frozen LM's caption cross-entropy."""

    config_class = FrozenConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        self.encoder = image_tower(self.build_encoder(config), config, m.image)
        self.image_locked = m.image.lock
        self.language_model = open_caption_lm(config)
        self.freeze_lm()
        self.prefix_length, self.blind = m.prefix_length, m.blind
        self.set_max_tokens(config)
        self.prefix_codes, self.code_temperature, self.code_information = m.prefix_codes, m.code_temperature, m.code_information
        if m.prefix_codes and (m.vocab_prefix != "off" or m.standardise_prefix):
            raise ConfigError("method.prefix_codes picks learned codes: it cannot be combined with method.vocab_prefix or method.standardise_prefix")
        if m.code_information and not m.prefix_codes:
            raise ConfigError("method.code_information weighs the codes' information: it needs method.prefix_codes > 0")
        if m.prefix_codes:  # logits over the codes instead of the embeddings themselves
            self.to_codes = nn.Linear(self.encoder.dim, m.prefix_length * m.prefix_codes)
            rows = self.language_model.input_rows().detach()
            picked = torch.randperm(len(rows))[: m.prefix_length * m.prefix_codes]
            self.codebook = nn.Parameter(rows[picked].clone().view(m.prefix_length, m.prefix_codes, -1))
        else:
            self.to_prefix = nn.Linear(self.encoder.dim, m.prefix_length * self.language_model.dim)
        self._generator: torch.Generator | None = None  # the step's, for the codes' Gumbel noise
        self.standardise = nn.BatchNorm1d(m.prefix_length * self.language_model.dim, affine=False) if m.standardise_prefix else None
        if self.standardise is not None:  # unit variance per coordinate × s: a prefix row of about a token embedding's norm
            rows = self.language_model.input_rows().detach()
            self.register_buffer("prefix_scale", rows.norm(dim=-1).median() / self.language_model.dim ** 0.5)
        self.vocab_prefix, self.vocab_temperature, self.vocab_usage = m.vocab_prefix, m.vocab_temperature, m.vocab_usage
        self.word_targets = m.word_targets
        if m.word_targets and m.vocab_prefix == "off":
            raise ConfigError("method.word_targets asks the prefix to be words of the LM's vocabulary: it needs method.vocab_prefix=soft or hard")
        self._usage: list[torch.Tensor] = []  # the step's token weights, for the usage term
        if m.vocab_prefix != "off":  # which token rows a prefix may be drawn from; saved, so evaluation draws from the same
            vocab = self.language_model.vocab_size
            self.register_buffer("vocab_allowed", torch.full((vocab,), m.vocab_from == "lm", dtype=torch.bool))
        self.episodes, self.episode_images, self.image_size = m.episodes, m.episode_images, config.data.image_size
        self.answers_only = m.episode_targets == "answer"
        self.names = glossary(m.glossary, config.train.seed) if m.episodes else []
        if self.episodes:
            self.check_episode_fits()
        self.train()

    def train(self, mode: bool = True) -> "Frozen":
        super().train(mode)
        if getattr(self, "image_locked", False):
            self.encoder.eval()  # a locked tower keeps its normalisation statistics too
        return self

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The k prefix embeddings (B, k, D): W f(images) + b, reshaped (``standardise_prefix``: s · BN(W f(images) + b);
        ``vocab_prefix``: each row replaced by :func:`~fewshot.models.prefix_lm.vocabulary_prefix` of it; ``prefix_codes``:
        :func:`~fewshot.models.prefix_lm.code_prefix` of the code logits, with Gumbel noise while training)."""
        if self.prefix_codes:
            logits = self.code_logits(images)
            if self.training and (self.vocab_usage or self.code_information):
                self._usage.append(logits.softmax(dim=-1))
            noise = gumbel_noise(logits.shape, self._generator) if self.training else None
            return code_prefix(logits, self.codebook, self.code_temperature, noise).to(logits.dtype)
        mapped = self.prefix_queries(images)
        if self.vocab_prefix == "off":
            return mapped
        rows = self.vocab_rows()[1]
        weights = vocabulary_weights(mapped, rows, self.vocab_temperature)
        if self.training and self.vocab_usage:
            self._usage.append(weights)
        return vocabulary_prefix(mapped, rows, self.vocab_temperature, self.vocab_prefix == "hard", weights).to(mapped.dtype)

    def prefix_queries(self, images: torch.Tensor) -> torch.Tensor:
        """(B, k, D): the mapped (and, with ``standardise_prefix``, standardised) rows, before any vocabulary step."""
        mapped = self.to_prefix(self.encoder(images))
        if self.standardise is not None:
            mapped = self.prefix_scale * self.standardise(mapped)
        return mapped.view(images.shape[0], self.prefix_length, -1)

    def code_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, k, C): ``prefix_codes``' logits of each image over each position's codes."""
        return self.to_codes(self.encoder(images)).view(images.shape[0], self.prefix_length, self.prefix_codes)

    def vocab_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids a vocabulary prefix may use and their token rows (every id before the first caption is seen)."""
        allowed = self.vocab_allowed if bool(self.vocab_allowed.any()) else torch.ones_like(self.vocab_allowed)
        return allowed.nonzero().flatten(), self.language_model.input_rows().detach()[allowed]

    def see_captions(self, tokens: torch.Tensor) -> None:
        """``vocab_from=captions``: the ids of a training batch's captions (B, T), PAD_ID aside, become usable prefix tokens."""
        if self.vocab_prefix != "off" and self.training:
            ids = tokens[tokens != PAD_ID]
            self.vocab_allowed[ids[ids < len(self.vocab_allowed)]] = True

    def training_images(self, images: torch.Tensor) -> torch.Tensor:
        """The training images, blank ones for the train-blind baseline."""
        return torch.zeros_like(images) if self.blind else images

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images = self.training_images(batch["images"])
        self.see_captions(batch["tokens"])
        self._usage.clear()
        self._generator = generator
        if not self.episodes:
            loss = self.caption_step(images, batch["tokens"])
        else:
            captions = self.caption_targets(images, batch["tokens"])
            sequences, targets = self.episode_batch(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            loss = token_weighted_mean([captions, (self.language_model.step(sequences)[0], targets)])
        logs = {}
        if self.word_targets:
            words = word_target_loss(self.prefix_queries(images), self.vocab_rows()[1], self.vocab_temperature, self.word_target_rows(batch["tokens"]))
            loss, logs["word_loss"] = loss + self.word_targets * words, float(words.detach())
        if not self._usage:
            return loss, logs
        weights = torch.cat([w.flatten(0, -3) for w in self._usage])
        self._usage.clear()
        if self.vocab_usage:
            gap = usage_entropy_gap(weights)
            loss, logs["usage_gap"] = loss + self.vocab_usage * gap, float(gap.detach())
        if self.code_information:
            information_gap = code_information_gap(weights)
            loss, logs["information_gap"] = loss + self.code_information * information_gap, float(information_gap.detach())
        return loss, logs

    def word_target_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, k): for each caption (B, T) about one object, the index among :meth:`vocab_rows` of its colour word's first
        token at prefix position 1 and its shape word's at position 2; −1 where the caption says neither, at positions
        past 2, or when the token is not a row the prefix may use."""
        ids, _ = self.vocab_rows()
        row_of = {int(i): r for r, i in enumerate(ids.tolist())}
        link = self.language_model
        targets = torch.full((tokens.shape[0], self.prefix_length), -1, dtype=torch.long, device=tokens.device)
        for n, caption in enumerate(tokens.tolist()):
            words = object_words(link.decode([i for i in caption if i != PAD_ID]))
            for j, word in enumerate((words or ())[: self.prefix_length]):
                if word is not None:
                    first = link.tokenizer.encode(f" {word}", add_special_tokens=False).ids[0]
                    targets[n, j] = row_of.get(first, -1)
        return targets

    def episode_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``method.episodes`` naming episodes of the seed, each laid out as the evaluation lays out a prompt
        (:func:`~fewshot.models.prefix_lm.interleaved_sequence`) with its answer: embeddings (E, T, D) right-padded
        with zeros and text targets (E, T) with IGNORE_INDEX at prefixes and padding (causal: padding after a
        sequence changes nothing before it)."""
        rows = []
        for j in range(self.episodes):
            episode, drawn = naming_episode(self.names, seed, j, self.image_size, self.episode_images)
            pictures = self.training_images(drawn.images[list(episode.images)].to(self.language_model.input_rows().device))
            sequence, targets = interleaved_sequence(self.language_model, self.prefix, pictures, episode.answered())
            if self.answers_only:  # the prompt is the answered sequence's beginning (the evaluation's layout): ignore it
                targets[:, : self.prompt_length(episode.pieces)] = IGNORE_INDEX
            rows.append((sequence, targets))
        length = max(sequence.shape[1] for sequence, _ in rows)
        sequences = torch.cat([nn.functional.pad(sequence, (0, 0, 0, length - sequence.shape[1])) for sequence, _ in rows])
        targets = torch.cat([nn.functional.pad(target, (0, length - target.shape[1]), value=IGNORE_INDEX) for _, target in rows])
        return sequences, targets

    def prompt_length(self, pieces: list[str] | tuple[str, ...]) -> int:
        """Positions the interleaved prompt of ``pieces`` takes (prefix rows counted, no image encoded)."""
        link = self.language_model
        blank = lambda images: torch.zeros(len(images), self.prefix_length, link.dim)  # noqa: E731  (lengths only)
        return interleaved_sequence(link, blank, torch.zeros(count_images(list(pieces)), 1), pieces)[0].shape[1]

    def check_episode_fits(self) -> None:
        """A one-line ConfigError when the longest naming episode the glossary can make does not fit the LM."""
        link = self.language_model
        tokens = lambda name: len(link.tokenizer.encode(f" {name}.", add_special_tokens=False).ids)  # noqa: E731
        need = self.prompt_length(longest_naming_pieces(self.names, self.episode_images, tokens))
        if need > link.context:
            raise ConfigError(f"a naming episode of up to {self.episode_images} images needs up to {need} positions, "
                              f"{need - link.context} more than {link.name}'s context of {link.context}: lower method.episode_images")

