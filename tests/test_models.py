"""Every registered encoder through the same contract: (B, C, H, W) → (B, dim), gradients, errors."""

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.models.encoders import create_encoder, encoder_names
from fewshot.models.heads import projection_head

SIZES = {"conv4": 28, "resnet18": 16, "vit-tiny": 16}
SMALL = {"conv4": {"width": 8}, "resnet18": {}, "vit-tiny": {"depth": 1}}


@pytest.mark.parametrize("name", encoder_names())
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_contract(name, channels):
    size = SIZES[name]
    enc = create_encoder(name, channels, size, **SMALL[name])
    x = torch.randn(3, channels, size, size, requires_grad=True)
    r = enc(x)
    assert r.shape == (3, enc.dim)
    r.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_channels_last_gives_the_same_output():
    enc = create_encoder("conv4", 1, 28, width=8).eval()
    x = torch.randn(4, 1, 28, 28)
    ref = enc(x)
    enc = enc.to(memory_format=torch.channels_last)
    torch.testing.assert_close(enc(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pools, dim", [(4, 8 * 1 * 1), (3, 8 * 3 * 3), (2, 8 * 7 * 7)])
def test_conv4_pools_set_the_grid(pools, dim):
    enc = create_encoder("conv4", 1, 28, width=8, pools=pools)
    assert enc.dim == dim and enc(torch.zeros(2, 1, 28, 28)).shape == (2, dim)


def test_vit_tokens_and_cls():
    enc = create_encoder("vit-tiny", 1, 16, depth=1)
    x = torch.randn(2, 1, 16, 16)
    tokens = enc.forward_tokens(x)
    assert tokens.shape == (2, 1 + (16 // 4) ** 2, enc.dim)
    torch.testing.assert_close(enc(x), tokens[:, 0])


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown encoder 'alexnet'.*conv4"):
        create_encoder("alexnet")
    with pytest.raises(ConfigError, match="conv4"):
        create_encoder("conv4", 1, 28, depth=3)  # an option the builder does not take
    with pytest.raises(ConfigError, match="at least"):
        create_encoder("conv4", 1, 8)


def test_projection_head_shapes():
    assert projection_head(10, 32, 4, layers=2)(torch.randn(5, 10)).shape == (5, 4)
    assert isinstance(projection_head(10, 32, 4, layers=0), torch.nn.Identity)


def _explicit_attention(attn, x, past=None):
    """Attention written out with softmax(QKᵀ/√d)V and an explicit mask: the reference."""
    b, t, d = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5
    if attn.causal:
        p = k.shape[2] - t
        allowed = torch.tensor([[j <= p + i for j in range(k.shape[2])] for i in range(t)])
        scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_past_matches_explicit_attention(causal):
    from fewshot.models.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(16, 4, causal=causal)
    x, past = torch.randn(2, 5, 16), (torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 4))
    torch.testing.assert_close(attn(x), _explicit_attention(attn, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, past), _explicit_attention(attn, x, past), atol=1e-5, rtol=1e-5)


def test_causal_attention_cache_equals_full_recompute():
    """Feeding tokens one at a time with the returned keys/values gives the full pass's outputs."""
    from fewshot.models.transformer import Block

    torch.manual_seed(0)
    block = Block(16, 4, causal=True)
    x = torch.randn(2, 6, 16)
    full = block(x)
    out, past = block(x[:, :2], return_kv=True)
    steps = [out]
    for i in range(2, 6):
        out, past = block(x[:, i : i + 1], past, return_kv=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert past[0].shape == (2, 4, 6, 4)
