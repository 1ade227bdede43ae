"""Text pre-training: tokenizer, token windows, GPT / masked LM, KV-cache generation, perplexity, speakers, CLI."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot import api
from fewshot.cli import main
from fewshot.data.masking import IGNORE_INDEX
from fewshot.data.text import TokenSet, parse_speeches, speaker_lines, split_text
from fewshot.data.tokenizer import (
    BOS_ID, CLS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, decode, encode, load_tokenizer, save_tokenizer, train_tokenizer,
)
from fewshot.errors import CheckpointError, ConfigError
from fewshot.evaluate.speakers import embed_texts, speaker_pool
from fewshot.evaluate.text import perplexity
from fewshot.generate import generate, sample_next
from fewshot.models.language import GPT, MaskedLM, prepend
from fewshot.objectives.language import token_cross_entropy
from conftest import resume_problems

SPEAKERS = ["ROMEO", "JULIET", "Nurse", "First Citizen", "MERCUTIO", "TYBALT"]
WORDS = "love death night day sword rose moon thou thee art heart fair sweet villain peace fire king".split()


def play(n_speeches=160, seed=0):
    """A few KB of play-format text; each speaker prefers a few words so speakers are learnable."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(n_speeches):
        k = rng.randrange(len(SPEAKERS))
        lines = [" ".join(rng.choice(WORDS[k * 2 : k * 2 + 5]) for _ in range(rng.randint(3, 7))).capitalize() + rng.choice(".!?")
                 for _ in range(rng.randint(1, 3))]
        blocks.append(f"{SPEAKERS[k]}:\n" + "\n".join(lines))
    return "\n\n".join(blocks) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(play())
    return path


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(play(), 300)


def tiny(cls, vocab=300, max_len=24, seed=0, std=None):
    torch.manual_seed(seed)
    model = cls(vocab, max_len, dim=32, depth=2, heads=4).eval()
    if std:  # well-separated logits, so greedy ties cannot hide a difference
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0, std)
    return model


# ------------------------------------------------------------------ tokenizer and data


def test_tokenizer_round_trip_fixed_specials_and_determinism(tok, tmp_path):
    for s in ["ROMEO:\nBut soft, what light?\n\n", "  two  spaces\tand a tab\n", "ünïcödé — 🙂 not in the corpus", ""]:
        assert decode(tok, encode(tok, s)) == s
        assert UNK_ID not in encode(tok, s)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, UNK_ID, BOS_ID, 3, MASK_ID, CLS_ID] == list(range(6))
    assert len(encode(tok, "thou art fair")) < len("thou art fair")  # merges were learned
    assert train_tokenizer(play(), 300).to_str() == tok.to_str()
    save_tokenizer(tok, tmp_path)
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer("abc", 100)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_speaker_lines_parses_a_sample_exactly(tmp_path):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
            "All:\nSpeak, speak.\n\n"
            "TITUS:\n\n"  # a header whose speech the corpus lost: skipped
            "\nKING RICHARD III:\nGive me another horse: bind up my wounds.\nHave mercy, Jesu!\n\n"
            "ROMEO:\nHe jests at scars that never felt a wound.\n")
    (tmp_path / "p.txt").write_text(text)
    assert speaker_lines(tmp_path / "p.txt") == [
        ("First Citizen", "Before we proceed any further, hear me speak."),
        ("All", "Speak, speak."),
        ("KING RICHARD III", "Give me another horse: bind up my wounds.\nHave mercy, Jesu!"),
        ("ROMEO", "He jests at scars that never felt a wound."),
    ]


def test_split_is_contiguous_and_cuts_at_a_blank_line():
    text = play()
    s = split_text(text, 0.1)
    assert s.train + s.heldout == text
    assert s.train.endswith("\n\n") and len(s.heldout) <= 0.1 * len(text)
    assert parse_speeches(s.train) + parse_speeches(s.heldout) == parse_speeches(text)  # no speech cut in two


