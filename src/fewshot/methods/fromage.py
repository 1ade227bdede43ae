"""FROMAGe (Koh, Salakhutdinov & Fried 2023, "Grounding Language Models to Images for Multimodal Inputs and
Outputs"): a frozen causal LM learns to read images (captioning) and to return them (retrieval through a new
[RET] token), with only linear maps, the [RET] embedding and a temperature trained.

Image: the frozen e (B, E) of ``method.image.init`` (a clip-scenes run's image tower and projection, as ClipCap
reads it). LM: ``method.lm.init`` (a fewshot gpt run, a Hugging Face causal LM folder or smollm2), frozen and
bit-identical after training (checked when the run is saved; ``method.lm.tune=true`` is not the paper's, and
exists as the negative control that moves it). Trained, with D the LM's width and q = ``embed_dim``:

* W_c: e → k visual embeddings, prefix = reshape_k(W_c e + b) (k = ``prefix_length``; the paper: 1);
* the [RET] embedding: one new row of the vocabulary, id V (the LM's own V rows stay as they are; the new row is
  a separate parameter spliced into the input embeddings wherever id V occurs), initialised to the mean of the
  LM's rows;
* W_t: h_[RET] → q and W_i: e → q, and the logit scale t of the contrastive loss (CLIP's: learned, initial
  ln(1/0.07), clamped at ln 100).

Losses, λ_c = ``caption_weight``, λ_r = ``retrieval_weight``, λ_e = ``emit_weight`` (the paper: all 1):

    L = λ_c L_cap + λ_r (L_t2i + L_i2t) + λ_e L_emit

* L_cap: the captioning cross-entropy of :mod:`fewshot.objectives.captioning` on caption tokens and EOS. A share
  ``concat_fraction`` of the batch (the paper: half) is concatenated in pairs, each sequence then reading
  start ids ⊕ P(e_a) ⊕ caption_a ⊕ EOS ⊕ P(e_b) ⊕ caption_b ⊕ EOS (:func:`caption_layout`), so the LM learns to
  read an image after text; visual positions and padding never count.
* L_t2i, L_i2t: the InfoNCE of the caption's [RET] state against its image, both ways over the batch:
  x_i = W_t h(start ⊕ caption_i ⊕ [RET])[RET], y_j = W_i e_j, s_ij = exp(t) cos(x_i, y_j);
  L_t2i = −(1/B) Σ_i log softmax_j(s_ij)_i, L_i2t the same over the columns
  (:func:`fewshot.objectives.clip.clip_loss` is their mean, so the sum is twice it; identical captions are positives).
* L_emit: the LM loss of the same text-only pass start ⊕ caption ⊕ [RET], over the vocabulary plus [RET], so the LM
  learns to say [RET] when a caption ends (how it asks for an image in dialogue): logits f(h) @ [E; r_out]ᵀ, f and E
  the LM's own output features and rows (:meth:`~fewshot.models.prefix_lm.PrefixLM.output_features`), r_out the [RET]
  output row; labels every caption token and [RET] (:func:`~fewshot.objectives.captioning.caption_loss`; start and
  padding never count).

Departure: the paper's [RET] is one row for input and output (OPT's embeddings are tied). ``tie_ret=false`` (the
default here) gives [RET] its own output row r_out, initialised like the input row: a tied row of a 128-wide LM cannot
serve both the retrieval state and the emission (docs/benchmarks.md: tied, 800 steps, p([RET]) after a caption 0.002 and
never the argmax); ``tie_ret=true`` is the paper's.

Retrieval (``embed_texts`` / ``embed_images``, what ``fewshot retrieve`` and :mod:`fewshot.evaluate.image_text`
read): a caption's [RET] state through W_t against the images through W_i, by cosine similarity.

:meth:`Fromage.emits_ret` says where the trained LM, reading a caption, would say [RET] (the argmax over V + 1).
The paper: CLIP ViT-L/14 and OPT-6.7B, q = 256, on CC3M; here a scene CLIP's conv4 and fewshot's small GPT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.config import MethodConfig, RunConfig
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.data.types import Batch
from fewshot.errors import ConfigError
from fewshot.methods.clipcap import ClipCap, ClipCapImage, ClipCapLM
from fewshot.methods.prefix_captioning import PrefixCaptioner, open_caption_lm
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss
from fewshot.objectives.clip import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, clip_loss

__all__ = ["Fromage", "FromageConfig", "caption_layout", "pair_groups"]


class FromageConfig(MethodConfig):
    prefix_length: int = Field(1, ge=1, description="k visual embeddings W_c maps e to (Koh et al. 2023: 1)")
    embed_dim: int = Field(256, ge=1, description="q, the retrieval space of W_t and W_i (Koh et al. 2023: 256)")
    caption_weight: float = Field(1.0, ge=0, description="λ_c, the captioning loss's weight (paper: 1)")
    retrieval_weight: float = Field(1.0, ge=0, description="λ_r, the weight of L_t2i + L_i2t (paper: 1)")
    emit_weight: float = Field(1.0, ge=0, description="λ_e, the weight of the LM loss that teaches the LM to say [RET] after a caption (paper: 1)")
    tie_ret: bool = Field(False, description="one [RET] row for input and output, as OPT's tied embeddings (paper); false: its own output row")
    concat_fraction: float = Field(0.5, ge=0, le=1, description="share of a batch's examples concatenated in pairs for captioning (paper: 0.5)")
    image: ClipCapImage = Field(default_factory=ClipCapImage)
    lm: ClipCapLM = Field(default_factory=ClipCapLM)


def pair_groups(batch: int, fraction: float, generator: torch.Generator) -> list[list[int]]:
    """The batch's rows in a random order, the first 2⌊fraction · batch / 2⌋ of them joined in pairs, the rest alone."""
    order = torch.randperm(batch, generator=generator).tolist()
    paired = 2 * int(fraction * batch / 2)
    return [order[i : i + 2] for i in range(0, paired, 2)] + [[i] for i in order[paired:]]


