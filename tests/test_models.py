"""Every registered encoder through the same contract: x → (B, dim), gradients, errors; the token
trunk's attention (past, padding mask, cross-attention) against explicit computations."""

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.models.encoders import create_encoder, encoder_names
from fewshot.models.heads import projection_head

SIZES = {"conv4": 28, "resnet18": 16, "vit-tiny": 16}
SMALL = {"conv4": {"width": 8}, "resnet18": {}, "vit-tiny": {"depth": 1},
         "text-transformer": {"vocab_size": 50, "max_len": 9, "dim": 16, "depth": 1, "heads": 2}}


def encoder_and_input(name, channels):
    if name == "text-transformer":  # token ids; no channels
        return create_encoder(name, **SMALL[name]), torch.randint(6, 50, (3, 7))
    size = SIZES[name]
    return create_encoder(name, channels, size, **SMALL[name]), torch.randn(3, channels, size, size, requires_grad=True)


@pytest.mark.parametrize("name", encoder_names())
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_contract(name, channels):
    enc, x = encoder_and_input(name, channels)
    r = enc(x)
    assert r.shape == (3, enc.dim)
    r.square().sum().backward()
    if x.is_floating_point():
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    if hasattr(enc, "forward_tokens"):  # one signature: x → (B, [CLS]/start + T, dim)
        tokens = enc.forward_tokens(x)
        assert tokens.shape[0] == 3 and tokens.shape[2] == enc.dim
        torch.testing.assert_close(enc(x), tokens[:, 0])  # both default to the first token's state


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



def test_attention_mask_of_any_pattern_matches_a_loop_transcription():
    """attn_mask (B, T, T) gives, for each query, softmax over exactly its allowed keys; with causal it is
    intersected with the causal mask; a row it empties stays finite; a wrong shape is refused."""
    from fewshot.models.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(8, 2).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    allowed = torch.rand(2, 4, 4) > 0.5
    allowed[:, :3, 0] = True  # every row but the last sees a key; row 3 of batch 1 none at all
    allowed[0, 3, 2] = True
    allowed[1, 3] = False
    q, k, v = attn.qkv(x).view(2, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)

    def loop(rule):
        out = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
        for b in range(2):
            for h in range(2):
                for i in range(4):
                    keys = [j for j in range(4) if rule(b, i, j)] or list(range(4))
                    w = torch.softmax(torch.stack([q[b, h, i] @ k[b, h, j] / 2.0 for j in keys]), 0)
                    out[b, h, i] = sum(wj * v[b, h, j] for wj, j in zip(w, keys))
        return attn.proj(out.transpose(1, 2).reshape(2, 4, 8))

    got = attn(x, attn_mask=allowed)
    torch.testing.assert_close(got, loop(lambda b, i, j: bool(allowed[b, i, j])), atol=1e-12, rtol=1e-12)
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, attn(x))  # negative control: the mask matters
    attn.causal = True
    torch.testing.assert_close(attn(x, attn_mask=allowed), loop(lambda b, i, j: bool(allowed[b, i, j]) and j <= i),
                               atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=allowed[:, :3])

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


def _pad(seqs, side):
    """Equal-length batch (B, T, D) from sequences of different lengths, junk at the padded
    positions, and the mask (B, T) that is True there."""
    t = max(len(x) for x in seqs)
    batch = torch.randn(len(seqs), t, seqs[0].shape[1])
    mask = torch.ones(len(seqs), t, dtype=torch.bool)
    for i, x in enumerate(seqs):
        span = slice(0, len(x)) if side == "right" else slice(t - len(x), t)
        batch[i, span], mask[i, span] = x, False
    return batch, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_gives_each_sequence_as_if_alone(causal, side):
    from fewshot.models.transformer import TokenTrunk

    torch.manual_seed(0)
    trunk = TokenTrunk(16, depth=2, heads=4, causal=causal).eval()
    seqs = [torch.randn(n, 16) for n in (5, 3, 1)]
    batch, mask = _pad(seqs, side)
    out, unmasked = trunk(batch, padding_mask=mask), trunk(batch)
    assert torch.isfinite(out).all()  # padded queries with no key to see stay finite
    differs = []
    for i, x in enumerate(seqs):
        alone = trunk(x[None])[0]
        torch.testing.assert_close(out[i][~mask[i]], alone, atol=1e-5, rtol=1e-5)
        differs.append(not torch.allclose(unmasked[i][~mask[i]], alone, atol=1e-4))
    # Negative control: without the mask the padded sequences see the junk, except where a causal
    # model's padding comes after every real token.
    assert differs == [False, not (causal and side == "right"), not (causal and side == "right")]


def test_cross_attention_matches_explicit_softmax_in_float64():
    from fewshot.models.transformer import Attention, TokenTrunk

    torch.manual_seed(0)
    attn = Attention(16, 4, context_dim=12).double()
    x, context = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    heads = lambda t: t.reshape(2, -1, 4, 4).transpose(1, 2)  # noqa: E731
    q = heads(x @ attn.q.weight.T + attn.q.bias)
    kv = context @ attn.kv.weight.T + attn.kv.bias
    k, v = heads(kv[..., :16]), heads(kv[..., 16:])

    def explicit(mask):
        scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(mask[:, None, None, :], float("-inf"))
        y = torch.exp(scores - scores.amax(-1, keepdim=True))
        y = (y / y.sum(-1, keepdim=True)) @ v
        return y.transpose(1, 2).reshape(2, 5, 16) @ attn.proj.weight.T + attn.proj.bias

    got = attn(x, context=context, padding_mask=pad)
    torch.testing.assert_close(got, explicit(pad), atol=1e-12, rtol=1e-12)
    assert not torch.allclose(got, explicit(torch.zeros_like(pad)))  # negative control: the mask matters
    with pytest.raises(ValueError, match="context"):
        attn(x)

    # Through the trunk: blocks route the context and its mask; padded context entries change nothing.
    trunk = TokenTrunk(16, depth=2, heads=4, context_dim=12).double()
    other = context.clone()
    other[1, 4:] = 100.0
    torch.testing.assert_close(trunk(x, context=context, context_mask=pad), trunk(x, context=other, context_mask=pad))
    assert not torch.allclose(trunk(x, context=context), trunk(x, context=other))
    assert not torch.allclose(trunk(x, context=context), trunk(x, context=2 * context))