def test_token_set_windows():
    tokens = torch.arange(100, 120)
    ts = TokenSet(tokens, seq_len=5, stride=1)
    assert len(ts) == 16 and not ts.labeled
    batch = ts.batch(torch.tensor([0, 15, 3]))
    assert set(batch) == set(ts.keys) == {"tokens"}  # unlabeled: no labels key at all
    assert batch["tokens"].tolist() == [list(range(100, 105)), list(range(115, 120)), list(range(103, 108))]
    assert len(TokenSet(tokens, 5, stride=5)) == 4


# ------------------------------------------------------------------ models


def test_tied_embeddings_are_one_parameter_and_survive_the_state_dict():
    for cls in (GPT, MaskedLM):
        m = tiny(cls)
        x = torch.randint(6, 300, (2, 7))
        emb = m.encoder.tok_emb.weight
        # logits = head(h) · Eᵀ with E the tower's embedding: the one vocab-sized matrix, stored once
        torch.testing.assert_close(m(x), m.head(m.encoder.hidden(x)) @ emb.T)
        assert [n for n, p in m.named_parameters() if p.shape[0] == 300] == ["encoder.tok_emb.weight"]
        m2 = tiny(cls, seed=1)
        assert not torch.allclose(m2(x), m(x))
        m2.load_state_dict(m.state_dict())
        torch.testing.assert_close(m2(x), m(x))


def test_causal_output_at_t_ignores_later_tokens_and_the_masked_lm_does_not():
    x = torch.randint(6, 300, (2, 12))
    y = x.clone()
    y[:, 6:] = torch.randint(6, 300, (2, 6))
    gpt, mlm = tiny(GPT), tiny(MaskedLM)
    torch.testing.assert_close(gpt(x)[:, :6], gpt(y)[:, :6])
    assert not torch.allclose(gpt(x)[:, 6:], gpt(y)[:, 6:])
    assert not torch.allclose(mlm(x)[:, :6], mlm(y)[:, :6])  # bidirectional: earlier positions see the change


def test_prefix_embeddings_act_like_the_tokens_they_embed():
    gpt = tiny(GPT)
    a, b = torch.randint(6, 300, (2, 4)), torch.randint(6, 300, (2, 5))
    torch.testing.assert_close(gpt(b, prefix=gpt.encoder.tok_emb(a)), gpt(torch.cat([a, b], 1))[:, 4:])
    with pytest.raises(ValueError, match="context"):
        gpt(torch.zeros(1, 25, dtype=torch.long))


def test_embed_pools():
    mlm = tiny(MaskedLM).encoder
    x = torch.randint(6, 300, (3, 8))
    h = mlm.hidden(prepend(x, CLS_ID))
    torch.testing.assert_close(mlm.forward_tokens(x), h)  # plain tokens: the tower adds [CLS] itself
    torch.testing.assert_close(mlm(x), h[:, 0])  # [CLS] by default
    torch.testing.assert_close(mlm.embed(x, "mean"), h[:, 1:].mean(1))
    gpt = tiny(GPT).encoder
    torch.testing.assert_close(gpt(x), gpt.hidden(prepend(x, BOS_ID))[:, 1:].mean(1))


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("prompt_len, new", [(3, 12), (0, 5), (5, 40)])  # 40: the 24-position context slides
def test_greedy_with_kv_cache_equals_recomputing_the_prefix(prompt_len, new):
    gpt = tiny(GPT, std=0.3)
    prompt = torch.randint(6, 300, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    cached = generate(gpt, prompt, new, temperature=0, use_cache=True)
    full = generate(gpt, prompt, new, temperature=0, use_cache=False)
    assert cached == full and len(cached) == prompt_len + new and cached[:prompt_len] == prompt
    assert len(set(cached[prompt_len:])) > 1  # not a degenerate constant run

    # Independent reference: argmax of the full forward pass over [BOS] + everything so far.
    ref = list(prompt)
    for _ in range(min(new, gpt.max_len - 1 - prompt_len)):
        ref.append(int(gpt(prepend(torch.tensor([ref], dtype=torch.long), BOS_ID))[0, -1].argmax()))
    assert cached[: len(ref)] == ref


def test_sampling_with_cache_is_seeded_and_equal_to_recompute():
    gpt = tiny(GPT, std=0.3)
    runs = [generate(gpt, [7, 8], 20, 0.8, 40, torch.Generator().manual_seed(3), use_cache=c) for c in (True, False, True)]
    assert runs[0] == runs[1] == runs[2]


def test_top_k_never_leaves_the_top_k_and_follows_the_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g)
    top = set(logits[0].topk(5).indices.tolist())
    draws = torch.cat([sample_next(logits.expand(2000, -1), 1.3, 5, g) for _ in range(5)])
    assert set(draws.tolist()) <= top
    # Frequencies match softmax(l / T) renormalised over the top 5, computed here by hand.
    idx = sorted(top)
    p = np.exp(logits[0, idx].double().numpy() / 1.3)
    p /= p.sum()
    freq = np.array([(draws == i).float().mean().item() for i in idx])
    assert np.abs(freq - p).max() < 0.03


