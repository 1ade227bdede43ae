"""Flamingo (Alayrac et al. 2022; open_flamingo's structure) over a frozen image tower and a frozen causal LM.

Image: the encoder of ``method.image.init`` (a fewshot run folder, e.g. a ``clip-scenes`` run's conv4 tower), frozen
(no gradient, eval mode); its token features (:func:`~fewshot.models.flamingo.image_token_features`: a ViT's tokens,
a conv net's last spatial grid) feed the Perceiver Resampler. LM: ``method.lm.init``, a fewshot ``gpt`` run, a Hugging Face causal
LM folder or ``smollm2`` (:func:`~fewshot.models.causal_lm.open_causal_lm`), frozen and wrapped by :class:`~fewshot.models.flamingo.FlamingoLM` (gated cross-attention blocks before every
``cross_every``-th layer, ``<image>`` and ``<|endofchunk|>`` as new ids V and V + 1). Trained: the resampler, the
gated blocks and the two new embeddings; nothing else. A checkpoint is refused (one line) if the frozen LM or image
tower moved.

Training sequences (open_flamingo's format, no spaces around the markers): each step cuts the batch of captioned
images into consecutive groups of 1 … ``max_images`` pairs (sizes drawn with the step's generator), one sequence per
group:

    [BOS] <image>caption₁<|endofchunk|><image>caption₂<|endofchunk|> … [EOS]

([BOS] is the LM's start ids, none for GPT-2's and SmolLM2's tokenizers; [EOS] its EOS).

so single-image captioning and interleaved multi-image sequences are both trained. Loss: next-token cross-entropy
on the caption tokens, ``<|endofchunk|>`` and [EOS]; never on ``<image>`` or padding.

The paper's interleaved web pages (M3W) are where Flamingo meets text that refers to earlier images; our stand-in,
``method.episodes`` > 0, adds that many naming episodes to each batch
(:func:`~fewshot.data.vl_prompts.naming_episode`: freshly drawn one-object images named with made-up glossary words,
never the evaluation's, in the evaluation's layout with the answer), on the same text-only loss;
``method.question_episodes`` adds episodes that ask a named object's colour in a two-object scene
(:func:`~fewshot.data.vl_prompts.question_episode`, Fast-VQA's layout, glossary names; not the paper's). ``method.blind``
blanks every training image (the train-blind baseline).

Two options that are not the paper's: ``method.gate_lr_scale`` multiplies the tanh gates' learning rate (at α = 0 the
blocks behind a gate get no gradient, so on a CPU budget the gates otherwise stay near 0), and ``method.text_distill``
= δ adds δ · :func:`residual_distance` between each naming episode and the frozen LM reading the same episode with
every image replaced by its description (:func:`~fewshot.data.vl_prompts.described`): the gated blocks learn to put
the LM where the words would have put it.

The defaults are the paper's (64 latents, 6 resampler layers, 8 heads, a gated block before every LM layer as in
Flamingo-3B); the CPU recipe ``flamingo-scenes`` uses 8 latents × 2 layers of 4 heads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fewshot.config import RunConfig
from fewshot.data.token_ids import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from fewshot.data.types import Batch
from fewshot.data.vl_prompts import described, glossary, longest_naming_pieces, naming_episode, question_episode
from fewshot.errors import CheckpointError, ConfigError
from fewshot.methods.base import Method
from fewshot.methods.prefix_captioning import open_caption_lm, untie, weight_digests
from fewshot.methods.vision_language import NamingEpisodesConfig, load_image_tower
from fewshot.models.flamingo import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, FlamingoLM, image_token_features, image_token_width
from fewshot.models.prefix_lm import decode_steps, same_key_batches
from fewshot.objectives.captioning import caption_loss, token_weighted_mean

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoInContext", "TextEpisodes", "draw_group_sizes", "interleave_captions", "interleaved_labels",
           "residual_distance", "right_padded", "shared_text_positions"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FlamingoImage(_Section):
    init: str | None = Field(None, description="a fewshot run folder whose frozen image tower gives the token features")


class FlamingoLMSection(_Section):
    init: str | None = Field(None, description="the frozen causal LM: a fewshot gpt run folder, a Hugging Face causal LM folder or smollm2")


class FlamingoConfig(NamingEpisodesConfig):  # episodes: our stand-in for M3W's interleaved web pages
    latents: int = Field(64, ge=1, description="Perceiver Resampler latents per image (Flamingo: 64; the recipe: 8)")
    resampler_depth: int = Field(6, ge=1, description="Perceiver Resampler layers (Flamingo: 6; the recipe: 2)")
    resampler_heads: int = Field(8, ge=1, description="resampler heads, dividing the image features' width (open_flamingo: 8)")
    cross_every: int = Field(1, ge=1, description="a gated cross-attention block before every n-th frozen LM layer (Flamingo-3B: 1)")
    cross_heads: int = Field(8, ge=1, description="gated cross-attention heads, dividing the LM's width (open_flamingo: 8)")
    mlp_ratio: float = Field(4.0, gt=0, description="feed-forward width ÷ model width in the resampler and gated blocks")
    gate_lr_scale: float = Field(1.0, gt=0, description="the tanh gates' learning rate ÷ train.lr (not the paper's, which has 1): "
                                 "lets the gates leave 0 before the blocks behind them are trained")
    text_distill: float = Field(0.0, ge=0, description="δ > 0 (not the paper's; needs episodes): adds δ · the mean squared difference "
                                "between the layer-normalised residuals entering each gated layer on a naming episode and those of the "
                                "frozen LM reading the same episode with each image replaced by its description, over the text both share")
    question_episodes: int = Field(0, ge=0, description="Fast-VQA-layout episodes (glossary names, 2 shapes, the colour "
                                   "question) added to each batch beside the naming episodes (not the paper's; needs episodes)")
    max_images: int = Field(3, ge=1, description="each training sequence interleaves 1 … max_images captioned images")
    blind: bool = Field(False, description="the train-blind baseline: every training image (captions' and episodes') is blank")
    image: FlamingoImage = Field(default_factory=FlamingoImage)
    lm: FlamingoLMSection = Field(default_factory=FlamingoLMSection)


# ----------------------------------------------------------------------------------------------- training sequences


def draw_group_sizes(batch: int, max_images: int, generator: torch.Generator) -> list[int]:
    """Consecutive group sizes covering ``batch`` pairs, each drawn uniformly from 1 … max_images (the last cut short)."""
    sizes, left = [], batch
    for size in torch.randint(1, max_images + 1, (batch,), generator=generator).tolist():
        if not left:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def interleave_captions(captions: torch.Tensor, sizes: list[int], image_id: int, chunk_id: int, start_ids: Sequence[int] = (BOS_ID,),
                        eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions (B, L) right-padded with ``pad_id``, cut into consecutive groups of ``sizes`` → sequences (G, T)

        start ids ([BOS]) (<image> caption_i <|endofchunk|>) for i in the group, then EOS, right-padded,

    and members (G, max size): the batch row of each sequence's i-th image, −1 past its last."""
    if sum(sizes) != captions.shape[0]:
        raise ValueError(f"group sizes {sizes} do not cover {captions.shape[0]} captions")
    rows, members, first = [], [], 0
    for size in sizes:
        seq = list(start_ids)
        for r in range(first, first + size):
            seq += [image_id, *captions[r][captions[r] != pad_id].tolist(), chunk_id]
        rows.append(seq + [eos_id])
        members.append(list(range(first, first + size)) + [-1] * (max(sizes) - size))
        first += size
    return right_padded(rows, captions.device, pad_id), torch.tensor(members, dtype=torch.long, device=captions.device)


