"""Images in context: the interleaved prompt's embedding sequence against a hand-assembled one, the cache against
recomputation, the test-blind baseline feeding blank images (a scripted model that reads them shows it), the seeded
episode sampler and its answers, Fast-VQA's answers, bad input, and ``fewshot icl vl-eval``."""

import json

import numpy as np
import pytest
import torch

from fewshot.cli import main
from fewshot.data.scenes import COLOURS
from fewshot.data.tokenizer import train_tokenizer
from fewshot.data.vl_prompts import (IMAGE, NONCE_NAMES, QUERY, VLImages, category_images, fast_vqa_episode, glossary, naming_episode,
                                     open_ended_episode)
from fewshot.errors import DataError
from fewshot.evaluate.vl_in_context import (
    BlankImages, PrefixInContext, Setting, answer_matches, evaluate_fast_vqa, evaluate_open_ended, interleaved_embeddings, nonce_warnings,
)
from fewshot.models.prefix_lm import GPTPrefixLM, open_prefix_lm
from test_frozen import CORPUS, frozen_config, save_tiny_gpt, scene_pairs

PIECES = ["answer with dax or blicket.", IMAGE, "this is a dax.", IMAGE, "this is a blicket.", IMAGE, QUERY]


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    return open_prefix_lm(save_tiny_gpt(tmp_path_factory.mktemp("gpt")))


