"""PEFT's adaptation methods on a Hugging Face base, as entries of the one adaptation registry.

PEFT does the adapting; this module only picks each method's paper settings. The registry
(:mod:`fewshot.adapt.registry`) lists them as ``peft-lora``, ``peft-ia3``, ``peft-prefix`` and
``peft-prompt`` beside fewshot's own methods, so the same runner, cosine head, adapter files and
``fewshot adapt`` serve them (``fewshot adapt all-minilm-l6-v2 --method peft-lora --episodes 100``).
The base is a :class:`~fewshot.models.hf_text.TextEncoder` (texts → r); fewshot's own
``linear-probe``, ``full``, ``bitfit`` and ``norm`` work on it too.

Adapters (:data:`ADAPTERS`, built by :func:`adapter_config`; each a ``peft`` config):

``lora``
    LoRA (Hu et al. 2021): W x + (alpha / r) B A x on the attention query and value projections
    (the paper's choice for its GLUE runs), r = 8, alpha = 16; B starts at zero, so the adapted
    model starts equal to the base.
``ia3``
    (IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
    than In-Context Learning"): learned vectors, initialised to ones, rescale the keys, the
    values and the feed-forward activations (the input of each block's second FFN layer). PEFT's
    default for BERT also rescales the attention output projection's input; we keep the paper's
    three: 6 x (384 + 384 + 1536) = 13,824 parameters for MiniLM.
``prefix``
    Prefix tuning (Li & Liang 2021): trained keys and values for ``virtual_tokens`` positions
    prepended in every layer's attention (without the reparameterising MLP).
``prompt``
    Prompt tuning (Lester et al. 2021): ``virtual_tokens`` trained input embeddings prepended to
    the tokens; their outputs are dropped before pooling.

``peft`` and ``transformers`` are optional (``pip install fewshot[hf]``) and imported lazily.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fewshot.errors import ConfigError, EncoderMismatch
from fewshot.models.hf_text import TextEncoder, require

__all__ = ["ADAPTERS", "DEFAULT_LR", "adapter_config", "attach_adapter", "merge_adapter", "peft_builder"]

# (IA)^3's three rescaled places in a BERT layer, as full-name regular expressions (PEFT matches a
# string target with re.fullmatch). "layer.N.output.dense" is the second FFN layer; its input is
# the FFN activation. The attention block's "attention.output.dense" is deliberately left out.
_IA3_TARGETS = r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense"
_IA3_FEEDFORWARD = r".*\.layer\.\d+\.output\.dense"


def _lora(r: int = 8, alpha: int = 16, target_modules: Sequence[str] = ("query", "value"),
          dropout: float = 0.0) -> Any:
    peft = require("peft")
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout
    )


def _ia3(target_modules: str | Sequence[str] = _IA3_TARGETS,
         feedforward_modules: str | Sequence[str] = _IA3_FEEDFORWARD) -> Any:
    peft = require("peft")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if not isinstance(feedforward_modules, str):
        feedforward_modules = list(feedforward_modules)
    return peft.IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules)


def _prefix(virtual_tokens: int = 10) -> Any:
    peft = require("peft")
    return peft.PrefixTuningConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens
    )


def _prompt(virtual_tokens: int = 10) -> Any:
    peft = require("peft")
    return peft.PromptTuningConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens
    )


ADAPTERS: dict[str, Callable[..., Any]] = {
    "lora": _lora,
    "ia3": _ia3,
    "prefix": _prefix,
    "prompt": _prompt,
}

# AdamW learning rates of the adapter when the user gives none (the registry's AdaptMethod.lr).
# Few-shot fits run tens of steps, not the thousands of the papers, so these sit at the top of each paper's range:
# (IA)^3 3e-3 is T-Few's own value; LoRA 1e-3 is above the 2e-4..5e-4 of Hu et al.'s GLUE runs
# for the shorter schedule; prefix/prompt tuning use the larger rates those papers report
# (Lester et al. use 0.3 with Adafactor; 1e-2 with AdamW here).
DEFAULT_LR = {"lora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 1e-2}


def adapter_config(name: str, **options: Any) -> Any:
    """A PEFT config for adapter ``name`` (see the module docstring); options override defaults."""
    if name not in ADAPTERS:
        raise ConfigError(f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}")
    try:
        return ADAPTERS[name](**options)
    except TypeError as error:
        raise ConfigError(f"adapter {name!r}: {error}") from None


def attach_adapter(
    encoder: TextEncoder, config: Any, seed: int = 0, copy_base: bool = True
) -> TextEncoder:
    """``encoder`` with a fresh PEFT adapter; only the adapter's parameters require gradients.

    PEFT injects into the model it is given, so by default a deep copy of the base is adapted
    and ``encoder`` is left as it was. PEFT draws initial adapter weights (LoRA's A, prompt
    embeddings) from torch's global generator; that draw runs under ``torch.manual_seed(seed)``
    inside ``fork_rng``, so it is reproducible and the caller's random state is untouched.
    """
    peft = require("peft")
    if isinstance(config, str):
        config = adapter_config(config)
    model = copy.deepcopy(encoder.model) if copy_base else encoder.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            adapted = peft.get_peft_model(model, config)
        except ValueError as error:  # e.g. no module matched target_modules
            raise ConfigError(f"cannot attach {type(config).__name__}: {error}") from None
    return encoder.with_model(adapted)


def merge_adapter(encoder: TextEncoder) -> TextEncoder:
    """Fold the adapter into the base weights (PEFT's ``merge_and_unload``): a plain model again.

    Only weight adapters (LoRA, (IA)^3) merge; prefix and prompt tuning add tokens instead.
    """
    model = encoder.model
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ConfigError("this encoder has no PEFT adapter to merge; attach one first")
    if any(c.is_prompt_learning for c in configs.values()):
        raise ConfigError("only weight adapters (lora, ia3) can be merged into the base model")
    return encoder.with_model(model.merge_and_unload())


def peft_builder(name: str) -> Callable[..., TextEncoder]:
    """The registry's ``build(encoder, *, generator, **options)`` for PEFT method ``name``: a fresh
    adapter attached to ``encoder`` (the runner passes a copy), its initial draw seeded from ``generator``."""

    def build(encoder: TextEncoder, *, generator: torch.Generator | None = None, **options: Any) -> TextEncoder:
        if not isinstance(encoder, TextEncoder):
            raise EncoderMismatch(f"peft-{name} adapts a Hugging Face model (e.g. all-minilm-l6-v2), not a {type(encoder).__name__}")
        seed = int(torch.randint(2**62, (1,), generator=generator).item()) if generator is not None else 0
        return attach_adapter(encoder, adapter_config(name, **options), seed=seed, copy_base=False)

    params = inspect.signature(ADAPTERS[name]).parameters.values()  # options as PEFT's config takes them
    build.__signature__ = inspect.Signature([inspect.Parameter("encoder", inspect.Parameter.POSITIONAL_ONLY), *params])  # type: ignore[attr-defined]
    return build
