"""What every method that captions through a causal LM's prefix shares (ClipCap, Frozen): the LM behind the
link of :mod:`fewshot.models.prefix_lm`, the captioning step, decoding, and the frozen LM's guard.

A subclass sets ``self.language_model`` (:func:`open_caption_lm`), ``self.prefix_length`` and ``prefix(images)``
→ (B, k, D), then calls :meth:`PrefixCaptioner.freeze_lm` (or not, when it tunes the LM). A frozen LM's weights are
fingerprinted there (SHA-256 of each tensor's bytes) and checked whenever the method's state is read: a frozen LM
whose weights changed is refused (:class:`~fewshot.errors.CheckpointError`), so such a run is never saved.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from fewshot.config import RunConfig
from fewshot.data.token_ids import PAD_ID
from fewshot.data.types import Batch
from fewshot.errors import CheckpointError, ConfigError
from fewshot.methods.base import Method
from fewshot.models.prefix_lm import PrefixLM, beam_search, greedy, nucleus, open_prefix_lm
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss

__all__ = ["DECODINGS", "PrefixCaptioner", "open_caption_lm", "weight_digests"]

DECODINGS = ("greedy", "beam", "nucleus")


def weight_digests(module: nn.Module) -> dict[str, str]:
    """SHA-256 of the bytes of every tensor of ``module``'s state (parameters and buffers), by name."""
    out = {}
    for name, tensor in module.state_dict().items():
        out[name] = hashlib.sha256(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


class PrefixCaptioner(Method):
    """start ids ⊕ prefix(images) ⊕ caption ⊕ EOS through ``language_model``; the loss on the caption and EOS only."""

    inputs = ("images", "tokens")
    language_model: PrefixLM
    prefix_length: int
    tune_lm: bool = True
    _lm_digests: dict[str, str] | None = None

    @classmethod
    def caption_tokenizer(cls, config: RunConfig) -> Any:
        """The LM's tokenizer (a ``tokenizers.Tokenizer``): what the run's captions are tokenized with."""
        return open_caption_lm(config).tokenizer

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The k prefix embeddings (B, k, D) of images."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the frozen LM's guard

    def freeze_lm(self) -> None:
        """No gradient and eval mode for the LM; its weights fingerprinted, checked on every state read."""
        self.language_model.model.requires_grad_(False)
        self.tune_lm = False
        self._lm_digests = weight_digests(self.language_model.model)
        self._register_state_dict_hook(_check_frozen_lm)

    def check_frozen_lm(self) -> None:
        """A one-line CheckpointError naming the first LM tensor whose bytes differ from when it was frozen."""
        if self._lm_digests is None:
            return
        now = weight_digests(self.language_model.model)
        changed = [name for name, digest in self._lm_digests.items() if now.get(name) != digest]
        if changed:
            raise CheckpointError(f"the frozen language model changed during training ({len(changed)} tensor(s), first "
                                  f"'{changed[0]}'); refusing to save a run whose frozen LM is not the one it was given")

    def train(self, mode: bool = True) -> "PrefixCaptioner":
        super().train(mode)
        if not getattr(self, "tune_lm", True):
            self.language_model.eval()
        return self

    # ------------------------------------------------------------------ the step

    def caption_logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, s + k + L, V) at every position of start ids ⊕ prefix ⊕ ``ids`` (B, L)."""
        sequence = torch.cat([self.language_model.prefix_sequence(prefix), self.language_model.embed(ids).to(prefix.dtype)], dim=1)
        return self.language_model.step(sequence)[0]

    def caption_targets(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of start ids ⊕ prefix(images) ⊕ caption ⊕ EOS, for captions (B, T) padded with PAD_ID."""
        link = self.language_model
        ids = append_eos(tokens, link.eos_id, PAD_ID)
        return self.caption_logits(self.prefix(images), ids), caption_labels(len(link.start_ids) + self.prefix_length, ids, PAD_ID)

    def caption_step(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The captioning loss of images (B, C, H, W) and their captions (B, T) padded with PAD_ID."""
        return caption_loss(*self.caption_targets(images, tokens))

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self.caption_step(batch["images"], batch["tokens"]), {}

    # ------------------------------------------------------------------ captioning

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, decoding: str = "greedy", max_tokens: int | None = None, beams: int = 5,
                       top_p: float = 0.9, temperature: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
        """Captions of images (B, C, H, W) in [0, 1]: ``greedy``, ``beam`` (``beams`` wide) or ``nucleus`` (``top_p``)."""
        if decoding not in DECODINGS:
            raise ConfigError(f"unknown decoding '{decoding}'; choose {', '.join(DECODINGS)}")
        was = self.training
        self.eval()
        prefix, n = self.prefix(images), max_tokens or self.max_tokens
        link = self.language_model
        if decoding == "greedy":
            ids = greedy(link, prefix, n)
        elif decoding == "beam":
            ids = beam_search(link, prefix, n, beams)
        else:
            ids = nucleus(link, prefix, n, top_p, temperature, generator)
        self.train(was)
        return [link.decode(row).strip() for row in ids]

    @property
    def text_tokenizer(self) -> Any:
        """The LM's tokenizer: the run's captions are its ids (as a pre-trained text tower's in CLIP)."""
        return self.language_model.tokenizer

    def set_max_tokens(self, config: RunConfig) -> None:
        """Check that start ids + prefix + the longest caption ⊕ EOS fit the LM; remember the caption length."""
        link = self.language_model
        seq_len = getattr(config.data, "seq_len", None)
        if seq_len is not None:
            link.check_fits(self.prefix_length, seq_len + 1)  # caption ⊕ EOS
        self.max_tokens = (seq_len or link.context - len(link.start_ids) - self.prefix_length) + 1
        self._register_state_dict_hook(_untie_hook)


def _check_frozen_lm(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
    module.check_frozen_lm()


def _untie_hook(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
    untie(module, state, prefix, local_metadata)  # looked up when called: a test swaps it for its negative control


def untie(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: Any) -> None:
    """A tensor stored under two names (a Hugging Face LM's tied input and output embeddings) is saved as two copies:
    safetensors refuses shared storage, and loading writes the same values into the one tied parameter."""
    seen: set[int] = set()
    for key, value in state.items():
        if value.untyped_storage().data_ptr() in seen:
            state[key] = value.clone()
        else:
            seen.add(value.untyped_storage().data_ptr())


def open_caption_lm(config: RunConfig) -> PrefixLM:
    """The causal LM of ``method.lm.init`` as a :class:`PrefixLM`, refused when its ids clash with caption padding."""
    m = config.method
    if m.lm.init is None:
        raise ConfigError(f"method '{m.name}' needs a causal LM: set method.lm.init to a gpt run folder, a Hugging Face "
                          "causal LM folder or smollm2")
    link = open_prefix_lm(m.lm.init)
    if link.eos_id == PAD_ID:
        raise ConfigError(f"{link.name}'s EOS is id {PAD_ID}, the id caption pairs pad with: the end of a caption would read as padding")
    pad = link.tokenizer.get_added_tokens_decoder().get(PAD_ID)
    if pad is None or not pad.special:  # captions are padded with id 0: it must never be a word of a caption
        raise ConfigError(f"{link.name}'s tokenizer has a text token at id {PAD_ID}, the id caption pairs pad with; "
                          "use an LM whose id 0 is a special token (fewshot's gpt runs, SmolLM2)")
    return link
