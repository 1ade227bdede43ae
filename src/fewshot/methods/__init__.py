"""Pre-training methods: each ties views, encoder, heads and an objective together.

A method is a :class:`~fewshot.methods.base.Method`: ``.encoder`` (what evaluation keeps) and
``forward(batch, generator) -> (loss, logs)``, the training step the one trainer calls on a
mapping of named tensors of which it reads ``inputs``; ``after_step(step, total_steps)`` is the hook for per-step extras (EMA, queues). Its
``config_class`` is its recipe section, the paper's hyper-parameters as defaults. A new method
is one class and one :func:`register_method` call.
"""

from __future__ import annotations

from fewshot.config import RunConfig, register_method_config
from fewshot.errors import ConfigError
from fewshot.methods.autoencoder import Autoencoder
from fewshot.methods.base import Method
from fewshot.methods.blip import BLIP
from fewshot.methods.blip2 import BLIP2Captioner, BLIP2QFormer
from fewshot.methods.clipcap import ClipCap
from fewshot.methods.contrastive import CONTRASTIVE_METHODS, TwoViewMethod
from fewshot.methods.episodic import EPISODIC_METHODS
from fewshot.methods.fromage import Fromage
from fewshot.methods.frozen import Frozen
from fewshot.methods.flamingo import Flamingo
from fewshot.methods.icl_classify import ICLClassify
from fewshot.methods.in_context import ICLRegression
from fewshot.methods.language import LANGUAGE_METHODS
from fewshot.methods.mae import MAE
from fewshot.methods.mm_cot import MultimodalCoT
from fewshot.methods.momentum import MOMENTUM_METHODS
from fewshot.methods.neighbors import NNCLR
from fewshot.methods.time_contrastive import TimeContrastive
from fewshot.methods.vision_language import CLIP, CoCa

METHODS: dict[str, type[Method]] = {}


def register_method(name: str, method_class: type[Method]) -> type[Method]:
    """Make ``method.name=<name>`` build ``method_class``, its section validated by ``method_class.config_class``."""
    if not (isinstance(method_class, type) and issubclass(method_class, Method)):
        raise TypeError(f"method '{name}' must be a subclass of fewshot.methods.Method")
    register_method_config(name, method_class.config_class)
    METHODS[name] = method_class
    return method_class


for _name, _cls in {**CONTRASTIVE_METHODS, **MOMENTUM_METHODS, **EPISODIC_METHODS, "autoencoder": Autoencoder, "mae": MAE,
                    **LANGUAGE_METHODS, "time-contrastive": TimeContrastive, "nnclr": NNCLR,
                    "clip": CLIP, "coca": CoCa, "clipcap": ClipCap, "blip": BLIP, "blip2-qformer": BLIP2QFormer, "blip2": BLIP2Captioner, "frozen": Frozen, "fromage": Fromage, "flamingo": Flamingo, "mm-cot": MultimodalCoT, "icl-regression": ICLRegression, "icl-classify": ICLClassify}.items():
    register_method(_name, _cls)


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(config: RunConfig) -> Method:
    """The method named by ``config.method.name`` with a fresh encoder."""
    name = config.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(method_names())}")
    return METHODS[name](config)


__all__ = ["METHODS", "Method", "TwoViewMethod", "build_method", "method_names", "register_method"]
