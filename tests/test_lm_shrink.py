"""Shrinking a Hugging Face causal LM (`fewshot icl shrink-lm`): fewer layers, a trimmed vocabulary. Tiny random models
(a 2-layer GPT-2 with its own BPE from conftest, a 4-layer Llama), never SmolLM2."""

import json

import pytest
import torch

from fewshot.adapt import lm_shrink
from fewshot.adapt.lm_shrink import keep_layers, kept_tokens, shrink_lm, trim_vocabulary
from fewshot.cli import main
from fewshot.errors import ConfigError, DataError
from fewshot.models.causal_lm import HFCausalLM, open_causal_lm

from conftest import save_tiny_hf_gpt2

transformers = pytest.importorskip("transformers")

# The tokenizer learns merges from every line; the task speaks only TASK.
CORPUS = "\n".join(["a small red circle. this is a dax. q: what is this? a: this is a dax.",
                    "the quick brown fox jumps over the lazy dog while singing loudly.",
                    "a large blue triangle and a green square sit to the left of a yellow star.",
                    "numbers like 12345 and 67890 appear in ledgers, invoices and receipts."] * 5)
TASK = ["a small red circle. this is a dax.", "q: what is this? a: this is a dax.", "a large blue triangle."]


@pytest.fixture()
def gpt2(tmp_path):
    return open_causal_lm(save_tiny_hf_gpt2(tmp_path / "gpt2", CORPUS))


def logits(lm: HFCausalLM, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([lm.encode(text)])).logits[0]


def test_trimmed_vocabulary_keeps_the_task_tokens_and_their_logits(gpt2):
    vocab = dict(gpt2.tokenizer.get_vocab())
    full = {text: (gpt2.encode(text), logits(gpt2, text)) for text in TASK}
    small = trim_vocabulary(gpt2, TASK)
    size = small.model.config.vocab_size
    assert size < len(vocab) and small.model.get_output_embeddings().weight.shape[0] == size
    new_vocab = small.tokenizer.get_vocab()
    old_id = torch.tensor([vocab[t] for t in sorted(new_vocab, key=new_vocab.get)])
    assert sorted(new_vocab.values()) == list(range(size))
    for text, (ids, full_logits) in full.items():
        renumbered = small.encode(text)
        assert old_id[renumbered].tolist() == ids  # the same tokens, renumbered
        assert torch.equal(logits(small, text), full_logits[:, old_id])  # a kept token's logit is its full-model logit
    other = "zebras quizzically vex 9 jumping wizards"  # words the task never uses still tokenize, in smaller pieces
    assert small.decode(small.encode(other)) == other


def test_trimming_without_the_merge_closure_changes_a_task_text(gpt2, monkeypatch):
    """The control: keep only the tokens the task's texts end up as (not those BPE passes through): some merges lose a
    part, a task word splits differently, and the check refuses in one line."""
    spec = json.loads(gpt2.tokenizer.backend_tokenizer.to_str())
    closure = kept_tokens(spec, {t for text in TASK for t in gpt2.tokenizer.convert_ids_to_tokens(gpt2.encode(text))})
    base_and_used = lambda spec, used: kept_tokens(spec, set()) | set(used)  # noqa: E731  (the alphabet, the specials, the used)
    assert base_and_used(spec, closure & set()) < base_and_used(spec, closure) == closure
    monkeypatch.setattr(lm_shrink, "kept_tokens", base_and_used)
    with pytest.raises(DataError, match="splits .* differently"):
        trim_vocabulary(gpt2, TASK)


def tiny_llama(layers: int = 4) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return model


def test_keep_layers_is_the_model_built_from_those_layers():
    """Independent: a fresh 2-layer Llama given layers 0 and 3's weights; cached greedy decoding agrees with it too."""
    model = tiny_llama(4)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 2})).eval()
    reference.load_state_dict({k.replace("layers.3.", "layers.1."): v for k, v in model.state_dict().items()
                               if not any(f"layers.{i}." in k for i in (1, 2))})
    cut = _cut(model, 2)
    ids = torch.tensor([[5, 9, 2, 33, 17, 8]])
    with torch.no_grad():
        assert torch.equal(cut(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert torch.equal(cut.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True),
                           reference.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True))
    assert cut.config.num_hidden_layers == 2


def _cut(model, count):
    class Holder(HFCausalLM):
        def __init__(self, model):  # no tokenizer needed to cut layers
            self.model, self.name = model, "tiny"

    return keep_layers(Holder(model), [*range(count - 1), model.config.num_hidden_layers - 1]).model


