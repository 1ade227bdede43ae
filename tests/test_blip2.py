"""BLIP-2's Q-Former: its three masks against hand-written ones, what each mask lets through (with the broken
mask as the negative control), and the stage-1 objectives against loop transcriptions."""

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.models.qformer import QFormer, qformer_attention_mask
from fewshot.objectives.blip2 import hard_negatives, itc_loss, itc_similarity

T, F_ = True, False


def test_the_three_masks_equal_hand_written_ones():
    """Q = 2 queries, T = 3 text positions, the last one padded in the second row."""
    padding = torch.tensor([[F_, F_, F_], [F_, F_, T]])
    unimodal = torch.tensor([
        [T, T, F_, F_, F_],
        [T, T, F_, F_, F_],
        [F_, F_, T, T, T],
        [F_, F_, T, T, T],
        [F_, F_, T, T, T],
    ])
    bidirectional = torch.ones(5, 5, dtype=torch.bool)
    causal = torch.tensor([
        [T, T, F_, F_, F_],
        [T, T, F_, F_, F_],
        [T, T, T, F_, F_],
        [T, T, T, T, F_],
        [T, T, T, T, T],
    ])
    for kind, expected in (("unimodal", unimodal), ("bidirectional", bidirectional), ("multimodal-causal", causal)):
        got = qformer_attention_mask(kind, 2, padding)
        assert torch.equal(got[0], expected), kind
        hidden = expected.clone()
        hidden[:, 4] = False  # the padded key of row 2
        assert torch.equal(got[1], hidden), kind
    with pytest.raises(ValueError, match="unknown Q-Former mask"):
        qformer_attention_mask("causal", 2, padding)


def _qformer(cross_every: int = 2) -> QFormer:
    torch.manual_seed(0)
    return QFormer(image_dim=12, dim=16, depth=3, heads=4, queries=4, vocab_size=30, max_len=8, cross_every=cross_every).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 5, 12, generator=g)
    ids = torch.randint(6, 30, (2, 6), generator=g)
    ids[1, 4:] = 0  # padding
    return image, ids


