"""Evaluation of a text run: held-out perplexity and few-shot speaker identification.

Perplexity = exp(mean token NLL) over the held-out split, cut into non-overlapping windows of
``data.seq_len`` tokens; each window starts after [BOS], so its first token is predicted from
[BOS] alone (as in training). Bits per character = total NLL / (ln 2 · characters), which does
not depend on the tokenizer. A masked LM has no left-to-right likelihood: for it we report the
masked-token perplexity, exp(mean NLL of the original tokens at BERT-masked positions, seeded),
which is not comparable with a causal perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fewshot.config import RunConfig
from fewshot.data.masking import causal_targets
from fewshot.data.text import encode_text, load_text_splits, parse_speeches
from fewshot.data.tokenizer import BOS_ID, load_tokenizer
from fewshot.evaluate.evaluator import EvalReport, random_encoder
from fewshot.evaluate.speakers import bag_of_words, embed_texts, speaker_episodes, speaker_pool
from fewshot.methods.base import Method
from fewshot.methods.language import MaskedLanguageModel
from fewshot.models.language import LanguageModel, prepend


def _windows(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` (the last may be shorter), covering every token once."""
    return list(tokens.split(seq_len))


def _summary(total_nll: float, count: int, n_chars: int | None, kind: str) -> dict[str, Any]:
    mean = total_nll / count
    out = {"kind": kind, "nll": mean, "perplexity": math.exp(mean), "tokens": count}
    if n_chars:
        out["bits_per_char"] = total_nll / (math.log(2) * n_chars)
    return out


@torch.no_grad()
def perplexity(model: LanguageModel, tokens: torch.Tensor, seq_len: int, n_chars: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """exp(mean NLL) of every token of ``tokens`` (N,) under the causal ``model`` ([BOS] before each window).

    Returns {"kind": "causal", "nll", "perplexity", "tokens", and "bits_per_char" if ``n_chars``}.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    windows = _windows(tokens, seq_len)
    for size in sorted({len(w) for w in windows}):  # equal lengths batch together (the last window may be short)
        same = [w for w in windows if len(w) == size]
        for b in range(0, len(same), batch_size):
            shifted = causal_targets(prepend(torch.stack(same[b : b + batch_size]).to(device), BOS_ID))
            logits = model(shifted.inputs)
            total += F.cross_entropy(logits.flatten(0, 1).float(), shifted.targets.flatten(), reduction="sum").item()
            count += shifted.targets.numel()
    model.train(was_training)
    return _summary(total, count, n_chars, "causal")


@torch.no_grad()
def masked_perplexity(method: MaskedLanguageModel, tokens: torch.Tensor, seq_len: int, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """exp(mean NLL of the original tokens at the masked positions), the method's own masking rule
    drawn from a generator seeded with ``seed`` (same masks every time)."""
    model = method.language_model()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    windows = _windows(tokens, seq_len)
    for size in sorted({len(w) for w in windows}):
        same = [w for w in windows if len(w) == size]
        for b in range(0, len(same), batch_size):
            masked = method.mask(torch.stack(same[b : b + batch_size]).to(device), generator)
            logits = model(masked.inputs)
            total += F.cross_entropy(logits.flatten(0, 1).float(), masked.targets.flatten(), reduction="sum").item()
            count += int(masked.mask.sum())
    model.train(was_training)
    return _summary(total, max(count, 1), None, "masked")


@dataclass
class TextEvalReport(EvalReport):
    perplexity: dict[str, Any] = field(default_factory=dict)
    speakers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "perplexity": self.perplexity, "speakers": self.speakers}


def evaluate_text_run(config: RunConfig, method: Method, run_dir: str | Path, log: Callable[[str], None] = lambda _: None) -> TextEvalReport:
    """Held-out perplexity and the speaker-identification table of a gpt / mlm run, with the
    bag-of-words and random-initialisation baselines when ``eval.baselines``."""
    data, ev, name = config.data, config.eval, config.method.name
    tokenizer = load_tokenizer(run_dir)
    splits = load_text_splits(data)
    held = encode_text(tokenizer, splits.heldout)
    log(f"perplexity on {len(held)} held-out tokens")
    if not method.encoder.causal:  # the model says which likelihood it has: masked tokens only
        ppl = masked_perplexity(method, held, data.seq_len, seed=ev.seed)
    else:
        ppl = perplexity(method.language_model(), held, data.seq_len, n_chars=len(splits.heldout))
    pool = speaker_pool(parse_speeches(splits.heldout), max(ev.shots) + ev.queries, data.holdout_classes, data.split_seed)
    log(f"speaker episodes over {len(pool.speakers)} held-out speakers ({len(pool.texts)} speeches)")
    features = {f"{name}-{p}": embed_texts(method.encoder, tokenizer, pool.texts, p) for p in method.encoder.pools}
    if ev.baselines:
        rand = random_encoder(config)
        features |= {f"random-{p}": embed_texts(rand, tokenizer, pool.texts, p) for p in rand.pools}
        features["bag-of-words"] = bag_of_words([t for _, t in parse_speeches(splits.train)], pool.texts)
    report = TextEvalReport(run_dir=str(run_dir), perplexity=ppl, speakers=pool.speakers)
    report.results = speaker_episodes(features, pool.labels, ev)
    return report


def perplexity_line(ppl: dict[str, Any]) -> str:
    """One sentence for reports and the terminal."""
    if ppl.get("kind") == "masked":
        return f"Held-out masked-token perplexity {ppl['perplexity']:.2f} over {ppl['tokens']} masked tokens (not comparable with a causal perplexity)."
    bpc = f", {ppl['bits_per_char']:.3f} bits/char" if "bits_per_char" in ppl else ""
    return f"Held-out perplexity {ppl['perplexity']:.2f} over {ppl['tokens']} tokens{bpc}."
