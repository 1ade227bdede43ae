"""Flamingo over a frozen GPT: gated blocks at initialisation give exactly the frozen LM's logits; text before the first
image is bit-identical whatever the images; the media mask against a hand-written one; the frozen LM and image tower
bit-identical after training through the one trainer (a moved LM is refused at save); the KV cache equals
recomputation; the bad-input errors; the Perceiver Resampler against a loop transcription of its attention. Each
guarded property has a broken variant asserted to fail it."""

import math

import pytest
import torch

from fewshot.config import load_config
from fewshot.data.token_ids import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from fewshot.data.tokenizer import train_tokenizer
from fewshot.errors import CheckpointError, ConfigError
from fewshot.methods import build_method
from fewshot.methods.flamingo import Flamingo, interleave_captions, interleaved_labels
from fewshot.models import flamingo as flamingo_module
from fewshot.models.flamingo import FlamingoLM, PerceiverResampler, media_mask
from fewshot.models.language import GPT

V, IMG, EOC = 50, 50, 51
MEDIA = 8


KINDS = ["gpt", "hf-gpt2", "hf-llama"]


def _lm(kind="gpt", seed=0):
    """A tiny frozen LM of V ids, 24 positions, 16 wide, 2 layers: fewshot's GPT, or a Hugging Face GPT-2 or Llama
    (SmolLM2's architecture); weights at std 0.3 so logits are well apart."""
    torch.manual_seed(seed)
    if kind == "gpt":
        lm = GPT(V, max_len=24, dim=16, depth=2, heads=2)
    else:
        transformers = pytest.importorskip("transformers")
        if kind == "hf-gpt2":
            lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=24, n_embd=16, n_layer=2, n_head=2))
        else:
            lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V, max_position_embeddings=24, hidden_size=16,
                                                                        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                                        num_key_value_heads=1))
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return lm.eval()


def _frozen_logits(f, embeds):
    """The LM alone (no hook active) on input embeddings: logits over its V ids."""
    if f.is_gpt:
        return f.lm.logits(f.lm.encoder.hidden(torch.empty(1, 0, dtype=torch.long), prefix=embeds))
    return f.lm(inputs_embeds=embeds).logits


def _flamingo(gate_init=0.0, cross_every=1, seed=0, kind="gpt"):
    lm = _lm(kind, seed)
    torch.manual_seed(seed + 1)
    return FlamingoLM(lm, MEDIA, latents=3, resampler_depth=2, resampler_heads=2, cross_every=cross_every, cross_heads=2,
                      gate_init=gate_init).eval()


def _features(images, seed):
    return torch.randn(1, images, 4, MEDIA, generator=torch.Generator().manual_seed(seed))


# before the first image: BOS 5 6 7; then two chunks
IDS = torch.tensor([[BOS_ID, 5, 6, 7, IMG, 8, 9, EOC, IMG, 10, 11, EOC]])
FIRST_IMAGE = 4


# ------------------------------------------------------------------ (a) the frozen LM's logits at initialisation


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cross_every", [1, 2])
@pytest.mark.parametrize("variant", ["gates at 0", "a gate initialised at 0.5"])
def test_at_initialisation_the_wrapped_model_gives_the_frozen_lms_logits(variant, cross_every, kind):
    f = _flamingo(gate_init=0.0 if variant == "gates at 0" else 0.5, cross_every=cross_every, kind=kind)
    with torch.no_grad():
        wrapped = f(IDS, _features(2, 0))
        frozen = _frozen_logits(f, f.embed(IDS))  # the LM alone, fed the same input embeddings (the new tokens' included)
    assert wrapped.shape == (1, IDS.shape[1], V + 2)
    assert torch.equal(wrapped[..., :V], frozen) == (variant == "gates at 0")


