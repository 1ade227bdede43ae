"""Prompt-based adaptation (fewshot.adapt.prompts, fewshot.adapt.pgn) against a ViT forward written
out by hand (unfolded patches, explicit LayerNorm, softmax(QKᵀ/√d)V, explicit GELU MLP), plus the
wrapper contract: frozen base, closed-form parameter counts, identities at zero, training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.adapt.pgn import PromptGenerationNetwork
from fewshot.adapt.prompts import (
    DeepPromptTuning,
    PaddingPrompt,
    PrefixTuning,
    PromptTuning,
    VisualPromptTuning,
)
from fewshot.errors import ConfigError, DataError
from fewshot.models.encoders import Conv4, SmallResNet18, ViT

TOL = dict(atol=1e-10, rtol=1e-10)
DIM, DEPTH, HEADS, SIZE, PATCH = 32, 2, 4, 8, 4


def tiny_vit(channels: int = 1, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    vit = ViT(channels, SIZE, PATCH, dim=DIM, depth=DEPTH, heads=HEADS)
    with torch.no_grad():
        vit.cls_token.normal_()  # zero by default; a random one tests that [CLS] stays first
    return vit


def images(batch: int = 3, channels: int = 1, size: int = SIZE, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# The reference: the ViT transcribed from its definition, sharing only the weights.


def ref_layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_attention(attn, x: torch.Tensor, past=None) -> torch.Tensor:
    """softmax(Q [K_past; K]ᵀ/√d) [V_past; V] per head, written out."""
    b, t, d = x.shape
    h = attn.heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, t, h, d // h).transpose(1, 2) for i in range(3))
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    weights = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d // h))
    y = (weights / weights.sum(-1, keepdim=True)) @ v
    return y.transpose(1, 2).reshape(b, t, d) @ attn.proj.weight.T + attn.proj.bias


def ref_block(block, x: torch.Tensor, past=None) -> torch.Tensor:
    x = x + ref_attention(block.attn, ref_layer_norm(block.norm1, x), past)
    fc1, fc2 = block.mlp[0], block.mlp[2]
    hidden = ref_layer_norm(block.norm2, x) @ fc1.weight.T + fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return x + hidden @ fc2.weight.T + fc2.bias


def ref_patches(vit, x: torch.Tensor) -> torch.Tensor:
    """Non-overlapping patches flattened (c, i, j) and projected: (B, patches, D)."""
    b, c, s, _ = x.shape
    p = vit.patch_embed.proj.kernel_size[0]
    g = s // p
    patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
    w = vit.patch_embed.proj.weight.reshape(vit.dim, -1)
    return patches @ w.T + vit.patch_embed.proj.bias


def ref_vit(vit, x: torch.Tensor, layer_prompts=None, pasts=None) -> torch.Tensor:
    """layer_prompts[l] (B, n, D) or None: tokens put right after [CLS] at layer l's input, replacing
    the prompts a lower layer put there; pasts[l]: (K, V) prepended in layer l's attention."""
    tokens = ref_patches(vit, x)
    z = torch.cat([vit.cls_token.expand(x.shape[0], 1, -1), tokens], 1) + vit.pos_embed
    n_prev = 0
    for layer, block in enumerate(vit.trunk.blocks):
        if layer_prompts is not None and layer_prompts[layer] is not None:
            z = torch.cat([z[:, :1], layer_prompts[layer], z[:, 1 + n_prev :]], 1)
            n_prev = layer_prompts[layer].shape[1]
        z = ref_block(block, z, None if pasts is None else pasts[layer])
    return ref_layer_norm(vit.trunk.norm, z)[:, 0]


def test_reference_is_the_vit():
    vit = tiny_vit().double()
    x = images()
    torch.testing.assert_close(ref_vit(vit, x), vit(x), **TOL)


# Every wrapper, for the contract tests.


