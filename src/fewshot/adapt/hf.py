"""Few-shot adaptation of a pre-trained Hugging Face encoder through PEFT.

PEFT does the adapting; this module only picks each method's paper settings, trains an adapter
plus a classification head on an episode's support set, and saves, reloads and merges adapters.

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

:class:`PeftFewShotClassifier` is a scikit-learn-shaped classifier over texts: ``fit`` attaches
a fresh adapter to a copy of the base model and trains it with a linear head for ``steps`` AdamW
steps on the support set; ``predict`` classifies texts. With ``adapter=None`` only the head trains
(a linear probe on frozen embeddings). :func:`run_text_episodes` scores any such classifier on
seeded N-way K-shot episodes of (text, label) lists, with the 95% interval of
:func:`fewshot.evaluate.runner.mean_ci95`.

``peft`` and ``transformers`` are optional (``pip install fewshot[hf]``) and imported lazily.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from sklearn.exceptions import NotFittedError
from torch import nn

from fewshot.adapt.classifier import CosineHead, fit_steps
from fewshot.adapt.inject import count_trainable
from fewshot.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from fewshot.evaluate.classifiers import PrototypeClassifier
from fewshot.evaluate.runner import mean_ci95
from fewshot.models.pretrained import TextEncoder, require

__all__ = [
    "ADAPTERS",
    "DEFAULT_LR",
    "PeftFewShotClassifier",
    "PrototypeTextClassifier",
    "adapter_config",
    "attach_adapter",
    "load_adapter",
    "merge_adapter",
    "run_text_episodes",
    "save_adapter",
]

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

# AdamW learning rates for the adapter when fit() is not given one. Few-shot fits run tens of
# steps, not the thousands of the papers, so these sit at the top of each paper's range:
# (IA)^3 3e-3 is T-Few's own value; LoRA 1e-3 is above the 2e-4..5e-4 of Hu et al.'s GLUE runs
# for the shorter schedule; prefix/prompt tuning use the larger rates those papers report
# (Lester et al. use 0.3 with Adafactor; 1e-2 with AdamW here).
DEFAULT_LR = {"lora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 1e-2}
HEAD_LR = 1e-2


def adapter_config(name: str, **options: Any) -> Any:
    """A PEFT config for adapter ``name`` (see the module docstring); options override defaults."""
    if name not in ADAPTERS:
        raise ConfigError(f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}")
    try:
        return ADAPTERS[name](**options)
    except TypeError as error:
        raise ConfigError(f"adapter {name!r}: {error}") from None


def _seed_from(seed: int | Sequence[int]) -> int:
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


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


_FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def save_adapter(encoder: TextEncoder, directory: str | Path) -> Path:
    """Save only the adapter (``adapter_model.safetensors`` + ``adapter_config.json``).

    The base weights are not written: load the adapter back onto the base with
    :func:`load_adapter`. Raises :class:`CheckpointError` if anything pickled appeared.
    """
    if not hasattr(encoder.model, "peft_config"):
        raise ConfigError("this encoder has no PEFT adapter to save; attach one first")
    directory = Path(directory)
    encoder.model.save_pretrained(directory, safe_serialization=True)
    pickled = [p.name for p in directory.rglob("*") if p.suffix in _FORBIDDEN_SUFFIXES]
    if pickled:
        raise CheckpointError(f"PEFT wrote pickled files {pickled} to {directory}")
    return directory / "adapter_model.safetensors"


def load_adapter(base: TextEncoder, directory: str | Path, copy_base: bool = True) -> TextEncoder:
    """The adapter saved in ``directory`` put onto (a copy of) ``base``, in eval mode."""
    peft = require("peft")
    directory = Path(directory)
    if not (directory / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{directory} holds no adapter_model.safetensors")
    model = copy.deepcopy(base.model) if copy_base else base.model
    adapted = peft.PeftModel.from_pretrained(model, directory)
    return base.with_model(adapted).eval()


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


def _class_indices(labels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    labels = list(labels)
    if not labels:
        raise DataError("no labels")
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    return classes, y.reshape(-1)


def _check_texts(texts: Sequence[str], n: int | None = None) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be a list of strings")
    texts = list(texts)
    if not texts:
        raise DataError("no texts")
    if n is not None and len(texts) != n:
        raise DataError(f"{len(texts)} texts for {n} labels")
    return texts


class PeftFewShotClassifier:
    """Adapter + cosine head trained on one task's support texts; predicts labels of texts.

    Parameters are only stored here; ``fit`` validates and sets ``classes_``, ``encoder_`` (the
    adapted :class:`TextEncoder`), ``head_``, ``trainable_params_`` and ``losses_``.

    adapter: a name in :data:`ADAPTERS`, a PEFT config, or None (frozen encoder, head only).
    steps: full-batch AdamW steps on the support set (cross-entropy of the head's logits), with
    the base in eval mode (no dropout). lr: the adapter's learning rate (default
    :data:`DEFAULT_LR`); head_lr: the head's. The head is the cosine head of
    :mod:`fewshot.adapt` (logits = s * cos(r, W) + b, s = 10) started at the class prototypes,
    so zero steps is the evaluator's ``proto-cosine``, as for the image adapters.
    seed: an int or a sequence of ints (e.g. ``[seed, episode]``) for the adapter's initial draw.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        adapter: str | Any | None = "lora",
        steps: int = 20,
        lr: float | None = None,
        head_lr: float = HEAD_LR,
        weight_decay: float = 0.0,
        seed: int | Sequence[int] = 0,
    ) -> None:
        self.encoder = encoder
        self.adapter = adapter
        self.steps = steps
        self.lr = lr
        self.head_lr = head_lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _adapter_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if isinstance(self.adapter, str):
            return DEFAULT_LR[self.adapter]
        return 1e-3

    def fit(self, texts: Sequence[str], labels: Sequence[Any]) -> "PeftFewShotClassifier":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be a non-negative integer, got {self.steps!r}")
        if isinstance(self.adapter, str) and self.adapter not in ADAPTERS:
            raise ConfigError(
                f"unknown adapter {self.adapter!r}; choose one of: {', '.join(ADAPTERS)}"
            )
        classes, y = _class_indices(labels)
        texts = _check_texts(texts, len(y))
        if len(classes) < 2:
            raise DataError(f"the support set has {len(classes)} class; a task needs at least 2")
        y = torch.as_tensor(y)
        with torch.random.fork_rng(devices=[]):  # whatever PEFT or torch draws stays local
            torch.manual_seed(_seed_from(self.seed))
            if self.adapter is None:
                encoder = self.encoder
                frozen = encoder.embed(texts)  # (n, dim): computed once, the encoder never changes
                head = CosineHead.from_prototypes(frozen, y, len(classes))
                params = [{"params": head.parameters(), "lr": self.head_lr}]
            else:
                encoder = attach_adapter(self.encoder, self.adapter, seed=_seed_from(self.seed))
                batch = encoder.tokenize(texts)
                head = CosineHead.from_prototypes(encoder.embed(texts), y, len(classes))
                params = [
                    {"params": [p for p in encoder.parameters() if p.requires_grad],
                     "lr": self._adapter_lr()},
                    {"params": head.parameters(), "lr": self.head_lr},
                ]
            encoder.eval()  # no dropout: 25 examples and 20 steps need no noise, and fits repeat
            embed = (lambda: frozen) if self.adapter is None else (lambda: encoder(batch))
            losses = fit_steps(embed, head, y, params, self.steps, self.weight_decay)
        encoder.eval()
        if losses and not math.isfinite(losses[-1]):
            raise TrainingDiverged(f"few-shot training diverged (loss {losses[-1]}); lower lr")
        self.classes_ = classes
        self.encoder_ = encoder
        self.head_ = head.eval()
        self.losses_ = losses
        self.trainable_params_ = count_trainable(head) + (
            0 if self.adapter is None else count_trainable(encoder)
        )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "head_"):
            raise NotFittedError("this classifier is not fitted yet; call fit(texts, labels) first")

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Head logits (n, n_classes)."""
        self._check_fitted()
        with torch.no_grad():
            return self.head_(self.encoder_.embed(_check_texts(texts))).numpy()

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(texts), axis=1)]

    def save(self, directory: str | Path) -> list[Path]:
        """The task's files: the adapter (PEFT, safetensors + JSON) and ``head.safetensors``."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        if self.adapter is not None:
            files += [save_adapter(self.encoder_, directory), directory / "adapter_config.json"]
        head = directory / "head.safetensors"
        head.write_bytes(safetensors_bytes(dict(self.head_.state_dict())))
        return files + [head]

    def task_bytes(self) -> int:
        """Bytes stored per task: adapter weights + config + head (not PEFT's README)."""
        with tempfile.TemporaryDirectory() as tmp:
            return sum(p.stat().st_size for p in self.save(tmp))


