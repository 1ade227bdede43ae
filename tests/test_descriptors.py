"""Classification by description and Socratic captioning (fewshot.evaluate.descriptors).

The score is checked against a slow loop over descriptors (negative control: renormalised prototypes, CLIP's
prompt-ensembling rule, rank a hand-made case differently); on a hand-made text tower the true descriptors
classify perfectly and the derangement fails; the LM answer parser on hand-written outputs; the JSON, callable and
LM sources (a scripted LM); one-line errors; the CLI on a tiny CLIP run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot import api, cli
from fewshot.data.scenes import COLOURS, PRETRAIN_SHAPES, SHAPES
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.descriptors import (
    CONCEPTS, DESCRIPTOR_PROMPT, SOCRATIC_EXAMPLE, clean_caption, derangement, descriptor_prototypes, descriptor_scores,
    descriptor_sentence, lm_descriptors, nonce_names, parse_descriptors, rank_scene_words, read_descriptor_table, resolve_descriptors,
    socratic_captions, socratic_prompt, true_descriptors,
)
from fewshot.evaluate.zeroshot import ZeroShotClassifier, zero_shot_scores
from fewshot.models.causal_lm import PromptLM

from test_vl_commands import clip_run  # noqa: F401  (the tiny CLIP run of the scene pool)


def hashed_embed(texts: list[str], dim: int = 12) -> torch.Tensor:
    """A fixed pseudo-random vector per text (SHA-256 seeded): an independent stand-in for a text tower."""
    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=dim) for t in texts]
    return torch.tensor(np.array(rows))


def slow_scores(images: torch.Tensor, names: list[str], descriptors: list[list[str]]) -> np.ndarray:
    out = np.zeros((len(images), len(names)))
    for i, x in enumerate(images):
        for c, (name, ds) in enumerate(zip(names, descriptors)):
            cosines = [float(F.cosine_similarity(x[None].double(), hashed_embed([descriptor_sentence(name, d)]).double())) for d in ds]
            out[i, c] = sum(cosines) / len(cosines)
    return out


def test_score_is_the_mean_cosine_over_descriptors() -> None:
    names = ["dax", "wug", "fep"]
    descriptors = [["is red", "has a stem", "a round fruit"], ["is blue"], ["green leaves", "is small"]]
    images = torch.randn(7, 12, generator=torch.Generator().manual_seed(0))
    fast = descriptor_scores(images, descriptor_prototypes(hashed_embed, names, descriptors)).numpy()
    np.testing.assert_allclose(fast, slow_scores(images, names, descriptors), atol=1e-10)
    # the episode runner's classifier, prototypes as given, predicts the loop's argmax
    classifier = ZeroShotClassifier(descriptor_prototypes(hashed_embed, names, descriptors), normalize_prototypes=False)
    np.testing.assert_array_equal(classifier.predict(images.numpy()), slow_scores(images, names, descriptors).argmax(axis=1))


@pytest.mark.parametrize("normalize", [False, True], ids=["mean-cosine", "broken:renormalised"])
def test_renormalised_prototypes_rank_differently(normalize: bool) -> None:
    """x = e1; class A's two descriptors e1 and e2 (mean cosine 0.5), class B's one (0.6, 0.8) (cosine 0.6): the mean
    cosine picks B, the renormalised mean of A, (e1 + e2)/√2, has cosine 0.707 and picks A (the negative control)."""
    table = {"dax, which is a": [1.0, 0.0, 0.0], "dax, which is b": [0.0, 1.0, 0.0], "wug, which is c": [0.6, 0.8, 0.0]}
    prototypes = descriptor_prototypes(lambda texts: torch.tensor([table[t] for t in texts]), ["dax", "wug"], [["is a", "is b"], ["is c"]])
    predicted = ZeroShotClassifier(prototypes, normalize_prototypes=normalize).predict(np.array([[1.0, 0.0, 0.0]]))
    assert bool(predicted[0] == 1) is (not normalize)


WORDS = [*COLOURS, *PRETRAIN_SHAPES]


def bag_of_scene_words(texts: list[str]) -> torch.Tensor:
    """A hand-made text tower: one dimension per scene word, on when the word is in the text; a small constant
    elsewhere so a text without scene words is not the zero vector."""
    out = torch.full((len(texts), len(WORDS) + 1), 0.0, dtype=torch.float64)
    out[:, -1] = 0.05
    for i, t in enumerate(texts):
        for j, w in enumerate(WORDS):
            out[i, j] = float(w in t.replace(",", " ").split())
    return out


def test_true_descriptors_classify_and_a_derangement_does_not() -> None:
    classes = ["red circle", "blue square", "green star", "yellow ring"]  # no colour or shape shared
    images = bag_of_scene_words(classes).repeat_interleave(3, dim=0)
    labels = np.repeat(np.arange(4), 3)
    names = nonce_names(4)
    truth = [true_descriptors(c) for c in classes]
    right = zero_shot_scores(images, labels, descriptor_prototypes(bag_of_scene_words, names, truth), normalize_prototypes=False)
    assert right["accuracy"] == 1.0
    swap = derangement(4, seed=0)
    wrong = zero_shot_scores(images, labels, descriptor_prototypes(bag_of_scene_words, names, [truth[j] for j in swap]), normalize_prototypes=False)
    assert wrong["accuracy"] == 0.0
    # the nonce name alone holds no scene word: every class ties, the first wins, chance-level 1/4
    alone = zero_shot_scores(images, labels, bag_of_scene_words([f"a photo of a {n}" for n in names]))
    assert alone["accuracy"] == 0.25


def test_derangement_has_no_fixed_point_and_is_seeded() -> None:
    for n in (2, 3, 25):
        for seed in range(5):
            order = derangement(n, seed)
            assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert derangement(25, 1) == derangement(25, 1) != derangement(25, 2)
    with pytest.raises(ConfigError, match="at least 2"):
        derangement(1)


def test_descriptor_sentences() -> None:
    assert descriptor_sentence("dax", "is red") == "dax, which is red"
    assert descriptor_sentence("dax", "a round fruit") == "dax, which is a round fruit"
    assert descriptor_sentence("dax", "green  leaves") == "dax, which has green leaves"
    assert descriptor_sentence("dax", "used for sailing") == "dax, which is used for sailing"
    assert descriptor_sentence(None, "is red") == "it is red"
    assert true_descriptors("orange arrow") == ["is orange", "is an arrow"]
    with pytest.raises(ConfigError, match="not a '<colour> <shape>' class"):
        true_descriptors("red dodecahedron")


@pytest.mark.parametrize("answer, complete, expected", [
    (" round shape\n- red skin\n- green stem\n\nQ: What are", True, ["round shape", "red skin", "green stem"]),
    (" Round shape.\n* \"Red skin\"\n1. green stem\n2) round shape\nQ: next", True, ["round shape", "red skin", "green stem"]),
    (" red\n- \n-   \n- shiny", True, ["red", "shiny"]),
    (" red\nThe tomato is a fruit.\n- shiny", True, ["red"]),  # the model left the format: the list ends
    (" red\n- shiny\n- green st", False, ["red", "shiny"]),  # cut by the budget: the partial line goes
    (" red\n- shiny\n\n", False, ["red", "shiny"]),  # stopped at a blank line: nothing was cut
    (" a very long single line cut", False, ["a very long single line cut"]),  # the only line stays
    ("\n\n", True, []),
])
def test_parse_descriptors(answer: str, complete: bool, expected: list[str]) -> None:
    assert parse_descriptors(answer, complete=complete) == expected


def test_parse_descriptors_limit() -> None:
    assert parse_descriptors(" a\n- b\n- c\n- d", limit=2) == ["a", "b"]


class ScriptedLM(PromptLM):
    """A byte-level 'LM' whose greedy continuation of any prompt is ``answer`` (then a blank line)."""

    name, context, start_ids = "scripted", 4096, []

    def __init__(self, answer: str) -> None:
        self.answer = list((answer + "\n\n").encode())
        self.prompts: list[str] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="ignore")

    def step(self, ids: torch.Tensor, past):
        if past is None:
            self.prompt = ids.shape[1]
            self.prompts += [self.decode(r) for r in ids.tolist()]
        total = ids.shape[1] + (0 if past is None else past[0][0].shape[2])
        produced = total - self.prompt
        logits = torch.zeros(ids.shape[0], ids.shape[1], 256)
        logits[:, -1, self.answer[min(produced, len(self.answer) - 1)]] = 100.0  # sampled or greedy alike
        cache = torch.zeros(ids.shape[0], 1, total, 1)
        return logits, [(cache, cache)]


def test_lm_descriptors_ask_about_the_concept_only() -> None:
    lm = ScriptedLM(" round fruit\n- shiny skin")
    out = lm_descriptors(lm, {"red circle": "tomato", "green triangle": "christmas tree"})
    assert out["red circle"]["descriptors"] == ["round fruit", "shiny skin"] and out["red circle"]["concept"] == "tomato"
    assert lm.prompts[0] == DESCRIPTOR_PROMPT.format(concept="tomato")
    assert not set(re.findall(r"[a-z]+", lm.prompts[0].lower())) & (set(COLOURS) | set(SHAPES))  # the answer is never in it
    table, record = resolve_descriptors(lm, ["red circle"])
    assert table == {"red circle": ["round fruit", "shiny skin"]} and record["source"] == "scripted" and record["worked_example"]


def test_the_concepts_never_name_the_answer() -> None:
    words = set(COLOURS) | set(PRETRAIN_SHAPES)
    assert all(not (set(concept.split()) & words) for concept in CONCEPTS.values())
    assert all(c.split()[0] in COLOURS and c.split()[1] in PRETRAIN_SHAPES for c in CONCEPTS)
    assert len(set(nonce_names(len(CONCEPTS)))) == len(CONCEPTS)


def test_json_and_callable_sources(tmp_path: Path) -> None:
    classes = ["red circle", "green triangle"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"red circle": ["round", " red  skin "], "green triangle": ["tall tree"]}))
    assert read_descriptor_table(path, classes) == {"red circle": ["round", "red skin"], "green triangle": ["tall tree"]}
    table, record = resolve_descriptors(str(path), classes)
    assert table["green triangle"] == ["tall tree"] and record == {"source": str(path)}
    table, record = resolve_descriptors(lambda name: [f"looks like a {name}"], classes)
    assert table == {c: [f"looks like a {c}"] for c in classes} and record == {"source": "callable"}
    assert resolve_descriptors({"red circle": ["x"], "green triangle": ["y"]}, classes)[0]["red circle"] == ["x"]


@pytest.mark.parametrize("content, message", [
    ({"red circle": ["round"], "green triangle": ["tree"], "blue blob": ["odd"]}, "unknown class 'blue blob'"),
    ({"red circle": ["round"], "green triangle": []}, "'green triangle' has an empty descriptor list"),
    ({"red circle": ["round"], "green triangle": ["  "]}, "'green triangle' has an empty descriptor list"),
    ({"red circle": ["round"]}, "no descriptors for class 'green triangle'"),
    ({"red circle": "round", "green triangle": ["tree"]}, "must be a list of strings"),
    (["round"], "must be a JSON object"),
])
def test_bad_tables_are_one_line_errors(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        read_descriptor_table(path, ["red circle", "green triangle"])


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        resolve_descriptors(tmp_path / "missing.json", ["red circle"])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="is not JSON"):
        resolve_descriptors(tmp_path / "broken.json", ["red circle"])
    with pytest.raises(DataError, match="does not exist"):
        resolve_descriptors(tmp_path / "no-such-run", ["red circle"])
    with pytest.raises(DataError, match="'red circle' has an empty descriptor list"):
        resolve_descriptors(lambda name: [], ["red circle"])
    with pytest.raises(ConfigError, match="no concept for class 'cyan arrow'"):
        resolve_descriptors(ScriptedLM(" x"), ["cyan arrow"])
    with pytest.raises(DataError, match="has no descriptors"):
        descriptor_prototypes(hashed_embed, ["dax"], [[]])


def test_socratic_words_drafts_and_pick() -> None:
    """The run (a bag of scene words) ranks the words of a red circle; the scripted LM drafts one caption; the pick is
    the draft with the highest cosine, and the template caption fills the words into the grammar."""
    def embed(texts: list[str]) -> torch.Tensor:
        counts = torch.tensor([[float(t.startswith("there is one"))] for t in texts], dtype=torch.float64)
        return torch.cat([bag_of_scene_words(texts), counts], dim=1)

    image = embed(["red circle"]) + torch.cat([torch.zeros(1, len(WORDS) + 1), torch.ones(1, 1)], dim=1).double()
    assert rank_scene_words(image, embed) == [{"count": 1, "colours": ["red"], "shapes": ["circle"]}]
    out = socratic_captions(image, embed, ScriptedLM(" \"A red circle.\""), samples=2)
    assert out["template"] == ["a red circle"] and out["greedy"] == ["a red circle"] and out["socratic"] == ["a red circle"]
    assert out["candidates"] == [["a red circle"]]  # the samples repeat the greedy draft and are merged
    assert clean_caption(" 'There is a blue star!'\nmore") == "there is a blue star"
    words = {"count": 1, "colours": ["red"], "shapes": ["circle"]}
    shown, alone = socratic_prompt(words), socratic_prompt(words, example=False)
    assert shown.count(SOCRATIC_EXAMPLE["caption"]) == 1 and SOCRATIC_EXAMPLE["caption"] not in alone
    assert shown.endswith(alone.split("\n", 1)[1]) and alone.endswith("there is one object. Colours I see: red. Shapes I see: circle.\n"
                                                                         "A short caption of this picture is:")


def test_describe_on_a_run_api_and_cli(clip_run: Path, tmp_path: Path, capsys) -> None:
    classes = ["red circle", "green triangle", "white ring"]
    table = tmp_path / "table.json"
    table.write_text(json.dumps({c: ["round", "shiny"] for c in classes}))
    out = api.describe(clip_run, str(table), classes=classes, way=2, episodes=5, query=2, per_class=3)
    assert [r["row"] for r in out["rows"]] == ["name", "lm", "lm-deranged", "true", "true-deranged", "real-name"]
    assert out["names"] == ["dax", "wug", "blicket"] and out["chance"] == pytest.approx(1 / 3)
    assert all(r["images"] == 9 and r["episodes"] == 5 and 0 <= r["accuracy"] <= 1 for r in out["rows"])
    assert out["descriptors"]["true-deranged"]["red circle"] != out["descriptors"]["true"]["red circle"]
    assert cli.main(["describe", str(clip_run), "--descriptors", str(table), "--classes", *classes, "--way", "2", "--episodes", "5",
                     "--query", "2", "--per-class", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["row"] for r in printed["rows"]] == [r["row"] for r in out["rows"]]
    assert cli.main(["describe", str(clip_run), "--descriptors", "none", "--classes", *classes, "--way", "2", "--episodes", "3",
                     "--query", "2", "--per-class", "3"]) == 0
    assert "true-deranged" in capsys.readouterr().out
    for argv, message in (
        (["--descriptors", str(tmp_path / "missing.json")], "does not exist"),
        (["--classes", "red circle", "blue blob"], "not a '<colour> <shape>' class"),
        (["--way", "30"], "need 2 ≤ way"),
    ):
        assert cli.main(["describe", str(clip_run), "--per-class", "3", "--query", "2", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
