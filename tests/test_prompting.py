"""Few-shot prompting (`fewshot icl prompt`): prompts, cached scoring, greedy generation, tasks, bad input.

The models are tiny and random: a 2-layer GPT-2 built with ``transformers`` and saved to a folder (the
Hugging Face path) and a fewshot GPT (the run path). Only the last test loads SmolLM2, if installed.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import save_tiny_hf_gpt2
from fewshot import api
from fewshot.cli import main
from fewshot.data.tokenizer import BOS_ID, train_tokenizer
from fewshot.errors import CheckpointError, ConfigError, DataError
from fewshot.evaluate import prompting
from fewshot.evaluate.prompting import (
    CATEGORIES, PromptTask, anagram_inner, build_prompt, continuation_logprobs, cycle_letters, evaluate_prompting,
    flipped_labels, greedy_lines, load_task, nonce_clashes, open_prompt_model, prefill, random_insertion, score_draw,
    word_lists,
)
from fewshot.generate import generate
from fewshot.models.causal_lm import SMOLLM2, GPTPromptLM, gguf_path, load_gguf
from fewshot.models.language import GPT

transformers = pytest.importorskip("transformers")

WORDS = " ".join(w for ws in word_lists().values() for w in ws)
CORPUS = (f"{WORDS} -> animal fruit colour vehicle clothing country\nThe quick brown fox jumps over the lazy dog.\n") * 3


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random 2-layer GPT-2 and a BPE tokenizer, saved as a Hugging Face folder."""
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), CORPUS)


@pytest.fixture(scope="module")
def hf_lm(hf_folder):
    return open_prompt_model(hf_folder)


def tiny_gpt(max_len=256):
    torch.manual_seed(1)
    model = GPT(400, max_len, dim=32, depth=2, heads=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return GPTPromptLM(model, train_tokenizer(CORPUS, 400), "tiny-gpt")


@pytest.fixture(scope="module")
def gpt_lm():
    return tiny_gpt()


def toy_task(kind="classify"):
    pairs = [("dog", "animal"), ("apple", "fruit"), ("red", "colour"), ("cat", "animal"), ("pear", "fruit"), ("blue", "colour")]
    return PromptTask("toy", kind, "Name the category.", pairs[:3], pairs[3:], ["animal", "fruit", "colour"])


# ------------------------------------------------------------------ cached scoring = recomputed scoring


@pytest.mark.parametrize("which", ["hf", "gpt"])
def test_cached_and_recomputed_prompts_give_the_same_log_likelihoods(which, hf_lm, gpt_lm):
    lm = hf_lm if which == "hf" else gpt_lm
    task = toy_task()
    prompt = build_prompt(lm, task.examples, task.description)
    queries = [lm.encode(f"{x} ->") for x, _ in task.queries]
    labels = [lm.encode(f" {c}") for c in task.labels]
    contexts = [q for q in queries for _ in labels]
    conts = labels * len(queries)
    past = prefill(lm, prompt)
    cached = continuation_logprobs(lm, past, contexts, conts, rows_per_batch=4)
    recomputed = continuation_logprobs(lm, None, [prompt + x for x in contexts], conts)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
    # The cache is only read: scoring again from it gives the same numbers.
    torch.testing.assert_close(continuation_logprobs(lm, past, contexts, conts), cached, atol=1e-5, rtol=0)
    # Negative controls: a stale cache (extended by an earlier query) and a cache one position short
    # (an off-by-one in the prompt) give other log-likelihoods.
    stale = lm.step(torch.tensor([queries[0]]), past)[1]
    short = prefill(lm, prompt[:-1])
    for broken in (stale, short):
        assert (continuation_logprobs(lm, broken, contexts, conts) - recomputed).abs().max() > 1e-3


def test_label_log_likelihood_is_the_models_own_loss(hf_folder, hf_lm):
    # Independent: transformers' cross-entropy over the label tokens only (labels = -100 elsewhere).
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    prompt = build_prompt(hf_lm, [("dog", "animal")], None)
    x, c = hf_lm.encode("apple ->"), hf_lm.encode(" fruit")
    ids = torch.tensor([prompt + x + c])
    target = ids.clone()
    target[:, : len(prompt) + len(x)] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=target).loss
    ours = continuation_logprobs(hf_lm, prefill(hf_lm, prompt), [x], [c])
    assert ours.item() == pytest.approx(-loss.item() * len(c), abs=1e-4)