def test_temperature_to_zero_is_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    greedy = sample_next(logits, 0)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1e-4, None, torch.Generator().manual_seed(0)), greedy)
    assert not torch.equal(sample_next(logits, 1.0, None, torch.Generator().manual_seed(0)), greedy)
    with pytest.raises(ConfigError):
        sample_next(logits, -1)
    with pytest.raises(ConfigError):
        sample_next(logits, 1, 0)


# ------------------------------------------------------------------ objectives and perplexity


def test_token_cross_entropy_is_the_mean_nll_over_targeted_positions():
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, IGNORE_INDEX, 3, 0, IGNORE_INDEX], [IGNORE_INDEX, 6, 6, IGNORE_INDEX, 2]])
    terms = [-math.log(torch.softmax(logits[b, t].double(), 0)[targets[b, t]]) for b in range(2) for t in range(5)
             if targets[b, t] != IGNORE_INDEX]
    assert token_cross_entropy(logits, targets).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    zero = token_cross_entropy(logits.requires_grad_(), torch.full((2, 5), IGNORE_INDEX))
    assert zero.item() == 0 and zero.requires_grad


def test_perplexity_is_exp_of_a_hand_computed_mean_nll():
    gpt = tiny(GPT, max_len=9, std=0.1)
    tokens = torch.randint(6, 300, (21,), generator=torch.Generator().manual_seed(0))  # 8 + 8 + 5: a short last window
    nll = []
    for w in tokens.split(8):
        for t in range(len(w)):  # token w[t] given [BOS] + w[:t], one full forward pass each
            context = torch.cat([torch.tensor([BOS_ID]), w[:t]])[None]
            nll.append(-torch.log_softmax(gpt(context)[0, -1].double(), 0)[w[t]].item())
    out = perplexity(gpt, tokens, seq_len=8, n_chars=50)
    assert out["tokens"] == 21
    assert out["perplexity"] == pytest.approx(math.exp(sum(nll) / 21), rel=1e-5)
    assert out["bits_per_char"] == pytest.approx(sum(nll) / (50 * math.log(2)), rel=1e-5)


# ------------------------------------------------------------------ methods through the one trainer

TINY = ["data.source=text", "data.seq_len=16", "data.vocab_size=300", "encoder=text-transformer",
        "encoder.options={dim: 32, depth: 2, heads: 4}", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
        "train.lr=3e-3", "train.channels_last=false", "train.checkpoint_every=100"]


def _config(tmp_path, corpus, name, method, *extra):
    return api.load_config(overrides=[f"out={tmp_path}", f"name={name}", f"method={method}", f"data.path={corpus}", *TINY, *extra])


