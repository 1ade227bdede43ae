"""Adaptation: LoRA, adapters, (IA)³, BitFit, probes against independent transcriptions of their
formulas; merge/unmerge invariants; adapter files; the per-episode runner; the CLI."""

import copy
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fewshot.adapt import (
    ADAPT_METHODS,
    AdaptSettings,
    adapt,
    count_trainable,
    fit_classifier,
    load_adapter,
    merge,
    run_adaptation,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from fewshot.adapt.adapters import ConvResidualAdapter
from fewshot.adapt.ia3 import IA3KeyValue
from fewshot.adapt.lora import LoRAConv2d, LoRALinear
from fewshot.cli import main
from fewshot.data.sources import load_digits
from fewshot.errors import CheckpointError, ConfigError, EncoderMismatch
from fewshot.evaluate.runner import run_episodes
from fewshot.models.encoders import create_encoder
from fewshot.models.transformer import Block

SIZE = 16


def conv4():
    torch.manual_seed(0)
    return create_encoder("conv4", image_size=SIZE, width=8, pools=3, blocks=3).eval()


def vit():
    torch.manual_seed(0)
    return create_encoder("vit-tiny", image_size=SIZE, patch_size=4, depth=2).eval()


ENCODERS = {"conv4": conv4, "vit": vit}


def images(n=4, seed=1):
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def applicable(method, encoder_name):
    """Whether the method fits the encoder (prompt and adapter methods need a ViT)."""
    try:
        adapt(ENCODERS[encoder_name](), method, _options(method))
        return True
    except EncoderMismatch:  # only this is "does not fit"; any other ConfigError is a failure here
        return False


def _options(method):
    return {"image_size": SIZE, "in_channels": 1} if method == "padding-prompt" else {}


def perturb(model, seed=2, scale=0.1):
    """Every trainable parameter moved by a random amount, so merges are not trivially exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


CASES = [(m, e) for m in ADAPT_METHODS for e in ENCODERS if applicable(m, e)]
MERGEABLE = [(m, e) for m, e in CASES if ADAPT_METHODS[m].mergeable]
ZERO_INIT = [(m, e) for m, e in CASES if m in ("lora", "ia3", "adapter", "conv-adapter")]


def test_every_method_fits_some_encoder():
    # PEFT's entries adapt Hugging Face text models (tests/test_hf.py); an image encoder is an EncoderMismatch.
    peft = {m for m in ADAPT_METHODS if m.startswith("peft-")}
    assert peft == {"peft-lora", "peft-ia3", "peft-prefix", "peft-prompt"}
    assert {m for m, _ in CASES} == set(ADAPT_METHODS) - peft
    assert {m for m, _ in MERGEABLE} == {"lora", "ia3", "conv-adapter"}


# ----------------------------------------------------------------------------------- LoRA


def test_lora_linear_is_the_paper_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), r=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    w = base.weight + (6.0 / 3) * layer.lora_B @ layer.lora_A  # W0 + (α/r)·BA
    torch.testing.assert_close(layer(x), x @ w.T + base.bias)


def test_lora_conv_is_the_paper_formula():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    layer = LoRAConv2d(copy.deepcopy(base), r=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 9, 9)
    delta = (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view(5, 3, 3, 3)
    expected = F.conv2d(x, base.weight + 2.0 * delta, base.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("name", ENCODERS)
def test_lora_at_init_is_exactly_the_base(name):
    base = ENCODERS[name]()
    x = images()
    model = adapt(copy.deepcopy(base), "lora", {"r": 2, "alpha": 4})
    assert torch.equal(model(x), base(x))


def test_lora_parameter_count_is_r_times_in_plus_out():
    base, r = vit(), 3
    model = adapt(copy.deepcopy(base), "lora", {"r": r, "targets": ["*attn.qkv", "*mlp.0"]})
    layers = [m for n, m in base.named_modules() if n.endswith("attn.qkv") or n.endswith("mlp.0")]
    assert len(layers) == 4
    assert count_trainable(model) == sum(r * (m.in_features + m.out_features) for m in layers)
    base = conv4()
    model = adapt(copy.deepcopy(base), "lora", {"r": r})
    convs = [m for m in base.modules() if isinstance(m, nn.Conv2d)]
    assert count_trainable(model) == sum(r * (c.in_channels * 9 + c.out_channels) for c in convs)


def test_lora_targets_that_match_nothing_name_the_patterns_and_what_exists():
    with pytest.raises(ConfigError, match=r"no Linear/Conv2d module matches targets \['\*nothing\*'\].*blocks\.0\.attn\.qkv"):
        adapt(vit(), "lora", {"targets": ["*nothing*"]})
    model = adapt(vit(), "lora", {"targets": [r"re:trunk\.blocks\.1\.attn\.(qkv|proj)"]})
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == ["trunk.blocks.1.attn.proj", "trunk.blocks.1.attn.qkv"]


def test_unknown_method_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown adaptation method 'nope'.*lora"):
        adapt(conv4(), "nope")
    with pytest.raises(ConfigError, match="unknown option.*rank.*accepted: r, alpha, targets"):
        adapt(conv4(), "lora", {"rank": 4})
    with pytest.raises(ConfigError, match="rank r"):
        adapt(conv4(), "lora", {"r": 0})


# ---------------------------------------------------------------- adapters and (IA)³


def test_ia3_block_is_the_t_few_formula():
    """A Block with (IA)³ against attention written out by hand with l_k, l_v and l_ff."""
    torch.manual_seed(0)
    block = Block(8, heads=2).eval()
    adapted = adapt(nn.Sequential(copy.deepcopy(block)), "ia3")[0]
    perturb(adapted)
    qkv = adapted.attn.qkv
    l_k, l_v, l_ff = qkv.ia3_l_k, qkv.ia3_l_v, adapted.mlp[-1].ia3_l_ff
    x = torch.randn(2, 5, 8)
    h = block.norm1(x)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(8, dim=-1)
    k, v = k * l_k, v * l_v
    heads = lambda t: t.view(2, 5, 2, 4).transpose(1, 2)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1) @ heads(v)
    x1 = x + block.attn.proj(att.transpose(1, 2).reshape(2, 5, 8))
    hidden = F.gelu(block.mlp[0](block.norm2(x1))) * l_ff
    expected = x1 + block.mlp[2](hidden)
    torch.testing.assert_close(adapted(x), expected)


def test_bottleneck_adapters_sit_on_each_sublayer_output():
    torch.manual_seed(0)
    block = Block(8, heads=2).eval()
    adapted = adapt(nn.Sequential(copy.deepcopy(block)), "adapter", {"bottleneck": 3, "norms": False})[0]
    perturb(adapted)
    a1, a2 = adapted.attn.adapter, adapted.mlp.adapter
    # h + W_up f(W_down h + b_down) + b_up, one token h per column
    ad = lambda a, h: h + a.up.weight @ F.gelu(a.down.weight @ h + a.down.bias[:, None]) + a.up.bias[:, None]  # noqa: E731
    x = torch.randn(5, 8)
    x1 = x + ad(a1, block.attn(block.norm1(x)[None])[0].T).T
    expected = x1 + ad(a2, block.mlp(block.norm2(x1)).T).T
    torch.testing.assert_close(adapted(x[None])[0], expected)


def test_conv_residual_adapter_is_x_plus_alpha_conv_x():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    layer = perturb(ConvResidualAdapter(copy.deepcopy(conv).requires_grad_(False)))
    x = torch.randn(2, 2, 6, 6)
    y = conv(x)
    expected = y + torch.einsum("oc,bchw->bohw", layer.alpha[:, :, 0, 0], y)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("method,name", ZERO_INIT)
def test_zero_and_one_initialised_methods_start_exactly_at_the_base(method, name):
    base = ENCODERS[name]()
    x = images()
    assert torch.equal(adapt(copy.deepcopy(base), method)(x), base(x))


@pytest.mark.parametrize("method,name", MERGEABLE)
def test_merge_and_unmerge_are_exact_inverses(method, name):
    base = ENCODERS[name]()
    # small moves, as training makes them: unmerging the conv adapter solves (I + α) W = W', whose
    # float32 rounding grows with the condition number of I + α (a 192×192 α of N(0, 0.1²) is near singular)
    model = perturb(adapt(copy.deepcopy(base), method), scale=0.02)
    x = images()
    before = model(x)
    assert not torch.allclose(before, base(x), atol=1e-3)  # the perturbation changed something
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    ADAPT_METHODS[method].merge(model)
    merged = model(x)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    ADAPT_METHODS[method].unmerge(model)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-5, rtol=1e-5)
    # merged, the forward runs on the base weights alone, which now hold the change
    merge(model)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.fill_(float("nan"))
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_bottleneck_adapter_refuses_to_merge():
    with pytest.raises(ConfigError, match="nothing to merge"):
        ADAPT_METHODS["adapter"].merge(adapt(vit(), "adapter"))


# ------------------------------------------------------------------- which params train


def _trainable_names(method, name, options=None):
    return set(trainable_parameters(adapt(ENCODERS[name](), method, options or _options(method))))


def test_only_the_methods_parameters_train():
    all_vit = {n for n, _ in vit().named_parameters()}
    assert _trainable_names("linear-probe", "vit") == set()
    assert _trainable_names("full", "vit") == all_vit
    assert _trainable_names("bitfit", "vit") == {n for n in all_vit if n.endswith(".bias")}
    assert _trainable_names("norm", "vit") == {n for n in all_vit if ".norm" in n or n.startswith("norm.")}
    assert _trainable_names("norm", "conv4") == {"features.1.weight", "features.1.bias", "features.5.weight",
                                                 "features.5.bias", "features.9.weight", "features.9.bias"}
    assert _trainable_names("partial", "conv4", {"k": 1}) == {"features.8.weight", "features.8.bias",
                                                              "features.9.weight", "features.9.bias"}
    assert _trainable_names("partial", "vit", {"k": 1}) == {n for n in all_vit if n.startswith(("trunk.blocks.1.", "trunk.norm."))}
    assert all(n.split(".")[-1] in ("lora_A", "lora_B") for n in _trainable_names("lora", "vit"))
    assert all(n.split(".")[-1].startswith("ia3_") for n in _trainable_names("ia3", "vit"))
    adapter = _trainable_names("adapter", "vit", {"norms": False})
    assert adapter and all(".adapter." in n for n in adapter)
    assert _trainable_names("adapter", "vit") - adapter == {n for n in all_vit if ".norm1." in n or ".norm2." in n}
    assert all(n.endswith(".alpha") for n in _trainable_names("conv-adapter", "conv4"))
    for method in ("prompt", "deep-prompt", "prefix", "pgn", "padding-prompt"):
        assert not any(n.startswith("base.") for n in _trainable_names(method, "vit")), method
    with pytest.raises(ConfigError, match="partial: k must be"):
        adapt(conv4(), "partial", {"k": 9})


# ------------------------------------------------------------------------ adapter files


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), len(raw) - 8 - n


@pytest.mark.parametrize("method,name", CASES)
def test_adapter_file_round_trip_and_size(method, name, tmp_path):
    base = ENCODERS[name]()
    x = images(10)
    clf = fit_classifier(base, method, _options(method), x, torch.arange(10) % 2, AdaptSettings(steps=2, lr=1e-2),
                         torch.Generator().manual_seed(0))
    path = save_adapter(tmp_path / "task", clf, method, _options(method), base_sha256="a" * 64)
    n_header, header, data_bytes = _header(path)
    params = count_trainable(clf.encoder) + sum(p.numel() for p in clf.head.parameters())
    assert data_bytes == 4 * params  # every stored tensor is a trained float32 parameter, nothing else
    assert sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__") == params
    assert n_header < 200 + 120 * (len(header) - 1)  # the header is small: one short entry per tensor
    loaded = load_adapter(path, base, "a" * 64)
    torch.testing.assert_close(loaded.predict(x), clf.predict(x), rtol=0, atol=0)
    clf.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clf(x))
    with pytest.raises(CheckpointError, match="was made for base checkpoint aaaa"):
        load_adapter(path, base, "b" * 64)


def test_adapter_file_of_full_fine_tuning_holds_the_whole_encoder(tmp_path):
    base = conv4()
    clf = fit_classifier(base, "full", {}, images(6), torch.arange(6) % 3, AdaptSettings(steps=1), torch.Generator())
    _, _, data_bytes = _header(save_adapter(tmp_path / "f", clf, "full", {}, "x"))
    assert data_bytes == 4 * (sum(p.numel() for p in base.parameters()) + 3 * base.dim + 3)


# --------------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def digits():
    data = load_digits(SIZE)
    keep = data.labels >= 5  # five classes, as the held-out half of the quickstart split
    return data.images[keep], data.labels[keep] - 5


def test_runner_at_zero_steps_is_the_prototype_classifier(digits):
    """No training: the head is started at the prototypes, so accuracy equals the evaluator's proto-cosine."""
    x, y = digits
    base = conv4()
    row = run_adaptation(base, x, y, "linear-probe", way=5, shot=2, query=4, episodes=5, settings=AdaptSettings(steps=0), seed=3)
    with torch.no_grad():
        features = base(x)
    reference = run_episodes(features, y, 5, 2, 4, 5, ["proto-cosine"], seed=3)[0]
    assert row["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
    assert row["ci95"] == pytest.approx(reference["ci95"], abs=1e-12)


def test_runner_gives_accuracy_ci_and_costs(digits):
    x, y = digits
    row = run_adaptation(conv4(), x, y, "lora", {"r": 2}, way=5, shot=2, query=3, episodes=3, settings=AdaptSettings(steps=3))
    assert 0 <= row["accuracy"] <= 1 and math.isfinite(row["ci95"])
    assert row["trainable_params"] == sum(2 * (c.in_channels * 9 + c.out_channels) for c in conv4().modules() if isinstance(c, nn.Conv2d))
    assert row["head_params"] == 5 * conv4().dim + 5
    assert row["bytes_per_task"] > 4 * (row["trainable_params"] + row["head_params"])
    assert row["seconds_per_episode"] > 0 and row["episodes"] == 3


def test_training_fits_the_support_set(digits):
    """Adaptation does something: full fine-tuning drives the support loss down from the prototype start."""
    x, y = digits
    idx = torch.cat([torch.nonzero(y == c)[:3, 0] for c in range(5)])
    base = conv4()
    losses = []
    for steps in (0, 30):
        clf = fit_classifier(base, "full", {}, x[idx], y[idx], AdaptSettings(steps=steps, lr=1e-2, head_lr=1e-2), torch.Generator())
        with torch.no_grad():
            losses.append(F.cross_entropy(clf(x[idx]), y[idx]).item())
    assert losses[1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------ CLI


def test_cli_adapt_episodes_and_support(tmp_path, capsys):
    tiny = ["data.image_size=16", "train.steps=2", "train.batch_size=32", "train.warmup_steps=1", "method.projection_hidden=16",
            "method.projection_dim=8", "encoder.options={width: 8, pools: 3, blocks: 3}", "method.projection_conv_blocks=0"]
    assert main(["pretrain", "--json", f"out={tmp_path}", "name=r", *tiny]) == 0
    capsys.readouterr()
    run = str(tmp_path / "r")
    code = main(["adapt", run, "--method", "lora", "--options", "r=2", "alpha=4", "--episodes", "2", "--ways", "3",
                 "--shots", "1", "--queries", "2", "--steps", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["episodes"] == 2 and 0 <= out["accuracy"] <= 1 and out["options"] == {"r": 2, "alpha": 4}
    support = tmp_path / "support"
    for c in ("a", "b"):
        (support / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((np.random.default_rng([i, ord(c)]).random((16, 16)) * 255).astype(np.uint8)).save(support / c / f"{i}.png")
    code = main(["adapt", run, "--method", "ia3", "--support", str(support), "--steps", "2", "--out", str(tmp_path / "t"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["classes"] == ["a", "b"] and (tmp_path / "t.safetensors").stat().st_size == out["bytes"]
    from fewshot import api

    clf = api.load_adapted(tmp_path / "t", run)
    assert clf.classes == ["a", "b"]
    code = main(["adapt", run, "--method", "nope", "--episodes", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("fewshot: error:") == 1 and "unknown adaptation method" in err and "Traceback" not in err
    code = main(["adapt", run, "--method", "lora", "--support", str(support)])
    assert code == 2 and "--out" in capsys.readouterr().err


# ------------------------------------------------------------------ bench/adapt.py: what is n/a


def test_a_wrong_option_is_a_config_error_not_an_encoder_mismatch():
    for method, options in [("lora", {"r": -1}), ("lora", {"targets": ["no_such_layer"]}), ("partial", {"k": 99})]:
        with pytest.raises(ConfigError) as info:
            adapt(conv4(), method, options)
        assert not isinstance(info.value, EncoderMismatch), (method, options)
    with pytest.raises(EncoderMismatch, match="needs a ViT"):
        adapt(conv4(), "prompt", {})


@pytest.mark.parametrize("variant", ["real", "every-config-error-is-n/a"])
def test_bench_adapt_lists_only_encoder_mismatches_as_na(tmp_path, capsys, monkeypatch, variant):
    """bench/adapt.py: a ViT-only method on Conv-4 is n/a; a bad option (lora r=-1) stops the script
    with exit 2. The second variant is the old behaviour (every ConfigError → n/a), which the same
    assertions must catch: it turns the bad option into a silent n/a row."""
    import importlib.util

    tiny = ["data.image_size=16", "train.steps=2", "train.batch_size=32", "train.warmup_steps=1", "method.projection_hidden=16",
            "method.projection_dim=8", "encoder.options={width: 8, pools: 3, blocks: 3}", "method.projection_conv_blocks=0"]
    assert main(["pretrain", "--json", f"out={tmp_path}", "name=r", *tiny]) == 0
    spec = importlib.util.spec_from_file_location("bench_adapt", Path(__file__).resolve().parents[1] / "bench" / "adapt.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if variant != "real":
        monkeypatch.setattr(bench, "EncoderMismatch", ConfigError)

    def bench_main(*extra):
        monkeypatch.setattr(sys, "argv", ["adapt.py", "--checkpoint", str(tmp_path / "r"), "--datasets", "digits", "--episodes", "2",
                                          "--steps", "1", "--plot", str(tmp_path / "plot.png"), *extra])
        code = bench.main()
        return code, capsys.readouterr()

    code, out = bench_main("--methods", "linear-probe", "prompt")
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out.out.strip().splitlines()[-1])["rows"]}
    assert "accuracy" in rows["linear-probe"] and "needs a ViT" in rows["prompt"]["skipped"]
    code, out = bench_main("--methods", "lora", "--method-options", '{"lora": {"r": -1}}')
    if variant == "real":
        assert code == 2 and "rank r must be a positive integer" in out.err
    else:  # the broken variant: the bad option became an n/a row and the script "succeeded"
        assert code == 0 and "n/a" in out.out
