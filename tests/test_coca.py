"""CoCa: the loss is clip_loss + 2 × a captioning cross-entropy computed row by row on unpadded prefixes;
the decoder is causal (a non-causal decoder or unimodal tower is caught); padding never enters the
captioning loss (a loss without the ignore index is caught); the attentional pooler equals a hand
transcription, reads every image token (a pooler that sees one is caught) and its first query is the
contrastive embedding; a few steps through the one trainer, saved and reopened with Run.open."""

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.config import load_config
from fewshot.data.token_ids import PAD_ID
from fewshot.methods import build_method
from fewshot.methods import vision_language
from fewshot.models.pooling import AttentionalPooler
from fewshot.objectives.clip import clip_loss

# data.source=text stands in for the pairs source (it has data.seq_len and data.vocab_size); conv4 with two
# pools keeps a 4×4 grid of image tokens at 16 px.
TINY = ["method=coca", "data.source=text", "data.image_size=16", "data.channels=3", "data.seq_len=8", "data.vocab_size=300",
        "encoder.options={width: 8, pools: 2}", "method.embed_dim=8", "method.text={dim: 16, depth: 1, heads: 2}",
        "method.caption_queries=3", "method.pool_heads=2", "train.channels_last=false"]


def _coca(*overrides):
    torch.manual_seed(0)
    return build_method(load_config(overrides=[*TINY, *overrides])).eval()  # eval: BatchNorm per row = per batch


def _pairs(n=6, seed=0, t=6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 300, (n, t), generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 4, 2])[:n]
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = PAD_ID
    return {"images": torch.rand(n, 3, 16, 16, generator=g), "tokens": tokens, "caption_keys": torch.arange(n)}, lengths


def _hand_caption_loss(method, batch, lengths):
    """−mean over every caption token of log p(token | the caption's earlier tokens, image), each row
    run alone on its unpadded caption, one token at a time."""
    terms = []
    for b, n in enumerate(lengths.tolist()):
        image_tokens = method.pooled_images(batch["images"][b : b + 1])[:, 1:]
        row = batch["tokens"][b : b + 1, :n]
        states, _, sequence = method.unimodal(row)
        logits = method.caption_logits(states, sequence, image_tokens)[0]  # (n, vocab)
        for t in range(n):
            terms.append(-torch.log_softmax(logits[t].double(), dim=0)[row[0, t]])
    return torch.stack(terms).mean()


def test_the_loss_is_clip_loss_plus_twice_the_captioning_cross_entropy():
    method = _coca()
    batch, lengths = _pairs()
    with torch.no_grad():
        loss, logs = method(batch, torch.Generator())
        contrastive = clip_loss(method.embed_images(batch["images"]), method.embed_texts(batch["tokens"]), method.logit_scale,
                                batch["caption_keys"])
        caption = _hand_caption_loss(method, batch, lengths)
    assert caption.item() == pytest.approx(math.log(300), rel=0.1)  # an untrained head is near uniform
    assert loss.item() == pytest.approx(contrastive.item() + 2 * caption.item(), rel=1e-5)
    assert logs["caption"] == pytest.approx(caption.item(), rel=1e-5) and logs["contrastive"] == pytest.approx(contrastive.item(), rel=1e-5)
    assert loss.item() != pytest.approx(contrastive.item() + caption.item(), rel=1e-3)  # the weight is 2, not 1
    weighted, _ = _coca("method.contrastive_loss_weight=0.5", "method.caption_loss_weight=3")(batch, torch.Generator())
    assert weighted.item() == pytest.approx(0.5 * contrastive.item() + 3 * caption.item(), rel=1e-5)


def _logits(method, batch):
    pooled = method.pooled_images(batch["images"])
    states, _, sequence = method.unimodal(batch["tokens"])
    return method.caption_logits(states, sequence, pooled[:, 1:])


