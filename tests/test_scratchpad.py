"""The scratchpad GPT (issue 18 item 3): data.source=arithmetic's target formats, the loss mask, the shared problem
order, the held-out split, the random offsets, batched greedy decoding and a tiny run end to end."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewshot import api
from fewshot.config import load_config
from fewshot.data import scratchpad as sp
from fewshot.data.masking import causal_targets
from fewshot.data.reasoning import ReasoningItem, generate_items, solve
from fewshot.data.registry import load_run_data
from fewshot.data.token_ids import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.cot import example_text, extract_answer
from fewshot.evaluate.scratchpad import accuracy_by_steps, greedy_continuations, score_items
from fewshot.generate import generate
from fewshot.methods import build_method
from fewshot.methods.language import shift_right
from fewshot.models.language import GPT
from fewshot.run import Run
from fewshot.train.trainer import BatchOrder

HAND = ReasoningItem("arithmetic", "What is (2 + 3) * 2?", "2 + 3 = 5. 5 * 2 = 10.", "10")


def config(tmp_path: Path, *overrides: str):
    base = ["out=" + str(tmp_path), "data.problems=64", "data.max_steps=2", "data.seq_len=72", "encoder.options.dim=16",
            "encoder.options.depth=1", "encoder.options.heads=2", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
            "train.log_every=1"]
    return load_config(api.find_recipe("gpt-scratchpad"), base + list(overrides))


# ------------------------------------------------------------------ formats and the loss mask


def test_the_two_target_formats_of_a_hand_written_problem():
    assert sp.format_example(HAND, True) == ("Q: What is (2 + 3) * 2?\nA:", " 2 + 3 = 5. 5 * 2 = 10. The answer is 10.")
    assert sp.format_example(HAND, False) == ("Q: What is (2 + 3) * 2?\nA:", " The answer is 10.")
    for scratch in (True, False):  # the layout of a few-shot chain-of-thought example, so cot's extractor reads it
        prompt, target = sp.format_example(HAND, scratch)
        assert prompt + target + "\n\n" == example_text(HAND, scratch)
        assert extract_answer(target, "number", needs_trigger=True) == "10"


def test_generated_rationales_are_one_true_step_per_operation():
    for item in generate_items("arithmetic", 50, 0, steps=4):
        lines = item.rationale.split(". ")
        assert len(lines) == 4 and solve("arithmetic", item.question) == item.answer
        for line in lines:  # each step's arithmetic, checked independently of the generator
            lhs, rhs = line.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert int(rhs) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert lines[-1].rstrip(".").split(" = ")[1] == item.answer


def _mask_by_loop(prompt: str, target: str, seq_len: int) -> list[int]:
    """The targets by a loop over the sequence: position t predicts x[t+1] when x[t+1] is a target character or [EOS]."""
    x = [BOS_ID, *sp.encode_chars(prompt), *sp.encode_chars(target), EOS_ID]
    first_target = 1 + len(prompt)
    return [x[t + 1] if t + 1 < len(x) and t + 1 >= first_target else IGNORE_INDEX for t in range(seq_len)]


@pytest.mark.parametrize("variant", ["target only", "broken: the question too"])
def test_the_loss_mask_covers_exactly_the_target_tokens(variant):
    for scratch in (True, False):
        prompt, target = sp.format_example(HAND, scratch)
        inputs, targets = sp.encode_example(prompt, target, 80)
        if variant != "target only":  # negative control: next-token targets everywhere but padding
            targets = causal_targets(torch.cat([inputs, torch.tensor([PAD_ID])])[None]).targets[0]
            targets = targets.masked_fill(targets == PAD_ID, IGNORE_INDEX)
        assert sp.decode_chars(inputs.tolist()) == prompt + target and inputs[0] == BOS_ID
        matches = targets.tolist() == _mask_by_loop(prompt, target, 80)
        assert matches == (variant == "target only")
        if matches:
            assert int((targets != IGNORE_INDEX).sum()) == len(target) + 1


def test_the_gpt_loss_is_the_mean_over_target_positions(tmp_path):
    cfg = config(tmp_path, "data.random_offsets=false")
    torch.manual_seed(0)
    method = build_method(cfg)
    data = load_run_data(cfg.data, None, None).pretrain
    batch = data.batch(torch.arange(4))
    loss, _ = method(batch, torch.Generator().manual_seed(0))
    logits = method.language_model()(batch["tokens"])
    terms = [-F.log_softmax(logits[b, t], -1)[y] for b in range(4) for t, y in enumerate(batch["targets"][b].tolist()) if y != IGNORE_INDEX]
    assert loss.item() == pytest.approx(float(sum(terms).detach() / len(terms)), rel=1e-5)
    whole = F.cross_entropy(logits.flatten(0, 1), causal_targets(torch.cat([batch["tokens"], batch["tokens"][:, :1]], 1)).targets.flatten(),
                            ignore_index=PAD_ID)
    assert not math.isclose(loss.item(), whole.item(), rel_tol=1e-3)  # the loss over every next token is another number


# ------------------------------------------------------------------ the same problems, held-out apart


def test_both_variants_see_the_same_problems_in_the_same_order(tmp_path):
    sets = [load_run_data(config(tmp_path, f"data.scratchpad={s}").data, None, None).pretrain for s in ("true", "false")]
    assert sets[0].items == sets[1].items
    orders = [BatchOrder(len(s), 8, 0) for s in sets]
    for step in range(5):
        idx = orders[0].indices(step)
        assert torch.equal(idx, orders[1].indices(step))
        prompts = [[sp.decode_chars(row.tolist()).split("\nA:")[0] for row in s.batch(idx)["tokens"]] for s in sets]
        assert prompts[0] == prompts[1]
    assert not torch.equal(sets[0].targets, sets[1].targets)


def test_held_out_problems_are_never_trained_on():
    train = sp.training_items(3000, 1, 3, 0, 0.2)
    seen = {item.question for item in train}
    assert {len(item.rationale.split(". ")) for item in train} == {1, 2, 3}
    for steps in (1, 2, 3, 5):
        held = sp.heldout_items(60, steps, 0, 0.2)
        assert held and all(sp.is_heldout(i.question, 0, 0.2) for i in held)
        assert len({i.question for i in held}) == len(held) and not seen & {i.question for i in held}
    one_step = {i.question for i in sp.heldout_items(99, 1, 0, 0.2)}
    assert 0 < len(one_step) < 99 and {i.question for i in train if i.question.count("(") == 0} - one_step


# ------------------------------------------------------------------ random offsets


def test_random_offsets_move_each_row_within_its_padding():
    tokens, targets = sp.encode_example(*sp.format_example(HAND, True), 80)
    rows = torch.stack([tokens] * 200), torch.stack([targets] * 200)
    moved, moved_targets = shift_right(*rows, torch.Generator().manual_seed(0))
    free = int((tokens == PAD_ID).sum())
    starts = (moved == BOS_ID).long().argmax(1)
    assert set(starts.tolist()) == set(range(free + 1))  # every start from 0 to the padding's length
    for row, row_targets, s in zip(moved, moved_targets, starts.tolist()):
        assert torch.equal(row[s : s + 80 - free], tokens[: 80 - free]) and bool((row[:s] == PAD_ID).all())
        assert torch.equal(row_targets[s : s + 80 - free], targets[: 80 - free]) and bool((row_targets[:s] == IGNORE_INDEX).all())


def test_left_padding_is_invisible_to_the_real_tokens():
    """Masked left padding: the logits at a row's real tokens equal those of the same tokens with the same positions
    but padding that attends nothing else, so only the position shift is new (checked by swapping the padding id)."""
    torch.manual_seed(0)
    model = GPT(sp.VOCAB_SIZE, 48, dim=16, depth=2, heads=2).eval()
    tokens, _ = sp.encode_example("Q: What is 2 + 3?\nA:", " The answer is 5.", 48)  # 38 real tokens, 10 [PAD]
    shifted = torch.roll(tokens, 5)[None]
    other = shifted.clone()
    other[0, :5] = sp.encode_chars("99999")[0]
    with torch.no_grad():
        a = model(shifted, padding_mask=shifted == PAD_ID)
        b = model(other, padding_mask=shifted == PAD_ID)
        c = model(other)  # negative control: unmasked, the padding's content leaks in
    real = shifted[0] != PAD_ID
    assert torch.allclose(a[0, real], b[0, real], atol=1e-5) and not torch.allclose(a[0, real], c[0, real], atol=1e-3)


# ------------------------------------------------------------------ decoding and a run end to end


def test_batched_greedy_decoding_equals_generate_row_by_row():
    torch.manual_seed(1)
    model = GPT(sp.VOCAB_SIZE, 48, dim=16, depth=2, heads=2).eval()
    items = generate_items("arithmetic", 5, 0, steps=2)
    prompts = torch.tensor([[BOS_ID, *sp.encode_chars(sp.format_example(i, False)[0])] for i in items])
    got = greedy_continuations(model, prompts)
    for row, out in zip(prompts.tolist(), got):
        ref = generate(model, row[1:], 48 - len(row) + 1, temperature=0)[len(row) - 1 :]
        assert out == (ref[: ref.index(EOS_ID)] if EOS_ID in ref else ref)


def test_a_tiny_run_trains_and_is_scored_beyond_its_lengths(tmp_path):
    cfg = config(tmp_path, "name=tiny")
    api.pretrain(cfg, progress=False)
    run = Run.open(cfg.run_dir)
    assert run.step == 2 and math.isfinite(run.history[-1]["loss"])
    model = run.method().language_model()
    rows = accuracy_by_steps(model, [1, 3], 4, 0, cfg.data.heldout_fraction)
    assert [r["steps"] for r in rows] == [1, 3] and all(r["items"] == 4 and 0 <= r["correct"] <= 4 for r in rows)
    assert all(r["accuracy"] == 100 * r["correct"] / 4 for r in rows)
    scored = score_items(model, sp.heldout_items(3, 2, 0, 0.2))
    assert all((s["answer"] is None) or not s["correct"] or s["answer"] in s["output"] for s in scored)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not in the arithmetic alphabet"):
        sp.encode_chars("What is x?")
    with pytest.raises(DataError, match="does not fit data.seq_len"):
        sp.encode_example(*sp.format_example(HAND, True), 20)
    with pytest.raises(ConfigError, match="min_steps"):
        config(tmp_path, "data.min_steps=4")
    with pytest.raises(ConfigError, match="data.source=text"):
        build_method(config(tmp_path, "method.name=mlm"))


def test_the_bench_calls_a_win_only_beyond_both_cis():
    spec = importlib.util.spec_from_file_location("bench_scratchpad", Path(__file__).resolve().parents[1] / "bench" / "scratchpad.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.above_beyond_ci95({"accuracy": 50, "ci95": 5}, {"accuracy": 30, "ci95": 10})
    assert not bench.above_beyond_ci95({"accuracy": 50, "ci95": 11}, {"accuracy": 30, "ci95": 10})


@pytest.mark.parametrize("output, error", [
    (" 2 + 3 = 5. 5 * 2 = 10. The answer is 10.", "none"),
    (" 2 + 3 = 5. 5 * 3 = 15. The answer is 15.", "operand"),
    (" 2 + 3 = 5. 6 * 2 = 12. The answer is 12.", "copy"),
    (" 2 + 3 = 6. 6 * 2 = 12. The answer is 12.", "arithmetic"),
    (" 2 + 3 = 5. The answer is 5.", "too few steps"),
    (" 2 + 3 = 5. 5 * 2 = 10. 10 + 1 = 11. The answer is 11.", "too many steps"),
    (" 2 + 3 = 5. 5 * 2 = 10. The answer is 100.", "answer"),
    (" 2 + 3 = 5. 5 * = 10. The answer is 10.", "malformed"),
    (" The answer is 10.", "too few steps"),
])
def test_the_first_error_of_a_hand_written_scratchpad(output, error):
    from fewshot.evaluate.scratchpad import first_error
    assert first_error(HAND, output) == error