@pytest.mark.parametrize("kind", ["hf-gpt2", "hf-llama"])
@pytest.mark.parametrize("cross_every", [1, 2])
@pytest.mark.parametrize("layer", ["entering", "leaving"])  # leaving: the control that the wrong layer's states are told apart
def test_the_captured_residuals_are_the_hidden_states_entering_each_gated_layer(kind, cross_every, layer):
    """FlamingoLM.residuals (what method.text_distill compares) against Hugging Face's own output_hidden_states, whose
    entry i is the input of layer i: for the frozen LM alone on text, and for the wrapped model at initialisation
    (gates at 0, so each gated block passes its input through) on the same embeddings, markers included."""
    f = _flamingo(cross_every=cross_every, kind=kind)
    text = torch.tensor([[BOS_ID, 5, 6, 7, 8, 9, 10, 11]])
    offset = 0 if layer == "entering" else 1
    with torch.no_grad():
        _, teacher = f.residuals(text)
        _, student = f.residuals(IDS, _features(2, 0))
        hidden_text = f.lm(text, output_hidden_states=True).hidden_states
        hidden_ids = f.lm(inputs_embeds=f.embed(IDS), output_hidden_states=True).hidden_states
    assert len(teacher) == len(student) == len(f.cross_layers)
    same = [torch.allclose(got, hidden[i + offset], atol=1e-6)
            for captured, hidden in ((teacher, hidden_text), (student, hidden_ids)) for got, i in zip(captured, f.cross_layers)]
    assert all(same) if layer == "entering" else not any(same), same


# ------------------------------------------------------------------ (b) text before the first image ignores every image


def _trained_like(f):
    """Gates open and the gated blocks' weights moved, as after training, so images do change later positions."""
    with torch.no_grad():
        for block in f.gated:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
            for p in block.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.5)
    return f


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["media mask", "every token sees every image"])
def test_text_before_the_first_image_is_bit_identical_whatever_the_images(monkeypatch, variant, kind):
    if variant == "every token sees every image":  # negative control: no media mask
        monkeypatch.setattr(flamingo_module, "media_mask", lambda ids, image_id, images, latents, before=None:
                            torch.ones(ids.shape[0], ids.shape[1], images * latents, dtype=torch.bool))
    f = _trained_like(_flamingo(kind=kind))
    with torch.no_grad():
        one, other = f(IDS, _features(2, 0)), f(IDS, _features(2, 1) * 3)
    assert not torch.equal(one[:, FIRST_IMAGE:], other[:, FIRST_IMAGE:])  # the images are used after their markers
    assert torch.equal(one[:, :FIRST_IMAGE], other[:, :FIRST_IMAGE]) == (variant == "media mask")


# ------------------------------------------------------------------ (c) the media mask


