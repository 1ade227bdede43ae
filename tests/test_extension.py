"""Extending fewshot without editing it: a toy encoder, method, data source and adaptation method,
each one class (or function) and one registry entry, through pretrain → evaluate → adapt; and a data
source with options of its own (one loader, one config class, one entry)."""

import pytest
import torch
from pydantic import Field
from torch import nn

from fewshot import api, config as config_module
from fewshot.adapt.registry import ADAPT_METHODS, AdaptMethod, register as register_adapt_method
from fewshot.config import DataConfig, MethodConfig
from fewshot.data.registry import SOURCES, RunData, load_run_data, register_image_source, register_source
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
    for table, name in ((encoders._REGISTRY, "tiny-mlp"), (SOURCES, "blobs"), (config_module._SOURCE_CONFIGS, "blobs"),
                        (METHODS, "noisy-pair"), (ADAPT_METHODS, "last-layer")):
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


class RingsConfig(DataConfig):
    rings: int = Field(4, ge=2, description="classes: one ring radius each")
    held_out: int = Field(2, ge=1, description="the last N radii are the evaluation classes")


def rings(data: RingsConfig, eval_path, tokenizer) -> RunData:
    """``data.rings`` classes of 6 images: a ring whose radius grows with the class, its centre
    jittered; the last ``data.held_out`` radii are held out for evaluation."""
    g = torch.Generator().manual_seed(data.split_seed)
    size = data.image_size
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).float()
    images, labels = [], []
    for c in range(data.rings):
        for _ in range(6):
            at = size / 2 + torch.randn(2, generator=g) * 0.5
            distance = ((grid - at[:, None, None]) ** 2).sum(0).sqrt()
            images.append(torch.exp(-((distance - 1.5 - c * size / (3 * data.rings)) ** 2))[None])
            labels.append(c)
    every = ImageSet(torch.stack(images), torch.tensor(labels), [f"r{c}" for c in range(data.rings)])
    train = list(range(data.rings - data.held_out))
    return RunData(every.select_classes(train), every.select_classes(list(range(len(train), data.rings))))


@pytest.fixture
def ring_source(registered):
    register_source("rings", rings, RingsConfig)
    yield
    SOURCES.pop("rings")
    config_module._SOURCE_CONFIGS.pop("rings")


def test_a_source_with_its_own_options_is_one_loader_one_config_class_one_entry(ring_source, tmp_path):
    """The source's options are validated by its own class, refused on other sources, dispatched to
    its loader, and stored with the run: the checkpoint's config reads them back (a dump through the
    DataConfig base alone would lose them and read back the default 4)."""
    from fewshot.errors import ConfigError
    from fewshot.run import Run

    config = api.load_config(overrides=[
        f"out={tmp_path}", "name=rings", "data.source=rings", "data.rings=5", "data.image_size=12", "encoder=tiny-mlp",
        "method=noisy-pair", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.channels_last=false",
        "eval.ways=[2]", "eval.shots=[1]", "eval.queries=2", "eval.episodes=4", "eval.probe_fractions=[]", "eval.baselines=false",
    ])
    assert isinstance(config.data, RingsConfig) and config.data.rings == 5
    with pytest.raises(ConfigError, match=r"'data.rings' \(an option of data.source rings\)"):
        api.load_config(overrides=["data.rings=5"])
    with pytest.raises(ConfigError, match="'data.rings'"):
        api.load_config(overrides=["data.source=rings", "data.rings=1"])
    data = load_run_data(config.data)
    assert data.pretrain.classes == ["r0", "r1", "r2"] and data.evaluation.classes == ["r3", "r4"]

    result = api.pretrain(config, progress=False)
    run = Run.open(result.run_dir)
    assert isinstance(run.config.data, RingsConfig) and run.config.data.rings == 5
    assert run.evaluation_set().classes == ["r3", "r4"]
    rows = api.evaluate_run(result.run_dir).to_json()["results"]
    assert {r["encoder"] for r in rows} == {"pretrained"}