@pytest.fixture(scope="module")
def hf_link(tmp_path_factory):
    """A random GPT-2 with an [EOS] as a prefix LM, weights at std 0.3 so that continuations depend on the images."""
    pytest.importorskip("transformers")
    from conftest import save_tiny_hf_gpt2

    return open_prefix_lm(save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf"), CORPUS, n_positions=64, eos_token="[EOS]"))


def pixel_prefix(link):
    """A prefix that is a fixed function of the pixels: the first 2·D values of each image as 2 embeddings."""
    return lambda images: images.flatten(1)[:, : 2 * link.dim].reshape(len(images), 2, link.dim)


def images(n, seed=0):
    return list(torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------ the prompt as embeddings


@pytest.mark.parametrize("order", ["as given", "images swapped"])
def test_the_interleaved_sequence_equals_a_hand_assembled_one(link, order):
    shown = images(3)
    got = interleaved_embeddings(link, pixel_prefix(link), shown, PIECES)

    def text(s):
        return link.embed(torch.tensor([link.tokenizer.encode(s, add_special_tokens=False).ids]))[0]

    def image(x):
        return x.flatten()[: 2 * link.dim].view(2, link.dim)

    placed = shown if order == "as given" else [shown[1], shown[0], shown[2]]  # negative control: a wrong order differs
    by_hand = torch.cat([link.embed(torch.tensor([link.start_ids]))[0], text("answer with dax or blicket."), image(placed[0]),
                         text(" this is a dax."), image(placed[1]), text(" this is a blicket."), image(placed[2]), text(" " + QUERY)])[None]
    assert got.shape == by_hand.shape
    assert torch.equal(got, by_hand) == (order == "as given")


@pytest.mark.parametrize("cache", ["kept", "dropped"])
def test_cached_and_recomputed_prompts_give_the_same_logits(link, cache):
    model = PrefixInContext(link, pixel_prefix(link), "tiny")
    shown = images(3)
    whole, _ = model.logits(shown, PIECES)
    sequence = interleaved_embeddings(link, pixel_prefix(link), shown, PIECES)
    chunks, past, start = [], None, 0
    for size in (1, 5, 2, 7, sequence.shape[1]):  # arbitrary cuts, across image and text pieces
        piece = sequence[:, start : start + size]
        if piece.shape[1] == 0:
            break
        logits, kept = link.step(piece, past)
        past = kept if cache == "kept" else None  # negative control: each chunk read without what came before
        chunks.append(logits)
        start += size
    assert torch.allclose(torch.cat(chunks, dim=1), whole, atol=1e-5) == (cache == "kept")
    uncached = PrefixInContext(link, pixel_prefix(link), "tiny", use_cache=False)
    assert model.next_text(shown, PIECES, 6) == uncached.next_text(shown, PIECES, 6)


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_last_only_logits_are_the_last_positions_of_the_full_logits(link, request, kind):
    """step(last_only=True), the prefill of next_text (the LM's head runs on one position), gives the full logits'
    last position, after a cache too; not the position before it (the control that positions differ at all)."""
    if kind == "hf":
        link = request.getfixturevalue("hf_link")
    sequence = interleaved_embeddings(link, pixel_prefix(link), images(3), PIECES)
    with torch.no_grad():
        _, past = link.step(sequence[:, :4])
        for cache in (None, past):
            chunk = sequence[:, 4:] if cache is not None else sequence
            full, _ = link.step(chunk, cache)
            last, _ = link.step(chunk, cache, last_only=True)
            assert last.shape == (1, 1, full.shape[-1])
            assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5) and not torch.allclose(last[:, 0], full[:, -2], atol=1e-3)


def test_decode_steps_cuts_each_row_at_its_own_end():
    """The one decoding loop, on scripted choices: a row ends before EOS or a stop id, or right after the token that
    completes a text stop; finished rows keep being fed; the loop stops once every row has ended."""
    from fewshot.models.prefix_lm import decode_steps

    script = torch.tensor([[5, 6, 0, 7, 7], [5, 9, 6, 6, 6], [4, 3, 6, 6, 6], [8, 8, 8, 8, 8]])  # EOS = 0, stop id 9, "3" ends
    calls = []

    def next_logits(tokens):
        calls.append(tokens.shape[1])
        return torch.nn.functional.one_hot(script[:, tokens.shape[1]], 10).float()

    rows = decode_steps(next_logits, 4, 4, 0, lambda logits: logits.argmax(-1), stop_ids=[9], ends=lambda row: row[-1] == 3)
    assert rows == [[5, 6], [5], [4, 3], [8, 8, 8, 8]] and calls == [0, 1, 2, 3]
    assert decode_steps(next_logits, 4, 4, 0, lambda logits: logits.argmax(-1)) == [[5, 6], [5, 9, 6, 6], [4, 3, 6, 6], [8, 8, 8, 8]]


@pytest.mark.parametrize("model_kind", ["prefix", "blank images"])
def test_batched_continuations_equal_one_prompt_at_a_time(hf_link, model_kind):
    """next_texts (prompts of one length stacked, no padding) gives each prompt's next_text, in the prompts' order,
    for prompts of several lengths mixed; BlankImages' batched path blanks the images too (its texts differ from the
    model's on the real images: the control that a batched call forwarded to the model unblanked would be seen)."""
    from fewshot.evaluate.vl_in_context import continue_prompts

    model = PrefixInContext(hf_link, lambda x: 3 * pixel_prefix(hf_link)(x), "tiny")
    short = ["answer with dax or blicket.", IMAGE, "this is a dax.", IMAGE, QUERY]
    prompts = [(images(3, seed), PIECES) if seed % 2 else (images(2, seed), short) for seed in range(7)]
    tested = BlankImages(model) if model_kind == "blank images" else model
    batched = continue_prompts(tested, prompts, 6)
    assert batched == [tested.next_text(shown, pieces, 6) for shown, pieces in prompts]
    if model_kind == "blank images":
        assert batched != continue_prompts(model, prompts, 6)
    else:
        assert len(set(batched)) > 2  # more than the two lengths: a row given another's continuation would show


# ------------------------------------------------------------------ blind baselines


class NearestSupport:
    """A scripted model that reads the images: the name after the support image whose colour (the mean of the lit
    pixels) is nearest the query image's."""

    name = "nearest support"

    def __init__(self):
        self.seen = []

    def next_text(self, images, pieces, max_tokens):
        self.seen.append([x.clone() for x in images])
        names, j = [], 0
        for k, piece in enumerate(pieces):
            if piece == IMAGE:
                if k + 1 < len(pieces) and pieces[k + 1].startswith("this is a "):
                    names.append((j, pieces[k + 1][len("this is a "):].rstrip(".")))
                j += 1
        def colour(x):
            lit = x.amax(dim=0) > 0.05
            return x[:, lit].mean(dim=1) if lit.any() else torch.zeros(3)

        best = min(names, key=lambda item: float((colour(images[item[0]]) - colour(images[-1])).pow(2).sum()))
        return f" {best[1]}."


def test_test_blind_feeds_blank_images():
    data = category_images("colours", 8, size=16)
    model = NearestSupport()
    seeing = evaluate_open_ended(model, data, [Setting(2, 1, 0, True)], episodes=40)
    blind = BlankImages(model)
    blank = evaluate_open_ended(blind, data, [Setting(2, 1, 0, True)], episodes=40)
    assert all(float(x.abs().sum()) == 0 for prompt in model.seen[40:] for x in prompt)
    assert all(float(x.abs().sum()) > 0 for prompt in model.seen[:40] for x in prompt)
    (seeing,), (blank,) = seeing.values(), blank.values()
    # on blank images every support is equally near: the first is named, right only when the query's class came first
    assert seeing["accuracy"] > 80 and blank["accuracy"] < 75 and blind.name == "nearest support (test-blind)"


class Recorder:
    name = "recorder"

    def __init__(self):
        self.calls = []

    def next_text(self, images, pieces, max_tokens):
        self.calls.append((list(images), list(pieces)))
        return " dax."


def test_the_text_only_row_puts_each_images_description_where_its_marker_was():
    data = category_images("shapes", 8, size=16)
    model = Recorder()
    evaluate_open_ended(model, data, [Setting(2, 3, 1, True)], episodes=5, text_only=True)
    for i, (shown, pieces) in enumerate(model.calls):
        e = open_ended_episode(data.labels, data.class_names, 2, 3, 1, True, True, 0, i)
        assert shown == [] and IMAGE not in pieces and len(pieces) == len(e.pieces)
        images = iter(e.images)
        for p, q in zip(e.pieces, pieces):
            if p == IMAGE:
                obj = next(images)
                assert q == data.descriptions[obj] and data.class_names[data.labels[obj]] in q  # a shape's description names it
            else:
                assert q == p
    with pytest.raises(DataError, match="needs the images' descriptions"):
        evaluate_open_ended(model, toy_images(), [Setting(2, 1, 0, True)], episodes=1, text_only=True)


# ------------------------------------------------------------------ episodes


def toy_images():
    labels = np.repeat(np.arange(6), 7)
    return VLImages(torch.rand(42, 3, 4, 4), labels, [f"class{c}" for c in range(6)])


@pytest.mark.parametrize("nonce", [True, False])
@pytest.mark.parametrize("way,shots,repeats", [(2, 1, 0), (5, 3, 1), (3, 5, 3)])
def test_the_episode_sampler_is_seeded_and_its_answers_are_right(way, shots, repeats, nonce):
    data = toy_images()
    e = open_ended_episode(data.labels, data.class_names, way, shots, repeats, True, nonce, seed=3, i=7)
    assert e == open_ended_episode(data.labels, data.class_names, way, shots, repeats, True, nonce, seed=3, i=7)
    assert e != open_ended_episode(data.labels, data.class_names, way, shots, repeats, True, nonce, seed=3, i=8)
    assert e.pieces[0] == f"answer with {', '.join(e.names[:-1])} or {e.names[-1]}." and e.pieces[-1] == QUERY
    assert len(e.images) == sum(p == IMAGE for p in e.pieces) == way * shots * (1 + repeats) + 1
    named = {}  # every support image's name is the name of its class, one name per class
    for k, piece in enumerate(e.pieces[1:-2], start=1):
        if piece == IMAGE:
            index = e.images[sum(p == IMAGE for p in e.pieces[:k])]
            name = e.pieces[k + 1][len("this is a "):-1]
            assert named.setdefault(int(data.labels[index]), name) == name
    assert len(named) == way and len(set(named.values())) == way
    query = e.images[-1]
    assert query not in e.images[:-1] and named[int(data.labels[query])] == e.answer
    assert set(named.values()) <= (set(NONCE_NAMES) if nonce else set(data.class_names))
    if not nonce:
        assert e.answer == data.class_names[int(data.labels[query])]
    support = [e.images[j] for j in range(way * shots)]
    assert sorted(e.images[:-1]) == sorted(support * (1 + repeats))  # the support block repeated, nothing else


def test_fast_vqa_answers_are_the_colour_of_an_object_in_the_query():
    for i in range(10):
        e, shown = fast_vqa_episode(2, seed=0, i=i, size=16)
        assert e.pieces[-1] in {f"q: what colour is the {name}? a:" for name in e.names}
        assert len(shown) == 5 and e.answer in COLOURS
        colour = torch.tensor(COLOURS[e.answer])
        lit = shown[-1].flatten(1).T[shown[-1].flatten(1).amax(dim=0) > 0.5]  # drawn pixels: coverage × colour on black
        hue = lit / lit.amax(dim=1, keepdim=True)
        assert ((hue - colour / colour.max()).abs().amax(dim=1) < 0.03).any()  # some pixel has the answer's colour
    e0, _ = fast_vqa_episode(0, seed=0, i=0, size=16)
    assert e0.pieces == (IMAGE, e0.pieces[-1]) and len(e0.images) == 1


class FastVQAReader:
    """Reads a Fast-VQA prompt in words by hand: each description before "this is a NAME." names a shape; the answer
    is the colour the query scene gives that shape (``first_object``: the broken variant, the query's first colour)."""

    name = "fast-vqa reader"

    def __init__(self, first_object: bool = False) -> None:
        self.first_object = first_object

    def next_text(self, images, pieces, max_tokens):
        assert not len(images) and IMAGE not in pieces
        shape_of = {p[len("this is a "):-1]: d.rstrip(".").split()[-1] for d, p in zip(pieces, pieces[1:]) if p.startswith("this is a ")}
        asked = pieces[-1].removeprefix("q: what colour is the ").removesuffix("? a:")
        objects = [o.split()[-2:] for o in pieces[-2].rstrip(".").split(" and ")]  # "a red circle and a blue star."
        colour = objects[0][0] if self.first_object else next((c for c, shape in objects if shape == shape_of[asked]), "")
        return f" {colour}."


@pytest.mark.parametrize("descriptions", ["the episode's", "the next episode's"])  # the next episode's: the control
def test_fast_vqa_in_words_is_the_same_episodes_and_a_reader_of_the_words_answers_all(descriptions, monkeypatch):
    """``evaluate_fast_vqa(text_only=True)`` asks the image episodes with each image replaced by its description: the
    episodes equal :func:`fast_vqa_episode`'s, and a hand reader of the words answers every one; the control reader,
    who takes the query's first object whatever the name, does not, nor does the reader when each episode is given
    the next episode's descriptions (control)."""
    from fewshot.data.vl_prompts import fast_vqa_descriptions
    from fewshot.evaluate import vl_in_context

    if descriptions != "the episode's":
        monkeypatch.setattr(vl_in_context, "fast_vqa_descriptions",
                            lambda k, seed, i: (fast_vqa_descriptions(k, seed, i)[0], fast_vqa_descriptions(k, seed, i + 1)[1]))
        misread = evaluate_fast_vqa(FastVQAReader(), [1, 3], 40, seed=2, text_only=True)
        assert all(c["accuracy"] < 100 for c in misread.values())
        return
    for k in (0, 1, 3):
        for i in range(10):
            e, descriptions = fast_vqa_descriptions(k, seed=2, i=i)
            assert e == fast_vqa_episode(k, seed=2, i=i, size=16)[0] and len(descriptions) == len(e.images)
    right = evaluate_fast_vqa(FastVQAReader(), [1, 3], 40, seed=2, text_only=True)
    assert [c["accuracy"] for c in right.values()] == [100.0, 100.0]
    first = evaluate_fast_vqa(FastVQAReader(first_object=True), [1, 3], 40, seed=2, text_only=True)
    assert all(20 < c["accuracy"] < 80 for c in first.values())


@pytest.mark.parametrize("image", ["the query", "the first support image"])  # the first support image: the control
def test_the_dominant_colour_rule_names_a_colour_of_the_query_scene(image):
    """Fast-VQA's no-LM baseline answers with a colour the query scene's description gives one of its objects, in every
    episode, so it scores near a coin between the two; reading another image instead (control) misses that."""
    from fewshot.data.vl_prompts import fast_vqa_descriptions
    from fewshot.evaluate.vl_in_context import DominantColour

    rule, inside = DominantColour(), []
    for i in range(40):
        e, shown = fast_vqa_episode(2, seed=4, i=i, size=32)
        _, descriptions = fast_vqa_descriptions(2, seed=4, i=i)
        picked = [shown[-1]] if image == "the query" else [shown[0]]
        said = rule.next_text(picked, e.pieces, 4).strip(" .")
        inside.append(said in {o.split()[-2] for o in descriptions[-1].rstrip(".").split(" and ")})
    assert all(inside) == (image == "the query")
    assert rule.next_text([torch.zeros(3, 16, 16)], (), 4) == ""
    if image == "the query":
        accuracy = evaluate_fast_vqa(rule, [1], 60, seed=4)["1"]["accuracy"]
        assert 25 < accuracy < 75


def test_question_episodes_are_fast_vqa_on_glossary_names_with_their_descriptions():
    """Training's Fast-VQA layout: glossary names only, 1–3 shots of each of 2 shapes, each image described in the
    corpus's words; the query scene's description gives the asked name's shape the answer's colour."""
    from fewshot.data.vl_prompts import described, question_episode

    names = glossary(50)
    shots = set()
    for i in range(20):
        e, images = question_episode(names, seed=1, i=i, size=16)
        assert set(e.names) <= set(names) and not set(e.names) & set(NONCE_NAMES) and e.answer in COLOURS
        assert len(images.descriptions) == len(images.images) == len(e.images)
        asked = e.pieces[-1].removeprefix("q: what colour is the ").removesuffix("? a:")
        named_shapes = {d.split()[-1].rstrip(".") for d, p in zip(images.descriptions, e.pieces[1::2]) if p == f"this is a {asked}."}
        assert len(named_shapes) == 1 and f"a {e.answer} {named_shapes.pop()}" in images.descriptions[-1]
        shots.add((len(e.images) - 1) // 2)
        text = described(e.answered(), e.images, images.descriptions)
        assert IMAGE not in text and text[-1].endswith(f"a: {e.answer}.")
    assert shots == {1, 2, 3}


def test_training_naming_episodes_bind_glossary_names_to_one_attribute():
    names = glossary(50)
    shared = {"shape": 0, "colour": 0}
    for i in range(40):
        e, shown = naming_episode(names, seed=0, i=i, size=16, max_images=9)
        again, shown_again = naming_episode(names, seed=0, i=i, size=16, max_images=9)
        assert e == again and torch.equal(shown.images, shown_again.images)
        assert len(e.images) <= 9 and max(e.images) < len(shown.images) and e.answer in e.names
        assert set(e.names) <= set(names) and not set(e.names) & set(NONCE_NAMES)
        named = {}  # name → the (colour, shape) of its support images
        for k, piece in enumerate(e.pieces):
            if piece == IMAGE and k + 1 < len(e.pieces) and e.pieces[k + 1].startswith("this is a "):
                words = shown.descriptions[e.images[sum(p == IMAGE for p in e.pieces[:k])]].rstrip(".").split()
                named.setdefault(e.pieces[k + 1][len("this is a "):-1], []).append(tuple(words[-2:]))
        query = tuple(shown.descriptions[e.images[-1]].rstrip(".").split()[-2:])
        binding = []  # attributes with one value per name, a different one for each name, the answer's on the query
        for a, attribute in enumerate(("colour", "shape")):
            values = {name: {seen[a] for seen in pairs} for name, pairs in named.items()}
            if (all(len(v) == 1 for v in values.values()) and len(set.union(*values.values())) == len(values)
                    and values[e.answer] == {query[a]}):
                binding.append(attribute)
        assert binding, (e, shown.descriptions)
        if len(binding) == 1:
            shared[binding[0]] += 1
    assert shared["shape"] >= 5 and shared["colour"] >= 5  # both kinds, each with another attribute that varies


def test_answers_are_matched_exactly():
    assert answer_matches(" dax.", "dax") and answer_matches(" character 3. more", "character 3")
    assert not answer_matches(" daxo.", "dax") and not answer_matches(" blicket", "dax") and not answer_matches("", "dax")


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(link):
    model = PrefixInContext(link, pixel_prefix(link), "tiny")
    with pytest.raises(DataError, match=r"^the prompt has 3 image slot\(s\) \(<image>\) but 2 image\(s\) were given$"):
        model.next_text(images(2), PIECES, 4)
    long = ["answer with dax or blicket."] + [IMAGE, "this is a blicket."] * 12 + [IMAGE, QUERY]
    with pytest.raises(DataError, match=r"holds 97: \d+ too many; use fewer shots or repeats$"):
        model.next_text(images(13), long, 4)


@pytest.mark.parametrize("vocabulary", ["dax is a word", "nonce only"])
def test_a_nonce_name_in_the_vocabulary_is_a_warning(link, vocabulary, recwarn):
    text = CORPUS + (" dax" * 3000 if vocabulary == "dax is a word" else "")
    model = PrefixInContext(GPTPrefixLM(link.model, train_tokenizer(text, 300), "tiny"), pixel_prefix(link), "tiny")
    notes = nonce_warnings(model)
    if vocabulary == "dax is a word":
        assert notes == ["nonce name 'dax' is a single token of tiny's vocabulary: it may already be a known word"]
        assert any("nonce name 'dax'" in str(w.message) for w in recwarn.list)
    else:
        assert notes == []


# ------------------------------------------------------------------ the command


def test_vl_eval_command_on_a_frozen_run(tmp_path, monkeypatch, capsys):
    from fewshot.train.trainer import pretrain
    from fewshot.methods import build_method

    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "no-data"))
    gpt = save_tiny_gpt(tmp_path / "lm")
    config = frozen_config(gpt, tmp_path)
    pretrain(config, scene_pairs(build_method(config).text_tokenizer), progress=False)
    args = ["icl", "vl-eval", str(config.run_dir), "--categories", "shapes", "omniglot", "--ways", "2", "--shots", "1", "--repeats", "0",
            "--names", "nonce", "--episodes", "3", "--vqa-shots", "0", "1"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "omniglot" in out["skipped"] and set(out["categories"]["shapes"]) == {"model", "test-blind"}
    cells = out["categories"]["shapes"]["model"]
    assert len(cells) == 2 and all(c["episodes"] == 3 and 0 <= c["accuracy"] <= 100 for c in cells.values())
    assert set(out["fast_vqa"]["test-blind"]) == {"0", "1"}
    assert main([*args[:6], "--ways", "5", "--repeats", "5", "--shots", "1", "--names", "nonce", "--episodes", "1", "--vqa-shots"]) != 0
    err = capsys.readouterr().err.strip()
    assert "too many" in err and len(err.splitlines()) == 1


def test_nearest_support_baselines_read_the_prompt_as_named_items():
    """The simple baselines: the word-overlap rule on a text-only prompt and 1-NN on features; changing the query's
    shape (the control) changes the answer, so neither answers from the layout alone."""
    from fewshot.data.vl_prompts import IMAGE, QUERY, induction_text
    from fewshot.evaluate.vl_in_context import NearestSupport, feature_cosine, named_items, word_overlap

    rule = NearestSupport(word_overlap, "overlap")
    pieces = [induction_text(["dax", "wug"]), "a small red circle.", "this is a dax.", "a large blue star.", "this is a wug.", "a small green circle.", QUERY]
    assert rule.next_text([], pieces, 5) == "dax"
    assert rule.next_text([], pieces[:5] + ["a large green star.", QUERY], 5) == "wug"
    images = [torch.eye(4)[i].view(1, 2, 2) for i in (0, 1, 1)]
    pieces = [IMAGE, "this is a dax.", IMAGE, "this is a wug.", IMAGE, QUERY]
    assert named_items(images, pieces) == ([(images[0], "dax"), (images[1], "wug")], images[2])
    nearest = NearestSupport(feature_cosine(lambda x: x.flatten(1)), "1-nn")
    assert nearest.next_text(images, pieces, 5) == "wug"
    assert nearest.next_text(images[:2] + [images[0]], pieces, 5) == "dax"
    with pytest.raises(DataError, match="not an open-ended prompt"):
        named_items([], ["a red circle.", QUERY])
