"""Chain-of-thought (`fewshot icl cot`): the reasoning tasks and their solver, the answer extractor, the vote,
the two-stage zero-shot CoT, batched generation, bad input.

Models: a scripted character-level fake (its continuations are rules of the text it is given), a random
2-layer GPT-2 saved as a Hugging Face folder and a random fewshot GPT; SmolLM2 is left to bench/cot.py.
"""

import dataclasses
import json
import re

import pytest
import torch

from conftest import save_tiny_hf_gpt2
from fewshot.cli import main
from fewshot.data import reasoning
from fewshot.data.reasoning import ANSWER_KINDS, REASONING_TASKS, ReasoningItem, generate_items, solve
from fewshot.data.tokenizer import train_tokenizer
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate import cot
from fewshot.evaluate.cot import evaluate_cot, extract_answer, generate_continuations, majority_vote, run_method
from fewshot.evaluate.prompting import open_prompt_model, prefill
from fewshot.models.causal_lm import GPTPromptLM, PromptLM
from fewshot.models.language import GPT

transformers = pytest.importorskip("transformers")

OPTIONS = {"word-problems": [{"operations": 2}, {"operations": 3}, {}], "last-letters": [{"words": 2}, {"words": 4}],
           "coin-flip": [{"people": 2}, {"people": 4}], "arithmetic": [{"steps": s} for s in (1, 3, 6)]}


# ------------------------------------------------------------------ tasks and solver


@pytest.mark.parametrize("variant", ["generator", "broken coin flip (counts every person)"])
def test_the_solver_agrees_with_every_generated_answer(variant, monkeypatch):
    if variant != "generator":  # negative control: a generator bug the solver must catch
        def broken(rng, people=4):
            item = reasoning.coin_flip(rng, people)
            return dataclasses.replace(item, answer="yes" if people % 2 == 0 else "no")
        monkeypatch.setitem(reasoning._MAKERS, "coin-flip", broken)
    disagreements = 0
    for task in REASONING_TASKS:
        for options in OPTIONS[task]:
            for seed in (0, 1):
                for split in ("test", "examples"):
                    for item in generate_items(task, 150, seed, split, **options):
                        disagreements += solve(task, item.question) != item.answer
    assert (disagreements == 0) == (variant == "generator")


def test_items_are_seeded_and_their_rationales_end_in_the_answer():
    for task in REASONING_TASKS:
        a, b = generate_items(task, 30, 3), generate_items(task, 30, 3)
        assert a == b and a != generate_items(task, 30, 4)
        assert {i.question for i in a} != {i.question for i in generate_items(task, 30, 3, "examples")}
        for item in a:  # a worked example, as the prompts write it, reads back as its own answer
            assert extract_answer(f"{item.rationale} The answer is {item.answer}.", ANSWER_KINDS[task]) == item.answer
    ops = [len(re.findall(r" [-+*/] ", i.rationale)) for i in generate_items("word-problems", 200, 0)]
    assert set(ops) == {2, 3}
    assert all(len(re.findall(r" [+*] ", i.rationale)) == 5 for i in generate_items("arithmetic", 20, 0, steps=5))
    with pytest.raises(ConfigError, match="unknown reasoning task 'chess'"):
        generate_items("chess", 1)


# ------------------------------------------------------------------ extractor and vote

TABLE = [
    (" 12.", "number", "12"),
    (": 1,234 apples", "number", "1234"),
    (" -3", "number", "-3"),
    (" 7.0.", "number", "7"),
    ("She has 4 + 3 = 7 apples. Then 7 - 2 = 5. The answer is 5.", "number", "5"),
    ("3 bags, so the answer is 12, not 3.", "number", "12"),
    ("The Answer is 9. The answer is 10.", "number", "10"),
    (" none of them", "number", None),
    ("", "number", None),
    (" Yes.", "yes-no", "yes"),
    (":\n No, it is tails up.", "yes-no", "no"),
    ("It flipped twice, so yes it was. The answer is no.", "yes-no", "no"),
    (" nothing", "yes-no", None),  # "no" inside a word is not an answer
    (":\nA: The answer (Yes", "yes-no", None),  # the trigger's format hint echoed, cut short: no answer
    (" The answer (Yes or No) is no.", "yes-no", "no"),
    (": The answer (arabic numerals) is 12", "number", "12"),
    (' "nkye".', "letters", "nkye"),
    (' "n k y e"', "letters", "nkye"),
    (" NKYE.", "letters", "nkye"),
    ('The last letter of "Elon" is "n". Concatenating them is "nk". The answer is "nk".', "letters", "nk"),
    (" 42", "letters", None),
]
# a CoT rationale needs its "answer is": one cut off before it has no answer
NEEDS_TRIGGER = [("She has 4 + 3 = 7 apples. Then 7 - 2", "number", None), ('"Olivia" ends in "a", "Parker"', "letters", None),
                 ("It ends heads up. The answer is yes.", "yes-no", "yes")]


def _last_number(text, kind):
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


