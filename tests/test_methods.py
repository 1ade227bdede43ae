"""Methods wire views → encoder → projector → objective; checked against the objective called by hand."""

import pytest
import torch

from fewshot.config import load_config
from fewshot.methods import METHODS, build_method, method_names
from fewshot.objectives import nt_xent_loss, supcon_loss
from fewshot.errors import ConfigError

TINY = ["data.image_size=16", "method.projection_hidden=16", "method.projection_dim=8", "encoder.options={width: 8}"]
# Methods tied to one encoder family get it here (after TINY, so these options replace TINY's).
ENCODER_FOR = {"mae": ["encoder=vit-tiny", "encoder.options={depth: 1}", "method.decoder_depth=1"]}
TEXT = ["data.source=text", "data.seq_len=8", "data.vocab_size=300", "encoder=text-transformer", "encoder.options={dim: 16, depth: 1, heads: 2}"]
ENCODER_FOR |= {"gpt": TEXT, "mlm": TEXT}
TEXT_METHODS = {"gpt", "mlm"}  # trained on token windows (B, seq_len); tests/test_text.py checks them in depth
SEQUENCE_METHODS = {"time-contrastive"}  # trained on frame sequences (B, T, C, H, W)


def _batch(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 3


def owned(name, overrides):
    """The overrides that ``name``'s config has a field for (each method owns its config)."""
    fields = METHODS[name].config_class.model_fields
    return [o for o in overrides if not o.startswith("method.") or o.split("=")[0].split(".")[1] in fields]


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains(name):
    method = build_method(load_config(overrides=[f"method={name}", *owned(name, TINY), *ENCODER_FOR.get(name, [])]))
    x, y = _batch()
    if name in SEQUENCE_METHODS:  # sequences (B, T, C, H, W) instead of images
        x = torch.rand(12, 6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    if name in TEXT_METHODS:
        x = torch.randint(6, 300, (12, 8), generator=torch.Generator().manual_seed(0))
    loss, logs = method(x, y, torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in method.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _by_hand(method, x, seed):
    v1, v2 = method.views.two_views(x, torch.Generator().manual_seed(seed))
    z = method.projector(method.encoder(torch.cat([v1, v2])))
    return z.chunk(2)


def test_simclr_is_nt_xent_on_two_views():
    cfg = load_config(overrides=["method=simclr", "method.temperature=0.3", "train.channels_last=false", *TINY])
    torch.manual_seed(0)
    method = build_method(cfg)
    x, y = _batch()
    loss, _ = method(x, y, torch.Generator().manual_seed(5))
    z1, z2 = _by_hand(method, x, 5)
    torch.testing.assert_close(loss, nt_xent_loss(z1, z2, 0.3))


def test_supcon_uses_labels():
    cfg = load_config(overrides=["method=supcon", "method.temperature=0.2", "train.channels_last=false", *TINY])
    method = build_method(cfg)
    x, y = _batch()
    loss, _ = method(x, y, torch.Generator().manual_seed(5))
    z1, z2 = _by_hand(method, x, 5)
    torch.testing.assert_close(loss, supcon_loss(torch.stack([z1, z2], 1), y, 0.2))
    assert method.needs_labels


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'byol2'.*simclr"):
        build_method(load_config(overrides=["method=byol2"]))