def build(name: str) -> nn.Module:
    if name == "prompt":
        return PromptTuning(tiny_vit(), n_prompts=3)
    if name == "deep":
        return DeepPromptTuning(tiny_vit(), n_prompts=3)
    if name == "prefix":
        return PrefixTuning(tiny_vit(), n_prefix=3, embed_dim=8, hidden=16)
    if name == "prefix-direct":
        return PrefixTuning(tiny_vit(), n_prefix=3, reparam=False)
    if name == "pgn-patch":
        return PromptGenerationNetwork(tiny_vit(), n_prompts=2, library_size=5, hidden=16)
    if name == "pgn-conv":
        return PromptGenerationNetwork(tiny_vit(), n_prompts=2, library_size=5, net="conv", width=4)
    if name == "pad-vit":
        return PaddingPrompt(tiny_vit(), pad=2)
    if name == "pad-conv4":
        torch.manual_seed(0)
        return PaddingPrompt(Conv4(1, 16, width=8, pools=2), pad=3, image_size=16)
    if name == "pad-resnet18":
        torch.manual_seed(0)
        return PaddingPrompt(SmallResNet18(1, 8), pad=2, image_size=8)
    raise AssertionError(name)


WRAPPERS = ["prompt", "deep", "prefix", "prefix-direct", "pgn-patch", "pgn-conv", "pad-vit", "pad-conv4", "pad-resnet18"]


def input_size(name: str) -> int:
    return 16 if name == "pad-conv4" else SIZE


@pytest.mark.parametrize("name", WRAPPERS)
def test_base_is_frozen_and_gets_no_gradient(name):
    wrapper = build(name).train()
    assert not wrapper.base.training  # BatchNorm of a frozen base keeps its statistics
    assert wrapper.dim == wrapper.base.dim
    assert all(not p.requires_grad for p in wrapper.base.parameters())
    trainable = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("base.") for n in trainable)
    r = wrapper(images(3, size=input_size(name), dtype=torch.float32))
    assert r.shape == (3, wrapper.dim)
    r.square().sum().backward()
    assert all(p.grad is None for p in wrapper.base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.parameters() if p.requires_grad)


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name, count",
    [
        ("prompt", 3 * DIM),
        ("deep", DEPTH * 3 * DIM),
        ("prefix", 3 * 8 + 8 * 16 + 16 + 16 * 2 * DEPTH * DIM + 2 * DEPTH * DIM),
        ("prefix-direct", 2 * DEPTH * 3 * DIM),
        ("pgn-patch", 5 * DIM + DIM * 16 + 16 + 16 * 2 * 5 + 2 * 5),
        ("pgn-conv", 5 * DIM + (9 * 1 * 4 + 4) + 2 * 4 + (9 * 4 * 4 + 4) + 2 * 4 + 4 * 2 * 5 + 2 * 5),
        ("pad-vit", 1 * (SIZE**2 - (SIZE - 4) ** 2)),
        ("pad-conv4", 1 * (16**2 - (16 - 6) ** 2)),
    ],
)
def test_trainable_parameter_counts_match_closed_forms(name, count):
    assert n_trainable(build(name)) == count


def test_zero_length_prompts_and_prefixes_are_the_base():
    x = images()
    base = tiny_vit().double()
    for wrapper in [
        PromptTuning(tiny_vit(), n_prompts=0),
        DeepPromptTuning(tiny_vit(), n_prompts=0),
        PrefixTuning(tiny_vit(), n_prefix=0),
        PrefixTuning(tiny_vit(), n_prefix=0, reparam=False),
    ]:
        torch.testing.assert_close(wrapper.double()(x), base(x), **TOL)


def test_prompts_keep_the_base_pooling():
    """A mean-pooled ViT stays mean-pooled under prompts: zero prompts give the base r, not its [CLS]."""
    torch.manual_seed(0)
    base = ViT(1, SIZE, PATCH, dim=DIM, depth=DEPTH, heads=HEADS, pool="mean").double()
    x = images()
    for wrapper in (PromptTuning(base, n_prompts=0), DeepPromptTuning(base, n_prompts=0)):
        torch.testing.assert_close(wrapper(x), base(x), **TOL)
    assert not torch.allclose(base.forward_tokens(x)[:, 0], base(x))  # a [CLS] readout would differ


@pytest.mark.parametrize("name, size", [("pad-conv4", 16), ("pad-vit", SIZE), ("pad-resnet18", SIZE)])
def test_padding_prompt_at_zero_is_the_base(name, size):
    wrapper = build(name).double()
    x = images(4, size=size)
    assert not torch.allclose(wrapper(x), wrapper.base(x))
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.requires_grad:
                p.zero_()
    torch.testing.assert_close(wrapper(x), wrapper.base(x), **TOL)


