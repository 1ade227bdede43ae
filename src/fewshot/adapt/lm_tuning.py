"""LoRA on a Hugging Face causal LM's answers: teach a pre-trained LM a prompt layout, merge, save, then freeze it.

Frozen and Flamingo keep their language model frozen and depend on what it does in context. SmolLM2-135M does not
bind a description to a made-up name in the scene layout ("a small red circle. this is a dax. … q: what is this? a:
this is a"): its text-only 2-way rows are at chance (docs/benchmarks.md). A short LoRA fine-tune (Hu et al. 2021) on
text episodes of that layout, the loss on each line's answer only, makes it bind names it never saw in training. The
adapter is merged into the weights (W + (α/r)·B·A) and the model saved as a Hugging Face folder (safetensors), which
``method.lm.init``, ``open_causal_lm`` and every prompting command take like any other.

An answer is the text after a line's last ``marker`` (default ``a:``, the scene prompts' answer cue); lines without
the marker (captions, statements, drills) are not used.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.errors import ConfigError, DataError
from fewshot.io import sha256_file
from fewshot.models.causal_lm import HFCausalLM, PromptLM
from fewshot.models.hf_text import require
from fewshot.models.lm_fitting import answer_step, with_adapter

__all__ = ["LORA_TARGETS", "answer_rows", "save_hf_folder", "tune_lm", "tune_on_answers"]

# Every attention projection (the layout's match-and-copy lives in attention), per architecture; PEFT matches suffixes.
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}
TUNED_FORMAT = "fewshot-answer-tuned-lm"


def answer_rows(lm: HFCausalLM, lines: Iterable[str], marker: str = "a:", max_tokens: int = 256) -> list[tuple[list[int], list[int]]]:
    """(context ids, answer ids) of every line that holds ``marker``: the context is the LM's start ids and the line up to
    and including its last marker, the answer the rest. Lines longer than ``max_tokens`` ids are left out (they would
    set every batch's width)."""
    rows = []
    for line in lines:
        head, found, answer = line.rstrip("\n").rpartition(marker)
        if not found or not answer.strip():
            continue
        context, target = list(lm.start_ids) + lm.encode(head + marker), lm.encode(answer)
        if len(context) + len(target) <= max_tokens:
            rows.append((context, target))
    return rows


def tune_on_answers(
    lm: PromptLM, rows: list[tuple[list[int], list[int]]], steps: int, lr: float = 1e-3, batch_size: int = 8, rank: int = 16,
    seed: int = 0, log: Callable[[int, float], None] | None = None,
) -> HFCausalLM:
    """A copy of ``lm`` after ``steps`` AdamW steps of LoRA (rank r, α = 2r, every attention projection) on seeded
    batches of ``rows``, the loss the mean cross-entropy of the answer tokens; the adapter merged into the weights.
    ``log(step, loss)`` is called every step. ``lm`` itself is not changed."""
    if not isinstance(lm, HFCausalLM):
        raise ConfigError(f"answer tuning needs a Hugging Face causal LM (smollm2 or a folder), not {lm.name}")
    if not rows:
        raise DataError("answer tuning: no line of the corpus holds the answer marker")
    if steps < 1 or batch_size < 1 or rank < 1:
        raise ConfigError(f"answer tuning needs steps, batch size and rank ≥ 1, got {steps}, {batch_size}, {rank}")
    kind = getattr(lm.model.config, "model_type", "")
    if kind not in LORA_TARGETS:
        raise ConfigError(f"no LoRA targets for a {kind!r} model; known: {', '.join(LORA_TARGETS)}")
    peft = require("peft")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS[kind])
    model = with_adapter(lm.model, config, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 17])
    for step in range(1, steps + 1):
        loss = answer_step(model, optimizer, [rows[i] for i in rng.choice(len(rows), size=min(batch_size, len(rows)), replace=False)])
        if log is not None:
            log(step, loss)
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return HFCausalLM(merged, lm.tokenizer, f"{lm.name}+answers")


def plain_weights(model: Any) -> None:
    """Drop the quantisation flags of a model loaded from a GGUF file (transformers de-quantises its weights to float32
    at load, so they are plain tensors, but the model still says "gguf" and ``save_pretrained`` refuses it); any
    other quantised model is refused, since its weights are not plain."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = str(getattr(quantizer.quantization_config, "quant_method", "")).lower()
    if "gguf" not in method or any(not p.is_floating_point() or p.dtype != torch.float32 for p in model.parameters()):
        raise ConfigError(f"cannot save a model quantised with {method or 'an unknown method'}: its weights are not plain float32")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_hf_folder(lm: HFCausalLM, out: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """``lm`` saved as a Hugging Face folder (config, safetensors weights, tokenizer) plus ``fewshot.json`` (``meta`` and
    the weight files' SHA-256, which :func:`~fewshot.models.causal_lm.load_hf_folder` checks), written beside ``out`` and renamed into place, so a stopped write leaves no half folder; ``out`` must not exist."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; answer tuning writes a new folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain_weights(lm.model)
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        digests = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}  # checked again at load
        (tmp / "fewshot.json").write_text(json.dumps({"format": TUNED_FORMAT, **meta, "sha256": digests}, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tune_lm(model: str, corpus: str | os.PathLike[str], out: str | os.PathLike[str], steps: int = 80, lr: float = 1e-3,
            batch_size: int = 8, rank: int = 16, seed: int = 0, marker: str = "a:", max_tokens: int = 256,
            log: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """``fewshot icl tune-lm``: open ``model`` (smollm2 or a Hugging Face causal LM folder), tune it on the answers of
    ``corpus`` (one text per line, e.g. ``fewshot data scene-corpus``), save it to the new folder ``out``; what was done."""
    from fewshot.models.causal_lm import open_causal_lm

    out, corpus = Path(out), Path(corpus)
    if out.exists():  # before the minutes of tuning, not after
        raise ConfigError(f"{out} exists; answer tuning writes a new folder")
    if not corpus.is_file():
        raise DataError(f"corpus {corpus} is not a file")
    lm = open_causal_lm(model)
    if isinstance(lm, HFCausalLM):
        plain_weights(lm.model)  # a model that cannot be saved is refused before the minutes of tuning
    rows = answer_rows(lm, corpus.read_text(encoding="utf-8").splitlines(), marker, max_tokens)
    losses: list[float] = []

    def record(step: int, loss: float) -> None:
        losses.append(loss)
        if log is not None:
            log(step, loss)

    tuned = tune_on_answers(lm, rows, steps, lr, batch_size, rank, seed, record)
    meta = {"base": str(model), "corpus": str(corpus), "rows": len(rows), "marker": marker, "steps": steps, "lr": lr,
            "batch_size": batch_size, "rank": rank, "seed": seed, "final_loss": float(np.mean(losses[-10:]))}
    save_hf_folder(tuned, out, meta)
    return {"out": str(out), **meta}
