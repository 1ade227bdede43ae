"""Multimodal-CoT on scene questions: the generated answers against the scene world's own parser, the loss on the
target only, stage 2 reading the generated rationale (never the gold one), the blind model, and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch

from fewshot.api import find_recipe, load_config, pretrain
from fewshot.data.scene_questions import (
    ANSWERS, QUESTION_KINDS, SceneQuestionSet, encode_stage, stage_text, evaluation_items, training_items,
)
from fewshot.data.scenes import COLOURS, PLURALS, caption_is_true
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.data.tokenizer import train_tokenizer
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.mm_cot import answers_from_rationales, evaluate_mm_cot, rationale_then_answer, scene_images
from fewshot.methods import build_method
from fewshot.methods.mm_cot import answer_labels
from fewshot.objectives.captioning import append_eos
from test_captioning import CORPUS, _save_run

QUESTIONS = [*training_items(300, 0, 0), *evaluation_items(150, 1, 0, "seen"), *evaluation_items(150, 1, 0, "held-out")]
SHAPE_OF = {plural: shape for shape, plural in PLURALS.items()}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _checks(item) -> list[tuple[str, bool]]:
    """(statement, whether the scene parser must find it true) for the item's answer, from the question text alone."""
    if item.kind == "count":
        what = re.fullmatch(r"how many (.+) are there\?", item.question).group(1)
        n = ("zero", "one", "two", "three", "four", "five").index(item.answer)
        if what.endswith(" shapes"):
            colour = what.split()[0]
            phrase = lambda k: f"there {'is' if k == 1 else 'are'} {('zero', 'one', 'two', 'three', 'four', 'five')[k]} {colour} shape{'s' if k != 1 else ''}"
        else:
            shape = SHAPE_OF[what]
            phrase = lambda k: f"there {'is' if k == 1 else 'are'} {('zero', 'one', 'two', 'three', 'four', 'five')[k]} {shape if k == 1 else what}"
        return [(phrase(n), True), (phrase(n + 1), False), (phrase(n - 1), False)]
    if item.kind == "size":
        a, b = re.fullmatch(r"is the (.+) bigger than the (.+)\?", item.question).groups()
        return [(f"{_article(a)} is bigger than {_article(b)}", item.answer == "yes")]
    side, b = re.fullmatch(r"what colour is the shape (left of|right of|above|below) the (.+)\?", item.question).groups()
    return [(f"{_article(c + ' shape')} is {side} {_article(b)}", c == item.answer) for c in COLOURS]


def test_every_answer_agrees_with_the_scene_parser():
    assert {item.kind for item in QUESTIONS} == set(QUESTION_KINDS)
    for item in QUESTIONS:
        for statement, truth in _checks(item):
            assert caption_is_true(statement, item.scene) == truth, (item.question, item.answer, statement)


def test_a_wrong_answer_fails_the_parser_check():
    """Negative control: the same checks reject every item whose answer is swapped for another of its kind."""
    for item in QUESTIONS[:60]:
        wrong = {"count": {"one": "two", "two": "three", "three": "one"}, "size": {"yes": "no", "no": "yes"}}.get(item.kind)
        other = wrong[item.answer] if wrong else next(c for c in COLOURS if c != item.answer)
        broken = dataclasses.replace(item, answer=other)
        assert not all(caption_is_true(s, broken.scene) == t for s, t in _checks(broken))


def test_the_rationales_state_true_facts():
    for item in QUESTIONS:
        if item.kind == "size":
            for desc, size in re.findall(r"the ([a-z -]+?) is (small|large)\.", item.rationale):
                assert caption_is_true(f"there is {_article(size + ' ' + desc)}", item.scene), item.rationale
        elif item.kind == "relation":
            obj = re.search(r" is (an? [a-z -]+)\.$", item.rationale).group(1)
            assert obj.split()[2] == item.answer and caption_is_true(f"there is {obj}", item.scene)
        else:
            listed = re.fullmatch(r"i see (.+)\. that is (\w+)\.", item.rationale).groups()
            assert listed[1] == item.answer and all(caption_is_true(f"there is {p.strip()}", item.scene)
                                                    for p in re.split(r", | and ", listed[0]))


