"""Captioning through a language model: the link into a causal LM (fewshot's GPT and a Hugging Face GPT-2), the
captioning loss against a hand-computed one (prefix and padding never count), decoding (greedy stops at EOS,
the KV cache equals recomputation, beam width 1 is greedy), ClipCap through the one trainer (a frozen LM and
image tower stay bit-identical), the caption metrics against slow transcriptions of their formulas, scene F1's
identities, ``fewshot caption`` and its bad input."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from fewshot.cli import main
from fewshot.config import load_config
from fewshot.data.scenes import Obj, Scene, captions_for, caption_is_true, near_miss, sample_scenes, seen_pairs, heldout_pairs
from fewshot.data.token_ids import EOS_ID, IGNORE_INDEX, PAD_ID
from fewshot.data.tokenizer import save_tokenizer, train_tokenizer
from fewshot.errors import ConfigError
from fewshot.evaluate.captions import caption_scores, caption_tuples, pretokenize, scene_f1, scene_tuples
from fewshot.methods import build_method
from fewshot.models import prefix_lm
from fewshot.models.prefix_lm import beam_search, greedy, nucleus, open_prefix_lm
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss
from fewshot.train.checkpoint import Checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")

CORPUS = "\n".join(c for s in sample_scenes(np.random.default_rng(0), 40, (1, 2), seen_pairs(heldout_pairs(0)))
                   for c in captions_for(s, np.random.default_rng(1)))
IMAGE = ["data.source=text", "data.image_size=16", "data.channels=3", "data.seq_len=8", "data.vocab_size=300",
         "encoder.options={width: 8}", "train.channels_last=false"]


def _save_run(config, method, tokenizer=None):
    tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
    save_checkpoint(config.run_dir / "checkpoints" / "last", Checkpoint(config.model_dump(mode="json"), 1, tensors, {}))
    if tokenizer is not None:
        save_tokenizer(tokenizer, config.run_dir)
    return config.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A gpt run (random, well-separated logits) and a clip run (its image tower and projection), as run folders."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    gpt_config = load_config(overrides=["method=gpt", "data.source=text", "data.seq_len=32", "data.vocab_size=300", "encoder=text-transformer",
                                        "encoder.options={dim: 16, depth: 2, heads: 2}", "name=gpt", f"out={root}"])
    gpt = build_method(gpt_config)
    with torch.no_grad():
        for p in gpt.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    clip_config = load_config(overrides=[*IMAGE, "method=clip", "method.embed_dim=8", "method.text={dim: 16, depth: 1, heads: 2}",
                                         "name=clip", f"out={root}"])
    clip = build_method(clip_config)
    return {"gpt": _save_run(gpt_config, gpt, train_tokenizer(CORPUS, 300)), "clip": _save_run(clip_config, clip, train_tokenizer(CORPUS, 300))}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random 2-layer GPT-2 with an [EOS], and the same without one, as Hugging Face folders."""
    folders = {}
    for name, eos in (("with-eos", "[EOS]"), ("without-eos", None)):
        folder = tmp_path_factory.mktemp(name)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(CORPUS, 300), eos_token=eos, pad_token="[PAD]")
        tok.save_pretrained(folder)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=40, n_embd=16, n_layer=2, n_head=2))
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.3)
        model.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def links(runs, hf_folder):
    return {"gpt": open_prefix_lm(runs["gpt"]), "hf": open_prefix_lm(hf_folder["with-eos"])}