@pytest.mark.parametrize("method", ["gpt", "mlm"])
def test_gpt_and_mlm_train_through_the_trainer(tmp_path, corpus, method):
    result = api.pretrain(_config(tmp_path, corpus, method, method, "train.steps=25"), progress=False)
    losses = [h["loss"] for h in result.history]
    assert result.step == 25 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5  # it learns the tiny play
    tok = load_tokenizer(tmp_path / method)  # trained on the training split and saved beside the checkpoint
    assert tok.to_str() == train_tokenizer(split_text(corpus.read_text(), 0.1).train, 300).to_str()
    config, m, _ = api.load_pretrained(tmp_path / method)
    assert m.encoder.embed(torch.tensor([encode(tok, "Thou art")])).shape == (1, 32)


def test_method_losses_match_hand_computations(tmp_path, corpus):
    from fewshot.methods import build_method

    x = torch.randint(6, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    gpt = build_method(_config(tmp_path, corpus, "g", "gpt"))
    seq = torch.cat([torch.full((3, 1), BOS_ID), x], 1)
    logits = gpt.language_model()(seq[:, :-1])
    want = -torch.log_softmax(logits, -1).gather(2, x[..., None]).mean()
    torch.testing.assert_close(gpt({"tokens": x}, torch.Generator())[0], want)

    mlm = build_method(_config(tmp_path, corpus, "m", "mlm", "method.mlm_ratio=0.3"))
    loss, _ = mlm({"tokens": x}, torch.Generator().manual_seed(5))
    masked = mlm.mask(x, torch.Generator().manual_seed(5))  # the same draw
    assert (masked.inputs[:, 0] == CLS_ID).all() and not masked.mask[:, 0].any()  # [CLS] never chosen
    assert (masked.targets[masked.mask] == seq[:, 1:][masked.mask[:, 1:]]).all()
    logp = torch.log_softmax(mlm.language_model()(masked.inputs), -1)
    pos = masked.mask.nonzero().tolist()
    want = -sum(logp[b, t, x[b, t - 1]] for b, t in pos) / len(pos)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ConfigError, match="mlm_replace"):
        build_method(_config(tmp_path, corpus, "m", "mlm", "method.mlm_replace=[0.8,0.1,0.2]"))
    with pytest.raises(ConfigError, match="encoder.name=text-transformer"):
        build_method(_config(tmp_path, corpus, "m", "mlm", "encoder=conv4"))


def test_text_run_resumes_to_the_same_weights_with_its_tokenizer(tmp_path, corpus, monkeypatch):
    # Only the 3 steps left run, from the checkpoint (an altered one changes the result): tests/conftest.py.
    config_for = lambda name: _config(tmp_path, corpus, name, "gpt", "train.steps=6", "train.checkpoint_every=3")  # noqa: E731
    assert resume_problems(monkeypatch, config_for) == []
    a, b = api.load_pretrained(tmp_path / "full")[1].state_dict(), api.load_pretrained(tmp_path / "cut")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resumed run loads with its own tokenizer


# ------------------------------------------------------------------ speakers, evaluation, CLI


def test_speaker_pool_is_a_class_disjoint_split_of_speakers_with_enough_speeches():
    pairs = parse_speeches(play(400))
    pool = speaker_pool(pairs, min_lines=20, holdout=0.5, seed=0)
    assert len(pool.speakers) == 3 and not set(pool.speakers) & set(pool.tuning_speakers)
    assert sorted(pool.speakers + pool.tuning_speakers) == sorted(SPEAKERS)  # all have ≥ 20 of 400 speeches
    assert pool.texts == [t for s, t in pairs if s in pool.speakers]
    assert [pool.speakers[k] for k in pool.labels] == [s for s, _ in pairs if s in pool.speakers]
    assert speaker_pool(pairs, 20, 0.5, 0).speakers == pool.speakers != speaker_pool(pairs, 20, 0.5, 3).speakers