def test_answers_are_balanced_by_construction():
    counts = Counter((item.kind, item.answer) for item in training_items(1200, 3, 0))
    for kind, answers in ANSWERS.items():
        shares = [counts[(kind, {True: "yes", False: "no"}.get(a, a) if kind == "size" else
                          (("one", "two", "three")[a - 1] if kind == "count" else a))] for a in answers]
        assert min(shares) > 0.5 * max(shares), (kind, shares)


@pytest.mark.parametrize("variant", ["seen pairs", "every pair (negative control)"])
def test_heldout_compositions_hold_a_pair_training_never_draws(variant, monkeypatch):
    import fewshot.data.scene_questions as sq
    from fewshot.data.scenes import heldout_pairs

    held = heldout_pairs(0)
    if variant != "seen pairs":  # a broken split: training draws from every pair
        monkeypatch.setattr(sq, "seen_pairs", lambda heldout: [(s, c) for s in sq.PRETRAIN_SHAPES for c in COLOURS])
    assert all(any((o.shape, o.colour) in held for o in item.scene.objects) for item in evaluation_items(50, 1, 0, "held-out"))
    leaks = any((o.shape, o.colour) in held for item in sq.training_items(300, 0, 0) for o in item.scene.objects)
    assert leaks == (variant != "seen pairs")


# ----------------------------------------------------------------------------- the method

@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmcot")
    torch.manual_seed(0)
    config = load_config(overrides=["method=gpt", "data.source=text", "data.seq_len=300", "data.vocab_size=400", "encoder=text-transformer",
                                    "encoder.options={dim: 16, depth: 1, heads: 2}", "name=gpt", f"out={root}"])
    gpt = build_method(config)
    text = CORPUS + "\n" + "\n".join(" ".join(stage_text(item, "answer-from-rationale")) for item in QUESTIONS[:200])
    return _save_run(config, gpt, train_tokenizer(text, 400))


def _config(lm_run, tmp_path, *overrides):
    return load_config(find_recipe("mm-cot-scenes"), [f"method.lm.init={lm_run}", f"out={tmp_path}", "data.questions=16", "data.seq_len=60",
                                                       "data.image_size=16", "train.batch_size=4", "train.steps=2", "train.log_every=1",
                                                       "train.warmup_steps=1", "train.checkpoint_every=2", *overrides])


def test_labels_cover_the_target_and_its_eos_only():
    ids = torch.tensor([[7, 8, 9, 10, 2, 0], [7, 11, 12, 2, 0, 0]])  # prompt 2 / 1 ids, then target, EOS (=2), padding
    labels = answer_labels(3, ids, torch.tensor([2, 1]))
    ignore = IGNORE_INDEX
    assert labels.tolist() == [[ignore] * 3 + [ignore, ignore, 9, 10, 2, ignore], [ignore] * 3 + [ignore, 11, 12, 2, ignore, ignore]]


@pytest.mark.parametrize("variant", ["answer_labels", "captioning labels (counts the prompt)"])
def test_the_loss_equals_a_hand_computed_loss_on_the_target(lm_run, tmp_path, variant, monkeypatch):
    config = _config(lm_run, tmp_path, "data.target=rationale")
    method = build_method(config).eval()
    if variant != "answer_labels":  # negative control: a variant whose labels keep the prompt
        import fewshot.methods.mm_cot as mm
        from fewshot.objectives.captioning import caption_labels

        monkeypatch.setattr(mm, "answer_labels", lambda before, ids, lengths: caption_labels(before, ids))
    tok = method.language_model.tokenizer
    items = QUESTIONS[:3]
    data = SceneQuestionSet(items, tok, "rationale", 60, 16)
    batch = data.batch(torch.arange(3))
    loss, _ = method(batch, torch.Generator().manual_seed(0))
    # by hand: for each item, −log p(token | everything before) over the rationale's tokens and the EOS
    link, total, count = method.language_model, 0.0, 0
    for r, item in enumerate(items):
        prompt, target = stage_text(item, "rationale")
        p = tok.encode(prompt, add_special_tokens=False).ids
        t = tok.encode(target, add_special_tokens=False).ids + [link.eos_id]
        seq = torch.cat([link.prefix_sequence(method.prefix(batch["images"][r : r + 1])), link.embed(torch.tensor([p + t]))], dim=1)
        logp = link.step(seq)[0].log_softmax(-1)[0]
        start = len(link.start_ids) + method.prefix_length + len(p)
        for j, token in enumerate(t):
            total -= float(logp[start + j - 1, token].detach())
            count += 1
    assert (abs(float(loss.detach()) - total / count) < 1e-4) == (variant == "answer_labels")