@pytest.mark.parametrize("variant", ["causal", "bidirectional decoder", "bidirectional unimodal layers"])
def test_the_prediction_of_token_t_reads_only_earlier_tokens(variant):
    method = _coca()
    if variant == "bidirectional decoder":
        for block in method.decoder.blocks:
            block.attn.causal = False
    if variant == "bidirectional unimodal layers":
        for block in method.text_encoder.trunk.blocks:
            block.attn.causal = False
    batch, _ = _pairs()
    t = 2  # rows 0, 2 and 4 have a token 2 and one after it
    changed = {**batch, "tokens": batch["tokens"].clone()}
    changed["tokens"][:, t] = torch.where(changed["tokens"][:, t] == PAD_ID, PAD_ID, 7)
    with torch.no_grad():
        before, after = _logits(method, batch), _logits(method, changed)
    same_up_to_t = torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)
    assert same_up_to_t == (variant == "causal")
    assert not torch.allclose(before[0, t + 1], after[0, t + 1], atol=1e-4)  # token t is read by the next prediction


@pytest.mark.parametrize("variant", ["ignore index", "padding as a target"])
def test_padding_never_enters_the_captioning_loss(monkeypatch, variant):
    if variant == "padding as a target":  # negative control: cross-entropy without the ignore index
        monkeypatch.setattr(vision_language, "token_cross_entropy",
                            lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten()))
    method = _coca()
    batch, _ = _pairs()
    longer = {**batch, "tokens": F.pad(batch["tokens"], (0, 1), value=PAD_ID)}  # one more padded column: 7 ≤ seq_len
    with torch.no_grad():
        (loss, logs), (padded, padded_logs) = method(batch, torch.Generator()), method(longer, torch.Generator())
    assert logs["contrastive"] == pytest.approx(padded_logs["contrastive"], rel=1e-5)  # the [CLS] ignores padding
    assert (padded.item() == pytest.approx(loss.item(), rel=1e-5)) == (variant == "ignore index")


def _hand_pooler(pooler, tokens):
    """The pooler transcribed: LN(softmax(Q W_q (LN(X) W_k)ᵀ / √d_h) LN(X) W_v, per head) W_o)."""
    attn, h = pooler.attn, pooler.attn.heads
    x = F.layer_norm(tokens, tokens.shape[-1:], pooler.norm_context.weight, pooler.norm_context.bias)
    q = pooler.query @ attn.q.weight.T + attn.q.bias  # (n, D)
    k, v = (x @ attn.kv.weight.T + attn.kv.bias).chunk(2, dim=-1)  # (B, L, D) each
    d = q.shape[-1] // h
    out = []
    for i in range(h):
        part = slice(i * d, (i + 1) * d)
        weights = torch.softmax(torch.einsum("nd,bld->bnl", q[:, part], k[..., part]) / math.sqrt(d), dim=-1)
        out.append(weights @ v[..., part])
    y = torch.cat(out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    return F.layer_norm(y, y.shape[-1:], pooler.norm.weight, pooler.norm.bias)


def test_the_pooler_equals_its_transcription_and_the_contrastive_embedding_is_its_first_query():
    torch.manual_seed(0)
    pooler = AttentionalPooler(dim=16, context_dim=8, queries=4, heads=2).double()
    tokens = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(pooler(tokens), _hand_pooler(pooler, tokens))
    method = _coca()
    images = _pairs()[0]["images"]
    with torch.no_grad():
        pooled = method.pooler(method.image_tokens(images))
        torch.testing.assert_close(method.embed_images(images), method.image_projection(pooled[:, 0]))
        assert not torch.allclose(method.embed_images(images), method.image_projection(pooled[:, 1]), atol=1e-3)


@pytest.mark.parametrize("variant", ["every token", "only the first token"])
def test_every_query_reads_every_image_token(monkeypatch, variant):
    if variant == "only the first token":  # negative control: a pooler that masks all but one token
        def first_only(self, tokens):
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
            mask[:, 0] = False
            queries = self.query.expand(tokens.shape[0], -1, -1)
            return self.norm(self.attn(queries, padding_mask=mask, context=self.norm_context(tokens)))

        monkeypatch.setattr(AttentionalPooler, "forward", first_only)
    method = _coca()
    tokens = method.image_tokens(_pairs()[0]["images"]).detach().requires_grad_(True)
    assert tokens.shape[1] == 16  # conv4's 4×4 grid
    pooled = method.pooler(tokens)
    for query in range(pooled.shape[1]):
        (grad,) = torch.autograd.grad(pooled[:, query].square().sum(), tokens, retain_graph=True)
        reads_all = bool((grad.abs().sum(dim=-1) > 0).all())
        assert reads_all == (variant == "every token")


def test_bad_options_are_one_line_errors():
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="pool_heads=3 must divide method.text.dim=16"):
        _coca("method.pool_heads=3")
    with pytest.raises(ConfigError, match="gives none"):
        _coca("encoder=resnet18", "encoder.options={}")