def test_the_media_mask_equals_a_hand_written_one():
    ids = torch.tensor([[BOS_ID, 5, IMG, 6, EOC, IMG, 7, EOC]])
    want = [[0, 0, 0, 0],  # BOS: before any image
            [0, 0, 0, 0],  # 5
            [1, 1, 0, 0],  # <image> 1 sees its own latents
            [1, 1, 0, 0],
            [1, 1, 0, 0],  # <|endofchunk|> still in chunk 1
            [0, 0, 1, 1],  # <image> 2
            [0, 0, 1, 1],
            [0, 0, 1, 1]]
    assert media_mask(ids, IMG, images=2, latents=2).int().tolist() == [want]
    # a cached continuation after one marker: its text still belongs to image 1 until the next marker
    later = torch.tensor([[6, IMG, 7]])
    assert media_mask(later, IMG, 2, 2, images_before=torch.tensor([1])).int().tolist() == [[[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]]


@torch.no_grad()
def test_the_masked_cross_attention_zeroes_text_without_an_image_and_matches_a_loop():
    f = _trained_like(_flamingo())
    block = f.gated[0]
    torch.manual_seed(3)
    x, media = torch.randn(1, 4, 16), torch.randn(1, 6, MEDIA)
    mask = torch.tensor([[[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]]], dtype=torch.bool)
    out = flamingo_module.masked_cross_attention(block.attn, x, media, mask)
    a, heads = block.attn, 2
    q, kv = a.q(x)[0].double(), a.kv(media)[0].double()
    k, v = kv[:, :16], kv[:, 16:]
    for t in range(4):
        if not mask[0, t].any():
            assert torch.equal(out[0, t], torch.zeros(16))
            continue
        cat = []
        for h in range(heads):
            sl = slice(8 * h, 8 * h + 8)
            keys = [j for j in range(6) if mask[0, t, j]]
            scores = torch.tensor([float(q[t, sl] @ k[j, sl]) / math.sqrt(8) for j in keys], dtype=torch.float64)
            w = scores.softmax(0)
            cat.append(sum(w[i] * v[j, sl] for i, j in enumerate(keys)))
        want = torch.cat(cat) @ a.proj.weight.double().T + a.proj.bias.double()
        assert torch.allclose(out[0, t].double(), want, atol=1e-5)


# ------------------------------------------------------------------ (e) the KV cache


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cuts", [[1], [3, 4, 5, 9], [4, 8]])
def test_cached_incremental_decoding_equals_recomputation(cuts, kind):
    f = _trained_like(_flamingo(kind=kind))
    features = _features(2, 0)
    with torch.no_grad():
        full = f(IDS, features)
        state, pieces, edges = f.start(features), [], [0, *cuts, IDS.shape[1]]
        for a, b in zip(edges[:-1], edges[1:]):
            for t in range(a, b) if cuts == [1] else [a]:  # [1]: one token per step; else the chunks between the cuts
                logits, state = f.step(IDS[:, t : t + 1] if cuts == [1] else IDS[:, a:b], state)
                pieces.append(logits)
    cached = torch.cat(pieces, dim=1)
    assert cached.shape == full.shape and torch.allclose(cached, full, atol=1e-5)



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [(0, 5), (5, 9)])  # a prompt's prefill, then a chunk after the cache
def test_last_only_logits_are_the_last_positions_of_the_full_logits(kind, chunk):
    """step(last_only=True), what generation's prefill calls (the LM's head runs on one position), gives the full
    logits' last position, and not the one before it (the control that the positions differ at all)."""
    f = _trained_like(_flamingo(kind=kind))
    a, b = chunk
    with torch.no_grad():
        state = f.start(_features(2, 0))
        if a:
            _, state = f.step(IDS[:, :a], state)
        full, _ = f.step(IDS[:, a:b], state)
        last, _ = f.step(IDS[:, a:b], state, last_only=True)
    assert last.shape == (IDS.shape[0], 1, f.vocab_size + 2)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5) and not torch.allclose(last[:, 0], full[:, -2], atol=1e-3)

# ------------------------------------------------------------------ (f) bad input


def test_bad_input_is_one_line():
    f = _flamingo()
    with pytest.raises(ConfigError, match=r"row 0 has 2 <image> marker\(s\) but 3 image\(s\)") as err:
        f(IDS, _features(3, 0))
    assert "\n" not in str(err.value)
    long = torch.tensor([[BOS_ID, IMG] + [5] * 25])
    with pytest.raises(ConfigError, match="an interleaved sequence of 27 positions is 3 longer than the language model's context of 24"):
        f(long, _features(1, 0))
    state = f.start(_features(1, 0))
    _, state = f.step(IDS[:, :6], state)
    with pytest.raises(ConfigError, match=r"more <image> markers \(2\) than images \(1\)"):
        f.step(IDS[:, 6:], state)


# ------------------------------------------------------------------ (g) the resampler


@torch.no_grad()
def test_the_resampler_latents_attend_to_the_features_and_themselves():
    torch.manual_seed(0)
    r = PerceiverResampler(MEDIA, latents=3, depth=2, heads=2)
    features = torch.randn(2, 5, MEDIA)
    assert r(features).shape == (2, 3, MEDIA)
    layer, latents = r.layers[0], r.latents.expand(2, -1, -1)
    out = layer(features, latents)
    # a loop transcription of one layer: queries from LN_l(latents); keys/values from [LN_m(features); LN_l(latents)]
    a = layer.attn
    for b in range(2):
        lat = layer.norm_latents(latents[b]).double()
        kv_in = torch.cat([layer.norm_media(features[b]).double(), lat])  # 5 + 3 keys
        q = lat @ a.q.weight.double().T + a.q.bias.double()
        kv = kv_in @ a.kv.weight.double().T + a.kv.bias.double()
        k, v = kv[:, :MEDIA], kv[:, MEDIA:]
        for i in range(3):
            heads = []
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                w = torch.tensor([float(q[i, sl] @ k[j, sl]) / 2.0 for j in range(8)], dtype=torch.float64).softmax(0)
                heads.append(sum(w[j] * v[j, sl] for j in range(8)))
            attended = latents[b, i].double() + torch.cat(heads) @ a.proj.weight.double().T + a.proj.bias.double()
            want = attended + layer.ff(attended.float()[None])[0].double()
            assert torch.allclose(out[b, i].double(), want, atol=1e-5)
    # and the latents' own keys matter: with the latents' part of the keys removed, the output differs
    features_only = a(layer.norm_latents(latents), context=layer.norm_media(features))
    assert not torch.allclose(out, latents + features_only + layer.ff(latents + features_only), atol=1e-4)