def test_rank_classification_picks_the_label_of_highest_summed_log_likelihood(gpt_lm):
    # A loop transcription: each (query, label) sequence scored from scratch through the GPT itself.
    task = toy_task()
    got = score_draw(gpt_lm, task, task.examples, task.queries)
    prompt = build_prompt(gpt_lm, task.examples, task.description)
    right = 0
    for x, y in task.queries:
        scores = []
        for c in task.labels:
            q, lab = gpt_lm.encode(f"{x} ->"), gpt_lm.encode(f" {c}")
            seq = torch.tensor([prompt + q + lab])
            logp = torch.log_softmax(gpt_lm.model(seq)[0].double(), -1)
            scores.append(sum(logp[len(prompt) + len(q) + t - 1, lab[t]].item() for t in range(len(lab))))
        right += task.labels[int(np.argmax(scores))] == y
    assert got["accuracy"] == pytest.approx(right / len(task.queries))


@pytest.mark.parametrize("which", ["hf", "gpt"])
def test_greedy_lines_equal_uncached_greedy_decoding(which, hf_folder, hf_lm, gpt_lm):
    lm = hf_lm if which == "hf" else gpt_lm
    prompt = build_prompt(lm, [("tsrif", "first"), ("god", "dog")], None)
    contexts = [lm.encode(f"{w} ->") for w in ["tac", "elppa", "der", "nom"]]
    lines = greedy_lines(lm, prefill(lm, prompt), contexts, 6)
    for ctx, line in zip(contexts, lines):
        if which == "gpt":  # fewshot's generate without the cache, [BOS] added by it
            ids = generate(lm.model, prompt[1:] + ctx, 6, temperature=0, use_cache=False)
        else:  # transformers' own greedy decoding
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
            ids = model.generate(torch.tensor([prompt + ctx]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
            ids = ids[1:] if not prompt else ids
        want = lm.decode(ids[len(prompt) - len(lm.start_ids) + len(ctx) :]).split("\n")[0]
        assert line == want


# ------------------------------------------------------------------ tasks


def test_scrambles_keep_the_letters_and_follow_their_rules():
    rng = np.random.default_rng(0)
    for word in ["thousand", "kingdom", "gentleman"]:
        c = cycle_letters(word, rng)
        assert c != word and c in word + word and sorted(c) == sorted(word)
        a1, a2 = anagram_inner(word, 1, rng), anagram_inner(word, 2, rng)
        assert a1 != word and a1[0] + a1[-1] == word[0] + word[-1] and sorted(a1) == sorted(word)
        assert a2[:2] + a2[-2:] == word[:2] + word[-2:] and sorted(a2) == sorted(word)
        r = random_insertion(word, rng)
        assert r[::2] == word and len(r) == 2 * len(word) - 1 and all(m in " .,;:!?-/" for m in r[1::2])


@pytest.mark.parametrize("broken", [False, True])
def test_flipped_labels_move_every_label(broken, monkeypatch):
    if broken:  # negative control: a plain permutation (fixed points allowed) is caught
        monkeypatch.setattr(prompting, "flipped_labels", lambda labels, rng: {c: c for c in labels})
    task = prompting.load_task("categories-flipped", seed=3)
    real = prompting.load_task("categories", seed=3)
    moved = all(shown != prior for (_, shown), prior in zip(task.queries, task.prior))
    assert moved != broken
    assert sorted(task.labels) == sorted(real.labels) == sorted(CATEGORIES)
    for seed in range(20):
        mapping = flipped_labels(list(CATEGORIES), np.random.default_rng(seed))
        assert sorted(mapping.values()) == sorted(CATEGORIES) and all(k != v for k, v in mapping.items())


def test_category_pools_are_disjoint_and_nonce_clashes_warn(gpt_lm):
    task = load_task("categories-nonce", seed=0)
    assert not {x for x, _ in task.examples} & {x for x, _ in task.queries}
    assert set(task.labels) == set(word_lists()["nonce"]) and not task.warnings
    listed = [w for c in CATEGORIES for w in word_lists()[c]]
    assert nonce_clashes(None, ["dax", "dog"], listed) == ["dog"]
    spaced = (gpt_lm.decode([i]) for i in range(400))
    single = next(t[1:] for t in spaced if t.startswith(" ") and t[1:].isalpha() and len(t) > 2)
    assert gpt_lm.single_token(single)
    assert nonce_clashes(gpt_lm, [single, "zzqx"], []) == [single]
    nonce = word_lists()["nonce"]
    real_lists = word_lists

    def clashing():
        lists = real_lists()
        lists["nonce"] = ["dog", *nonce[1:]]
        return lists

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prompting, "word_lists", clashing)
        with pytest.warns(UserWarning, match="dog"):
            assert load_task("categories-nonce").warnings


def test_scramble_tasks_read_tinyshakespeare_words(tmp_path):
    text = tmp_path / "play.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks? Wherefore gentle kingdom thousand\n" * 3 + "Seldom\n")
    task = load_task("reversed-words", text_path=text)
    assert task.kind == "generate"
    assert all(x == y[::-1] and 6 <= len(y) <= 9 for x, y in task.examples + task.queries)
    assert {y for _, y in task.examples + task.queries} == {"through", "yonder", "window", "breaks", "wherefore", "gentle", "kingdom", "thousand"}