def test_training_and_reopening_through_the_recipe(lm_run, tmp_path):
    config = _config(lm_run, tmp_path, "data.target=answer-from-rationale", "name=stage2")
    pretrain(config, progress=False)
    items = evaluation_items(4, 1, 0)
    from fewshot.evaluate.mm_cot import open_mm_cot_run

    model = open_mm_cot_run(config.run_dir)
    answers = answers_from_rationales(model, scene_images(items, 16), items, [i.rationale for i in items])
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def _padded_batch(method, images, prompts, max_tokens):
    """The broken variant: every prompt right-padded with [PAD] to the longest and decoded in one batch."""
    from fewshot.models.prefix_lm import greedy

    link = method.language_model
    ids = [link.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    width = max(map(len, ids))
    prompt = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in ids])
    prefix = torch.cat([method.prefix(images), link.embed(prompt)], dim=1)
    with torch.no_grad():
        return [link.decode(row).strip() for row in greedy(link, prefix, max_tokens)]


@pytest.mark.parametrize("variant", ["grouped by length", "padded batch (negative control)"])
def test_grouped_decoding_equals_one_row_at_a_time(lm_run, tmp_path, variant):
    method = build_method(_config(lm_run, tmp_path)).eval()
    items = QUESTIONS[:8]
    images = scene_images(items, 16)
    prompts = [stage_text(item, "rationale")[0] for item in items]
    assert len({len(method.language_model.tokenizer.encode(p, add_special_tokens=False).ids) for p in prompts}) > 1
    if variant == "grouped by length":
        together = method.complete(images, prompts, max_tokens=6)
    else:
        together = _padded_batch(method, images, prompts, 6)
    alone = [method.complete(images[i : i + 1], prompts[i : i + 1], max_tokens=6)[0] for i in range(len(items))]
    assert (together == alone) == (variant == "grouped by length")


@pytest.mark.parametrize("blind", [True, False])
def test_the_blind_model_sees_no_image(lm_run, tmp_path, blind):
    method = build_method(_config(lm_run, tmp_path, f"method.blind={str(blind).lower()}")).eval()
    images = scene_images(QUESTIONS[:2], 16)
    same = torch.equal(method.prefix(images[:1]), method.prefix(images[1:2]))
    assert same == blind  # the non-blind model is the negative control


# ----------------------------------------------------------------------------- stage 2 reads stage 1's rationale


