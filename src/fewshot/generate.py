"""Text generation from a GPT: greedy, temperature and top-k sampling, with a KV cache.

Each step feeds only the newest token and the cached keys/values of all earlier positions
(``use_cache=False`` recomputes the whole context instead; the two give identical tokens).
When the context is full, it slides forward by half the model's window: the kept tokens are
re-encoded after [BOS] and caching resumes (both modes follow the same rule).
"""

from __future__ import annotations

import torch

from fewshot.data.tokenizer import BOS_ID
from fewshot.errors import ConfigError
from fewshot.models.language import LanguageModel, prepend


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    temperature = 0: argmax (greedy). Otherwise sample from softmax(logits / temperature)
    restricted to the ``top_k`` largest logits (Fan et al. 2018), drawn with ``generator``.
    """
    if temperature < 0:
        raise ConfigError(f"temperature must be ≥ 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be ≥ 1 (or None for the whole vocabulary), got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """``prompt`` followed by ``max_new_tokens`` generated ids ([BOS] is added internally, not returned)."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if not model.causal:
        raise ConfigError("generation needs a causal language model (a gpt run)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens, start, past = list(prompt), 0, None
    for _ in range(max_new_tokens):
        if 1 + len(tokens) - start > model.max_len:  # context full: keep the newest half, re-encode
            start, past = len(tokens) - model.max_len // 2, None
        if use_cache and past is not None:
            logits, past = model(torch.tensor([tokens[-1:]], device=device), past=past, return_kv=True)
        else:
            context = prepend(torch.tensor([tokens[start:]], dtype=torch.long, device=device), BOS_ID)
            logits, past = model(context, return_kv=True)
        tokens.append(int(sample_next(logits[:, -1], temperature, top_k, generator)))
    model.train(was_training)
    return tokens