def test_scramble_multiple_choice_ranks_the_querys_own_candidates(tmp_path, gpt_lm):
    text = tmp_path / "play.txt"
    text.write_text("But soft, what light through yonder window breaks? Wherefore gentle kingdom thousand Seldom golden\n" * 3)
    task = load_task("reversed-words", text_path=text, choices=3)
    assert task.kind == "choice" and len(task.candidates) == len(task.queries)
    for (_, word), row in zip(task.queries, task.candidates):
        assert word in row and len(set(row)) == len(row) and {len(w) for w in row} == {len(word)}
    # A loop transcription: each candidate's summed log-likelihood scored from scratch.
    got = score_draw(gpt_lm, task, task.examples[:2], task.queries, candidates=task.candidates)
    prompt = build_prompt(gpt_lm, task.examples[:2], task.description)
    right = 0
    for (x, y), row in zip(task.queries, task.candidates):
        q = gpt_lm.encode(f"{x} ->")
        scores = []
        for c in row:
            lab = gpt_lm.encode(f" {c}")
            logp = torch.log_softmax(gpt_lm.model(torch.tensor([prompt + q + lab]))[0].double(), -1)
            scores.append(sum(logp[len(prompt) + len(q) + t - 1, lab[t]].item() for t in range(len(lab))))
        right += row[int(np.argmax(scores))] == y
    assert got["accuracy"] == pytest.approx(right / len(task.queries))
    out = evaluate_prompting(gpt_lm, ["reversed-words"], shots=[0, 1], draws=1, queries=2, text_path=text, choices=3)
    assert out["tasks"]["reversed-words"]["chance"] == pytest.approx(np.mean([1 / len(row) for row in task.candidates]))
    with pytest.raises(ConfigError, match="choices"):
        load_task("reversed-words", text_path=text, choices=1)


@pytest.mark.parametrize("spell", [True, False])
def test_spelled_scrambles_are_the_same_words_letter_by_letter(tmp_path, gpt_lm, monkeypatch, spell):
    """``spell``: the same split, draws and candidates as the plain task, each word's letters joined by spaces, and an
    answer counts when its letters match the target's, spaces aside ("revolt" for "r e v o l t"). Negative control: the
    plain task compares the stripped text, so the same spaced answers are all wrong there."""
    text = tmp_path / "play.txt"
    text.write_text("But soft, what light through yonder window breaks? Wherefore gentle kingdom thousand Seldom golden\n" * 3)
    plain = load_task("cycle-letters", text_path=text, choices=3)
    task = load_task("cycle-letters", text_path=text, choices=3, spell=spell)
    letters = (lambda w: " ".join(w)) if spell else (lambda w: w)
    assert task.examples == [(letters(x), letters(y)) for x, y in plain.examples]
    assert task.queries == [(letters(x), letters(y)) for x, y in plain.queries]
    assert task.candidates == [[letters(c) for c in row] for row in plain.candidates]
    generated = load_task("cycle-letters", text_path=text, spell=spell)
    monkeypatch.setattr(prompting, "greedy_lines", lambda lm, past, ids, n: [" " + " ".join(y.replace(" ", "")) for _, y in generated.queries])
    assert score_draw(gpt_lm, generated, generated.examples[:1], generated.queries)["accuracy"] == (1.0 if spell else 0.0)


