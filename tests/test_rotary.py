"""Rotary positions (RoFormer) in the token trunk: the rotation against a loop over pairs, scores that depend on
the offset alone (a non-rotation fails it), and a rotary GPT's KV cache (new tokens numbered from 0: caught), position sensitivity and recipe option."""

import math

import pytest
import torch

from fewshot.config import RunConfig
from fewshot.errors import ConfigError
from fewshot.methods.language import build_text_tower
from fewshot.models.language import TextTransformer
from fewshot.models import transformer
from fewshot.models.transformer import Attention, rotate


def rotate_by_loop(x, start, base=10000.0):
    """Each head vector's pairs (x_i, x_{i + d/2}) turned by the angle p · base^(−2i/d), one by one."""
    out = x.clone()
    d = x.shape[-1]
    half = d // 2
    for p in range(x.shape[-2]):
        for i in range(half):
            angle = (start + p) * base ** (-2 * i / d)
            a, b = x[..., p, i], x[..., p, i + half]
            out[..., p, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., p, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_rotate_matches_a_loop_over_pairs():
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for start in (0, 5):
        assert torch.allclose(rotate(x, start), rotate_by_loop(x, start), atol=1e-5)


def scaled_only(x, start):
    """A broken variant: positions scale each coordinate by cos(pθ) instead of turning the pairs."""
    half = x.shape[-1] // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=x.dtype) * 2 / x.shape[-1])
    angle = torch.arange(start, start + x.shape[-2], dtype=x.dtype)[:, None] * theta
    return x * torch.cat([angle.cos(), angle.cos()], dim=-1)


@pytest.mark.parametrize("variant", [rotate, scaled_only])
def test_scores_depend_on_the_offset_alone(variant):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 6, 16, generator=g, dtype=torch.float64), torch.randn(1, 2, 6, 16, generator=g, dtype=torch.float64)
    scores = [variant(q, s) @ variant(k, s).transpose(-1, -2) for s in (0, 9, 40)]
    invariant = all(torch.allclose(scores[0], other, atol=1e-4) for other in scores[1:])
    assert invariant == (variant is rotate)  # the negative control (scaling, no rotation) moves with the start


@pytest.mark.parametrize("variant", ["numbered after the past", "numbered from 0 (broken)"])
def test_rotary_gpt_cache_equals_recomputation_and_order_matters(monkeypatch, variant):
    if variant != "numbered after the past":  # negative control: new tokens rotated as if the cache were empty
        monkeypatch.setattr(transformer, "rotate", lambda x, start, base=10000.0: rotate(x, 0, base))
    torch.manual_seed(0)
    tower = TextTransformer(40, 24, dim=16, depth=2, heads=2, causal=True, positions="rotary").eval()
    ids = torch.randint(4, 40, (2, 12))
    with torch.no_grad():
        whole = tower.hidden(ids)
        first, past = tower.hidden(ids[:, :5], return_kv=True)
        rest = tower.hidden(ids[:, 5:], past=past)
        swapped = ids.clone()
        swapped[:, [2, 7]] = ids[:, [7, 2]]
        moved = tower.hidden(swapped)
    assert torch.allclose(whole, torch.cat([first, rest], dim=1), atol=1e-5) == (variant == "numbered after the past")
    # no position embedding is added, yet the last state knows where tokens stood (the same multiset, another order)
    assert torch.count_nonzero(tower.pos_emb) == 0 and not tower.pos_emb.requires_grad
    assert not torch.allclose(whole[:, -1], moved[:, -1], atol=1e-4)


def test_the_recipe_option_and_its_errors():
    config = RunConfig.model_validate({"name": "t", "data": {"source": "text", "seq_len": 16, "vocab_size": 300},
                                       "encoder": {"name": "text-transformer", "options": {"dim": 16, "depth": 1, "heads": 2, "positions": "rotary"}},
                                       "method": {"name": "gpt"}})
    tower = build_text_tower(config, causal=True)
    assert tower.positions == "rotary" and all(block.attn.rotary for block in tower.trunk.blocks)
    config.encoder.options["positions"] = "sinusoid"
    with pytest.raises(ConfigError, match="unknown positions 'sinusoid'"):
        build_text_tower(config, causal=True)
    with pytest.raises(ValueError, match="even head width"):
        Attention(6, 2, causal=True, rotary=True)
