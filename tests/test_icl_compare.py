"""ICL against lightweight fine-tuning (`fewshot icl compare`): measured FLOPs, label-only loss, adapters, the comparison.

The model is a tiny random 2-layer GPT-2 built here with ``transformers`` (never SmolLM2).
"""

import json

import numpy as np
import pytest
import torch

from fewshot.cli import main
from fewshot.data.tokenizer import train_tokenizer
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate import icl_compare
from fewshot.evaluate.icl_compare import (
    compare_icl, compare_table, count_flops, fit_adapter, label_targets, last_hidden_features, overtakes,
)
from fewshot.evaluate.prompting import continuation_logprobs, load_task, open_prompt_model, word_lists
from fewshot.objectives.language import token_cross_entropy

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = " ".join(w for ws in word_lists().values() for w in ws)
CORPUS = f"{WORDS} -> animal fruit colour vehicle clothing country\nClassify each word as one of these.\n" * 3
DIM, LAYERS, VOCAB = 32, 2, 400


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random 2-layer GPT-2 (context 512) and a BPE tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(CORPUS, VOCAB)).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=512, n_embd=DIM, n_layer=LAYERS, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm(hf_folder):
    return open_prompt_model(hf_folder)


def test_flop_counter_matches_two_params_per_token(lm):
    """FlopCounterMode on a forward pass ≈ 2 · (matrix parameters, head included) · tokens."""
    tokens = 16
    ids = torch.randint(0, VOCAB, (1, tokens))
    _, flops = count_flops(lm.step, ids, None)
    # Every weight matrix the tokens pass through: 4·d² (attention) + 8·d² (MLP) per layer, and the tied head.
    matrix_params = LAYERS * 12 * DIM * DIM + VOCAB * DIM
    assert matrix_params == sum(p.numel() for n, p in lm.model.named_parameters() if p.ndim == 2 and "wpe" not in n)
    ratio = flops / (2 * matrix_params * tokens)
    assert 0.9 < ratio < 1.5  # the rest is attention's 4·T²·d per layer


@pytest.mark.parametrize("broken", [False, True])
def test_icl_query_flops_grow_with_k_and_lora_stay_flat(lm, monkeypatch, broken):
    if broken:  # the CPU attention kernel left uncounted: the cache's cost disappears
        monkeypatch.setattr(icl_compare, "_CPU_ATTENTION", {})
    out = compare_icl(lm, "categories", shots=(1, 8, 32), methods=("icl", "lora"), draws=1, queries=4, steps=1)
    icl = [out["methods"]["icl"][k]["flops_per_query"] for k in ("1", "8", "32")]
    lora = [out["methods"]["lora"][k]["flops_per_query"] for k in ("1", "8", "32")]
    prefill = [out["methods"]["icl"][k]["flops_adapt"] for k in ("1", "8", "32")]
    assert lora[0] == lora[1] == lora[2] and lora[0] > 0
    assert prefill[0] < prefill[1] < prefill[2]
    grows = icl[0] < icl[1] < icl[2]
    assert grows != broken
    if not broken:  # what grows is attention over the cache: 4·d per cached position, query token and layer (QKᵀ and AV)
        task = load_task("categories", 0, lm)
        queries = [task.queries[int(i)] for i in np.random.default_rng([0, 0, 0]).choice(len(task.queries), 4, replace=False)]
        width = max(len(lm.encode(f"{x} ->")) + len(lm.encode(f" {c}")) for x, _ in queries for c in task.labels)  # one padded batch
        cached = out["methods"]["icl"]["32"]["prompt_tokens"] - out["methods"]["icl"]["1"]["prompt_tokens"]
        assert icl[2] - icl[0] == len(task.labels) * width * cached * LAYERS * 4 * DIM


@pytest.mark.parametrize("broken", [False, True])
def test_label_only_loss_is_the_scorers_label_log_likelihood(lm, monkeypatch, broken):
    if broken:  # targets not shifted: each position would predict itself
        monkeypatch.setattr(icl_compare, "label_targets",
                            lambda x, c, w: [-100] * len(x) + list(c) + [-100] * (w - len(x) - len(c)))
    context, label = lm.encode("zebra ->"), lm.encode(" animal")
    ids = torch.tensor([context + label])
    targets = torch.tensor([icl_compare.label_targets(context, label, ids.shape[1])])
    loss = token_cross_entropy(lm.model(input_ids=ids).logits, targets)
    scored = continuation_logprobs(lm, None, [context], [label])[0]
    assert (abs(float(loss) * len(label) + float(scored)) < 1e-4) != broken