@pytest.mark.parametrize("extractor", ["ours", "broken: the last number"])
def test_the_extractor_on_hand_written_outputs(extractor):
    extract = extract_answer if extractor == "ours" else _last_number
    wrong = [(text, want, extract(text, kind)) for text, kind, want in TABLE if extract(text, kind) != want]
    assert (wrong == []) == (extractor == "ours"), wrong
    strict = [extract_answer(text, kind, needs_trigger=True) for text, kind, _ in NEEDS_TRIGGER]
    assert strict == [want for *_, want in NEEDS_TRIGGER]
    assert extract_answer(NEEDS_TRIGGER[0][0], "number") == "4"  # without the rule: a number from inside the rationale


VOTES = [
    (["5", "4", "5"], "5"),
    (["4", "5", "5", "4"], "4"),  # a tie: the answer sampled first
    (["5", "4", "4", "5"], "5"),
    ([None, None, "3"], "3"),  # no answer is no vote
    ([None, None], None),
    (["b", None, "a", "a", "b", "c"], "b"),
]


@pytest.mark.parametrize("vote", ["ours", "broken: ties to the smallest", "broken: None votes"])
def test_majority_vote_and_its_tie_break(vote):
    if vote == "ours":
        fn = majority_vote
    elif vote.startswith("broken: ties"):
        def fn(answers):
            real = [a for a in answers if a is not None]
            return min(real, key=lambda a: (-real.count(a), a)) if real else None
    else:
        def fn(answers):
            return max(answers, key=answers.count)
    assert all(fn(v) == want for v, want in VOTES) == (vote == "ours")


# ------------------------------------------------------------------ a scripted fake model


class ScriptedLM(PromptLM):
    """Characters as ids. After "step by step." it writes " So it is <belief>."; after an answer trigger
    ("… is") it writes the last number of the text before the trigger; then a blank line."""

    takes_padding = False

    def __init__(self, belief=41, context=4096):
        self.name, self.context, self.start_ids, self.belief = "scripted", context, [], belief

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def continuation(self, before, trigger):
        if trigger == "step by step.":
            return f" So it is {self.belief}.\n\n"
        numbers = re.findall(r"\d+", before)
        return f" {numbers[-1] if numbers else 'none'}.\n\n"

    def next_char(self, text):
        where = {t: text.rfind(t) for t in ("step by step.", "numerals) is", "answer is")}
        trigger = max(where, key=where.get)
        if where[trigger] < 0:
            return "\n"
        cut = where[trigger] + len(trigger)
        so_far, want = text[cut:], self.continuation(text[: where[trigger]], trigger)
        return want[len(so_far)] if want.startswith(so_far) and len(so_far) < len(want) else "\n"

    def step(self, ids, past):
        before = past[0][0][:, 0, :, 0].long() if past is not None else torch.zeros(1, 0, dtype=torch.long)
        full = torch.cat([before.expand(ids.shape[0], -1), ids], dim=1)
        logits = torch.zeros(ids.shape[0], ids.shape[1], 128)
        for i, row in enumerate(full.tolist()):
            logits[i, -1, ord(self.next_char(self.decode(row)))] = 1.0
        kv = full[:, None, :, None].float()
        return logits, [(kv, kv)]


def problems(n=4):
    return generate_items("word-problems", n, 0)


@pytest.mark.parametrize("variant", ["ours", "broken: stage 2 without the rationale"])
def test_zero_shot_cot_answers_from_the_generated_rationale_never_the_gold_one(variant, monkeypatch):
    if variant != "ours":
        real = cot.extraction_prompt
        monkeypatch.setattr(cot, "extraction_prompt", lambda stage_one, rationale, kind: real(stage_one, "", kind))
    items = problems()
    lm = ScriptedLM(belief=41)
    got = run_method(lm, "zero-shot-cot", items, [])
    follows = got["predictions"] == ["41"] * len(items)
    assert all(r["rationale"].strip() == "So it is 41." for r in got["records"])
    # the gold rationale changed: the prediction does not move
    moved_gold = [dataclasses.replace(it, rationale="So it is 999.") for it in items]
    assert run_method(lm, "zero-shot-cot", moved_gold, [])["predictions"] == got["predictions"]
    # the model's own rationale changed: the prediction follows it
    lm.belief = 17
    follows_new = run_method(lm, "zero-shot-cot", items, [])["predictions"] == ["17"] * len(items)
    assert (follows and follows_new) == (variant == "ours")


def test_few_shot_cot_reads_the_answer_after_the_rationale_and_counts_unextractable_answers():
    items = problems(3)
    got = run_method(ScriptedLM(), "few-shot-cot", items, generate_items("word-problems", 2, 0, "examples"))
    # the scripted model continues "A:" with nothing it can answer from: every item is wrong and reported
    assert got["unextractable"] == 3 and got["accuracy"] == 0.0 and got["predictions"] == [None] * 3
    direct = run_method(ScriptedLM(), "zero-shot", items, [])
    want = [re.findall(r"\d+", it.question)[-1] for it in items]  # the script: the question's last number
    assert direct["predictions"] == want and direct["unextractable"] == 0
    assert direct["accuracy"] == pytest.approx(sum(w == it.answer for w, it in zip(want, items)) / 3)