def caption_layout(ids: torch.Tensor, groups: list[list[int]], starts: int, k: int, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every position of the captioning sequences comes from, and its label.

    ``ids`` (B, L): each caption ⊕ EOS, right-padded with ``pad_id``. Sequence r of ``groups[r]`` = [b₁, b₂, …] is
    start ⊕ P(b₁) ⊕ caption_b₁ ⊕ EOS ⊕ P(b₂) ⊕ caption_b₂ ⊕ EOS …, right-padded to the longest. Its positions index one
    table of embeddings: rows 0 … starts−1 the start ids, starts + b·k + j visual embedding j of image b,
    starts + B·k + b·L + t token t of ``ids[b]``, and the last row (starts + B·k + B·L) padding.

    Returns ``source`` (R, N) into that table and ``labels`` (R, N): the token at caption positions, IGNORE_INDEX at
    start, visual and padding positions (so :func:`~fewshot.objectives.captioning.caption_loss` counts captions only)."""
    b, width = ids.shape
    lengths = (ids != pad_id).sum(dim=1).tolist()
    tokens_at, pad_row = starts + b * k, starts + b * k + b * width
    rows: list[tuple[list[int], list[int]]] = []
    for group in groups:
        source, labels = list(range(starts)), [IGNORE_INDEX] * starts
        for i in group:
            source += [starts + i * k + j for j in range(k)]
            labels += [IGNORE_INDEX] * k
            source += [tokens_at + i * width + t for t in range(lengths[i])]
            labels += ids[i, : lengths[i]].tolist()
        rows.append((source, labels))
    n = max(len(s) for s, _ in rows)
    source = torch.tensor([s + [pad_row] * (n - len(s)) for s, _ in rows], dtype=torch.long, device=ids.device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (n - len(lab)) for _, lab in rows], dtype=torch.long, device=ids.device)
    return source, labels


def _tied_before_ret_output(state_dict: dict, prefix: str, *args) -> None:
    """A run saved before [RET] had its own output row scored [RET] with its input row: load that row as the output row,
    so the old run reads and says [RET] exactly as it was trained."""
    if prefix + "ret_output" not in state_dict and prefix + "ret_embedding" in state_dict:
        state_dict[prefix + "ret_output"] = state_dict[prefix + "ret_embedding"].clone()


class Fromage(ClipCap):
    """Frozen image embedding → W_c → k visual embeddings for captioning; caption ⊕ [RET] → W_t against W_i e for retrieval."""

    config_class = FromageConfig
    inputs = ("images", "tokens", "caption_keys")

    def __init__(self, config: RunConfig) -> None:
        PrefixCaptioner.__init__(self)
        m = config.method
        if m.image.init is None:
            raise ConfigError("method 'fromage' maps a frozen image embedding: set method.image.init=RUN_DIR (e.g. a clip-scenes run)")
        self.encoder = self.build_encoder(config)
        self.image_projection = self._load_image_tower(config, m.image.init)
        self.encoder.requires_grad_(False)
        self.language_model = link = open_caption_lm(config)
        self.prefix_length, self.concat_fraction = m.prefix_length, m.concat_fraction
        self.caption_weight, self.retrieval_weight, self.emit_weight = m.caption_weight, m.retrieval_weight, m.emit_weight
        self.set_max_tokens(config)
        seq_len = getattr(config.data, "seq_len", None)
        if seq_len is not None and m.concat_fraction > 0:
            link.check_fits(2 * m.prefix_length, 2 * (seq_len + 1))  # two images and two captions ⊕ EOS in one sequence
        embed = self.image_embedding_dim
        self.ret_id = link.vocab_size  # one past the LM's own rows: the new token
        with torch.no_grad():
            mean_row = link.embed(torch.arange(link.vocab_size)).mean(dim=0, keepdim=True)
        self.ret_embedding = nn.Parameter(mean_row.clone())
        if not m.tie_ret:
            with torch.no_grad():
                mean_out = link.output_rows().mean(dim=0, keepdim=True)
            self.ret_output = nn.Parameter(mean_out.clone())
            self._register_load_state_dict_pre_hook(_tied_before_ret_output)
        self.visual = nn.Linear(embed, m.prefix_length * link.dim)  # W_c
        self.text_to_retrieval = nn.Linear(link.dim, m.embed_dim)  # W_t
        self.image_to_retrieval = nn.Linear(embed, m.embed_dim)  # W_i
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        if not m.lm.tune:
            self.freeze_lm()
        self.train()

    @property
    def image_embedding_dim(self) -> int:
        return self.encoder.dim if self.image_projection is None else self.image_projection.out_features

    # ------------------------------------------------------------------ captioning

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The k visual embeddings (B, k, D) = reshape_k(W_c e + b)."""
        return self.visual(self.image_embedding(images)).view(images.shape[0], self.prefix_length, -1)

    def caption_step(self, images: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_cap with a share ``concat_fraction`` of the rows concatenated in pairs (none without a generator)."""
        link = self.language_model
        ids = append_eos(tokens, link.eos_id, PAD_ID)
        b = ids.shape[0]
        groups = pair_groups(b, self.concat_fraction, generator) if generator is not None else [[i] for i in range(b)]
        source, labels = caption_layout(ids, groups, len(link.start_ids), self.prefix_length)
        prefix = self.prefix(images)
        start = link.embed(torch.tensor(link.start_ids, dtype=torch.long, device=ids.device)).to(prefix.dtype)
        table = torch.cat([start, prefix.reshape(-1, link.dim), link.embed(ids).reshape(-1, link.dim).to(prefix.dtype),
                           prefix.new_zeros(1, link.dim)])
        return caption_loss(link.step(table[source])[0], labels)

    # ------------------------------------------------------------------ retrieval

    def embed_with_ret(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings (B, T, D) of ids over the vocabulary plus [RET]: the LM's rows, the learned row at [RET]."""
        is_ret = ids == self.ret_id
        own = self.language_model.embed(ids.masked_fill(is_ret, PAD_ID))
        return torch.where(is_ret[..., None], self.ret_embedding.to(own.dtype).expand_as(own), own)

    def ret_pass(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The text-only pass start ⊕ caption ⊕ [RET] ⊕ padding over captions (B, T) padded with PAD_ID: the LM's last-layer
        states (B, s + T + 1, D), the ids caption ⊕ [RET] ⊕ padding (B, T + 1) and each row's [RET] position (B,)."""
        link = self.language_model
        ids = append_eos(tokens, self.ret_id, PAD_ID)
        b = ids.shape[0]
        start = link.embed(torch.tensor([link.start_ids], dtype=torch.long, device=ids.device)).expand(b, -1, -1)
        sequence = torch.cat([start, self.embed_with_ret(ids).to(start.dtype)], dim=1)
        return link.hidden(sequence), ids, len(link.start_ids) + (tokens != PAD_ID).sum(dim=1)

    def ret_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """h_[RET] (B, D): the LM's last-layer state at the [RET] placed right after each caption (B, T), padded with PAD_ID."""
        hidden, _, at = self.ret_pass(tokens)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), at]

    def extended_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V + 1) over the LM's vocabulary plus [RET]: f(h) @ [E; r_out]ᵀ."""
        link = self.language_model
        features = link.output_features(hidden)
        return features @ torch.cat([link.output_rows(), self.ret_output_row]).to(features.dtype).T

    @property
    def ret_output_row(self) -> torch.Tensor:
        """r_out (1, D): the [RET] input row itself when tied, else its own output row."""
        return self.ret_embedding if not hasattr(self, "ret_output") else self.ret_output

    def emission_loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """L_emit of a :meth:`ret_pass`: every caption token and the [RET] after it, given the start ids and what precedes."""
        return caption_loss(self.extended_logits(hidden), caption_labels(len(self.language_model.start_ids), ids, PAD_ID))

    @torch.no_grad()
    def emits_ret(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the LM would say [RET] reading captions (B, T): (B,) True where [RET] is the argmax right after the caption's
        last token, and (B,) the share of the positions whose next token is one of the caption's (the last start id up to
        its second-last token) where it is: a [RET] said too early."""
        hidden, _, at = self.ret_pass(tokens)
        said = self.extended_logits(hidden).argmax(dim=-1) == self.ret_id  # position p predicts p + 1
        positions = torch.arange(said.shape[1], device=said.device)[None, :]
        starts = len(self.language_model.start_ids)
        early = ((positions >= starts - 1) & (positions < at[:, None] - 1)).float()
        rows = torch.arange(said.shape[0], device=said.device)
        return said[rows, at - 1], (said.float() * early).sum(dim=1) / early.sum(dim=1).clamp(min=1)

    def text_retrieval(self, tokens: torch.Tensor) -> torch.Tensor:
        """x = W_t h_[RET] (B, q), not normalised."""
        return self.text_to_retrieval(self.ret_states(tokens))

    def image_retrieval(self, images: torch.Tensor) -> torch.Tensor:
        """y = W_i e (B, q), not normalised."""
        return self.image_to_retrieval(self.image_embedding(images))

    def retrieval_loss(self, images: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """L_t2i + L_i2t (twice CLIP's symmetric mean)."""
        return 2 * clip_loss(self.image_retrieval(images), self.text_retrieval(tokens), self.logit_scale, keys)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_retrieval(tokens), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_retrieval(images), dim=-1)

    # ------------------------------------------------------------------ the step

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        images, tokens = batch["images"], batch["tokens"]
        caption = self.caption_step(images, tokens, generator)
        hidden, ids, at = self.ret_pass(tokens)  # one text-only pass serves L_t2i + L_i2t and L_emit
        texts = self.text_to_retrieval(hidden[torch.arange(hidden.shape[0], device=hidden.device), at])
        retrieval = 2 * clip_loss(self.image_retrieval(images), texts, self.logit_scale, batch.get("caption_keys"))
        loss = self.caption_weight * caption + self.retrieval_weight * retrieval
        logs = {}
        if self.emit_weight:
            emission = self.emission_loss(hidden, ids)
            loss = loss + self.emit_weight * emission
            logs["emit"] = float(emission.detach())
        return loss, {"caption": float(caption.detach()), "retrieval": float(retrieval.detach()), **logs,
                      "logit_scale": float(self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())}