def test_embed_texts_batches_without_changing_any_vector(tok):
    mlm = tiny(MaskedLM, max_len=10).encoder
    texts = ["thou art", "fair rose moon", "thou art", "sweet villain peace fire king love death night day"]
    got = embed_texts(mlm, tok, texts, "cls", batch_size=2)
    for i, t in enumerate(texts):
        ids = torch.tensor([encode(tok, t)[:9]])
        torch.testing.assert_close(got[i], mlm.embed(ids, "cls")[0])


def test_generate_and_evaluate_commands_on_a_tiny_run(tmp_path, corpus, capsys):
    api.pretrain(_config(tmp_path, corpus, "g", "gpt", "train.steps=3", "data.heldout_fraction=0.5"), progress=False)
    argv = ["generate", str(tmp_path / "g"), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "0.8",
            "--top-k", "40", "--seed", "0", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 30 and out["text"].startswith("ROMEO:") and out["prompt"] == "ROMEO:"
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["text"] == out["text"]  # same seed, same text

    assert main(["pretrain", "--resume", str(tmp_path / "g"), "--json", "train.max_minutes=1"]) == 0  # reuses tokenizer.json
    assert json.loads(capsys.readouterr().out)["step"] == 3

    assert main(["generate", str(tmp_path / "nothing-here"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fewshot: error:") and "Traceback" not in err
    assert main(["generate", str(tmp_path / "g"), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err

    assert main(["evaluate", str(tmp_path / "g"), "--json", "eval.episodes=20", "eval.queries=3", "eval.shots=[1]", "eval.ways=[2]"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["perplexity"]["kind"] == "causal" and res["perplexity"]["perplexity"] > 1
    assert {r["encoder"] for r in res["results"]} == {"gpt-mean", "random-mean", "bag-of-words"}
    assert len(res["speakers"]) >= 2


def test_text_source_with_an_image_method_is_a_config_error(tmp_path, corpus):
    with pytest.raises(ConfigError, match="language method"):
        api.pretrain(_config(tmp_path, corpus, "x", "simclr"), progress=False)
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.parametrize("guard", ["on", "disabled"])
def test_a_text_run_never_overwrites_the_tokenizer_of_a_run_without_checkpoint(tmp_path, corpus, monkeypatch, guard):
    """A run that stopped before its first checkpoint leaves config.json and tokenizer.json; a new run
    with the same name= must refuse the folder, not retrain the tokenizer over them. "disabled" is the
    broken variant (no guard), where the same comparison sees the tokenizer replaced."""
    run_dir = tmp_path / "t"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_text(train_tokenizer(play()[:2000], 280).to_str())  # another run's tokenizer
    before = (run_dir / "tokenizer.json").read_bytes()
    if guard == "disabled":
        monkeypatch.setattr(api, "refuse_existing_run", lambda run_dir: None)
        api.pretrain(_config(tmp_path, corpus, "t", "gpt", "train.steps=1"), progress=False)
        assert (run_dir / "tokenizer.json").read_bytes() != before
        return
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        api.pretrain(_config(tmp_path, corpus, "t", "gpt", "train.steps=1"), progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["tokenizer.json"] and (run_dir / "tokenizer.json").read_bytes() == before


def test_a_run_refused_before_it_begins_leaves_no_tokenizer_behind(tmp_path, corpus, monkeypatch):
    from fewshot.errors import ConfigError
    from fewshot.train import trainer

    def refuse(config):
        raise ConfigError("method refused its options")

    with monkeypatch.context() as m:
        m.setattr(trainer, "build_method", refuse)  # fails after the tokenizer is trained, before config.json
        with pytest.raises(ConfigError):
            api.pretrain(_config(tmp_path, corpus, "again", "gpt", "train.steps=2"), progress=False)
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    api.pretrain(_config(tmp_path, corpus, "again", "gpt", "train.steps=2"), progress=False)  # the corrected rerun takes the name
    # a run that got as far as writing config.json keeps its files (and the name stays refused)
    with pytest.raises(Exception, match="already holds"):
        api.pretrain(_config(tmp_path, corpus, "again", "gpt", "train.steps=2"), progress=False)
