"""Methods wire views → encoder → projector → objective; checked against the objective called by hand."""

import operator

import pytest
import torch
from conftest import owned

from fewshot.config import load_config
from fewshot.methods import METHODS, build_method, method_names
from fewshot.objectives import nt_xent_loss, supcon_loss
from fewshot.errors import ConfigError

TINY = ["data.image_size=16", "method.projection_hidden=16", "method.projection_dim=8", "encoder.options={width: 8}"]
# MAE builds only on a ViT (after TINY, so these options replace TINY's).
ENCODER_FOR = {"mae": ["encoder=vit-tiny", "encoder.options={depth: 1}", "method.decoder_depth=1"]}
# A tiny tensor for every batch key a method can declare, and the data a recipe must name to give it.
_g = torch.Generator().manual_seed(0)
EXAMPLE = {
    "images": torch.rand(12, 1, 16, 16, generator=_g),
    "labels": torch.arange(12) % 3,
    "tokens": torch.randint(6, 300, (12, 8), generator=_g),
    "frames": torch.rand(12, 6, 1, 16, 16, generator=_g),
    "caption_keys": torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 1, 7, 8, 9]),  # rows 0 and 3, 1 and 8: identical captions
    "xs": torch.randn(12, 9, 4, generator=_g),  # regression prompts: 9 pairs in 4 dimensions, and their tasks
    "ys": torch.randn(12, 9, generator=_g),
    "ws": torch.randn(12, 4, generator=_g),
}
SOURCE_FOR = {"tokens": ["data.source=text", "data.seq_len=8", "data.vocab_size=300", "encoder=text-transformer",
                         "encoder.options={dim: 16, depth: 1, heads: 2}"],
             # image–caption pairs: the image tower is conv4 again, after the text source's encoder
             "caption_keys": ["encoder=conv4", "encoder.options={width: 8}", "method.text={dim: 16, depth: 1, heads: 2}"],
             # the prompt model is the method's own (encoder.* left at its defaults)
             "xs": ["data.source=linear-regression", "data.dim=4", "data.points=9", "data.curriculum_dims=null",
                    "data.curriculum_points=null", "encoder.options={}", "method.width=16", "method.depth=1", "method.heads=2"]}
# Classification prompts (icl-classify) read xs with a label per sample: their own source and example.
PROMPT_LABELS = ("xs", "labels")
# Scene questions (mm-cot): RGB scenes, a prompt and target in tokens, and where the target starts.
QUESTION_INPUTS = ("images", "tokens", "prompt_lengths")
QUESTION_SOURCE = ["data.source=scene-questions", "data.seq_len=10", "encoder=conv4", "encoder.options={width: 8}"]
QUESTION_EXAMPLE = {"images": torch.rand(12, 3, 16, 16, generator=_g), "tokens": EXAMPLE["tokens"], "prompt_lengths": torch.arange(12) % 4 + 1}
PROMPT_SOURCE = ["data.source=classification-prompts", "data.input_size=2", "encoder.options={}", "data.ways=3", "data.points=9", "method.width=16",
                 "method.depth=1", "method.heads=2"]
PROMPT_EXAMPLE = {"xs": torch.randn(12, 9, 4, generator=_g), "labels": torch.randint(0, 3, (12, 9), generator=_g)}


def _source(inputs) -> list[str]:
    if tuple(inputs) == PROMPT_LABELS:
        return PROMPT_SOURCE
    if tuple(inputs) == QUESTION_INPUTS:
        return QUESTION_SOURCE
    return [o for key in inputs for o in SOURCE_FOR.get(key, [])]


def _example(inputs) -> dict[str, torch.Tensor]:
    if tuple(inputs) == QUESTION_INPUTS:
        return dict(QUESTION_EXAMPLE)
    return dict(PROMPT_EXAMPLE) if tuple(inputs) == PROMPT_LABELS else {key: EXAMPLE[key] for key in inputs}


# ClipCap maps a frozen image tower's embedding into a frozen GPT: it needs both as runs, and its mapper is what trains.
# Flamingo: a frozen tower and GPT too; at its first step only the gated blocks' tanh gates (and the new tokens) get a
# non-zero gradient, the gates being 0.
# BLIP-2: stage 1's Q-Former reads a frozen tower; stage 2 reads stage 1's run, and its Q-Former trains on.
# FROMAGe: the same frozen tower and GPT; W_c (visual) is what trains.
FROZEN_ENCODER = {"clipcap": "mapper", "fromage": "visual", "flamingo": "flamingo.gated", "blip2-qformer": "qformer", "blip2": "query_projection"}