# ------------------------------------------------------------------ training sequences


def test_captions_interleave_into_sequences_with_text_only_labels():
    captions = torch.tensor([[5, 6, PAD_ID], [7, PAD_ID, PAD_ID], [8, 9, 10]])
    ids, members = interleave_captions(captions, [2, 1], IMG, EOC)
    assert ids.tolist() == [[BOS_ID, IMG, 5, 6, EOC, IMG, 7, EOC, EOS_ID],
                            [BOS_ID, IMG, 8, 9, 10, EOC, EOS_ID, PAD_ID, PAD_ID]]
    assert members.tolist() == [[0, 1], [2, -1]]
    I = IGNORE_INDEX
    assert interleaved_labels(ids, IMG).tolist() == [[BOS_ID, I, 5, 6, EOC, I, 7, EOC, EOS_ID],
                                                     [BOS_ID, I, 8, 9, 10, EOC, EOS_ID, I, I]]


# ------------------------------------------------------------------ (d) the method through the one trainer

from test_captioning import CORPUS, IMAGE, _pairs, _save_run  # noqa: E402  (the captioning tests' tiny runs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    gpt_config = load_config(overrides=["method=gpt", "data.source=text", "data.seq_len=32", "data.vocab_size=300", "encoder=text-transformer",
                                        "encoder.options={dim: 16, depth: 2, heads: 2}", "name=gpt", f"out={root}"])
    clip_config = load_config(overrides=[*IMAGE, "method=clip", "method.embed_dim=8", "method.text={dim: 16, depth: 1, heads: 2}",
                                         "name=clip", f"out={root}"])
    long_config = gpt_config.model_copy(update={"name": "gpt-long", "data": gpt_config.data.model_copy(update={"seq_len": 160})})
    runs = {"gpt": _save_run(gpt_config, build_method(gpt_config), train_tokenizer(CORPUS, 300)),
            "gpt-long": _save_run(long_config, build_method(long_config), train_tokenizer(CORPUS, 300)),  # room for episodes
            "clip": _save_run(clip_config, build_method(clip_config), train_tokenizer(CORPUS, 300))}
    transformers = pytest.importorskip("transformers")
    folder = root / "hf-gpt2"  # a Hugging Face causal LM with tied embeddings and an [EOS]
    transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(CORPUS, 300), eos_token="[EOS]", pad_token="[PAD]").save_pretrained(folder)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=40, n_embd=16, n_layer=2, n_head=2)).save_pretrained(folder)
    runs["hf"] = folder
    return runs


def _config(runs, root, *overrides, lm="gpt"):
    return load_config(overrides=[*IMAGE, "method=flamingo", f"method.image.init={runs['clip']}", f"method.lm.init={runs[lm]}",
                                  "method.latents=2", "method.resampler_depth=1", "method.resampler_heads=2", "method.cross_heads=2",
                                  "method.max_images=2", f"out={root}", "name=flamingo", "train.steps=3", "train.batch_size=8",
                                  "train.warmup_steps=1", "train.lr=0.01", "train.accelerator=cpu", "train.devices=1", *overrides])