def test_keep_layers_must_renumber_the_cache():
    """The control: layers that keep their old numbers address the KV cache at slots it does not have, and cached
    decoding fails (this transformers raises IndexError) or no longer equals decoding without the cache."""
    ids = torch.tensor([[5, 9, 2, 33, 17, 8]])
    cut = _cut(tiny_llama(4), 2)
    with torch.no_grad():
        cached = cut.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(cached, cut.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
        cut.model.layers[1].self_attn.layer_idx = 3  # the old number
        try:
            stale = cut.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        except (IndexError, RuntimeError):
            stale = None
    assert stale is None or not torch.equal(stale, cached)


@pytest.mark.parametrize("kept", [[0, 2], [1, 0], [], [0, 0]])
def test_keep_layers_refuses_indices_that_are_not_the_models(gpt2, kept):
    with pytest.raises(ConfigError, match="distinct increasing indices"):
        keep_layers(gpt2, kept)


def test_block_distances_are_the_angle_between_streams():
    """Independent: the streams entering layer ℓ and ℓ + n computed by hand, layer by layer, for each start ℓ."""
    model = tiny_llama(4)

    class Plain(HFCausalLM):
        def __init__(self, model):
            self.model, self.name, self.start_ids = model, "tiny", []

        def encode(self, text):
            return [ord(c) % 64 for c in text]

    texts = ["a red dax", "the blue wug is here", "zz"]
    lm = Plain(model)
    distances = lm_shrink.block_distances(lm, texts, 2)
    assert len(distances) == 2  # starts 0 and 1; a start of 2 would drop the last layer
    for start, distance in enumerate(distances):
        angles = []
        for text in texts:
            ids = torch.tensor([lm.encode(text)])
            with torch.no_grad():
                h = model.model.embed_tokens(ids)
                positions = torch.arange(ids.shape[1])[None]
                rotary = model.model.rotary_emb(h, positions)
                mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
                streams = [h[0, -1]]
                for layer in model.model.layers:
                    h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
                    h = h[0] if isinstance(h, tuple) else h
                    streams.append(h[0, -1])
            a, b = streams[start], streams[start + 2]
            angles.append(float(torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1)) / torch.pi))
        assert distance == pytest.approx(sum(angles) / len(angles), abs=1e-5)
    kept = lm_shrink.layers_to_keep(lm, texts, 2)
    best = min(range(2), key=distances.__getitem__)
    assert kept == [i for i in range(4) if not best <= i < best + 2] and 3 in kept


def test_shrink_lm_writes_a_folder_that_loads_with_its_digests(gpt2, tmp_path, capsys):
    folder = save_tiny_hf_gpt2(tmp_path / "base", CORPUS)
    vocabulary = tmp_path / "task.txt"
    vocabulary.write_text("\n".join(TASK) + "\n")
    out = tmp_path / "small"
    main(["icl", "shrink-lm", str(folder), "--out", str(out), "--layers", "1", "--vocabulary", str(vocabulary), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["after"]["layers"] == 1 and record["after"]["vocabulary"] < record["before"]["vocabulary"]
    meta = json.loads((out / "fewshot.json").read_text())
    assert meta["format"] == "fewshot-shrunk-lm" and meta["sha256"]
    reopened = open_causal_lm(out)
    assert reopened.model.config.num_hidden_layers == 1
    assert reopened.model.get_output_embeddings().weight.data_ptr() == reopened.model.get_input_embeddings().weight.data_ptr()
    assert record["kept_layers"] == [1]  # of 2, the one block that leaves the last layer in place is layer 0
    direct = trim_vocabulary(keep_layers(open_causal_lm(folder), [1]), TASK)
    for text in TASK:
        assert reopened.encode(text) == direct.encode(text)
        assert torch.equal(logits(reopened, text), logits(direct, text))


@pytest.mark.parametrize("argv, message", [
    (["--layers", "1"], "exists"),
    ([], "needs --layers, --vocabulary or both"),
    (["--vocabulary", "missing.txt"], "is not a file"),
])
def test_shrink_lm_bad_input_is_one_line(tmp_path, capsys, argv, message):
    folder = save_tiny_hf_gpt2(tmp_path / "base", CORPUS)
    out = tmp_path / "small"
    if message == "exists":
        out.mkdir()
    code = main(["icl", "shrink-lm", str(folder), "--out", str(out), *[str(tmp_path / a) if a.endswith(".txt") else a for a in argv]])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("texts", ["scene_texts", "the caption LM's corpus alone"])  # the corpus alone: the control
def test_scene_texts_hold_every_word_the_evaluation_says(texts, monkeypatch):
    """A vocabulary trimmed to `scenes` must cover the evaluation's prompts and answers: every word of the open-ended
    episodes (nonce and real names, each scene category, in words), of Fast-VQA and of Omniglot's names is in them.
    The caption LM's corpus alone misses some (the reserved shapes' names, Omniglot's)."""
    from fewshot.data import vl_prompts
    from fewshot.data.vl_prompts import CATEGORIES, IMAGE, category_images, described, fast_vqa_episode, open_ended_episode

    if texts != "scene_texts":
        monkeypatch.setattr(vl_prompts, "scene_texts", lambda: vl_prompts.scene_corpus(20000, 8000, 0).splitlines())
    words = {w for line in lm_shrink.vocabulary_texts(["scenes"]) for w in line.split()}
    said = {"character", "12"}
    for category in CATEGORIES[:3]:
        data = category_images(category, 6, seed=3)
        for i in range(10):
            for nonce in (True, False):
                e = open_ended_episode(data.labels, data.class_names, 5, 2, 1, True, nonce, 7, i)
                said |= {w for piece in described(e.pieces, e.images, data.descriptions) for w in piece.split()} | set(e.answer.split())
    for i in range(10):
        e, _ = fast_vqa_episode(3, 7, i, size=8)
        said |= {w for piece in e.pieces if piece != IMAGE for w in piece.split()} | {e.answer}
    assert (said <= words) == (texts == "scene_texts"), sorted(said - words)