@pytest.fixture(scope="module")
def init_runs(tmp_path_factory):
    """Run overrides for methods built from other runs: a tiny conv4 image run and a tiny gpt run (with its tokenizer)."""
    from fewshot.data.tokenizer import save_tokenizer, train_tokenizer
    from fewshot.train.checkpoint import Checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("init-runs")
    folders = {}
    for name, overrides in (("image", ["method=simclr", *TINY]),
                            ("gpt", ["method=gpt", *SOURCE_FOR["tokens"], "data.seq_len=40"])):
        config = load_config(overrides=[*overrides, f"name={name}", f"out={root}"])
        tensors = {f"model.{k}": v for k, v in build_method(config).state_dict().items()}
        save_checkpoint(config.run_dir / "checkpoints" / "last", Checkpoint(config.model_dump(mode="json"), 1, tensors, {}))
        save_tokenizer(train_tokenizer("a red circle left of a blue square\n" * 5, 300), config.run_dir)
        folders[name] = config.run_dir
    qformer = ["encoder=conv4", "encoder.options={width: 8}", f"method.image.init={folders['image']}", "method.queries=2",
               "method.dim=16", "method.depth=2", "method.heads=2", "method.embed_dim=8"]
    config = load_config(overrides=["method=blip2-qformer", *owned("blip2-qformer", [*TINY, *_source(METHODS["blip2-qformer"].inputs)]), *qformer,
                                    "name=qformer", f"out={root}"])
    tensors = {f"model.{k}": v for k, v in build_method(config).state_dict().items()}
    save_checkpoint(config.run_dir / "checkpoints" / "last", Checkpoint(config.model_dump(mode="json"), 1, tensors, {}))
    return {"blip2-qformer": qformer,
            "blip2": ["encoder=conv4", "encoder.options={width: 8}", f"method.qformer.init={config.run_dir}", f"method.lm.init={folders['gpt']}"],
            "clipcap": ["encoder=conv4", "encoder.options={width: 8}", f"method.image.init={folders['image']}",
                        f"method.lm.init={folders['gpt']}", "method.prefix_length=2"],
            "frozen": ["encoder=conv4", "encoder.options={width: 8}", f"method.lm.init={folders['gpt']}"],
            "fromage": ["encoder=conv4", "encoder.options={width: 8}", f"method.image.init={folders['image']}",
                        f"method.lm.init={folders['gpt']}"],
            "mm-cot": [f"method.lm.init={folders['gpt']}"],
            "flamingo": ["encoder=conv4", "encoder.options={width: 8}", f"method.image.init={folders['image']}",
                         f"method.lm.init={folders['gpt']}", "method.max_images=1", "method.latents=2", "method.resampler_depth=1"]}


def _batch(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains(name, init_runs):
    inputs = METHODS[name].inputs  # the batch is made from what the method declares, with no per-method case
    source = _source(inputs)
    method = build_method(load_config(overrides=[f"method={name}", *owned(name, [*TINY, *source]), *ENCODER_FOR.get(name, []),
                                                 *init_runs.get(name, [])]))
    loss, logs = method(_example(inputs), torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in operator.attrgetter(FROZEN_ENCODER.get(name, "encoder"))(method).parameters()]
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
    loss, _ = method({"images": x, "labels": y}, torch.Generator().manual_seed(5))
    z1, z2 = _by_hand(method, x, 5)
    torch.testing.assert_close(loss, nt_xent_loss(z1, z2, 0.3))


def test_supcon_uses_labels():
    cfg = load_config(overrides=["method=supcon", "method.temperature=0.2", "train.channels_last=false", *TINY])
    method = build_method(cfg)
    x, y = _batch()
    loss, _ = method({"images": x, "labels": y}, torch.Generator().manual_seed(5))
    z1, z2 = _by_hand(method, x, 5)
    torch.testing.assert_close(loss, supcon_loss(torch.stack([z1, z2], 1), y, 0.2))
    assert "labels" in method.inputs


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'byol2'.*simclr"):
        build_method(load_config(overrides=["method=byol2"]))


# --------------------------------------------------------------------------- batches as mappings

def _tiny_run(tmp_path, *overrides):
    from fewshot import api

    return api.load_config(overrides=[f"out={tmp_path}", "train.steps=2", "train.batch_size=16", "train.warmup_steps=1",
                                      *owned(overrides[0].split("=")[1], TINY), *overrides])


@pytest.mark.parametrize("method, data, needle", [
    ("method=supcon", "data.holdout_classes=0.5", "reads labels from each batch, but data.source=digits gives only images"),
    ("method=gpt", "data.source=digits", "pre-trains on text"),  # refused by its build, earlier still
    ("method=time-contrastive", "data.source=digits", "reads frames"),
])
def test_a_method_is_refused_before_training_when_the_data_lacks_its_inputs(tmp_path, monkeypatch, method, data, needle):
    from fewshot import api
    from fewshot.data import types

    if method == "method=supcon":  # the pre-training set loses its labels, as an unlabeled folder's would
        real = types.ImageSet.batch
        monkeypatch.setattr(types.ImageSet, "keys", property(lambda self: frozenset({"images"})))
        monkeypatch.setattr(types.ImageSet, "batch", lambda self, idx: {"images": real(self, idx)["images"]})
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))
    with pytest.raises(ConfigError, match=needle):
        api.pretrain(_tiny_run(tmp_path, method, data), progress=False)
    assert steps == [] and not (tmp_path / "run" / "checkpoints").exists()


def test_a_label_free_method_never_receives_the_labels(tmp_path, monkeypatch):
    from fewshot import api
    from fewshot.methods.contrastive import SimCLR, SupCon

    seen = {}
    for cls in (SimCLR, SupCon):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, batch, g, real=real, cls=cls: seen.setdefault(cls.__name__, set(batch)) and real(self, batch, g))
    api.pretrain(_tiny_run(tmp_path / "a", "method=simclr"), progress=False)  # digits: a labeled source
    api.pretrain(_tiny_run(tmp_path / "b", "method=supcon"), progress=False)
    assert seen == {"SimCLR": {"images"}, "SupCon": {"images", "labels"}}


@pytest.mark.parametrize("name", method_names())
def test_every_method_starts_with_a_savable_state(name, init_runs):
    # the trainer refuses to save a non-finite tensor, so an unfilled queue marked with NaN (as nnclr's
    # image keys once were) failed every run too short to fill it
    source = _source(METHODS[name].inputs)
    method = build_method(load_config(overrides=[f"method={name}", *owned(name, [*TINY, *source]), *ENCODER_FOR.get(name, []),
                                                 *init_runs.get(name, [])]))
    bad = [k for k, v in method.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert bad == []