def test_evaluate_prompting_shapes_and_seeds(gpt_lm):
    a = evaluate_prompting(gpt_lm, ["categories", "categories-flipped"], shots=[0, 2], draws=2, queries=6, seed=1)
    b = evaluate_prompting(gpt_lm, ["categories", "categories-flipped"], shots=[0, 2], draws=2, queries=6, seed=1)
    assert a == b
    cell = a["tasks"]["categories"]["by_k"]["2"]
    assert len(cell["draws"]) == 2 and cell["accuracy"] == pytest.approx(np.mean(cell["draws"]))
    assert "prior" in a["tasks"]["categories-flipped"]["by_k"]["0"]
    assert a["tasks"]["categories"]["chance"] == pytest.approx(1 / 6)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(gpt_lm, tmp_path):
    with pytest.raises(DataError, match=r"K=999 examples asked but task categories has \d+"):
        evaluate_prompting(gpt_lm, ["categories"], shots=[999], draws=1, queries=2)
    short = tiny_gpt(max_len=24)
    with pytest.raises(DataError, match=r"needs \d+ positions but tiny-gpt holds 24: \d+ too many"):
        evaluate_prompting(short, ["categories"], shots=[8], draws=1, queries=2)
    with pytest.raises(ConfigError, match="unknown prompting task 'nope'"):
        evaluate_prompting(gpt_lm, ["nope"], shots=[1], draws=1, queries=2)
    with pytest.raises(ConfigError, match="unknown language model 'gpt-9'"):
        open_prompt_model("gpt-9")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf", SMOLLM2.sha256, "x")
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"GGUF not really")
    with pytest.raises(CheckpointError, match="SHA-256 .* expected b179c95"):
        load_gguf(corrupt, SMOLLM2.sha256, "x")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_needs_a_template_that_only_appends(hf_folder, gpt_lm):
    for lm in (gpt_lm, open_prompt_model(hf_folder)):  # neither has a chat template
        with pytest.raises(ConfigError, match="has no chat template: prompt it without --chat"):
            evaluate_prompting(lm, ["categories"], shots=[1], draws=1, queries=2, chat=True)
    lm = open_prompt_model(hf_folder)
    lm.tokenizer.chat_template = CHATML
    head, tails = prompting.chat_pieces(lm, [("dog", "animal")], "Name the category.", ["apple", "red"])
    assert head == "<|im_start|>system\nName the category.<|im_end|>\n<|im_start|>user\ndog<|im_end|>\n<|im_start|>assistant\nanimal<|im_end|>\n"
    assert tails == [f"<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n" for x in ("apple", "red")]
    # Negative control: a template that numbers the turns rewrites the earlier ones when one is added.
    lm.tokenizer.chat_template = "{{ messages | length }}" + CHATML
    with pytest.raises(ConfigError, match="rewrites earlier turns when one is added"):
        prompting.chat_pieces(lm, [("dog", "animal")], None, ["apple"])


