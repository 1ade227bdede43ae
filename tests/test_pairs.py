"""Image–caption manifests in open_clip's layout: a written pool reads back exactly (TSV and JSONL), the batch
contract (images, tokens padded with [PAD], caption keys equal exactly for equal texts), truncation counted,
and a one-line error naming the manifest and line for each bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.data.pairs import CAPTION_KEY, IMAGE_KEY, PairSet, load_pairs, pair_set, read_manifest, tokenize_captions, write_manifest
from fewshot.data.scenes import NoiseConfig, make_pool, write_scenes
from fewshot.data.token_ids import PAD_ID
from fewshot.data.tokenizer import decode, encode, train_tokenizer
from fewshot.errors import DataError


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "pool"
    write_scenes(out, 24, size=16, objects=(1, 3), seed=3, noise=NoiseConfig(mismatched=0.1, boilerplate=0.1, near_duplicate=0.1))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    captions = make_pool(200, objects=(1, 3), seed=0, draw=False).row_caption
    return train_tokenizer("\n".join(captions), 320)


@pytest.mark.parametrize("name", ["manifest.tsv", "manifest.jsonl"])
def test_manifest_round_trips(pool_dir: Path, tokenizer, name: str) -> None:
    pool = make_pool(24, size=16, objects=(1, 3), seed=3, noise=NoiseConfig(mismatched=0.1, boilerplate=0.1, near_duplicate=0.1))
    pairs = load_pairs(pool_dir / name, tokenizer, context=40, image_size=16)
    assert len(pairs) == len(pool.row_caption) and pairs.captions == pool.row_caption and pairs.noise == pool.row_noise
    # PNG is lossless and the images are read at their own size: exactly the generated pixels, each file once.
    assert pairs.images.shape == (24, 3, 16, 16) and torch.equal(pairs.images, torch.from_numpy(pool.images))
    assert pairs.image_index.tolist() == pool.row_image and pairs.truncated == 0
    batch = pairs.batch(torch.arange(len(pairs)))
    assert set(batch) == set(pairs.keys) == {"images", "tokens", "caption_keys"}
    assert batch["images"].shape == (len(pairs), 3, 16, 16) and batch["tokens"].dtype == torch.int64
    assert torch.equal(batch["images"], torch.from_numpy(pool.images[pool.row_image]).float() / 255)
    for row, caption in zip(batch["tokens"].tolist(), pool.row_caption):
        ids = encode(tokenizer, caption)
        assert row == ids + [PAD_ID] * (40 - len(ids)) and decode(tokenizer, ids) == caption
    # Caption keys: equal exactly when the texts are equal (brute force over all pairs of rows).
    keys = batch["caption_keys"].tolist()
    same_text = [[a == b for b in pool.row_caption] for a in pool.row_caption]
    assert [[a == b for b in keys] for a in keys] == same_text
    assert any(sum(r) > 1 for r in same_text)  # the pool has repeated captions ("there is one object"), so this bites


def test_tsv_is_open_clips_layout_and_quotes_hard_captions(tmp_path: Path) -> None:
    captions = ['a "quoted" caption', "tab\tinside", "two\nlines", "plain"]
    path = write_manifest(tmp_path / "m.tsv", ["a.png", "b.png", "c.png", "d.png"], captions)
    with open(path, newline="") as f:  # what open_clip's reader (pandas, sep="\t") sees: a header, then the fields
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == [IMAGE_KEY, CAPTION_KEY] and [r[1] for r in rows[1:]] == captions
    back = read_manifest(path)
    assert back.captions == captions and back.filepaths == ["a.png", "b.png", "c.png", "d.png"]
    assert back.lines == [2, 3, 5, 6]  # the caption with a line end takes lines 4-5
    jsonl = read_manifest(write_manifest(tmp_path / "m.jsonl", ["a.png"] * 4, captions))
    assert jsonl.captions == captions


def test_long_captions_are_truncated_and_counted(tokenizer) -> None:
    captions = ["a red circle", "a large red circle, a small blue star and a large green square", "a red circle"]
    tokens, truncated = tokenize_captions(tokenizer, captions, context=6)
    lengths = [len(encode(tokenizer, c)) for c in captions]
    assert truncated == sum(n > 6 for n in lengths) == 1 and tokens.shape == (3, 6)
    assert tokens[1].tolist() == encode(tokenizer, captions[1])[:6]
    images = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    assert pair_set(images, [0, 1, 0], captions, tokenizer, 6).truncated == 1


def _bad(tmp_path: Path, rows: list[tuple[str, str]], name: str = "m.tsv") -> Path:
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return write_manifest(tmp_path / name, [r[0] for r in rows], [r[1] for r in rows])


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("ok.png", "a red circle"), ("missing.png", "a blue star")], r"m.tsv line 3: image 'missing.png' does not exist"),
        ([("ok.png", "a red circle"), ("ok.png", "x"), ("broken.png", "a blue star")], r"m.tsv line 4: cannot read image 'broken.png'"),
        ([("ok.png", "a red circle"), ("ok.png", "  ")], r"m.tsv line 3: empty caption for image 'ok.png'"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path: Path, tokenizer, rows, message) -> None:
    path = _bad(tmp_path, rows)
    with pytest.raises(DataError, match=message) as err:
        load_pairs(path, tokenizer, context=8, image_size=8)
    assert "\n" not in str(err.value)


def test_bad_manifests_are_one_line_errors(tmp_path: Path, tokenizer) -> None:
    cases = {
        "cols.tsv": ("image\tcaption\nok.png\ta red circle\n", "lacks filepath and title"),
        "wide.tsv": ("filepath\ttitle\nok.png\ta red circle\textra\n", "line 2: 3 fields for a header of 2"),
        "short.tsv": ("filepath\ttitle\nok.png\n", "line 2: the row has no title field"),
        "empty.tsv": ("filepath\ttitle\n", "has no rows"),
        "bad.jsonl": ('{"filepath": "ok.png", "title": "a"}\n{"filepath": \n', "line 2: not JSON"),
        "list.jsonl": ('["ok.png", "a red circle"]\n', "line 1: expected a JSON object"),
        "nokey.jsonl": ('{"filepath": "ok.png"}\n', "line 1: the row has no title field"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message) as err:
            load_pairs(tmp_path / name, tokenizer, context=8, image_size=8)
        assert "\n" not in str(err.value), name
    with pytest.raises(DataError, match="is not a file"):
        read_manifest(tmp_path / "nothing.tsv")


def test_pair_set_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match="image_index"):
        PairSet(torch.zeros(2, 3, 4, 4), torch.tensor([0, 5]), torch.zeros(2, 3, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError):
        PairSet(torch.zeros(2, 3, 4, 4), torch.tensor([0]), torch.zeros(2, 3, dtype=torch.long), ["a", "b"])


def test_the_pair_tokenizer_learns_captions_and_the_corpus(tmp_path: Path) -> None:
    from fewshot.data.pairs import train_pair_tokenizer
    from fewshot.data.token_ids import SPECIAL_TOKENS

    corpus = tmp_path / "play.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 30 + "JULIET:\nHeld out.\n")
    captions = make_pool(100, objects=(1, 3), seed=0, draw=False).row_caption
    tok = train_pair_tokenizer(captions, 400, corpus=str(corpus))
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(encode(tok, " hourglass")) > 1 and len(encode(tok, " circle")) == 1  # a caption word is one token
    assert len(encode(tok, " yonder")) == 1 and decode(tok, encode(tok, captions[0])) == captions[0]
    assert train_pair_tokenizer(captions, 400, corpus=str(corpus)).to_str() == tok.to_str()  # deterministic


def test_pretrain_on_pairs_keeps_the_run_tokenizer_and_reads_the_scene_shapes(pool_dir: Path, tmp_path: Path, caplog) -> None:
    """data.source=pairs through the one trainer: a new run trains its tokenizer on the captions + corpus and saves it;
    evaluation reads the reserved shapes beside the manifest without reading the pairs; cut captions are reported."""
    from fewshot import api
    from fewshot.data.pairs import PairsDataConfig
    from fewshot.data.registry import load_run_data
    from fewshot.data.scenes import FEWSHOT_SHAPES
    from fewshot.data.tokenizer import load_tokenizer
    from fewshot.errors import ConfigError

    corpus = tmp_path / "play.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 20)
    config = api.load_config(overrides=[
        "method=clip", "data.source=pairs", f"data.path={pool_dir / 'manifest.tsv'}", f"data.corpus={corpus}", "data.vocab_size=300",
        "data.seq_len=6", "data.image_size=16", "encoder.name=conv4", "train.steps=2", "train.batch_size=8", f"out={tmp_path}",
        "name=clip", "method.text.dim=32", "method.text.depth=1", "method.text.heads=2", "method.embed_dim=16",
    ])
    assert isinstance(config.data, PairsDataConfig) and config.data.channels == 3
    with caplog.at_level("WARNING", logger="fewshot"):
        result = api.pretrain(config, progress=False)
    assert result.step == 2 and "were cut" in caplog.text  # the long scene captions do not fit in 6 tokens
    run = api.open_run(result.run_dir)
    saved = load_tokenizer(result.run_dir)
    assert run.tokenizer().to_str() == saved.to_str() and saved.get_vocab_size() <= 300
    evaluation = run.evaluation_set()
    assert evaluation.classes == sorted(FEWSHOT_SHAPES) and len(evaluation) == 8 * 40
    assert load_run_data(config.data).pretrain is None  # without the tokenizer the pairs are not read
    with pytest.raises(ConfigError, match="data.seq_len"):
        api.load_config(overrides=["data.source=pairs", "data.seq_len=0"])
    with pytest.raises(DataError, match="needs data.path"):
        load_run_data(api.load_config(overrides=["data.source=pairs"]).data)


def test_a_users_own_pairs_of_any_size_and_path(tmp_path: Path, tokenizer) -> None:
    """Your own folder: JPEG and PNG of other sizes, relative and absolute paths, a comma-separated manifest; images
    are decoded like every other image file (centred square, area average) and each file once."""
    from PIL import Image

    from fewshot.data.image_files import decode_image

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "photos" / "a.jpg")
    Image.fromarray(np.full((50, 50), 200, dtype=np.uint8)).save(tmp_path / "photos" / "b.png")
    path = tmp_path / "mine.csv"
    path.write_text(f"title,filepath\na dog on grass,photos/a.jpg\na grey square,{tmp_path / 'photos' / 'b.png'}\n"
                    "\"a dog, again\",photos/a.jpg\n")
    pairs = load_pairs(path, tokenizer, context=12, image_size=16, separator=",")
    assert len(pairs) == 3 and pairs.images.shape == (2, 3, 16, 16) and pairs.image_index.tolist() == [0, 1, 0]
    expected = decode_image((tmp_path / "photos" / "a.jpg").read_bytes(), 16, 3)
    assert torch.equal(pairs.batch(torch.tensor([2]))["images"][0], torch.from_numpy(expected))
    assert pairs.captions[2] == "a dog, again" and pairs.noise == ["", "", ""]