class HashModel:
    """A stand-in model whose output is a digest of each prompt: any change of what it reads moves its prediction."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def complete(self, images, prompts):
        self.prompts += prompts
        return [hashlib.sha256(p.encode()).hexdigest()[:8] for p in prompts]


def _changed_gold(items):
    return [dataclasses.replace(item, rationale="the gold rationale was changed.") for item in items]


@pytest.mark.parametrize("path", ["rationale-then-answer", "gold rationale (negative control)"])
def test_stage_two_reads_the_generated_rationale_never_the_gold_one(path):
    items = QUESTIONS[:10]
    images = torch.zeros(len(items), 3, 8, 8)

    def predict(these):
        stage1, stage2 = HashModel(), HashModel()
        if path == "rationale-then-answer":
            _, answers = rationale_then_answer(stage1, stage2, images, these)
        else:
            answers = answers_from_rationales(stage2, images, these, [item.rationale for item in these])
        return answers, stage2.prompts

    before, prompts = predict(items)
    after, _ = predict(_changed_gold(items))
    reads_gold = any(item.rationale in p for item, p in zip(items, prompts))
    assert (before == after) == (path == "rationale-then-answer")
    assert reads_gold == (path != "rationale-then-answer")


def test_a_trained_stage_two_does_not_move_when_the_gold_rationale_changes(lm_run, tmp_path):
    stage1 = build_method(_config(lm_run, tmp_path, "data.target=rationale")).eval()
    stage2 = build_method(_config(lm_run, tmp_path, "data.target=answer-from-rationale")).eval()
    items = QUESTIONS[:6]
    images = scene_images(items, 16)
    assert rationale_then_answer(stage1, stage2, images, items) == rationale_then_answer(stage1, stage2, images, _changed_gold(items))


def test_evaluate_reports_every_row_on_both_splits(lm_run, tmp_path):
    runs = {}
    for name, extra in {"direct": [], "rationale": ["data.target=rationale"], "answer": ["data.target=answer-from-rationale"],
                        "blind": ["method.blind=true"]}.items():
        config = _config(lm_run, tmp_path, f"name={name}", "train.steps=1", "train.checkpoint_every=1", *extra)
        pretrain(config, progress=False)
        runs[name] = config.run_dir
    out = evaluate_mm_cot(runs, n=6)
    assert set(out["rows"]) == {"direct", "rationale-then-answer", "gold rationale", "blind"}
    assert all(set(cells) == {"seen", "held-out"} and cells["seen"]["n"] == 6 for cells in out["rows"].values())


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(lm_run, tmp_path):
    with pytest.raises(ConfigError, match="data.source=scene-questions"):
        build_method(load_config(overrides=["method=mm-cot", f"method.lm.init={lm_run}", "data.source=digits", f"out={tmp_path}"]))
    with pytest.raises(ConfigError, match="needs a causal LM"):
        build_method(load_config(find_recipe("mm-cot-scenes"), [f"out={tmp_path}"]))
    tok = train_tokenizer(CORPUS, 300)
    with pytest.raises(DataError, match=r"needs \d+ tokens with its EOS, \d+ more than data.seq_len=8"):
        encode_stage(tok, QUESTIONS[0], "rationale", 8)
    with pytest.raises(DataError, match="unknown data.target"):
        stage_text(QUESTIONS[0], "explanation")
    with pytest.raises(ConfigError, match="data.target"):
        load_config(find_recipe("mm-cot-scenes"), ["data.target=explanation"])
    from fewshot.data.scene_questions import load_scene_questions

    with pytest.raises(DataError, match="tokenized with the method's language model"):
        load_scene_questions(load_config(find_recipe("mm-cot-scenes")).data, None, None)
    method = build_method(_config(lm_run, tmp_path)).eval()
    with pytest.raises(ConfigError, match=r"a prompt of 310 tokens after 5 start and prefix positions leaves nothing to generate in gpt's context of 301: 15 position\(s\) too many"):
        method.complete(torch.zeros(1, 3, 16, 16), ["a" * 310])
    with pytest.raises(ConfigError, match="is a gpt run, not an mm-cot run"):
        from fewshot.evaluate.mm_cot import open_mm_cot_run

        open_mm_cot_run(lm_run)


def test_the_cli_evaluates_and_refuses_no_runs(lm_run, tmp_path, capsys):
    from fewshot.cli import main

    config = _config(lm_run, tmp_path, "name=direct-cli", "train.steps=1", "train.checkpoint_every=1")
    pretrain(config, progress=False)
    assert main(["icl", "mm-cot", "--direct", str(config.run_dir), "--n", "4", "--json"]) in (0, None)
    assert '"direct"' in capsys.readouterr().out
    assert main(["icl", "mm-cot"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least one run" in err[0]