class PrototypeTextClassifier:
    """No training: nearest prototype (cosine) on frozen embeddings of ``encoder``."""

    trainable_params_ = 0

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder

    def fit(self, texts: Sequence[str], labels: Sequence[Any]) -> "PrototypeTextClassifier":
        classes, y = _class_indices(labels)
        texts = _check_texts(texts, len(y))
        self.classes_ = classes
        self.prototypes_ = PrototypeClassifier("cosine").fit(self.encoder.embed(texts).numpy(), y)
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        if not hasattr(self, "prototypes_"):
            raise NotFittedError("this classifier is not fitted yet; call fit(texts, labels) first")
        features = self.encoder.embed(_check_texts(texts)).numpy()
        return self.classes_[self.prototypes_.predict(features)]

    def task_bytes(self) -> int:
        """The class means as float32 safetensors."""
        means = torch.as_tensor(self.prototypes_.prototypes_, dtype=torch.float32)
        return len(safetensors_bytes({"prototypes": means}))


def run_text_episodes(
    make: Callable[[int], Any],
    texts: Sequence[str],
    labels: Sequence[Any],
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a text classifier on ``episodes`` seeded N-way K-shot episodes.

    ``make(i)`` returns a fresh classifier with ``fit(texts, labels)`` / ``predict(texts)`` for
    episode ``i`` (e.g. ``lambda i: PeftFewShotClassifier(enc, "lora", seed=i)``). Episodes come
    from :class:`EpisodeSampler` ``(labels, way, shot, query, seed)``, so every classifier sees the
    same ones. Returns ``{"way", "shot", "query", "episodes", "accuracy", "ci95",
    "trainable_params", "bytes_per_task", "seconds_per_episode"}`` (accuracy and ci95 as
    fractions; seconds count fit + predict; bytes from the first episode's ``task_bytes()``).
    """
    from fewshot.adapt.runner import score_episodes

    classes, y = _class_indices(labels)
    texts = _check_texts(texts, len(y))

    def fit_predict(i, support, support_labels, query):
        classifier = make(i)
        classifier.fit([texts[j] for j in support], support_labels)
        return classifier.predict([texts[j] for j in query]), classifier

    sampler, accuracies, seconds, first = score_episodes(fit_predict, y, way, shot, query, episodes, seed)
    trainable = int(getattr(first, "trainable_params_", 0))
    task_bytes = int(first.task_bytes()) if hasattr(first, "task_bytes") else None
    accuracy, ci95 = mean_ci95(accuracies)
    return {
        "way": sampler.way,
        "shot": sampler.shot,
        "query": sampler.query,
        "episodes": len(accuracies),
        "accuracy": accuracy,
        "ci95": ci95,
        "trainable_params": trainable,
        "bytes_per_task": task_bytes,
        "seconds_per_episode": float(np.mean(seconds)),
    }