def _captions(link, n=4, t=6, seed=0):
    """(B, t) caption ids of the LM's tokenizer, right-padded with [PAD], lengths 6, 3, 5, 1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 300, (n, t), generator=g)
    lengths = torch.tensor([6, 3, 5, 1])[:n]
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = PAD_ID
    return tokens, lengths


# ------------------------------------------------------------------ the loss


def _hand_loss(link, prefix, tokens, lengths):
    """−mean over every caption token and each caption's EOS of log p(token | start, prefix, earlier tokens), each row
    run alone on its unpadded sequence."""
    terms = []
    for b, n in enumerate(lengths.tolist()):
        targets = tokens[b, :n].tolist() + [link.eos_id]
        sequence = torch.cat([link.prefix_sequence(prefix[b : b + 1]), link.embed(torch.tensor([targets[:-1]], dtype=torch.long))], dim=1)
        logits = link.step(sequence)[0][0].double()
        before = len(link.start_ids) + prefix.shape[1]
        for t, y in enumerate(targets):
            terms.append(-torch.log_softmax(logits[before - 1 + t], dim=0)[y])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("variant", ["caption and EOS", "prefix counted", "padding counted"])
@pytest.mark.parametrize("which", ["gpt", "hf"])
def test_the_loss_counts_the_caption_and_its_eos_only(links, which, variant):
    link = links[which]
    torch.manual_seed(0)
    prefix = torch.randn(4, 3, link.dim)
    tokens, lengths = _captions(link)
    ids = append_eos(tokens, link.eos_id)
    assert ids[torch.arange(4), lengths].tolist() == [link.eos_id] * 4 and (ids[:, :-1] != PAD_ID).sum(1).tolist() == (lengths + 1).clamp(max=6).tolist()
    before = len(link.start_ids) + prefix.shape[1]
    labels = caption_labels(before, ids)
    if variant == "prefix counted":  # negative control: prefix positions labelled with a token instead of ignored
        labels[:, 1:before] = 7
    if variant == "padding counted":  # negative control: padding as a target
        labels[:, before:] = ids
    with torch.no_grad():
        logits = link.step(torch.cat([link.prefix_sequence(prefix), link.embed(ids)], dim=1))[0]
        loss, hand = caption_loss(logits, labels), _hand_loss(link, prefix, tokens, lengths)
    assert (labels != IGNORE_INDEX).sum() == (lengths + 1).sum() or variant != "caption and EOS"
    assert (loss.item() == pytest.approx(hand.item(), rel=1e-5)) == (variant == "caption and EOS")


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("variant", ["stops at EOS", "EOS unknown"])
def test_greedy_decoding_stops_at_eos(links, variant):
    link = links["gpt"]
    torch.manual_seed(0)
    prefix = torch.randn(1, 3, link.dim)
    free = greedy(link, prefix, 8)[0]  # the untrained model never picks [EOS]
    assert len(free) == 8 and EOS_ID not in free
    third = free[2]
    cut = free[: free.index(third)]
    calls = []
    real_step = type(link).step
    eos = third if variant == "stops at EOS" else -1  # negative control: a decoder that does not know the end token

    class Counting(type(link)):
        def step(self, embeds, past=None):
            calls.append(embeds.shape[1])
            return real_step(self, embeds, past)

    counting = Counting(link.model, link.tokenizer, link.name)
    counting.eos_id = eos
    out = greedy(counting, prefix, 8)[0]
    assert (out == cut and len(calls) == 1 + len(cut)) == (variant == "stops at EOS")


def _no_cache(link):
    """A broken KV cache, kept as a negative control: each new token is fed without the cached positions."""
    class Forgetful(type(link)):
        def step(self, embeds, past=None):
            return super().step(embeds, None)

    broken = Forgetful.__new__(Forgetful)
    broken.__dict__ = link.__dict__
    return broken


@pytest.mark.parametrize("cache", ["kv cache", "broken cache"])
@pytest.mark.parametrize("which", ["gpt", "hf"])
def test_cached_decoding_equals_recomputation(links, which, cache):
    link = links[which]
    torch.manual_seed(1)
    prefix = torch.randn(3, 2, link.dim)
    decoder = link if cache == "kv cache" else _no_cache(link)
    same = greedy(decoder, prefix, 10, use_cache=True) == greedy(link, prefix, 10, use_cache=False)
    draws = [nucleus(d, prefix, 10, top_p=0.8, generator=torch.Generator().manual_seed(3), use_cache=u) for d, u in ((decoder, True), (link, False))]
    assert same == (cache == "kv cache") and (draws[0] == draws[1]) == (cache == "kv cache")


@pytest.mark.parametrize("which", ["gpt", "hf"])
def test_beam_width_one_is_greedy_and_wider_beams_search_further(links, which):
    link = links[which]
    torch.manual_seed(2)
    prefix = torch.randn(4, 2, link.dim)
    assert beam_search(link, prefix, 8, beams=1) == greedy(link, prefix, 8)
    assert beam_search(link, prefix, 8, beams=3) != greedy(link, prefix, 8)  # the comparison can fail


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(prefix_lm.top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False] and kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False] and kept(1.0) == [True] * 4


# ------------------------------------------------------------------ ClipCap through the trainer


def _clipcap_config(runs, root, name, *overrides):
    return load_config(overrides=[*IMAGE, "method=clipcap", f"method.image.init={runs['clip']}", f"method.lm.init={runs['gpt']}",
                                  "method.prefix_length=2", "method.mapper_depth=1", "method.mapper_heads=2", f"name={name}", f"out={root}",
                                  "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.lr=0.01", "train.accelerator=cpu",
                                  "train.devices=1", *overrides])


def _pairs(tokenizer):
    from fewshot.data.pairs import pair_set
    from fewshot.data.scenes import make_pool

    pool = make_pool(10, size=16, objects=(1, 2), seed=0)
    return pair_set(pool.images, pool.row_image, pool.row_caption, tokenizer, context=8)


@pytest.mark.parametrize("setting", ["frozen lm", "tuned lm", "frozen without eval mode"])
@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_frozen_parts_are_bit_identical_after_training(runs, tmp_path, monkeypatch, setting, mapper):
    from fewshot.methods.clipcap import ClipCap
    from conftest import changed_by_training

    if setting == "frozen without eval mode":  # negative control: no gradient, but BatchNorm keeps updating its statistics
        monkeypatch.setattr(ClipCap, "train", torch.nn.Module.train)

    config = _clipcap_config(runs, tmp_path, "cap", f"method.mapper={mapper}", f"method.lm.tune={str(setting == 'tuned lm').lower()}")
    changed, run = changed_by_training(config, _pairs(build_method(config).text_tokenizer))
    lm = {k for k in run.method().state_dict() if k.startswith("language_model.")}
    tower_moved = any(k.startswith(("encoder.", "image_projection.")) for k in changed)  # BatchNorm statistics included
    assert tower_moved == (setting == "frozen without eval mode")
    assert any(k.startswith("mapper.") for k in changed)
    assert bool(changed & lm) == (setting == "tuned lm")  # the negative control: a tuned LM moves


def test_clipcap_captions_and_the_caption_command(runs, tmp_path, capsys):
    from fewshot.train.trainer import pretrain

    config = _clipcap_config(runs, tmp_path, "cap")
    method = build_method(config)
    assert method.prefix(torch.rand(2, 3, 16, 16)).shape == (2, 2, 16)
    pretrain(config, _pairs(method.text_tokenizer), progress=False)
    assert main(["caption", str(config.run_dir), "--n", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 6 and {"bleu4", "rouge_l", "cider_d", "scene_f1", "share_true"} <= out.keys()
    assert 0 <= out["scene_f1"] <= 1 and 0 <= out["share_true"] <= 1
    assert main(["caption", str(config.run_dir), "--n", "4", "--decoding", "beam", "--beams", "2"]) == 0
    assert "CIDEr-D" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["untied copies", "shared storage"])
def test_a_hugging_face_lm_with_tied_embeddings_trains_saves_and_reopens(runs, hf_folder, tmp_path, monkeypatch, variant):
    from fewshot.methods import prefix_captioning
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    if variant == "shared storage":  # negative control: the state as torch gives it, both names on one tensor
        monkeypatch.setattr(prefix_captioning, "untie", lambda *args: None)
    config = _clipcap_config(runs, tmp_path, "hf", f"method.lm.init={hf_folder['with-eos']}", "method.lm.tune=true")
    method = build_method(config)
    lm = method.language_model.model
    assert lm.lm_head.weight is lm.transformer.wte.weight  # GPT-2 ties its embeddings
    if variant == "shared storage":
        with pytest.raises(RuntimeError, match="share memory"):
            pretrain(config, _pairs(method.text_tokenizer), progress=False)
        return
    pretrain(config, _pairs(method.text_tokenizer), progress=False)
    reopened = Run.open(config.run_dir).method().language_model.model
    assert reopened.lm_head.weight is reopened.transformer.wte.weight
    assert not torch.equal(reopened.transformer.wte.weight, lm.transformer.wte.weight)  # tuned, saved and read back


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(runs, hf_folder, tmp_path, capsys):
    assert main(["caption", str(runs["clip"]), "--n", "4"]) == 2  # a clip run has no decoder
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no caption decoder" in err
    with pytest.raises(ConfigError, match="more than gpt's context of 33"):
        build_method(_clipcap_config(runs, tmp_path, "long", "method.prefix_length=30"))
    with pytest.raises(ConfigError, match="no EOS token"):
        open_prefix_lm(hf_folder["without-eos"])
    with pytest.raises(ConfigError, match="method.image.init"):
        build_method(load_config(overrides=[*IMAGE, "method=clipcap", f"method.lm.init={runs['gpt']}"]))
    with pytest.raises(ConfigError, match="more than gpt's context"):
        greedy(open_prefix_lm(runs["gpt"]), torch.zeros(1, 20, 16), 20)


# ------------------------------------------------------------------ metrics against their formulas


REFERENCES = [["a red circle left of a blue square", "there is a red circle", "two objects a red circle and a blue square"],
              ["a small green star", "a photo of a small star", "there is one star"],
              ["a large white ring above a cyan cross", "a white ring is above a cyan cross"],
              ["there are two objects", "a purple arrow and a yellow diamond"]]
CANDIDATES = ["a red circle and a blue square", "a small green star on a black background", "a white ring above a cross",
              "a purple arrow and a red diamond"]


def _ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def slow_bleu4(refs, cands, brevity=True):
    """Papineni et al. 2002, corpus level; the closest reference length (ties: the shorter)."""
    log_p = 0.0
    for n in range(1, 5):
        hit = total = 0
        for rs, c in zip(refs, cands):
            counts = _ngrams(c.split(), n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r.split(), n)
            hit += sum(min(k, best[g]) for g, k in counts.items())
            total += max(0, len(c.split()) - n + 1)
        log_p += math.log(hit / total) / 4
    c_len = sum(len(c.split()) for c in cands)
    r_len = sum(min((abs(len(r.split()) - len(c.split())), len(r.split())) for r in rs)[1] for rs, c in zip(refs, cands))
    bp = math.exp(1 - r_len / c_len) if brevity and c_len < r_len else 1.0
    return bp * math.exp(log_p)


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def slow_rouge_l(refs, cands, beta=1.2):
    """Lin 2004: P and R maximised over the references, F_β; the mean over images."""
    scores = []
    for rs, c in zip(refs, cands):
        p = max(_lcs(r.split(), c.split()) / len(c.split()) for r in rs)
        r = max(_lcs(r.split(), c.split()) / len(r.split()) for r in rs)
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return sum(scores) / len(scores)


def slow_cider_d(refs, cands, sigma=6.0, penalty=True):
    """Vedantam et al. 2015's CIDEr-D: TF-IDF n-gram vectors (idf over the images' reference sets), clipped candidate
    weights, a Gaussian length penalty, ×10, averaged over n = 1..4, the references and the images."""
    n_images = len(refs)
    df = Counter(g for rs in refs for g in {g for r in rs for n in range(1, 5) for g in _ngrams(r.split(), n)})

    def vector(words, n):
        return {g: k * math.log(n_images / max(1.0, df[g])) for g, k in _ngrams(words, n).items()}

    total = 0.0
    for rs, c in zip(refs, cands):
        image = 0.0
        for r in rs:
            for n in range(1, 5):
                vc, vr = vector(c.split(), n), vector(r.split(), n)
                norm = math.sqrt(sum(v * v for v in vc.values())) * math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
                length = math.exp(-((len(c.split()) - len(r.split())) ** 2) / (2 * sigma**2)) if penalty else 1.0
                image += (dot / norm if norm else 0.0) * length / 4
        total += 10 * image / len(rs)
    return total / n_images


@pytest.mark.parametrize("variant", ["formulas", "no brevity penalty, β = 1, no length penalty"])
def test_the_metrics_equal_slow_transcriptions_of_their_formulas(variant):
    pytest.importorskip("pycocoevalcap")
    ours = caption_scores(REFERENCES, CANDIDATES)
    broken = variant != "formulas"  # negative control: each formula without one of its parts
    slow = {"bleu4": slow_bleu4(REFERENCES, CANDIDATES, brevity=not broken), "rouge_l": slow_rouge_l(REFERENCES, CANDIDATES, 1.0 if broken else 1.2),
            "cider_d": slow_cider_d(REFERENCES, CANDIDATES, penalty=not broken)}
    for name, value in slow.items():
        assert (ours[name] == pytest.approx(value, rel=1e-6)) == (not broken), name
    assert 0 < ours["bleu4"] < 1 and 0 < ours["cider_d"] < 10


def test_pretokenize_drops_punctuation_and_case():
    assert pretokenize("Two objects: a Half-disc, and a STAR.") == "two objects a half-disc and a star"


# ------------------------------------------------------------------ scene F1 and the verifier


def test_scene_f1_is_one_for_full_descriptions_and_zero_for_another_scene_with_nothing_in_common():
    scenes = sample_scenes(np.random.default_rng(5), 60, (1, 3), seen_pairs(heldout_pairs(0)))
    rng = np.random.default_rng(6)
    for scene in scenes:
        captions = captions_for(scene, rng)
        assert scene_f1(captions[0], scene) == 1.0  # a full description names every object's size, colour and shape
        assert all(caption_tuples(c) <= scene_tuples(scene) for c in captions)  # every true caption states only true tuples
        assert all(caption_is_true(c, scene) for c in captions)
        miss = near_miss(scene, rng)
        assert scene_f1(miss, scene) < 1.0 or caption_tuples(miss) == caption_tuples(captions[0]) or not caption_tuples(miss)
    a = Scene([Obj("circle", "red", "small", 0.3, 0.3), Obj("star", "blue", "small", 0.7, 0.7)])
    b = Scene([Obj("square", "green", "large", 0.3, 0.3), Obj("ring", "white", "large", 0.7, 0.7)])
    cap_b = captions_for(b, np.random.default_rng(0))
    assert scene_f1(cap_b[0], b) == 1.0 and all(scene_f1(c, a) == 0.0 for c in cap_b)
    assert scene_f1("IMG_0423.jpg", a) == 0.0 and caption_tuples("IMG_0423.jpg") is None
    # Negative control: one changed attribute is no longer a perfect description.
    assert scene_f1("a small red circle and a small green star", a) == pytest.approx(7 / 9)  # 7 of 9 tuples on each side