def test_a_few_steps_through_the_trainer_save_and_reopen(tmp_path):
    from conftest import changed_by_training
    from test_clip import _scene_pairs

    data = _scene_pairs()
    config = load_config(overrides=[*TINY, "name=coca", f"out={tmp_path}", "train.steps=4", "train.batch_size=8", "train.warmup_steps=1",
                                    "train.lr=0.01", "train.accelerator=cpu", "train.devices=1"])
    changed, run = changed_by_training(config, data)
    method = run.method().eval()
    for part in ("pooler.query", "decoder.blocks.0.cross.q.weight", "lm_head.weight", "text_encoder.tok_emb.weight"):
        assert part in changed, part  # every part trained
    batch = data.batch(torch.arange(8))
    with torch.no_grad():
        loss, logs = method(batch, torch.Generator())
    assert torch.isfinite(loss) and logs["caption"] < math.log(300)  # four steps already beat a uniform guess
    assert run.encoder().dim == method.encoder.dim


def _hand_eos_loss(method, batch, lengths):
    """With method.eos: −mean over every caption token and the [EOS] after it, each row alone and unpadded."""
    from fewshot.data.token_ids import EOS_ID

    terms = []
    for b, n in enumerate(lengths.tolist()):
        image_tokens = method.pooled_images(batch["images"][b : b + 1])[:, 1:]
        row = batch["tokens"][b : b + 1, :n]
        states, _, sequence = method.unimodal(row)
        logits = method.caption_logits(states, sequence, image_tokens, n + 1)[0]  # (n + 1, vocab)
        targets = row[0].tolist() + [EOS_ID]
        terms += [-torch.log_softmax(logits[t].double(), dim=0)[targets[t]] for t in range(n + 1)]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("variant", ["eos", "no eos"])
def test_with_eos_the_captioning_loss_also_predicts_the_end_after_each_caption(variant):
    method = _coca(*(["method.eos=true"] if variant == "eos" else []))
    batch, lengths = _pairs()
    with torch.no_grad():
        _, logs = method(batch, torch.Generator())
        with_end = _hand_eos_loss(method, batch, lengths)
    assert (logs["caption"] == pytest.approx(with_end.item(), rel=1e-5)) == (variant == "eos")  # no eos: the old loss


def test_decoding_recomputes_the_greedy_caption_token_by_token_and_stops_at_eos():
    from fewshot.data.token_ids import EOS_ID
    from fewshot.errors import ConfigError

    method = _coca("method.eos=true")
    images = _pairs()[0]["images"][:3]
    with torch.no_grad():
        method.lm_head.bias.zero_()
        method.lm_head.bias[EOS_ID] = 4.0  # EOS likely but not certain: some rows end early, some run on
        ids = method.caption_ids(images, "greedy")
        for b, row in enumerate(ids):  # a loop transcription: argmax over the logits after the row's own earlier ids
            pooled = method.pooled_images(images[b : b + 1])[:, 1:]
            hand = []
            for _ in range(method.max_caption):
                prefix = torch.tensor([hand], dtype=torch.long).reshape(1, len(hand))
                states, _, sequence = method.unimodal(prefix)
                nxt = int(method.caption_logits(states, sequence, pooled, len(hand) + 1)[0, -1].argmax())
                if nxt == EOS_ID:
                    break
                hand.append(nxt)
            assert row == hand
        sampled = method.caption_ids(images, "nucleus", top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert all(EOS_ID not in row and PAD_ID not in row for row in ids + sampled)
    with pytest.raises(ConfigError, match="without method.eos=true"):
        _coca().caption_ids(images)