def test_unimodal_mask_is_two_separate_passes_and_bidirectional_is_not():
    """ITC's mask: the joint pass gives the queries-alone and text-alone passes' states exactly (up to float
    rounding); negative control: under the bidirectional mask both move."""
    qformer, (image, ids) = _qformer(), _inputs()
    queries, text = qformer(image, ids, "unimodal")
    alone_q, _ = qformer(image, None)
    _, alone_t = qformer(None, ids)
    torch.testing.assert_close(queries, alone_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(text, alone_t, atol=1e-6, rtol=1e-6)
    joint_q, joint_t = qformer(image, ids, "bidirectional")
    assert not torch.allclose(joint_q, alone_q, atol=1e-4)
    assert not torch.allclose(joint_t, alone_t, atol=1e-4)


@pytest.mark.parametrize("kind", ["unimodal", "bidirectional"])
def test_text_sees_the_image_only_through_queries_it_may_attend(kind):
    """Under ITC's mask the text states are bit-identical whatever the image; under ITM's (the negative control)
    the image reaches the text through the queries, since the text itself never cross-attends."""
    qformer, (image, ids) = _qformer(), _inputs()
    _, text_a = qformer(image, ids, kind)
    _, text_b = qformer(image + 1.0, ids, kind)
    assert torch.equal(text_a, text_b) == (kind == "unimodal")


@pytest.mark.parametrize("kind", ["multimodal-causal", "bidirectional"])
def test_generation_mask_keeps_the_queries_blind_to_text_and_the_text_causal(kind):
    """ITG's mask: query states equal the queries-alone pass and text position t ignores tokens after t;
    the bidirectional mask (the negative control) breaks both."""
    qformer, (image, ids) = _qformer(), _inputs()
    changed = ids.clone()
    changed[0, 3:] = torch.tensor([7, 8, 9])
    q_a, t_a = qformer(image, ids, kind)
    q_b, t_b = qformer(image, changed, kind)
    alone_q, _ = qformer(image, None)
    blind = torch.allclose(q_a, alone_q, atol=1e-6) and torch.equal(q_a, q_b)
    causal = torch.allclose(t_a[0, :3], t_b[0, :3], atol=1e-6)
    assert (blind and causal) == (kind == "multimodal-causal")


def test_padded_text_gives_the_states_of_the_text_alone():
    qformer, (image, ids) = _qformer(), _inputs()
    for kind in ("unimodal", "bidirectional", "multimodal-causal"):
        q_batch, t_batch = qformer(image, ids, kind)
        q_one, t_one = qformer(image[1:], ids[1:, :4], kind)
        torch.testing.assert_close(t_batch[1, :4], t_one[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q_batch[1], q_one[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        qformer(image, torch.ones(2, 9, dtype=torch.long))


def test_itc_similarity_and_loss_match_loops():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(3, 4, 8, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    s = itc_similarity(z, t)
    loop = torch.tensor([[max(float(z[i, q] @ t[j]) for q in range(4)) for j in range(3)] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(s, loop)
    tau = 0.07
    i2t = -sum(torch.log_softmax(loop[i] / tau, 0)[i] for i in range(3)) / 3
    t2i = -sum(torch.log_softmax(loop[:, j] / tau, 0)[j] for j in range(3)) / 3
    torch.testing.assert_close(itc_loss(s, tau), 0.5 * (i2t + t2i))
    # identical captions 0 and 1: each of their rows (and columns) spreads its target over both
    keys = torch.tensor([5, 5, 6])
    P = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    i2t = -sum(P[i, j] * torch.log_softmax(loop[i] / tau, 0)[j] for i in range(3) for j in range(3)) / 3
    t2i = -sum(P[i, j] * torch.log_softmax(loop[:, j] / tau, 0)[i] for i in range(3) for j in range(3)) / 3
    torch.testing.assert_close(itc_loss(s, tau, keys), 0.5 * (i2t + t2i))


def test_hard_negatives_follow_the_similarity_and_skip_positives():
    s = torch.tensor([[0.0, 5.0, -5.0, -5.0], [5.0, 0.0, -5.0, -5.0], [-5.0, -5.0, 0.0, 5.0], [-5.0, -5.0, 5.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(200):
        text, valid, image, valid_t = hard_negatives(s, g)
        assert valid.all() and valid_t.all()
        counts[torch.arange(4), text] += 1
    assert counts.diagonal().sum() == 0  # never the positive
    assert counts[0, 1] > 190 and counts[2, 3] > 190  # the most similar other text (p ≈ 0.9999)
    # with caption keys 0 and 1 equal, image 0's candidates are only texts 2 and 3; a row whose every text is
    # a positive has no negative
    keys = torch.tensor([7, 7, 8, 8])
    text, valid, _, _ = hard_negatives(s, g, keys)
    assert valid.all() and set(text[:2].tolist()) <= {2, 3} and set(text[2:].tolist()) <= {0, 1}
    _, valid, _, valid_t = hard_negatives(s, g, torch.zeros(4, dtype=torch.long))
    assert not valid.any() and not valid_t.any()


# ------------------------------------------------------------------ both stages through the one trainer

from test_captioning import IMAGE, _pairs, runs  # noqa: E402,F401  (the tiny clip and gpt runs)


def _stage1_config(runs, root, name="qformer", *overrides):
    from fewshot.config import load_config

    return load_config(overrides=[*IMAGE, "method=blip2-qformer", f"method.image.init={runs['clip']}", "method.queries=3",
                                  "method.dim=16", "method.depth=2", "method.heads=2", "method.embed_dim=8", f"name={name}",
                                  f"out={root}", "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.lr=0.01",
                                  "train.accelerator=cpu", "train.devices=1", *overrides])


@pytest.mark.parametrize("setting", ["frozen", "frozen without eval mode"])
def test_stage1_trains_its_three_losses_with_the_image_tower_frozen(runs, tmp_path, monkeypatch, setting):
    from fewshot.data.tokenizer import load_tokenizer
    from fewshot.methods.blip2 import BLIP2QFormer
    from conftest import changed_by_training

    if setting == "frozen without eval mode":  # negative control: no gradient, but BatchNorm keeps updating its statistics
        monkeypatch.setattr(BLIP2QFormer, "train", torch.nn.Module.train)
    config = _stage1_config(runs, tmp_path)
    changed, run = changed_by_training(config, _pairs(load_tokenizer(runs["clip"])))
    row = run.history[-1]
    assert {"itc", "itm", "itg"} <= row.keys() and all(math.isfinite(row[k]) for k in ("itc", "itm", "itg"))
    assert any(k.startswith("encoder.") for k in changed) == (setting != "frozen")  # BatchNorm statistics included
    for part in ("qformer.query_tokens", "qformer.token_embed.weight", "itm_head.weight", "lm_head.weight", "image_projection.weight"):
        assert part in changed, part


def test_stage2_reads_stage1_and_keeps_the_lm_and_tower_frozen(runs, tmp_path):
    from fewshot.config import load_config
    from fewshot.data.tokenizer import load_tokenizer
    from fewshot.errors import CheckpointError, ConfigError
    from fewshot.methods import build_method
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    stage1 = _stage1_config(runs, tmp_path)
    pretrain(stage1, _pairs(load_tokenizer(runs["clip"])), progress=False)
    base = [*IMAGE, "method=blip2", f"method.lm.init={runs['gpt']}", f"out={tmp_path}", "train.steps=3", "train.batch_size=8",
            "train.warmup_steps=1", "train.lr=0.01", "train.accelerator=cpu", "train.devices=1"]
    config = load_config(overrides=[*base, f"method.qformer.init={stage1.run_dir}", "name=lm"])
    method = build_method(config)
    torch.testing.assert_close(method.qformer.query_tokens, Run.open(stage1.run_dir).method().qformer.query_tokens)
    assert method.prefix(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16)  # Q = 3 soft-prompt embeddings of the LM's width
    before = method.state_dict()
    pretrain(config, _pairs(method.text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("encoder.", "language_model.")) for k in changed)
    assert any(k.startswith("qformer.") for k in changed) and any(k.startswith("query_projection.") for k in changed)
    assert len(method.caption_images(torch.rand(2, 3, 16, 16), max_tokens=4)) == 2
    with pytest.raises(ConfigError, match="qformer.init"):
        build_method(load_config(overrides=[*base, "name=x"]))
    with pytest.raises(CheckpointError, match="not a blip2-qformer run"):
        build_method(load_config(overrides=[*base, f"method.qformer.init={runs['clip']}", "name=y"]))
    with pytest.raises(ConfigError, match="frozen"):
        build_method(load_config(overrides=[*base, f"method.qformer.init={stage1.run_dir}", "method.lm.tune=true", "name=z"]))