def right_padded(rows: Sequence[list[int]], device: torch.device | str = "cpu", pad_id: int = PAD_ID) -> torch.Tensor:
    """Id lists → (len(rows), longest), each right-padded with ``pad_id``."""
    return nn.utils.rnn.pad_sequence([torch.tensor(row, dtype=torch.long) for row in rows], batch_first=True, padding_value=pad_id).to(device)


def interleaved_labels(ids: torch.Tensor, image_id: int, pad_id: int = PAD_ID) -> torch.Tensor:
    """Targets of an interleaved sequence: the ids, IGNORE_INDEX at ``<image>`` markers and padding (text only)."""
    return ids.masked_fill((ids == image_id) | (ids == pad_id), IGNORE_INDEX)


def shared_text_positions(pieces: Sequence[str], spans: Sequence[tuple[int, int]],
                          text_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(interleaved position, text-only position) pairs of the text pieces both layouts share: for each text piece
    (not an ``<image>`` marker) of ``pieces``, its last k tokens in each, k the shorter span (the piece's first word
    may be one token with a leading space and another without)."""
    pairs = []
    for piece, (s0, s1), (t0, t1) in zip(pieces, spans, text_spans):
        if piece != IMAGE_TOKEN:
            k = min(s1 - s0, t1 - t0)
            pairs += zip(range(s1 - k, s1), range(t1 - k, t1))
    return pairs


def residual_distance(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], pairs: torch.Tensor) -> torch.Tensor:
    """The text-distillation term: with LN the LayerNorm without affine over the width D and P the index rows
    (student row, student position, teacher row, teacher position),

        d = (1 / (L·|P|·D)) Σ_l Σ_{(b, t, c, u) ∈ P} ‖LN(x^l_{b,t}) − LN(z^l_{c,u})‖²,

    x^l the residual entering gated layer l of the interleaved model, z^l the frozen LM's on the text."""
    b, t, c, u = pairs.unbind(1)
    terms = [(F.layer_norm(x[b, t], x.shape[-1:]) - F.layer_norm(z[c, u], z.shape[-1:])).pow(2).mean() for x, z in zip(student, teacher)]
    return torch.stack(terms).mean()


class TextEpisodes:
    """Naming episodes in text (``ids`` (E, T'), each image replaced by its description) and, per episode, the
    (interleaved position, text position) pairs of the text both share (:func:`shared_text_positions`)."""

    def __init__(self, ids: torch.Tensor, spans: list[list[tuple[int, int]]]) -> None:
        self.ids, self.spans = ids, spans

    def pairs(self) -> torch.Tensor:
        """Index rows (student row, position, text row, position), episode e being row e of both."""
        return torch.tensor([(e, s, e, t) for e, pairs in enumerate(self.spans) for s, t in pairs],
                            dtype=torch.long, device=self.ids.device)


# ----------------------------------------------------------------------------------------------- the method


class Flamingo(Method):
    """Frozen image tower → Perceiver Resampler → gated cross-attention into a frozen causal LM; loss on text tokens."""

    config_class = FlamingoConfig
    inputs = ("images", "tokens")

    @classmethod
    def caption_tokenizer(cls, config: RunConfig) -> Any:
        """The LM's tokenizer: what the run's captions are tokenized with."""
        return open_caption_lm(config).tokenizer

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        m = config.method
        if m.image.init is None:
            raise ConfigError("method 'flamingo' reads a frozen image tower: set method.image.init=RUN_DIR (e.g. a clip-scenes run)")
        self.encoder = self.build_encoder(config)
        load_image_tower(self.encoder, config, m.image.init).requires_grad_(False)
        lm = open_caption_lm(config)  # the link's model is the LM itself (fewshot's GPT or a Hugging Face one)
        self.tokenizer, self.lm_name, self.start_ids, self.eos_id = lm.tokenizer, lm.name, lm.start_ids, lm.eos_id
        self.flamingo = FlamingoLM(lm.model, image_token_width(self.encoder), m.latents, m.resampler_depth, m.resampler_heads,
                                   m.cross_every, m.cross_heads, m.mlp_ratio)
        self.max_images, self.episodes, self.episode_images, self.blind = m.max_images, m.episodes, m.episode_images, m.blind
        self.gate_lr_scale, self.text_distill = m.gate_lr_scale, m.text_distill
        if m.text_distill and not m.episodes:
            raise ConfigError("method.text_distill compares naming episodes with their text-only versions: set method.episodes > 0")
        if m.question_episodes and not m.episodes:
            raise ConfigError("method.question_episodes go beside naming episodes: set method.episodes > 0")
        self.question_episodes = m.question_episodes
        self.names = glossary(m.glossary, config.train.seed) if m.episodes else []
        self.image_size = config.data.image_size
        if self.episodes:
            need = self.longest_episode()
            if need > self.flamingo.context:
                raise ConfigError(f"a naming episode of up to {m.episode_images} images needs up to {need} positions, "
                                  f"{need - self.flamingo.context} more than {lm.name}'s context of {self.flamingo.context}: lower method.episode_images")
        seq_len = getattr(config.data, "seq_len", None)
        need = None if seq_len is None else len(lm.start_ids) + m.max_images * (seq_len + 2) + 1
        if need is not None and need > self.flamingo.context:
            raise ConfigError(f"a training sequence of {m.max_images} captioned images (start ids, then <image> + {seq_len} caption "
                              f"tokens + <|endofchunk|> each, EOS) needs up to {need} positions, {need - self.flamingo.context} more "
                              f"than {lm.name}'s context of {self.flamingo.context}: lower method.max_images")
        self._frozen = {"encoder": weight_digests(self.encoder), "flamingo.lm": weight_digests(self.flamingo.lm)}
        self._register_state_dict_hook(_refuse_moved_frozen_parts)
        self._register_state_dict_hook(untie)
        self.train()

    def train(self, mode: bool = True) -> "Flamingo":
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics stay as loaded
        return self

    def lr_scale(self, name: str) -> float:
        """``method.gate_lr_scale`` for the tanh gates (α_attn, α_ff), 1 for every other trained parameter."""
        return self.gate_lr_scale if name.endswith(("attn_gate", "ff_gate")) else 1.0

    def frozen_changes(self) -> list[str]:
        """Names of the frozen tensors (image tower, LM) that differ from what was loaded."""
        parts = {"encoder": self.encoder, "flamingo.lm": self.flamingo.lm}
        return [f"{part}.{name}" for part, module in parts.items()
                for name, digest in weight_digests(module).items() if self._frozen[part].get(name) != digest]

    # ------------------------------------------------------------------ the parts

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tower's token features (B, S, D_v) of images (B, C, H, W)."""
        with torch.no_grad():
            return image_token_features(self.encoder, images)

    def training_features(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`image_features` of the training images, of blank ones for the train-blind baseline."""
        return self.image_features(torch.zeros_like(images) if self.blind else images)

    def sequence_features(self, images: torch.Tensor) -> torch.Tensor:
        """The token features (1, N, S, D_v) of one sequence's images (N, C, H, W); N may be 0."""
        if len(images):
            return self.image_features(images)[None]
        return images.new_zeros(1, 0, 1, self.flamingo.resampler.latents.shape[1])

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        f = self.flamingo
        sizes = draw_group_sizes(batch["images"].shape[0], self.max_images, generator)
        ids, members = interleave_captions(batch["tokens"], sizes, f.image_id, f.chunk_id, self.start_ids, self.eos_id)
        features = self.training_features(batch["images"])
        grouped = features[members.clamp(min=0)] * (members >= 0)[:, :, None, None].to(features.dtype)
        counts = (members >= 0).sum(dim=1)
        logs = {"images_per_sequence": float(counts.float().mean())}
        captions = (f(ids, grouped, counts), interleaved_labels(ids, f.image_id))
        if not self.episodes:
            return caption_loss(*captions), logs
        # The episodes run as their own batch: padded to the episodes' length, the caption rows would cost 3–4 times
        # their tokens (right padding changes nothing else in a causal LM); the loss stays the mean over all text tokens.
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        episode_ids, episode_features, episode_counts, teacher = self.naming_batch(seed, grouped, with_text=bool(self.text_distill))
        logits, student = f.residuals(episode_ids, episode_features, episode_counts)
        loss = token_weighted_mean([captions, (logits, interleaved_labels(episode_ids, f.image_id))])
        logs["images_per_sequence"] = float(torch.cat([counts, episode_counts]).float().mean())
        if teacher is not None:
            with torch.no_grad():
                _, reference = f.residuals(teacher.ids)
            distill = residual_distance(student, reference, teacher.pairs())
            loss = loss + self.text_distill * distill
            logs["distill"] = float(distill.detach())
        return loss, logs

    def longest_episode(self) -> int:
        """Positions a naming episode can take at most: task induction over the three longest names, every image but
        the query followed by the longest name's support line, the query, the longest answer, ``<|endofchunk|>``, EOS."""
        length = lambda name: len(self.tokenizer.encode(f" {name}.", add_special_tokens=False).ids)  # noqa: E731
        return len(self.pieces_ids(longest_naming_pieces(self.names, self.episode_images, length))) + 2

    def naming_batch(self, seed: int, like: torch.Tensor, with_text: bool = False) -> tuple[Any, ...]:
        """``method.episodes`` naming episodes of the seed (:func:`~fewshot.data.vl_prompts.naming_episode`), each laid
        out as at evaluation (:meth:`pieces_ids`) with its answer, ``<|endofchunk|>`` and EOS, right-padded to one
        length: ids (E, T), the images' token features (E, N, S, D_v) (dtype and device of ``like``) and image
        counts (E,); and with ``with_text`` the episodes in text (:class:`TextEpisodes`: each image replaced by its
        description), else None."""
        rows, pictures, texts, spans = [], [], [], []
        for j in range(self.episodes + self.question_episodes):
            episode, images = (naming_episode(self.names, seed, j, self.image_size, self.episode_images) if j < self.episodes
                               else question_episode(self.names, seed, j, self.image_size))
            pieces = episode.answered()
            row, row_spans = self.pieces_layout(pieces)
            rows.append(row + [self.flamingo.chunk_id, self.eos_id])
            pictures.append(self.training_features(images.images[list(episode.images)].to(like.device)))
            if with_text:
                text, text_spans = self.pieces_layout(described(pieces, episode.images, images.descriptions))
                texts.append(text + [self.eos_id])
                spans.append(shared_text_positions(pieces, row_spans, text_spans))
        ids = right_padded(rows, like.device)
        features = like.new_zeros(len(rows), max(map(len, pictures)), *pictures[0].shape[1:])
        for r, row_features in enumerate(pictures):
            features[r, : len(row_features)] = row_features
        counts = torch.tensor([len(p) for p in pictures], device=like.device)
        return ids, features, counts, TextEpisodes(right_padded(texts, like.device), spans) if with_text else None

    # ------------------------------------------------------------------ in-context use

    def encode_prompt(self, text: str) -> list[int]:
        """The LM's start ids ([BOS]) then its ids of ``text``, with ``<image>`` and ``<|endofchunk|>`` as their new ids."""
        ids = list(self.start_ids)
        for piece in re.split(f"({re.escape(IMAGE_TOKEN)}|{re.escape(END_OF_CHUNK_TOKEN)})", text):
            if piece == IMAGE_TOKEN:
                ids.append(self.flamingo.image_id)
            elif piece == END_OF_CHUNK_TOKEN:
                ids.append(self.flamingo.chunk_id)
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def pieces_ids(self, pieces: Sequence[str]) -> list[int]:
        """Ids of a prompt of text pieces and ``<image>`` markers, laid out as in training: start ids, each marker as
        ``<image>``, a text piece right after a marker with no leading space (as a caption after ``<image>``), any
        other text piece after a space, and ``<|endofchunk|>`` closing each text piece that a marker follows."""
        return self.pieces_layout(pieces)[0]

    def pieces_layout(self, pieces: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`pieces_ids` and each piece's span [start, end) of positions in them."""
        f, ids, spans = self.flamingo, list(self.start_ids), []
        for j, piece in enumerate(pieces):
            if piece == IMAGE_TOKEN:
                if j and pieces[j - 1] != IMAGE_TOKEN:
                    ids.append(f.chunk_id)
                ids.append(f.image_id)
                spans.append((len(ids) - 1, len(ids)))
            else:
                text = piece if j == 0 or pieces[j - 1] == IMAGE_TOKEN else " " + piece
                start = len(ids)
                ids += self.tokenizer.encode(text, add_special_tokens=False).ids
                spans.append((start, len(ids)))
        return ids, spans

    @torch.no_grad()
    def next_token_logits(self, images: torch.Tensor, prompt_ids: list[int]) -> torch.Tensor:
        """Logits (V + 2,) of the token after an interleaved prompt whose ``<image>`` markers are ``images`` (N, C, H, W)."""
        features = self.sequence_features(images)
        return self.flamingo(torch.tensor([prompt_ids], device=images.device), features)[0, -1]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: list[int], max_tokens: int, use_cache: bool = True,
                 stops: Sequence[str] = ()) -> list[int]:
        """Greedy continuation (ids) of an interleaved prompt whose ``<image>`` markers are ``images`` (N, C, H, W), in
        order; stops before [EOS] or ``<|endofchunk|>``, after a token whose text completes one of ``stops``, or after
        ``max_tokens``; ``<image>`` is never generated. ``use_cache=False`` recomputes the whole sequence at each step
        instead (the same ids)."""
        return self.generate_rows(images[None], [prompt_ids], max_tokens, use_cache, stops)[0]

    @torch.no_grad()
    def generate_rows(self, images: torch.Tensor, prompt_ids: Sequence[list[int]], max_tokens: int, use_cache: bool = True,
                      stops: Sequence[str] = ()) -> list[list[int]]:
        """:meth:`generate` for B prompts of one length at once: ``images`` (B, N, C, H, W), ``prompt_ids`` B lists of
        T ids each (no padding, so each row computes what it would alone)."""
        f = self.flamingo
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be ≥ 1, got {max_tokens}")
        if len({len(p) for p in prompt_ids}) != 1 or len(prompt_ids) != images.shape[0]:
            raise ValueError(f"generate_rows takes prompts of one length, one per row of images; got lengths {sorted({len(p) for p in prompt_ids})}")
        need = len(prompt_ids[0]) + max_tokens - 1
        if need > f.context:
            raise ConfigError(f"an interleaved sequence of {need} positions (prompt and answer) is {need - f.context} longer "
                              f"than {self.lm_name}'s context of {f.context}")
        was = self.training
        self.eval()
        b, n = images.shape[:2]
        features = self.image_features(images.flatten(0, 1)).unflatten(0, (b, n)) if n else self.sequence_features(images[0]).expand(b, -1, -1, -1)
        ids = torch.tensor(list(prompt_ids), device=images.device)
        f.check_markers(ids, torch.full((b,), n, dtype=torch.long, device=ids.device))
        state: list[Any] = [f.start(features)]

        def next_logits(tokens: torch.Tensor) -> torch.Tensor:
            if not tokens.shape[1]:
                logits, state[0] = f.step(ids, state[0], last_only=use_cache)
            elif use_cache:
                logits, state[0] = f.step(tokens[:, -1:], state[0])
            else:
                logits = f(torch.cat([ids, tokens], dim=1), features)
            return logits[:, -1]

        def no_image(logits: torch.Tensor) -> torch.Tensor:
            return logits.index_fill(1, torch.tensor([f.image_id], device=logits.device), float("-inf")).argmax(dim=-1)

        ends = (lambda row: any(s in self.tokenizer.decode(row, skip_special_tokens=True) for s in stops)) if stops else None
        out = decode_steps(next_logits, b, max_tokens, self.eos_id, no_image, images.device, stop_ids=[f.chunk_id], ends=ends)
        self.train(was)
        return out

    def generate_text(self, images: torch.Tensor, prompt: str, max_tokens: int) -> str:
        """Greedy text after ``prompt`` (``<image>`` marks where each of ``images`` (N, C, H, W) goes)."""
        return self.tokenizer.decode(self.generate(images, self.encode_prompt(prompt), max_tokens), skip_special_tokens=True).strip()

    @property
    def text_tokenizer(self) -> Any:
        return self.tokenizer


class FlamingoInContext:
    """A Flamingo method as the in-context protocol's model (``fewshot icl vl-eval``): ``next_text(images, pieces,
    max_tokens)`` continues a prompt of text pieces and ``<image>`` markers, one image (C, H, W) in [0, 1] per marker.

    The prompt is laid out as in training: [BOS], each marker as ``<image>``, a text piece right after a marker with no
    leading space (as a caption after ``<image>``), any other text piece after a space, and ``<|endofchunk|>`` closing
    each text piece that a marker follows. Greedy decoding stops at [EOS], ``<|endofchunk|>`` or once the text holds a
    ``.``, ``?`` or newline."""

    stops = (".", "?", "\n")
    image_size = 32  # what its tower reads; a run's own size when opened from a run

    def __init__(self, method: Flamingo, name: str, use_cache: bool = True) -> None:
        self.method, self.name, self.use_cache = method.eval(), name, use_cache
        self.context = method.flamingo.context

    def single_token(self, word: str) -> bool:
        return len(self.method.tokenizer.encode(" " + word, add_special_tokens=False).ids) == 1

    def check_fits(self, length: int, max_tokens: int) -> None:
        need = length + max_tokens - 1  # the last generated token is never fed back
        if need > self.context:
            raise ConfigError(f"the interleaved prompt needs {need} positions ({length} prompt + {max_tokens - 1} generated) but "
                              f"{self.method.lm_name} holds {self.context}: {need - self.context} too many; use fewer shots or repeats")

    def prompt_ids(self, pieces: Sequence[str]) -> list[int]:
        return self.method.pieces_ids(pieces)

    @torch.no_grad()
    def next_text(self, images: Sequence[torch.Tensor], pieces: Sequence[str], max_tokens: int) -> str:
        return self.next_texts([(images, pieces)], max_tokens)[0]

    @torch.no_grad()
    def next_texts(self, prompts: Sequence[tuple[Sequence[torch.Tensor], Sequence[str]]], max_tokens: int, batch: int = 32) -> list[str]:
        """:meth:`next_text` of each (images, pieces), prompts of one length and image count run ``batch`` at a time: the LM's weights are read once a step for them all (a step of one row is memory-bound on a CPU)."""
        ids = [self.prompt_ids(pieces) for _, pieces in prompts]
        for row in ids:
            self.check_fits(len(row), max_tokens)
        texts = [""] * len(prompts)
        for rows in same_key_batches([(len(row), len(images)) for row, (images, _) in zip(ids, prompts)], batch):
            shown = [list(prompts[r][0]) for r in rows]
            stacked = (torch.stack([torch.stack(images) for images in shown]) if shown[0] else
                       torch.zeros(len(rows), 0, 3, self.image_size, self.image_size))
            outs = self.method.generate_rows(stacked, [ids[r] for r in rows], max_tokens, self.use_cache, self.stops)
            for r, out in zip(rows, outs):
                texts[r] = self.method.tokenizer.decode(out, skip_special_tokens=True)
        return texts


def _refuse_moved_frozen_parts(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
    """Every checkpoint goes through ``state_dict``: refuse it when a frozen tensor moved (the weights are not Flamingo's)."""
    changed = module.frozen_changes()
    if changed:
        raise CheckpointError(f"refusing to save: {len(changed)} frozen tensor(s) changed in training (first: {changed[0]}); "
                              "Flamingo's image tower and language model must stay bit-identical")