def test_prompt_tuning_matches_hand_written_forward():
    wrapper = PromptTuning(tiny_vit(), n_prompts=3).double()
    assert VisualPromptTuning is PromptTuning
    x = images()
    prompts = wrapper.prompts.expand(3, -1, -1)
    torch.testing.assert_close(wrapper(x), ref_vit(wrapper.base, x, [prompts, None]), **TOL)
    assert not torch.allclose(wrapper(x), wrapper.base(x))


def test_deep_prompt_tuning_matches_hand_written_forward():
    wrapper = DeepPromptTuning(tiny_vit(), n_prompts=3).double()
    x = images()
    layer_prompts = [wrapper.prompts[layer].expand(3, -1, -1) for layer in range(DEPTH)]
    torch.testing.assert_close(wrapper(x), ref_vit(wrapper.base, x, layer_prompts), **TOL)
    # Layer 1's prompts replace layer 0's outputs: not the same as shallow prompts alone.
    assert not torch.allclose(wrapper(x), ref_vit(wrapper.base, x, [layer_prompts[0], None]))


def prefix_pasts(wrapper: PrefixTuning, batch: int):
    """Keys/values from P = Linear₂(tanh(Linear₁(P'))): columns [layer][key|value][D], heads split."""
    n = wrapper.n_prefix
    if wrapper.prefix is not None:
        table = [[wrapper.prefix[layer, kv] for kv in range(2)] for layer in range(DEPTH)]
    else:
        fc1, fc2 = wrapper.mlp[0], wrapper.mlp[2]
        out = torch.tanh(wrapper.embedding @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias  # (n, L·2·D)
        table = [[out[:, (2 * layer + kv) * DIM : (2 * layer + kv + 1) * DIM] for kv in range(2)] for layer in range(DEPTH)]
    split = lambda t: t.reshape(n, HEADS, DIM // HEADS).transpose(0, 1).expand(batch, -1, -1, -1)  # noqa: E731
    return [(split(k), split(v)) for k, v in table]


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_tuning_matches_explicit_attention_over_prefix_and_tokens(reparam):
    wrapper = PrefixTuning(tiny_vit(), n_prefix=3, reparam=reparam).double()
    x = images()
    ref = ref_vit(wrapper.base, x, pasts=prefix_pasts(wrapper, 3))
    torch.testing.assert_close(wrapper(x), ref, **TOL)
    assert not torch.allclose(wrapper(x), wrapper.base(x))


def test_materialize_keeps_outputs_and_drops_the_mlp():
    wrapper = PrefixTuning(tiny_vit(), n_prefix=3, embed_dim=8, hidden=16).double()
    x = images()
    before = wrapper(x)
    wrapper.materialize()
    torch.testing.assert_close(wrapper(x), before, **TOL)
    assert wrapper.mlp is None and wrapper.embedding is None
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == {"prefix"}
    assert n_trainable(wrapper) == 2 * DEPTH * 3 * DIM
    torch.testing.assert_close(wrapper(x), ref_vit(wrapper.base, x, pasts=prefix_pasts(wrapper, 3)), **TOL)
    wrapper(x).sum().backward()
    assert wrapper.prefix.grad is not None and wrapper.prefix.grad.abs().sum() > 0


@pytest.mark.parametrize("name, size, pad", [("pad-conv4", 16, 3), ("pad-vit", SIZE, 2)])
def test_padding_prompt_touches_only_the_border(name, size, pad):
    wrapper = build(name).double()
    phi = wrapper.prompt_image()
    border = torch.ones(size, size, dtype=torch.bool)
    border[pad : size - pad, pad : size - pad] = False
    assert phi.shape == (1, 1, size, size)
    assert (phi[..., ~border] == 0).all() and (phi[..., border] != 0).all()
    # The same canvas placed by index: the paper's four strips.
    ref = torch.zeros(1, 1, size, size, dtype=torch.float64)
    ref[..., :pad, :] = wrapper.pad_up
    ref[..., size - pad :, :] = wrapper.pad_down
    ref[..., pad : size - pad, :pad] = wrapper.pad_left
    ref[..., pad : size - pad, size - pad :] = wrapper.pad_right
    x = images(2, size=size)
    torch.testing.assert_close(wrapper(x), wrapper.base(x + ref), **TOL)
    # A gradient arriving only on interior pixels reaches no prompt parameter; one on the border does.
    params = [p for p in wrapper.parameters() if p.requires_grad]
    upstream = torch.randn(1, 1, size, size, dtype=torch.float64)
    inner = torch.autograd.grad((wrapper.prompt_image() * upstream * ~border).sum(), params)
    assert all((g == 0).all() for g in inner)
    outer = torch.autograd.grad((wrapper.prompt_image() * upstream * border).sum(), params)
    assert all((g != 0).all() for g in outer)


@pytest.mark.parametrize("net", ["patch", "conv"])
def test_pgn_weights_are_distributions_that_depend_on_the_input(net):
    wrapper = build(f"pgn-{net}").double().eval()
    x = images(3)
    w = wrapper.prompt_weights(x)
    assert w.shape == (3, 2, 5) and (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, dtype=torch.float64), **TOL)
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    torch.testing.assert_close(wrapper.prompts(x), torch.einsum("bnl,ld->bnd", w, wrapper.library), **TOL)


def test_pgn_patch_net_weights_and_forward_match_hand_written():
    wrapper = build("pgn-patch").double()
    x = images(3)
    fc1, fc2 = wrapper.generator_net[0], wrapper.generator_net[2]
    pooled = ref_patches(wrapper.base, x).mean(1)
    hidden = pooled @ fc1.weight.T + fc1.bias
    logits = (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) @ fc2.weight.T + fc2.bias
    w = torch.exp(logits.view(3, 2, 5))
    w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(wrapper.prompt_weights(x), w, **TOL)
    torch.testing.assert_close(wrapper(x), ref_vit(wrapper.base, x, [w @ wrapper.library, None]), **TOL)


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_few_steps_reduce_cross_entropy_through_the_wrapper(name):
    wrapper = build(name)
    base_state = {k: v.clone() for k, v in wrapper.base.state_dict().items()}
    torch.manual_seed(3)
    head = nn.Linear(wrapper.dim, 3).requires_grad_(False)  # fixed: only the prompts can lower the loss
    nn.init.normal_(head.weight)  # logits of order 1, so the loss has room to move
    x = images(6, size=input_size(name), seed=4, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam([p for p in wrapper.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(head(wrapper(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(torch.equal(v, wrapper.base.state_dict()[k]) for k, v in base_state.items())  # BN stats too


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PromptTuning(Conv4(1, 16, width=8)), "needs a ViT encoder"),
        (lambda: PrefixTuning(Conv4(1, 16, width=8)), "needs a ViT encoder"),
        (lambda: PromptGenerationNetwork(Conv4(1, 16, width=8)), "needs a ViT encoder"),
        (lambda: PromptTuning(tiny_vit(), n_prompts=-1), "n_prompts must be an integer ≥ 0"),
        (lambda: DeepPromptTuning(tiny_vit(), n_prompts=1.5), "n_prompts must be an integer"),
        (lambda: PrefixTuning(tiny_vit(), reparam=False, hidden=8), "set reparam=true"),
        (lambda: PrefixTuning(tiny_vit(), embed_dim=0), "embed_dim must be an integer ≥ 1"),
        (lambda: PrefixTuning(tiny_vit(), reparam="yes"), "reparam must be true or false"),
        (lambda: PaddingPrompt(Conv4(1, 16, width=8)), "pass image_size"),
        (lambda: PaddingPrompt(tiny_vit(), pad=4), "leaves no interior"),
        (lambda: PaddingPrompt(tiny_vit(), pad=0), "pad must be an integer ≥ 1"),
        (lambda: PromptGenerationNetwork(tiny_vit(), net="resnet"), "unknown net 'resnet'"),
        (lambda: PromptGenerationNetwork(tiny_vit(), width=8), "width sizes the 'conv' net"),
        (lambda: PromptGenerationNetwork(tiny_vit(), net="conv", hidden=8), "hidden sizes the 'patch' net"),
        (lambda: PromptGenerationNetwork(tiny_vit(), library_size=0), "library_size must be an integer ≥ 1"),
        (lambda: PromptTuning(nn.Linear(2, 2)), "needs an encoder module with an integer .dim"),
    ],
)
def test_bad_options_raise_one_line_config_errors(make, message):
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_padding_prompt_rejects_images_of_another_size():
    with pytest.raises(DataError, match=r"expects images \(B, 1, 16, 16\)"):
        build("pad-conv4")(torch.zeros(2, 1, 28, 28))