def test_label_targets_by_hand():
    assert label_targets([5, 6, 7], [8, 9], 7) == [-100, -100, 8, 9, -100, -100, -100]


@pytest.mark.parametrize("adapter, params", [("lora", LAYERS * 8 * (DIM + 3 * DIM)), ("ia3", LAYERS * (3 * DIM + 4 * DIM))])
def test_fit_adapter_trains_only_the_adapter_and_fits_the_examples(lm, adapter, params):
    examples = load_task("categories", 0).examples[:12]
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    contexts = [lm.encode(f"{x} ->") for x, _ in examples]
    labels = [lm.encode(f" {y}") for _, y in examples]
    nll_before = -continuation_logprobs(lm, None, contexts, labels).sum()
    adapted, flops, stored = fit_adapter(lm, adapter, examples, steps=30, lr=1e-2)
    nll_after = -continuation_logprobs(adapted, None, contexts, labels).sum()
    assert nll_after < nll_before
    assert stored == 4 * params  # LoRA: r·(d_in + d_out) per c_attn; (IA)³: c_attn's fused 3d outputs and the MLP's 4d inputs
    assert all(torch.equal(before[n], p) for n, p in lm.model.state_dict().items())  # the base is untouched
    one_step = fit_adapter(lm, adapter, examples, steps=1)[1]
    assert flops == 30 * one_step  # every step runs the same 12 rows


def test_probe_features_are_the_last_real_tokens_hidden_state(lm):
    texts = ["zebra ->", "red car ->"]
    got = last_hidden_features(lm, texts)
    for text, row in zip(texts, got):
        alone = lm.model(input_ids=torch.tensor([lm.encode(text)]), output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(row, alone.detach().numpy(), atol=1e-5)


def test_compare_table_overtakes_and_context_limit(hf_folder):
    short = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=48, n_embd=DIM, n_layer=LAYERS, n_head=4))
    from fewshot.models.causal_lm import HFCausalLM

    small = HFCausalLM(short, transformers.PreTrainedTokenizerFast.from_pretrained(hf_folder), "short")
    out = compare_icl(small, "categories-nonce", shots=(1, 2, 16), methods=("icl", "ia3", "probe"), draws=2, queries=6, steps=2)
    assert "n/a" in out["methods"]["icl"]["16"] and "holds 48" in out["methods"]["icl"]["16"]["n/a"]
    assert len(out["methods"]["probe"]["16"]["draws"]) == 2 and out["methods"]["probe"]["1"]["bytes_per_task"] == 0  # one class seen
    assert set(out["overtakes"]) == {"ia3", "probe"}
    assert "n/a" in compare_table(out)
    json.dumps(out)


def test_overtakes_reads_means_and_cis():
    cell = lambda a, c: {"accuracy": a, "ci95": c}  # noqa: E731
    out = {"shots": [1, 4, 16], "methods": {"icl": {"1": cell(.5, .1), "4": cell(.5, .1), "16": cell(.5, .1)},
                                            "lora": {"1": cell(.4, .1), "4": cell(.6, .1), "16": cell(.8, .1)}}}
    assert overtakes(out, "lora") == {"mean": 4, "beyond_ci": 16}
    assert overtakes(out, "icl", "lora") == {"mean": 1, "beyond_ci": None}


def test_bad_input_is_one_line(lm):
    with pytest.raises(ConfigError, match="unknown method"):
        compare_icl(lm, methods=("icl", "prefix"))
    with pytest.raises(ConfigError, match="task must be one of"):
        compare_icl(lm, task="anagram1")
    with pytest.raises(DataError, match="K=100 examples asked"):
        compare_icl(lm, shots=(100,), methods=("icl",))
    with pytest.raises(ConfigError, match="shots must be"):
        compare_icl(lm, shots=(0,), methods=("icl",))


def test_cli_icl_compare(hf_folder, capsys):
    main(["icl", "compare", str(hf_folder), "--methods", "icl", "lora", "--shots", "1", "2", "--draws", "2", "--queries", "3", "--steps", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["shots"] == [1, 2] and set(out["methods"]) == {"icl", "lora"}
    assert main(["icl", "compare", str(hf_folder), "--methods", "bogus"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown method 'bogus'" in err and "\n" not in err
