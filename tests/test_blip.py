"""BLIP: ITM's negatives are never positives (drawn without the positive mask: caught); the LM loss equals a row-by-row
hand computation that skips [DEC] and padding (padding as a target: caught); the decoder is causal (a bidirectional
one: caught) and the image-grounded encoder bidirectional; encoder and decoder share every weight but self-attention;
a few steps through the trainer, reopened, caption and match."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.config import load_config
from fewshot.data.token_ids import EOS_ID, PAD_ID
from fewshot.methods import blip as blip_module
from fewshot.methods import build_method

TINY = ["method=blip", "data.source=text", "data.image_size=16", "data.channels=3", "data.seq_len=8", "data.vocab_size=300",
        "encoder.options={width: 8, pools: 2}", "method.dim=16", "method.depth=2", "method.heads=2", "method.embed_dim=8",
        "train.channels_last=false"]


def _blip(*overrides):
    torch.manual_seed(0)
    return build_method(load_config(overrides=[*TINY, *overrides])).eval()


def _pairs(n=6, seed=0, t=6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 300, (n, t), generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 4, 2])[:n]
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = PAD_ID
    return {"images": torch.rand(n, 3, 16, 16, generator=g), "tokens": tokens, "caption_keys": torch.arange(n)}, lengths


def _unmasked_negatives(similarity, generator=None, caption_keys=None):
    """Negative control: hard negatives drawn from softmax(s) without removing the positives."""
    def draw(scores):
        return torch.multinomial(torch.softmax(scores.float(), dim=1), 1, generator=generator).squeeze(1)
    n = similarity.shape[0]
    ok = torch.ones(n, dtype=torch.bool)
    return draw(similarity), ok, draw(similarity.T), ok


@pytest.mark.parametrize("variant", ["hard negatives", "positives not masked"])
def test_itm_negatives_are_never_positives(monkeypatch, variant):
    if variant == "positives not masked":
        monkeypatch.setattr(blip_module, "hard_negatives", _unmasked_negatives)
    method = _blip("method.temperature=0.5")
    batch, _ = _pairs()
    batch["caption_keys"] = torch.tensor([0, 1, 0, 2, 1, 3])  # rows 0/2 and 1/4 carry the same caption
    seen = []
    real_itm_pairs = blip_module.itm_pairs
    monkeypatch.setattr(blip_module, "itm_pairs", lambda *a: seen.append(real_itm_pairs(*a)) or seen[-1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(30):
            method(batch, g)
    keys = batch["caption_keys"]
    clean = all(bool((keys[images[labels == 0]] != keys[texts[labels == 0]]).all()) for images, texts, labels in seen)
    assert clean == (variant == "hard negatives")
    images, texts, labels = seen[0]
    assert torch.equal(images[:6], torch.arange(6)) and torch.equal(texts[:6], torch.arange(6)) and labels[:6].eq(1).all()


def _hand_lm_loss(method, batch, lengths):
    """−mean over every caption token and its [EOS] of log p(token | [DEC], earlier tokens, image), row by row unpadded."""
    terms = []
    for b, n in enumerate(lengths.tolist()):
        image_tokens = method.image_tokens(batch["images"][b : b + 1])
        row = batch["tokens"][b : b + 1, :n]
        logits = method.decoder_logits(image_tokens, row)[0]  # (n + 1, vocab): [DEC] c1 … cn
        targets = row[0].tolist() + [EOS_ID]
        terms += [-torch.log_softmax(logits[t].double(), dim=0)[targets[t]] for t in range(n + 1)]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("variant", ["ignore index", "padding as a target"])
def test_the_lm_loss_ignores_dec_and_padding(monkeypatch, variant):
    if variant == "padding as a target":
        monkeypatch.setattr(blip_module, "caption_labels", lambda before, ids, pad_id: torch.cat(
            [torch.full((ids.shape[0], before), -100, dtype=torch.long), ids.long()], dim=1))
    method = _blip()
    batch, lengths = _pairs()
    with torch.no_grad():
        got = method.lm_loss(method.image_tokens(batch["images"]), batch["tokens"])
        hand = _hand_lm_loss(method, batch, lengths)
    assert hand.item() == pytest.approx(math.log(300), rel=0.15)  # untrained: near uniform
    assert (got.item() == pytest.approx(hand.item(), rel=1e-5)) == (variant == "ignore index")


def test_the_loss_is_itc_plus_itm_plus_lm():
    method = _blip()
    batch, lengths = _pairs()
    with torch.no_grad():
        loss, logs = method(batch, torch.Generator().manual_seed(0))
        # ITC by hand: image i's and caption i's cross-entropies over the other side at s/τ, averaged (keys all distinct)
        z = F.normalize(method.embed_images(batch["images"]).double(), dim=1)
        t = F.normalize(method.embed_texts(batch["tokens"]).double(), dim=1)
        logits = (z @ t.T) / method.temperature().double()
        itc = sum(-0.5 * (logits[i].log_softmax(0)[i] + logits[:, i].log_softmax(0)[i]) for i in range(len(z))) / len(z)
        lm = _hand_lm_loss(method, batch, lengths)
    assert logs["itc"] == pytest.approx(itc.item(), rel=1e-4) and logs["lm"] == pytest.approx(lm.item(), rel=1e-4)
    assert loss.item() == pytest.approx(logs["itc"] + logs["itm"] + logs["lm"], rel=1e-5)
    assert logs["itm"] == pytest.approx(math.log(2), rel=0.3)


@pytest.mark.parametrize("variant", ["causal decoder", "bidirectional decoder (broken)"])
def test_the_decoder_is_causal_the_encoders_bidirectional_and_only_self_attention_is_apart(variant):
    method = _blip()
    if variant != "causal decoder":  # negative control: the decoder's own self-attention sees later tokens
        for attention in method.decoder_attention:
            attention.causal = False
    batch, _ = _pairs()
    ids = batch["tokens"][:1, :5]  # row 0: five tokens, no padding
    changed = ids.clone()
    changed[0, 3] = 7
    with torch.no_grad():
        image_tokens = method.image_tokens(batch["images"][:1])
        dec, dec2 = method.decoder_logits(image_tokens, ids), method.decoder_logits(image_tokens, changed)
        enc, enc2 = method.text_states(method._first(ids, method.enc_id), image_tokens), method.text_states(method._first(changed, method.enc_id), image_tokens)
    assert torch.allclose(dec[:, :4], dec2[:, :4], atol=1e-6) == (variant == "causal decoder")
    assert not torch.allclose(dec[:, 4], dec2[:, 4], atol=1e-4)
    assert not torch.allclose(enc[:, 0], enc2[:, 0], atol=1e-4)  # [ENC] reads a later token
    names = {name for name, _ in method.named_parameters()}
    assert {n for n in names if n.startswith("decoder_attention.")} == {f"decoder_attention.{i}.{p}" for i in range(2)
                                                                       for p in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")}
    with torch.no_grad():  # a grounded text state depends on the image; the unimodal one does not read it at all
        other = method.image_tokens(torch.rand(1, 3, 16, 16))
        assert not torch.allclose(method.text_states(method._first(ids, method.enc_id), other), enc, atol=1e-4)


def test_a_few_steps_through_the_trainer_then_caption_and_match(tmp_path):
    from conftest import changed_by_training
    from test_clip import _scene_pairs

    data = _scene_pairs()
    config = load_config(overrides=[*TINY, "name=blip", f"out={tmp_path}", "train.steps=4", "train.batch_size=8", "train.warmup_steps=1",
                                    "train.lr=0.01", "train.accelerator=cpu", "train.devices=1"])
    changed, run = changed_by_training(config, data)
    method = run.method().eval()
    for part in ("decoder_attention.0.qkv.weight", "text.blocks.0.cross.q.weight", "itm_head.weight", "lm_head.weight", "token_embed.weight"):
        assert part in changed, part
    batch = data.batch(torch.arange(4))
    ids = method.caption_ids(batch["images"], "nucleus", generator=torch.Generator().manual_seed(0))
    assert len(ids) == 4 and all(len(row) <= 8 and EOS_ID not in row for row in ids)
    p = method.match_probability(batch["images"], batch["tokens"])
    assert p.shape == (4,) and bool(((p > 0) & (p < 1)).all())
    assert F.normalize(method.embed_texts(batch["tokens"]), dim=1).shape == (4, 8)