def test_context_overflow_says_by_how_much_and_k_below_one_is_refused():
    items, examples = problems(2), generate_items("word-problems", 8, 0, "examples")
    prompt = len("".join(cot.example_text(e, True) for e in examples))
    query = max(len(cot.question_text(it, "")) for it in items)
    lm = ScriptedLM(context=prompt + query + 10)
    with pytest.raises(DataError, match=rf"needs {prompt + query + 64} positions .* holds {prompt + query + 10}: 54 too many"):
        run_method(lm, "few-shot-cot", items, examples, max_new_tokens=64)
    assert run_method(lm, "few-shot-cot", items, examples, max_new_tokens=10)["accuracy"] == 0.0  # fits exactly
    with pytest.raises(DataError, match="zero-shot-cot prompt .* too many"):  # the rationale budget counts
        run_method(ScriptedLM(context=120), "zero-shot-cot", items, [], max_new_tokens=64)
    for k in (0, -2):
        with pytest.raises(ConfigError, match=rf"self-consistency needs k ≥ 1 sampled rationales, got {k}"):
            run_method(ScriptedLM(), "self-consistency", items, examples, samples=k)
        with pytest.raises(ConfigError, match="k ≥ 1"):
            evaluate_cot(ScriptedLM(), ["coin-flip"], ["self-consistency"], items=2, samples=k)
    with pytest.raises(ConfigError, match="unknown method 'few-shot-cat'"):
        evaluate_cot(ScriptedLM(), ["coin-flip"], ["few-shot-cat"], items=2)


# ------------------------------------------------------------------ real (tiny) models

CORPUS = " ".join(i.question + " " + i.rationale for t in REASONING_TASKS for i in generate_items(t, 20, 0)) + "\nQ: A: The answer is\n"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), CORPUS, n_positions=1024)


@pytest.fixture(scope="module")
def hf_lm(hf_folder):
    return open_prompt_model(hf_folder)


@pytest.mark.parametrize("variant", ["ours", "broken: no position ids"])
def test_a_left_padded_batch_generates_what_each_row_generates_alone(variant, hf_lm, monkeypatch):
    if variant != "ours":
        real = hf_lm.step
        monkeypatch.setattr(hf_lm, "step", lambda ids, past, attention_mask=None, position_ids=None: real(ids, past, attention_mask))
    examples = generate_items("coin-flip", 1, 0, "examples")
    past = prefill(hf_lm, hf_lm.encode(cot.example_text(examples[0], True)))
    contexts = [hf_lm.encode(cot.question_text(it, "")) for it in generate_items("last-letters", 4, 0, words=2)]
    contexts.append(contexts[0][:3])
    assert len({len(c) for c in contexts}) > 1
    batched = generate_continuations(hf_lm, past, contexts, 12, stops=())
    alone = [generate_continuations(hf_lm, past, [c], 12, stops=())[0] for c in contexts]
    assert (batched == alone) == (variant == "ours")


def tiny_gpt():
    torch.manual_seed(1)
    model = GPT(400, 1024, dim=32, depth=2, heads=4)
    return GPTPromptLM(model, train_tokenizer(CORPUS, 400), "tiny-gpt")


def test_evaluate_cot_on_both_model_kinds_is_seeded_and_counts_every_item(hf_lm):
    for lm in (hf_lm, tiny_gpt()):
        kw = {"items": 3, "max_new_tokens": 6, "answer_tokens": 3, "samples": 3, "cot_shots": 2}
        a = evaluate_cot(lm, ["coin-flip", "word-problems"], cot.METHODS, **kw)
        assert a == evaluate_cot(lm, ["coin-flip", "word-problems"], cot.METHODS, **kw)
        for row in a["tasks"].values():
            for method, cell in row["methods"].items():
                assert len(cell["correct"]) == 3 and cell["accuracy"] == pytest.approx(sum(cell["correct"]) / 3)
                assert cell["unextractable"] == sum(p is None for p in cell["predictions"])
        sc = a["tasks"]["coin-flip"]["methods"]["self-consistency"]
        for record in sc["records"]:
            assert len(record["samples"]) == 3 and record["prediction"] == majority_vote(record["votes"])
            assert record["votes"] == [extract_answer(s, "yes-no") for s in record["samples"]]
        assert a["tasks"]["coin-flip"]["methods"]["few-shot-2"]["prompt_tokens"] > 0


def test_cli_icl_cot(hf_folder, capsys):
    folder = hf_folder
    code = main(["icl", "cot", str(folder), "--tasks", "coin-flip", "--methods", "zero-shot", "few-shot-2", "--items", "2",
                 "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert set(out["tasks"]["coin-flip"]["methods"]) == {"zero-shot", "few-shot-2"}
    assert main(["icl", "cot", str(folder), "--methods", "self-consistency", "--samples", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "k ≥ 1" in err
