"""The scene corpus's glossary of made-up names: no name is a real word (words/english.txt and the category lists),
checked against the unfiltered candidates (which do hold real words: the negative control) and a generator that
offers nothing but real words until a made-up one."""

import re
from itertools import islice

import pytest

from fewshot.data import vl_prompts
from fewshot.data.scenes import COLOURS, FEWSHOT_SHAPES, PRETRAIN_SHAPES, SIZES
from fewshot.data.vl_prompts import NONCE_NAMES, glossary, real_words

SHAPES = re.compile(r"[bdfgklmnprstvz][aeiou][bdfgklmnprstvz]([aeiou][bdfgklmnprstvz]?)?|(bl|gr|st|tr|fl|sk)[aeiou][bdfgklmnprstvz][aeiou]")
SCENE = set(NONCE_NAMES) | set(PRETRAIN_SHAPES) | set(FEWSHOT_SHAPES) | set(COLOURS) | set(SIZES)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_glossary_name_is_a_real_word(seed):
    names = glossary(400, seed)
    assert len(set(names)) == 400 and names == glossary(400, seed)
    assert not set(names) & (real_words() | SCENE)
    assert all(SHAPES.fullmatch(w) for w in names)


@pytest.mark.parametrize("seed", [0, 2])
def test_the_glossary_is_the_unfiltered_candidates_less_the_listed_ones(seed):
    """An independent transcription: the distinct candidates in order, less the scene's and the listed words. It also
    shows the filter matters: at seeds 0 (the scene corpus's) and 2 (descriptors.nonce_names') the first 100
    unfiltered candidates hold real words, the crude 'fuk' among seed 0's."""
    raw = list(dict.fromkeys(islice(vl_prompts._candidate_names(seed), 3000)))
    assert set(raw[:100]) & real_words()
    if seed == 0:
        assert "fuk" in raw[:100] and "fuk" in real_words()
    assert glossary(300, seed) == [w for w in raw if w not in real_words() | SCENE][:300]


def test_a_generator_of_real_words_is_refused_until_a_made_up_one(monkeypatch):
    offered = ["sofa", "tiger", "lemon", "dax", "red", "circle", "male", "zorbl", "sofa", "plimb", "zorbl", "kevo"]
    monkeypatch.setattr(vl_prompts, "_candidate_names", lambda seed: iter(offered))
    assert glossary(3) == ["zorbl", "plimb", "kevo"]


def test_the_word_list_is_real_words_in_the_glossary_shapes():
    lines = [line for line in vl_prompts.resources.files("fewshot.data").joinpath("words", "english.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert len(lines) > 1500 and lines == sorted(set(lines))
    assert all(SHAPES.fullmatch(w) for w in lines)  # a word in no shape the generator makes could never be drawn
    assert {"sofa", "male", "sun", "fuk", "tide", "stone", "given"} <= real_words()
    assert {"tiger", "lemon", "kangaroo", "france"} <= real_words()  # the category lists count too
    assert not set(NONCE_NAMES) & real_words()


def test_a_glossary_without_the_word_filter_fails_the_property(monkeypatch):
    """The negative control of the first test: the same generator with the list emptied names real words."""
    listed = real_words()
    monkeypatch.setattr(vl_prompts, "real_words", lambda: frozenset())
    assert set(glossary(400, 0)) & listed


def test_a_glossary_larger_than_the_cap_is_a_one_line_error_and_the_cap_is_reachable():
    """Asking for more names than the cap is refused at once (it used to loop forever past the ≈ 76,000 candidates);
    the cap itself is drawn, all distinct."""
    from fewshot.data.vl_prompts import MAX_GLOSSARY
    from fewshot.errors import DataError

    with pytest.raises(DataError, match="0 to 20,000 made-up names") as err:
        glossary(MAX_GLOSSARY + 1)
    assert "\n" not in str(err.value)
    words = glossary(MAX_GLOSSARY, seed=1)
    assert len(set(words)) == MAX_GLOSSARY