def test_cli_icl_prompt_on_a_gpt_run_and_icl_evaluate_still_parses(tmp_path, capsys):
    corpus = tmp_path / "play.txt"
    corpus.write_text(CORPUS * 4)
    tiny = ["data.source=text", "data.seq_len=128", "data.vocab_size=300", "encoder=text-transformer",
            "encoder.options={dim: 32, depth: 2, heads: 4}", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
            "train.channels_last=false", "train.checkpoint_every=100", "train.steps=2"]
    api.pretrain(api.load_config(overrides=[f"out={tmp_path}", "name=g", "method=gpt", f"data.path={corpus}", *tiny]), progress=False)
    code = main(["icl", "prompt", str(tmp_path / "g"), "--tasks", "categories", "--shots", "0", "1", "--draws", "2", "--queries", "3", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["model"] == "g" and set(out["tasks"]["categories"]["by_k"]) == {"0", "1"}
    assert main(["icl", "prompt", str(tmp_path / "g"), "--tasks", "nope"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown prompting task" in err
    assert main(["icl", "prompt", str(tmp_path / "g"), "--tasks", "categories", "--chat"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "g has no chat template" in err
    assert main(["icl", "evaluate", str(tmp_path / "missing")]) != 0  # the regression sub-action is still there


# ------------------------------------------------------------------ SmolLM2, when installed


@pytest.fixture(scope="module")
def smollm2():
    try:
        gguf_path(SMOLLM2)
    except ConfigError as error:
        pytest.skip(f"SmolLM2 not installed: {error}")
    return open_prompt_model("smollm2")  # checks the SHA-256 first


def test_smollm2_hash_and_one_log_likelihood(smollm2):
    lm = smollm2
    assert lm.context == 8192 and lm.start_ids == [] and gguf_path(SMOLLM2).stat().st_size == 98_362_432
    prompt = build_prompt(lm, [("dog", "animal"), ("pear", "fruit"), ("car", "vehicle")], None)
    x = lm.encode("apple ->")
    labels = [lm.encode(f" {c}") for c in ["animal", "fruit", "vehicle"]]
    cached = continuation_logprobs(lm, prefill(lm, prompt), [x] * 3, labels)
    recomputed = continuation_logprobs(lm, None, [prompt + x] * 3, labels)
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=0)
    assert int(cached.argmax()) == 1 and cached[1] > -1.0  # " fruit" is likely after apple ->


@pytest.mark.parametrize("description", [None, "Name the category."])
def test_smollm2_chat_prompts_are_its_own_template_and_answer_in_the_reply(smollm2, description):
    lm, examples = smollm2, [("dog", "animal"), ("pear", "fruit"), ("car", "vehicle")]
    task = PromptTask("toy", "classify", description or "", examples, [("apple", "fruit"), ("cat", "animal")], ["animal", "fruit", "vehicle"])
    head, tails = prompting.chat_pieces(lm, examples, description, ["apple", "cat"])
    # Independent: transformers' own chat tokenisation of each whole conversation.
    turns = ([{"role": "system", "content": description}] if description else []) + [
        {"role": r, "content": t} for x, y in examples for r, t in (("user", x), ("assistant", y))]
    wholes = []
    for x, tail in zip(["apple", "cat"], tails):
        whole = lm.tokenizer.apply_chat_template(turns + [{"role": "user", "content": x}], add_generation_prompt=True, tokenize=True)
        wholes.append(list(whole["input_ids"] if hasattr(whole, "keys") else whole))
        assert lm.encode(head) + lm.encode(tail) == wholes[-1]
    # The reply's log-likelihoods over the cached examples against a loop over each whole conversation scored from scratch
    # by the model itself, the label written as the reply begins (no leading space).
    labels = [lm.encode(c) for c in task.labels]
    cached = continuation_logprobs(lm, prefill(lm, lm.encode(head)), [lm.encode(t) for t in tails for _ in labels], labels * 2)
    by_hand = []
    for whole in wholes:
        for label in labels:
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(torch.tensor([whole + label])).logits[0].double(), -1)
            by_hand.append(sum(logp[len(whole) + t - 1, label[t]].item() for t in range(len(label))))
    torch.testing.assert_close(cached, torch.tensor(by_hand, dtype=torch.float64), atol=1e-4, rtol=0)
    # Negative control: the plain prompts' labels (" fruit", after a space) are other tokens with other log-likelihoods.
    spaced = continuation_logprobs(lm, prefill(lm, lm.encode(head)), [lm.encode(t) for t in tails for _ in labels],
                                   [lm.encode(f" {c}") for c in task.labels] * 2)
    assert (spaced - cached).abs().max() > 1e-2
    # Without a description the template's own system turn comes first.
    assert ("You are a helpful AI assistant" in head) == (description is None)
    got = score_draw(lm, task, examples, task.queries, describe=description is not None, chat=True)
    assert got["accuracy"] == 1.0  # apple → fruit, cat → animal, scored as the assistant's reply
    # The same draw as plain "x -> y" lines is another prompt: the chat flag reaches the prompt.
    assert got["prompt_tokens"] != score_draw(lm, task, examples, task.queries, describe=description is not None)["prompt_tokens"]
