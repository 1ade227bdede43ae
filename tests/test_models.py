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
