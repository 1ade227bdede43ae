"""The link into a causal LM: prefix embeddings (B, k, D) + token ids → next-token logits, with a KV cache.

What captioning through a language model needs (ClipCap, Mokady et al. 2021; BLIP-2's stage 2; FROMAGe):
the sequence an image is captioned with is

    start ids ⊕ prefix (k embeddings from a mapper) ⊕ caption tokens ⊕ EOS

fed to the LM as input embeddings. :class:`PrefixLM` is the one interface, two kinds implement it:

:class:`GPTPrefixLM`
    fewshot's GPT (a ``gpt`` run: the text tower and its tied decoder) with the run's BPE tokenizer;
    [BOS] starts every sequence, as in its training windows; [EOS] is the tokenizer's fixed id 3.
:class:`HFPrefixLM`
    any Hugging Face causal LM (a local folder, or SmolLM2-135M-Instruct's hash-checked GGUF through
    :mod:`fewshot.models.causal_lm`), fed through ``inputs_embeds``; its tokenizer's own start specials
    begin the sequence and its ``eos_token_id`` ends a caption (a tokenizer without one is refused).

``hidden(embeds)`` gives the last layer's states (after the final norm) instead of logits: what FROMAGe's [RET]
token is read from. ``step(embeds, past) -> (logits, past)`` continues the cache ``past`` (a list over layers of (keys,
values), each (B, heads, T, head_dim)) by the embeddings ``embeds`` (B, T, D); decoding feeds one
token's embedding per step. Decoders (all stop a row at EOS, which is not returned):
:func:`greedy`, :func:`beam_search` and :func:`nucleus` (top-p sampling, Holtzman et al. 2020);
``use_cache=False`` recomputes the whole sequence at every step instead (the two give the same tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data.token_ids import BOS_ID, EOS_ID, IGNORE_INDEX, SPECIAL_TOKENS
from fewshot.data.vl_prompts import IMAGE, count_images
from fewshot.errors import ConfigError, DataError
from fewshot.models.causal_lm import GPTPromptLM, HFCausalLM, open_causal_lm
from fewshot.models.language import LanguageModel

__all__ = ["GPTPrefixLM", "HFPrefixLM", "Past", "PrefixLM", "beam_search", "check_image_count", "code_information_gap", "code_prefix", "decode_steps", "gumbel_noise", "greedy", "greedy_choice",
           "interleaved_sequence", "nucleus", "nucleus_choice", "open_prefix_lm", "same_key_batches", "top_p_filter", "usage_entropy_gap", "vocabulary_logits", "vocabulary_prefix", "vocabulary_weights", "word_target_loss"]

Past = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixLM(nn.Module):
    """Input embeddings → logits over a causal LM. ``model`` is the LM (what a frozen link freezes);
    ``dim`` its embedding width D, ``vocab_size`` its embedding rows, ``context`` the positions it holds, ``start_ids``
    what begins every sequence, ``eos_id`` what ends a caption, ``tokenizer`` a ``tokenizers.Tokenizer`` for its ids."""

    model: nn.Module
    dim: int
    vocab_size: int
    context: int
    start_ids: list[int]
    eos_id: int
    tokenizer: Any
    name: str

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM's token embeddings of ``ids`` (B, T) → (B, T, D)."""
        raise NotImplementedError

    def step(self, embeds: torch.Tensor, past: Past | None = None, last_only: bool = False) -> tuple[torch.Tensor, Past]:
        """Logits (B, T, vocab) at the positions of ``embeds`` (B, T, D), placed after the cached ``past``;
        and the cache extended by them. ``last_only``: logits (B, 1, vocab) at the last position only (a prompt's
        prefill; the head, vocab × D a position, is a fifth of SmolLM2's cost a token)."""
        raise NotImplementedError

    def output_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """f(h): the states :meth:`hidden` returns, made ready for the output rows, so that
        logits = f(h) @ :meth:`output_rows`ᵀ (what a new vocabulary row, such as FROMAGe's [RET], is scored by)."""
        raise NotImplementedError

    def output_rows(self) -> torch.Tensor:
        """The output embedding (vocab, D): logits = :meth:`output_features` (h) @ its transpose."""
        raise NotImplementedError

    def input_rows(self) -> torch.Tensor:
        """The input token embedding table (vocab, D): :meth:`embed` of id i is its row i."""
        raise NotImplementedError

    def check_fits(self, prefix_length: int, tokens: int) -> None:
        """A one-line error unless start ids + ``prefix_length`` + ``tokens`` positions fit the context."""
        need = len(self.start_ids) + prefix_length + tokens
        if need > self.context:
            raise ConfigError(f"a prefix of {prefix_length} embeddings, {len(self.start_ids)} start id(s) and {tokens} caption "
                              f"positions need {need} positions, more than {self.name}'s context of {self.context}")

    def prefix_sequence(self, prefix: torch.Tensor) -> torch.Tensor:
        """start ids' embeddings ⊕ ``prefix`` (B, k, D) → (B, s + k, D)."""
        b = prefix.shape[0]
        if prefix.ndim != 3 or prefix.shape[2] != self.dim:
            raise ConfigError(f"a prefix must be (batch, k, {self.dim}) for {self.name}, got {tuple(prefix.shape)}")
        if not self.start_ids:
            return prefix
        start = torch.tensor([self.start_ids], dtype=torch.long, device=prefix.device)
        return torch.cat([self.embed(start).expand(b, -1, -1).to(prefix.dtype), prefix], dim=1)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class GPTPrefixLM(PrefixLM):
    """fewshot's GPT (:class:`~fewshot.models.language.LanguageModel`, causal) with its run's BPE tokenizer."""

    def __init__(self, model: LanguageModel, tokenizer: Any, name: str) -> None:
        super().__init__()
        if not getattr(model, "causal", False):
            raise ConfigError(f"{name} is not a causal language model; captioning needs a gpt run")
        if tokenizer.token_to_id(SPECIAL_TOKENS[EOS_ID]) != EOS_ID:
            raise ConfigError(f"{name}'s tokenizer has no {SPECIAL_TOKENS[EOS_ID]} at id {EOS_ID}: a caption needs an end token")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.dim, self.context = model.encoder.dim, int(model.max_len)
        self.vocab_size = model.encoder.tok_emb.num_embeddings
        self.start_ids, self.eos_id = [BOS_ID], EOS_ID

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.tok_emb(ids)

    def step(self, embeds: torch.Tensor, past: Past | None = None, last_only: bool = False) -> tuple[torch.Tensor, Past]:
        start = 0 if past is None else past[0][0].shape[2]
        if start + embeds.shape[1] > self.context:
            raise ConfigError(f"{start + embeds.shape[1]} positions exceed {self.name}'s context of {self.context}")
        no_tokens = torch.empty(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
        hidden, kv = self.model.encoder.hidden(no_tokens, prefix=embeds, past=past, return_kv=True)
        return self.model.logits(hidden[:, -1:] if last_only else hidden), list(kv)

    def hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.shape[1] > self.context:
            raise ConfigError(f"{embeds.shape[1]} positions exceed {self.name}'s context of {self.context}")
        no_tokens = torch.empty(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
        return self.model.encoder.hidden(no_tokens, prefix=embeds)

    def output_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden)  # the head (final norm) before the tied decoder Eᵀ

    def output_rows(self) -> torch.Tensor:
        return self.model.encoder.tok_emb.weight

    def input_rows(self) -> torch.Tensor:
        return self.model.encoder.tok_emb.weight


class HFPrefixLM(PrefixLM):
    """A ``transformers`` causal LM fed through ``inputs_embeds`` (float32), its tokenizer's EOS ending captions."""

    def __init__(self, lm: HFCausalLM) -> None:
        super().__init__()
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ConfigError(f"{lm.name}'s tokenizer has no EOS token: a caption needs an end token")
        from fewshot.models.hf_text import word_pieces

        self.model, self.name = lm.model, lm.name
        self.tokenizer = word_pieces(lm.tokenizer)
        self.dim = int(lm.model.get_input_embeddings().weight.shape[1])
        self.vocab_size = int(lm.model.get_input_embeddings().weight.shape[0])
        self.context, self.start_ids, self.eos_id = lm.context, list(lm.start_ids), int(eos)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def step(self, embeds: torch.Tensor, past: Past | None = None, last_only: bool = False) -> tuple[torch.Tensor, Past]:
        from transformers import DynamicCache

        start = 0 if past is None else past[0][0].shape[2]
        if start + embeds.shape[1] > self.context:
            raise ConfigError(f"{start + embeds.shape[1]} positions exceed {self.name}'s context of {self.context}")
        cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
        logits = self.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=int(last_only)).logits
        return logits.float(), [(layer.keys, layer.values) for layer in cache.layers]

    def hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.shape[1] > self.context:
            raise ConfigError(f"{embeds.shape[1]} positions exceed {self.name}'s context of {self.context}")
        return self.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1].float()

    def output_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # transformers' last hidden state already went through the final norm

    def output_rows(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.float()

    def input_rows(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.float()


def vocabulary_logits(queries: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(q, E_v) / τ (…, V): each query q (…, D) against each token row E_v (V, D)."""
    return F.normalize(queries, dim=-1) @ F.normalize(rows, dim=-1).T / temperature


def vocabulary_weights(queries: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """a = softmax_v(cos(q, E_v) / τ) (…, V): how much of each token row E_v (V, D) a query q (…, D) takes."""
    return vocabulary_logits(queries, rows, temperature).softmax(dim=-1)


def vocabulary_prefix(queries: torch.Tensor, rows: torch.Tensor, temperature: float, hard: bool = False,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Prefix embeddings drawn from an LM's own token embeddings (after LQAE, Liu et al. 2023, which quantises image
    features to a frozen LM's vocabulary so that the LM reads images as words). For each query q (…, D) and the
    token table E (V, D), with a = :func:`vocabulary_weights` (``weights`` when already computed):

        soft(q) = Σ_v a_v E_v
        hard(q) = E_{argmax_v a_v} + soft(q) − sg(soft(q))     (straight-through: the value of the nearest token by
                                                                 cosine, the gradient of the soft mixture)

    so a prefix is a token embedding (``hard``) or a convex mixture of them (soft), never a vector off the LM's
    vocabulary; two images mapped to one token give the LM the very same input, as one word written twice does."""
    weights = vocabulary_weights(queries, rows, temperature) if weights is None else weights
    soft = weights @ rows
    if not hard:
        return soft
    return rows[weights.argmax(dim=-1)] + (soft - soft.detach())  # exactly the row: the added term is 0


def gumbel_noise(shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """g = −log(−log u), u ~ U(0, 1) elementwise (drawn from ``generator``): argmax(l + g) is a draw from softmax(l)."""
    u = torch.rand(tuple(shape), generator=generator).clamp(1e-10, 1 - 1e-7)  # both logs finite
    return -(-u.log()).log()


def code_prefix(logits: torch.Tensor, codebook: torch.Tensor, temperature: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Prefix embeddings picked from a learned codebook, one code per prefix position (a discrete bottleneck trained by
    the Gumbel-softmax straight-through estimator, Jang et al. 2017; DALL·E's dVAE trains its image codes so). For the
    logits l (…, k, C) of k positions over C codes, the codebook B (k, C, D) and Gumbel noise g (none at evaluation):

        a = softmax((l + g) / τ)                  over the C codes of each position
        prefix_j = B_{j, argmax_c a_c} + Σ_c a_c B_{j,c} − sg(Σ_c a_c B_{j,c})

    so the value is exactly one code's embedding (images given one code give the LM the very same input, as one word
    written twice does) and the gradient is the soft mixture's. Unlike :func:`vocabulary_prefix`, the C embeddings are
    free parameters, not the LM's token rows."""
    scores = logits if noise is None else logits + noise.to(logits.device, logits.dtype)
    weights = (scores / temperature).softmax(dim=-1)
    soft = torch.einsum("...kc,kcd->...kd", weights, codebook)
    picked = scores.argmax(dim=-1)  # (…, k)
    hard = codebook[torch.arange(codebook.shape[0], device=picked.device), picked]
    return hard + (soft - soft.detach())


def usage_entropy_gap(weights: torch.Tensor) -> torch.Tensor:
    """log V − H(ā), ā = the mean of the token weights ``weights`` (N, k, V) over the N prefixes, per prefix position,
    H in nats, averaged over the k positions: 0 when the prefixes use every token equally often, log V when all of
    them take one token. The usual remedy for a quantiser that collapses onto one code (a codebook-usage term)."""
    mean = weights.mean(dim=0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=-1)
    return (math.log(weights.shape[-1]) - entropy).mean()


def code_information_gap(probs: torch.Tensor) -> torch.Tensor:
    """log C − I(x; c) for code probabilities p(c | x_n) = ``probs`` (N, k, C), per prefix position, averaged over the k:

        I(x; c) = H(p̄) − (1/N) Σ_n H(p(· | x_n)),   p̄ = (1/N) Σ_n p(· | x_n)

    the mutual information between an image and its code (Krause et al. 2010; IMSAT, Hu et al. 2017). 0 when the codes
    are used equally often and each image's code is certain; unlike :func:`usage_entropy_gap` (log C − H(p̄) alone), it is
    not lowered by making every image's distribution flat, which spreads the codes without assigning any."""
    per_image = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean(dim=0)
    return usage_entropy_gap(probs) + per_image.mean()


def word_target_loss(queries: torch.Tensor, rows: torch.Tensor, temperature: float, targets: torch.Tensor) -> torch.Tensor:
    """The prefix asked to *be* given words of the LM's vocabulary: for queries q (N, k, D), token rows E (V, D) and
    target rows t (N, k), −1 where a position has no target,

        L = (1/|T|) Σ_{(n, j) ∈ T} −log softmax_v(cos(q_nj, E_v) / τ)[t_nj],   T = {(n, j): t_nj ≥ 0}

    the cross-entropy of :func:`vocabulary_weights` against the words, so the hard prefix (the row of highest weight)
    becomes the very token of each word; 0 (with a gradient of zeros) when no position has a target."""
    logits = vocabulary_logits(queries, rows, temperature)
    kept = targets >= 0
    if not bool(kept.any()):
        return logits.sum() * 0
    return F.cross_entropy(logits[kept], targets[kept])


def check_image_count(images: Sequence[torch.Tensor] | torch.Tensor, pieces: Sequence[str]) -> None:
    """A one-line DataError unless there is one image per :data:`~fewshot.data.vl_prompts.IMAGE` marker."""
    slots = count_images(list(pieces))
    if len(images) != slots:
        raise DataError(f"the prompt has {slots} image slot(s) ({IMAGE}) but {len(images)} image(s) were given")


def interleaved_sequence(link: PrefixLM, prefix: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor] | torch.Tensor,
                         pieces: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """An interleaved prompt as one embedding sequence (1, T, D) and its text targets (1, T): the start ids, then per
    piece either the next image's k prefix embeddings ``prefix(images)`` (k, D) or the piece's token embeddings (a
    space before every piece but the first, as the words of a caption corpus). Targets are the text pieces' ids and
    IGNORE_INDEX at the start ids and at every prefix position, so a loss counts text only (what Frozen is
    evaluated on, and what its naming episodes train)."""
    check_image_count(images, pieces)
    prefixes = prefix(images if isinstance(images, torch.Tensor) else torch.stack(list(images))) if len(images) else None
    device = next(link.parameters()).device
    parts = [link.embed(torch.tensor([link.start_ids], dtype=torch.long, device=device))[0]] if link.start_ids else []
    targets = [IGNORE_INDEX] * len(link.start_ids)
    next_image = 0
    for j, piece in enumerate(pieces):
        if piece == IMAGE:
            parts.append(prefixes[next_image].to(parts[0].dtype if parts else prefixes.dtype))
            targets += [IGNORE_INDEX] * prefixes.shape[1]
            next_image += 1
        else:
            ids = link.tokenizer.encode(piece if j == 0 else " " + piece, add_special_tokens=False).ids
            parts.append(link.embed(torch.tensor([ids], dtype=torch.long, device=device))[0])
            targets += ids
    sequence = torch.cat(parts, dim=0)[None]
    return sequence, torch.tensor([targets], dtype=torch.long, device=sequence.device)


def open_prefix_lm(spec: str | Path) -> PrefixLM:
    """The language model ``spec`` names (:func:`~fewshot.models.causal_lm.open_causal_lm`: ``smollm2``, a Hugging Face
    causal LM folder, or a fewshot gpt run) as a :class:`PrefixLM` in eval mode."""
    lm = open_causal_lm(spec)
    if isinstance(lm, GPTPromptLM):
        return GPTPrefixLM(lm.model, lm.tokenizer, lm.name).eval()
    return HFPrefixLM(lm).eval()


# ----------------------------------------------------------------------------------------------- decoding


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020) of logits (B, V): keep the smallest set of the most probable
    tokens whose probabilities sum to ≥ ``top_p`` (always the most probable one), −inf elsewhere."""
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    ordered, order = logits.float().sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the more probable tokens
    ordered = ordered.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(ordered, float("-inf")).scatter(-1, order, ordered)


def _check_length(link: PrefixLM, prefix: torch.Tensor, max_tokens: int) -> None:
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be ≥ 1, got {max_tokens}")
    link.check_fits(prefix.shape[1], max_tokens - 1)  # the last token is chosen, never fed


def decode_steps(next_logits: Callable[[torch.Tensor], torch.Tensor], batch: int, max_tokens: int, eos_id: int,
                 choose: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu", stop_ids: Sequence[int] = (),
                 ends: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """The one token-by-token decoding loop: ``next_logits(tokens (B, t)) → (B, V)`` scores the next token after each
    row's t tokens so far (t = 0 first), ``choose(logits) → (B,)`` picks it, until every row has finished or
    ``max_tokens`` are chosen. A row finishes on ``eos_id`` or any of ``stop_ids`` (cut before it), or once
    ``ends(row so far)`` holds (kept up to that token: a text stop such as a full stop). A finished row keeps being
    fed whatever it chose; nothing of it after its end is returned."""
    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    stops = {eos_id, *stop_ids}
    kept: list[list[int] | None] = [None] * batch  # a finished row's tokens
    for _ in range(max_tokens):
        chosen = choose(next_logits(tokens))
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        for r, token in enumerate(chosen.tolist()):
            if kept[r] is None and token in stops:
                kept[r] = tokens[r, :-1].tolist()
            elif kept[r] is None and ends is not None and ends(row := tokens[r].tolist()):
                kept[r] = row
        if all(k is not None for k in kept):
            break
    return [tokens[r].tolist() if k is None else k for r, k in enumerate(kept)]


def same_key_batches(keys: Sequence[Any], size: int) -> list[list[int]]:
    """Indices of ``keys`` in batches of at most ``size`` whose items share one key (e.g. prompts of one length and
    image count, which stack with no padding, so each row computes what it would alone), in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [rows[j : j + size] for rows in groups.values() for j in range(0, len(rows), size)]


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of logits (B, V)."""
    return logits.argmax(dim=-1)


def nucleus_choice(top_p: float, temperature: float = 1.0, generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A draw from softmax(logits / temperature) restricted to the top-p nucleus (:func:`top_p_filter`), with ``generator``."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 for sampling, got {temperature} (greedy decoding is temperature 0)")

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)

    return draw


def _decode(link: PrefixLM, prefix: torch.Tensor, max_tokens: int, choose: Callable[[torch.Tensor], torch.Tensor],
            use_cache: bool) -> list[list[int]]:
    """:func:`decode_steps` through the link after start ids ⊕ ``prefix``: with the KV cache, each new token fed alone;
    without, the whole sequence recomputed at every step."""
    _check_length(link, prefix, max_tokens)
    start = link.prefix_sequence(prefix)
    past: list[Past] = []

    def next_logits(tokens: torch.Tensor) -> torch.Tensor:
        if not tokens.shape[1]:
            logits, cache = link.step(start)
        elif use_cache:
            logits, cache = link.step(link.embed(tokens[:, -1:]), past[0])
        else:
            logits, cache = link.step(torch.cat([start, link.embed(tokens)], dim=1))
        past[:] = [cache]
        return logits[:, -1]

    return decode_steps(next_logits, prefix.shape[0], max_tokens, link.eos_id, choose, prefix.device)


@torch.no_grad()
def greedy(link: PrefixLM, prefix: torch.Tensor, max_tokens: int, use_cache: bool = True) -> list[list[int]]:
    """The most probable next token at every step until EOS or ``max_tokens``, for each prefix (B, k, D)."""
    return _decode(link, prefix, max_tokens, greedy_choice, use_cache)


@torch.no_grad()
def nucleus(link: PrefixLM, prefix: torch.Tensor, max_tokens: int, top_p: float = 0.9, temperature: float = 1.0,
            generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """Nucleus sampling (Holtzman et al. 2020): each token drawn from softmax(logits / temperature) restricted
    to the top-p nucleus (:func:`top_p_filter`), with ``generator``, until EOS or ``max_tokens``."""
    return _decode(link, prefix, max_tokens, nucleus_choice(top_p, temperature, generator), use_cache)


def _reorder(past: Past, rows: torch.Tensor) -> Past:
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in past]


@torch.no_grad()
def beam_search(link: PrefixLM, prefix: torch.Tensor, max_tokens: int, beams: int = 5, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search for each prefix (B, k, D): keep the ``beams`` best unfinished sequences by summed log-probability;
    a candidate ending in EOS among the best ``beams`` of a step is finished, scored by

        score(y) = Σ_t log p(y_t | prefix, y_<t) / |y|^length_penalty     (|y| counts the EOS)

    and the search of a row stops when ``beams`` sequences are finished or ``max_tokens`` are generated (then the
    unfinished beams compete too, |y| their length). Width 1 is greedy decoding."""
    if beams < 1:
        raise ConfigError(f"beams must be ≥ 1, got {beams}")
    _check_length(link, prefix, max_tokens)
    results = []
    for row in prefix:
        logits, past = link.step(link.prefix_sequence(row[None]))
        logp = logits[:, -1].float().log_softmax(dim=-1)
        vocab = logp.shape[-1]
        seqs: list[list[int]] = [[]]
        scores = torch.zeros(1, device=prefix.device)
        finished: list[tuple[float, list[int]]] = []
        while True:
            top = (scores[:, None] + logp).flatten().topk(min(2 * beams, logp.numel()))
            kept: list[tuple[int, int, float]] = []
            for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                beam, token = divmod(index, vocab)
                if token == link.eos_id:
                    if rank < beams:
                        finished.append((score / (len(seqs[beam]) + 1) ** length_penalty, seqs[beam]))
                elif len(kept) < beams:
                    kept.append((beam, token, score))
            seqs = [seqs[b] + [t] for b, t, _ in kept]
            scores = torch.tensor([s for _, _, s in kept], device=prefix.device)
            if len(finished) >= beams or not kept or len(seqs[0]) >= max_tokens:
                break
            past = _reorder(past, torch.tensor([b for b, _, _ in kept], device=prefix.device))
            logits, past = link.step(link.embed(torch.tensor([[t] for _, t, _ in kept], device=prefix.device)), past)
            logp = logits[:, -1].float().log_softmax(dim=-1)
        if len(finished) < beams:
            finished += [(s / len(q) ** length_penalty, q) for s, q in zip(scores.tolist(), seqs)]
        results.append(max(finished, key=lambda f: f[0])[1])
    return results
