"""Extending fewshot without editing it: a toy encoder, method, data source and adaptation method,
each one class (or function) and one registry entry, through pretrain → evaluate → adapt."""

import pytest
import torch
from pydantic import Field
from torch import nn

from fewshot import api
from fewshot.adapt.registry import ADAPT_METHODS, AdaptMethod, register as register_adapt_method
from fewshot.config import MethodConfig
from fewshot.data.datasets import IMAGE_SOURCES, register_image_source
from fewshot.data.types import ImageSet
from fewshot.methods import METHODS, Method, register_method
from fewshot.models import encoders


class TinyMLP(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 12, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, width), nn.ReLU(), nn.Linear(width, width))
        self.dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def blobs(data, size: int) -> ImageSet:
    """8 classes of 10 images: a bright blob at a class-specific place, jittered."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).float()
    images, labels = [], []
    for c in range(8):
        centre = torch.tensor([2 + (c % 4) * (size - 4) / 3, 3 + (c // 4) * (size - 6)])
        for _ in range(10):
            at = centre + torch.randn(2, generator=g) * 0.6
            images.append(torch.exp(-((grid - at[:, None, None]) ** 2).sum(0) / 4.0)[None])
            labels.append(c)
    return ImageSet(torch.stack(images), torch.tensor(labels), [f"blob{c}" for c in range(8)])


class NoisyPairConfig(MethodConfig):
    noise: float = Field(0.1, gt=0, description="σ of the Gaussian noise that makes the second view")


class NoisyPair(Method):
    """Pull an image's representation towards that of a noisy copy, against a spread term."""

    config_class = NoisyPairConfig

    def __init__(self, config) -> None:
        super().__init__()
        self.encoder = self.build_encoder(config)
        self.noise = config.method.noise

    def forward(self, batch, generator):
        x = batch["images"]
        noisy = x + self.noise * torch.randn(x.shape, generator=generator)
        r1, r2 = self.encoder(x), self.encoder(noisy)
        return (r1 - r2).pow(2).mean() - r1.std(0).mean().clamp(max=1.0), {}


def last_layer_only(encoder: nn.Module, *, generator=None) -> nn.Module:
    encoder.requires_grad_(False)
    [*encoder.modules()][-1].requires_grad_(True)
    return encoder


@pytest.fixture
def registered():
    encoders.register("tiny-mlp")(TinyMLP)
    register_image_source("blobs", blobs)
    register_method("noisy-pair", NoisyPair)
    register_adapt_method(AdaptMethod("last-layer", last_layer_only, "only the last layer trains"))
    yield
    for table, name in ((encoders._REGISTRY, "tiny-mlp"), (IMAGE_SOURCES, "blobs"), (METHODS, "noisy-pair"), (ADAPT_METHODS, "last-layer")):
        table.pop(name)


def test_toy_parts_run_pretrain_evaluate_adapt_through_the_api(registered, tmp_path):
    config = api.load_config(overrides=[
        f"out={tmp_path}", "name=toy", "data.source=blobs", "data.image_size=12", "encoder=tiny-mlp", "method=noisy-pair",
        "method.noise=0.2", "train.steps=5", "train.batch_size=8", "train.warmup_steps=1", "train.channels_last=false",
        "eval.ways=[2]", "eval.shots=[1]", "eval.queries=3", "eval.episodes=10", "eval.probe_fractions=[]",
    ])
    assert config.method.noise == 0.2
    result = api.pretrain(config, progress=False)
    assert result.step == 5
    report = api.evaluate_run(result.run_dir)
    rows = {(r["encoder"], r["classifier"]) for r in report.to_json()["results"]}
    assert ("pretrained", "proto-cosine") in rows and ("pixels", "proto-cosine") in rows
    row = api.adapt(result.run_dir, "last-layer", episodes=2, way=2, shot=1, query=2)
    assert row["episodes"] == 2 and 0 <= row["accuracy"] <= 1


def test_an_unregistered_name_is_a_config_error(registered):
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown data source"):
        api.load_config(overrides=["data.source=blobz"])
    with pytest.raises(ConfigError, match="unknown method 'noisy-pairs'"):
        api.load_config(overrides=["method=noisy-pairs"])