@pytest.mark.parametrize("lm", ["gpt", "hf"])
@pytest.mark.parametrize("variant", ["frozen", "lm left trainable"])
def test_the_frozen_parts_are_bit_identical_after_training(runs, tmp_path, monkeypatch, variant, lm):
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    if variant == "lm left trainable":  # negative control: the LM learns too, and the checkpoint is refused
        init = Flamingo.__init__

        def unfrozen(self, config):
            init(self, config)
            self.flamingo.lm.requires_grad_(True)

        monkeypatch.setattr(Flamingo, "__init__", unfrozen)
    config = _config(runs, tmp_path, lm=lm)
    before = build_method(config).state_dict()
    method = build_method(config)
    if variant == "lm left trainable":
        with pytest.raises(CheckpointError, match=r"refusing to save: \d+ frozen tensor\(s\) changed in training \(first: flamingo\.lm\.") as err:
            pretrain(config, _pairs(method.text_tokenizer), progress=False)
        assert "\n" not in str(err.value)
        return
    pretrain(config, _pairs(method.text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = {k for k in before if k.startswith(("encoder.", "flamingo.lm."))}
    assert not changed & frozen
    for part in ("flamingo.resampler.", "flamingo.gated.", "flamingo.new_tokens."):
        assert any(k.startswith(part) for k in changed), part
    assert {k for k in changed if k.endswith("_gate")}  # the tanh gates opened
    if lm == "gpt":  # the run opens as the in-context protocol's model (fewshot icl vl-eval)
        from fewshot.evaluate.vl_in_context import open_in_context_model
        from fewshot.methods.flamingo import FlamingoInContext

        model = open_in_context_model(config.run_dir)
        assert isinstance(model, FlamingoInContext) and model.image_size == config.data.image_size


@pytest.mark.parametrize("lm", ["gpt", "hf"])
def test_generation_cached_equals_recomputed_and_the_prompt_is_checked(runs, tmp_path, lm):
    method = build_method(_config(runs, tmp_path, lm=lm)).eval()
    _trained_like(method.flamingo)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt = "<image>a red circle.<|endofchunk|><image>"
    ids = method.encode_prompt(prompt)
    f = method.flamingo
    assert ids[: len(method.start_ids) + 1] == [*method.start_ids, f.image_id] and ids.count(f.image_id) == 2 and f.chunk_id in ids
    assert method.start_ids == ([BOS_ID] if lm == "gpt" else [])  # the HF tokenizer adds no start special
    cached = method.generate(images, ids, 6)
    assert cached == method.generate(images, ids, 6, use_cache=False)
    assert f.image_id not in cached and method.next_token_logits(images, ids).shape == (f.vocab_size + 2,)
    assert isinstance(method.generate_text(images, prompt, 3), str)
    with pytest.raises(ConfigError, match=r"1 <image> marker\(s\) but 2 image\(s\)"):
        method.generate(images, method.encode_prompt("<image>a red circle."), 4)
    with pytest.raises(ConfigError, match="longer than"):
        method.generate(images, ids, f.context)


def test_the_in_context_model_lays_out_pieces_as_in_training(runs, tmp_path):
    from fewshot.methods.flamingo import FlamingoInContext

    method = build_method(_config(runs, tmp_path))
    _trained_like(method.flamingo)
    model, f, tok = FlamingoInContext(method, "flamingo"), method.flamingo, method.tokenizer
    pieces = ["<image>", "a dax.", "<image>", "what?", "a"]
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    assert model.prompt_ids(pieces) == [BOS_ID, f.image_id, *enc("a dax."), f.chunk_id, f.image_id, *enc("what?"), *enc(" a")]
    images = list(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    model.image_size = 16
    text = model.next_text(images, pieces, 5)
    assert isinstance(text, str) and text == FlamingoInContext(method, "flamingo", use_cache=False).next_text(images, pieces, 5)
    with pytest.raises(ConfigError, match=r"2 <image> marker\(s\) but 1 image\(s\)"):
        model.next_text(images[:1], pieces, 5)
    with pytest.raises(ConfigError, match="too many; use fewer shots"):
        model.next_text(images, pieces, f.context)


@pytest.mark.parametrize("lm", ["gpt", "hf"])
def test_batched_continuations_equal_one_prompt_at_a_time(runs, tmp_path, lm):
    """next_texts (prompts of one length and image count stacked, no padding) gives each prompt's next_text in the
    prompts' order, for prompts of several lengths and image counts mixed, text-only ones among them."""
    from fewshot.methods.flamingo import FlamingoInContext

    method = build_method(_config(runs, tmp_path, lm=lm))
    with torch.no_grad():  # a resampler that passes on what it reads and an LM whose logits stand apart: answers vary
        for part, std in ((method.flamingo.resampler, 1.0), (method.flamingo.lm, 0.3)):
            for p in part.parameters():
                if p.ndim > 1:
                    p.normal_(0, std, generator=torch.Generator().manual_seed(p.numel()))
    _trained_like(method.flamingo)
    model = FlamingoInContext(method, "flamingo")
    model.image_size = 16
    layouts = [["<image>", "a dax.", "<image>", "what?", "a"], ["<image>", "what?", "a"], ["what is a dax? a"]]
    prompts = []
    for seed in range(9):
        pieces = layouts[seed % 3]
        shown = list(torch.rand(pieces.count("<image>"), 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
        prompts.append((shown, pieces))
    batched = model.next_texts(prompts, 4, batch=2)  # batches of 2: a group split across batches too
    assert batched == [model.next_text(shown, pieces, 4) for shown, pieces in prompts]
    assert len(set(batched)) > 3  # more than the three layouts: a row given another's continuation would show


@pytest.mark.parametrize("variant", ["text only", "<image> targets counted"])
def test_the_training_loss_is_the_mean_nll_of_the_text_tokens(runs, tmp_path, variant):
    from fewshot.methods.flamingo import draw_group_sizes

    method = build_method(_config(runs, tmp_path))
    _trained_like(method.flamingo)
    f, pairs = method.flamingo, _pairs(method.text_tokenizer)
    batch = {k: v for k, v in pairs.batch(torch.arange(6)).items() if k in method.inputs}
    with torch.no_grad():
        loss, _ = method(batch, torch.Generator().manual_seed(4))
        sizes = draw_group_sizes(6, method.max_images, torch.Generator().manual_seed(4))
        terms, first = [], 0
        for size in sizes:  # each sequence alone, unpadded: −log p(next) at every text target
            seq = [*method.start_ids]
            for r in range(first, first + size):
                caption = [t for t in batch["tokens"][r].tolist() if t != PAD_ID]
                seq += [f.image_id, *caption, f.chunk_id]
            seq.append(method.eos_id)
            features = method.image_features(batch["images"][first : first + size])[None]
            logp = f(torch.tensor([seq]), features)[0].double().log_softmax(-1)
            terms += [-logp[j - 1, seq[j]] for j in range(1, len(seq)) if seq[j] != f.image_id or variant != "text only"]
            first += size
    assert len(sizes) > 1 and max(sizes) > 1  # both captions alone and interleaved sequences
    assert math.isclose(float(loss), float(torch.stack(terms).mean()), rel_tol=1e-5) == (variant == "text only")


@pytest.mark.parametrize("variant", ["episodes counted", "episodes left out", "blind", "blind, real images in the loop",
                                     "questions counted", "questions left out"])
def test_naming_episodes_join_the_loss_laid_out_as_at_evaluation(runs, tmp_path, variant):
    """method.episodes adds interleaved naming episodes (glossary names) to each batch: the loss is the mean NLL of
    the text tokens over the caption sequences and the episodes, each laid out by the in-context model's own
    prompt_ids with its answer; leaving the episodes out of the independent loop must not match (control). With
    method.blind every training image is blank: the loop on blank images matches, on the real ones not (control).
    method.question_episodes adds Fast-VQA-layout episodes after them, answered with the asked colour (control: the
    loop without them)."""
    from fewshot.data.vl_prompts import NONCE_NAMES, naming_episode, question_episode
    from fewshot.methods.flamingo import FlamingoInContext, draw_group_sizes

    blind = variant.startswith("blind")
    questions = variant.startswith("questions")
    method = build_method(_config(runs, tmp_path, "method.episodes=2", "method.episode_images=5", f"method.blind={str(blind).lower()}",
                                  f"method.question_episodes={int(questions)}", lm="gpt-long"))
    seen = (lambda x: torch.zeros_like(x)) if variant == "blind" else (lambda x: x)  # noqa: E731
    with torch.no_grad():  # a resampler that passes on what it reads, so blank and real images part clearly
        for p in method.flamingo.resampler.parameters():
            if p.ndim > 1:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(p.numel()))
    _trained_like(method.flamingo)
    f, pairs, model = method.flamingo, _pairs(method.text_tokenizer), FlamingoInContext(method, "flamingo")
    batch = {k: v for k, v in pairs.batch(torch.arange(4)).items() if k in method.inputs}
    with torch.no_grad():
        loss, _ = method(batch, torch.Generator().manual_seed(5))
        generator = torch.Generator().manual_seed(5)
        sizes = draw_group_sizes(4, method.max_images, generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        sequences, first = [], 0
        for size in sizes:
            seq = [*method.start_ids]
            for r in range(first, first + size):
                seq += [f.image_id, *[t for t in batch["tokens"][r].tolist() if t != PAD_ID], f.chunk_id]
            sequences.append((seq + [method.eos_id], batch["images"][first : first + size]))
            first += size
        if variant != "episodes left out":
            for j in range(2):
                episode, images = naming_episode(method.names, seed, j, 16, 5)
                assert episode.answer in method.names and not set(episode.names) & set(NONCE_NAMES)
                ids = model.prompt_ids(list(episode.pieces)) + method.tokenizer.encode(f" {episode.answer}.", add_special_tokens=False).ids
                sequences.append((ids + [f.chunk_id, method.eos_id], images.images[list(episode.images)]))
        if variant == "questions counted":
            episode, images = question_episode(method.names, seed, 2, 16)
            assert episode.pieces[-1].startswith("q: what colour is the") and not set(episode.names) & set(NONCE_NAMES)
            ids = model.prompt_ids(list(episode.pieces)) + method.tokenizer.encode(f" {episode.answer}.", add_special_tokens=False).ids
            sequences.append((ids + [f.chunk_id, method.eos_id], images.images[list(episode.images)]))
        terms = []
        for seq, images in sequences:
            logp = f(torch.tensor([seq]), method.image_features(seen(images))[None])[0].double().log_softmax(-1)
            terms += [-logp[j - 1, seq[j]] for j in range(1, len(seq)) if seq[j] != f.image_id]
    assert math.isclose(float(loss), float(torch.stack(terms).mean()), rel_tol=1e-5) == (variant in ("episodes counted", "blind", "questions counted"))


def test_episodes_longer_than_the_context_are_refused_at_build(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"a naming episode of up to 8 images needs up to \d+ positions.*lower method.episode_images") as err:
        build_method(_config(runs, tmp_path, "method.episodes=1", "method.episode_images=8"))
    assert "\n" not in str(err.value)
    build_method(_config(runs, tmp_path, "method.episodes=1", "method.episode_images=8", lm="gpt-long"))  # control: room enough


@pytest.mark.parametrize("scale", [1.0, 8.0])  # 1: the paper's (the control that the other value changes something)
def test_the_gates_learning_rate_is_scaled_by_gate_lr_scale(runs, tmp_path, scale):
    """Adam's first update is lr·g/(|g| + ε), i.e. ±lr for every parameter with a gradient (no weight decay): the tanh
    gates move by gate_lr_scale·lr and every other trained parameter by at most lr."""
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    lr = 0.01
    config = _config(runs, tmp_path, f"method.gate_lr_scale={scale}", "train.steps=1", "train.checkpoint_every=1",
                     "train.weight_decay=0", f"name=gates-{scale}")
    torch.manual_seed(config.train.seed)  # as the trainer does before it builds the method
    before = build_method(config).state_dict()
    pretrain(config, _pairs(build_method(config).text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    moved = {k: (after[k] - before[k]).abs().max().item() for k in before if not torch.equal(before[k], after[k])}
    gates = {k: v for k, v in moved.items() if k.endswith("_gate")}
    others = {k: v for k, v in moved.items() if not k.endswith("_gate")}
    assert gates and others
    assert all(v == pytest.approx(scale * lr, rel=1e-3) for v in gates.values()), gates
    assert max(others.values()) == pytest.approx(lr, rel=1e-3), others


def _layer_norm(v):
    return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)


@pytest.mark.parametrize("variant", ["aligned", "shifted by one"])  # shifted: the control that misaligned pairs are caught
def test_text_distillation_pairs_each_episode_with_its_described_text(runs, tmp_path, variant):
    """method.text_distill = δ: the loss is the episodes' text loss + δ·d, d the mean over gated layers and paired
    positions of the squared difference of layer-normalised residuals (a loop over single unpadded sequences), the
    pairs holding the same text token in the interleaved episode and in its text-only version."""
    from fewshot.data.vl_prompts import IMAGE, described, naming_episode
    from fewshot.methods.flamingo import draw_group_sizes, shared_text_positions

    delta = 0.5
    method = build_method(_config(runs, tmp_path, "method.episodes=2", "method.episode_images=5", f"method.text_distill={delta}", lm="gpt-long"))
    _trained_like(method.flamingo)
    f, pairs = method.flamingo, _pairs(method.text_tokenizer)
    batch = {k: v for k, v in pairs.batch(torch.arange(4)).items() if k in method.inputs}
    with torch.no_grad():
        loss, logs = method(batch, torch.Generator().manual_seed(5))
        method.text_distill = 0.0
        text_loss, _ = method(batch, torch.Generator().manual_seed(5))
        method.text_distill = delta
    assert math.isclose(float(loss), float(text_loss) + delta * logs["distill"], rel_tol=1e-6) and logs["distill"] > 0

    generator = torch.Generator().manual_seed(5)
    draw_group_sizes(4, method.max_images, generator)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    encode = lambda text: method.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    sums, count = [0.0] * len(f.gated), 0
    with torch.no_grad():
        for j in range(2):
            episode, images = naming_episode(method.names, seed, j, 16, 5)
            pieces = episode.answered()
            student_ids, spans = method.pieces_layout(pieces)
            text = described(pieces, episode.images, images.descriptions)
            teacher_ids = [*method.start_ids, *encode(text[0])] + [t for piece in text[1:] for t in encode(" " + piece)]
            _, student = f.residuals(torch.tensor([student_ids + [f.chunk_id, method.eos_id]]),
                                     method.image_features(images.images[list(episode.images)])[None])
            _, teacher = f.residuals(torch.tensor([teacher_ids + [method.eos_id]]))
            _, text_spans = method.pieces_layout(text)
            paired = [(s + (variant != "aligned"), t) for s, t in shared_text_positions(pieces, spans, text_spans)]
            firsts = {s0 for piece, (s0, _) in zip(pieces, spans) if piece != IMAGE}
            same = all(student_ids[s] == teacher_ids[t] for s, t in paired if s not in firsts and s < len(student_ids))
            if variant != "aligned":
                assert not same
                return
            assert same and len(paired) == sum(len(encode(p)) for p in pieces if p != IMAGE)
            for layer, (x, z) in enumerate(zip(student, teacher)):
                sums[layer] += sum(float((_layer_norm(x[0, s]) - _layer_norm(z[0, t])).pow(2).mean()) for s, t in paired)
            count += len(paired)
    assert math.isclose(logs["distill"], sum(s / count for s in sums) / len(sums), rel_tol=1e-4)


def test_question_episodes_need_naming_episodes(runs, tmp_path):
    with pytest.raises(ConfigError, match="question_episodes.*method.episodes > 0") as err:
        build_method(_config(runs, tmp_path, "method.question_episodes=1", lm="gpt-long"))
    assert "\n" not in str(err.value)


def test_text_distillation_needs_episodes(runs, tmp_path):
    with pytest.raises(ConfigError, match="text_distill.*method.episodes > 0") as err:
        build_method(_config(runs, tmp_path, "method.text_distill=1.0", lm="gpt-long"))
    assert "\n" not in str(err.value)
