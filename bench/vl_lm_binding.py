"""Does the caption LM bind names in text? (issue 17's gate): a scene corpus variant → a gpt-scenes run → the text-only rows.

The text-only rows of bench/vl_in_context.py without any image model: Frozen's open-ended episodes on the scene shapes
and colours with every image replaced by its description ("a small red circle."), greedy exact match of the nonce name,
mean ± 95% CI over seeded episodes. 2-way: no induction 1 shot; induction 1 and 5 shots; induction 1 shot 3 repeats;
5-way induction 1 shot; and Fast-VQA at 1, 3 and 5 shots in words (the query scene "a red circle and a blue star.",
the answer a colour). An LM that cannot name the right word here cannot do it from an image prefix either. First the
induction diagnostics: a random sequence shown twice, and match-and-copy on the corpus's synthetic drill formats.

    OMP_NUM_THREADS=1 python bench/vl_lm_binding.py --name pD --episodes 12000 --steps 3600 \
        --corpus-options '{"open_ended": 0.7, "drill": 0.3}' train.batch_size=5 \
        "encoder.options={dim: 128, depth: 2, heads: 4, positions: rotary}"      # ≈ 7 CPU-minutes (docs/benchmarks.md)
    OMP_NUM_THREADS=1 python bench/vl_lm_binding.py --name quick --quick          # a smoke run, measures nothing
    OMP_NUM_THREADS=2 python bench/vl_lm_binding.py --name smol --lm runs/vlctx/smollm2-answers-160   # an existing LM
                                                   # (smollm2, an HF folder, e.g. from `fewshot icl tune-lm`): its rows only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reused_runs import train  # noqa: E402  (shared by the benches)

from fewshot import api
from fewshot.data import vl_prompts
from fewshot.data.vl_prompts import NONCE_NAMES, category_images, glossary, scene_corpus
from fewshot.evaluate.vl_in_context import PrefixInContext, Setting, evaluate_fast_vqa, evaluate_open_ended
from fewshot.io import atomic_write
from fewshot.models.prefix_lm import open_prefix_lm


def repeated_sequence_losses(link, pool: list[int], length: int = 40, sequences: int = 10, seed: int = 0) -> tuple[float, float]:
    """The induction diagnostic: ``sequences`` random sequences of token ids drawn from ``pool``, each shown twice after the
    start ids; the mean next-token loss (nats) over the first showing and over the second, past its first token.
    An induction head (match the current token earlier on, copy its successor) brings the second far below the first."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for _ in range(sequences):
        seq = [pool[j] for j in torch.randint(len(pool), (length,), generator=g).tolist()]
        ids = link.start_ids + seq + seq
        with torch.no_grad():
            logits, _ = link.step(link.embed(torch.tensor([ids])))
        nll = -logits[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        s = len(link.start_ids) - 1  # nll[t] is the loss of ids[t + 1]
        first.append(nll[s:s + length].mean().item())
        second.append(nll[s + length + 1:s + 2 * length].mean().item())
    return sum(first) / sequences, sum(second) / sequences


def _word_losses(link, line: str) -> list[float]:
    """The next-token loss of each space-separated word of ``line`` (its first token's), the line right after the start ids."""
    words = line.split(" ")
    pieces = [link.tokenizer.encode(w if i == 0 else f" {w}").ids for i, w in enumerate(words)]
    ids = link.start_ids + [t for p in pieces for t in p]
    with torch.no_grad():
        logits, _ = link.step(link.embed(torch.tensor([ids])))
    nll = -logits[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    starts = torch.tensor([len(link.start_ids) + sum(len(p) for p in pieces[:i]) for i in range(len(words))])
    return nll[starts - 1].tolist()


def drill_losses(link, names: list[str], lines: int = 40, seed: int = 0) -> dict[str, float]:
    """Match-and-copy on fresh lines of the corpus's own synthetic kinds (one-token names only), mean loss in nats of:
    a recall drill's values where they are listed (not predictable) and where their key is asked again (copied); a
    repeated span's words on the first and on the second showing; a keyed episode's names in its support and in the
    answers (copied from five tokens after the matching key)."""
    rng = np.random.default_rng([seed, 99])
    out: dict[str, list[float]] = {k: [] for k in ("recall listed", "recall asked", "repeat first", "repeat second", "keyed support", "keyed answer")}
    for _ in range(lines):
        line = vl_prompts._recall(rng, names)
        nll, n = _word_losses(link, line), line.split(". ", 1)[0].count(",") + 1
        out["recall listed"] += nll[2:2 * n + 1:2]
        out["recall asked"] += nll[2 * n + 2::2]
        line = vl_prompts._repeat(rng, names)
        nll, n = _word_losses(link, line), (len(line.split(" ")) - 1) // 2
        out["repeat first"] += nll[2:n + 1]
        out["repeat second"] += nll[n + 2:]
        line = vl_prompts._keyed_episode(rng, names)
        words, nll = line.split(" "), _word_losses(link, line)
        for i in range(4, len(words)):
            if words[i - 3:i] == ["this", "is", "a"]:
                out["keyed answer" if words[i - 4] == "a:" else "keyed support"].append(nll[i])
    return {k: sum(v) / len(v) for k, v in out.items()}


def text_only_rows(model: PrefixInContext, args: argparse.Namespace, result: dict) -> None:
    """The text-only rows of shapes and colours, printed and put in ``result``."""
    print(f"{args.name}: text-only exact match (%, mean ± 95% CI over {args.eval_episodes} seeded episodes)")
    for category in ("shapes", "colours"):
        cells = evaluate_open_ended(model, category_images(category, 12, 32, args.seed), SETTINGS, args.eval_episodes, args.seed, text_only=True)
        for label, cell in cells.items():
            print(f"  {category:8s} {label:55s} {cell['accuracy']:5.1f} ± {cell['ci95']:4.1f}")
        result[category] = {label: [round(c["accuracy"], 1), round(c["ci95"], 1)] for label, c in cells.items()}
    vqa = evaluate_fast_vqa(model, VQA_SHOTS, args.eval_episodes, args.seed, text_only=True)
    print("  fast-vqa " + "  ".join(f"{k} shot(s) {c['accuracy']:5.1f} ± {c['ci95']:4.1f}" for k, c in vqa.items()))
    result["fast_vqa"] = {k: [round(c["accuracy"], 1), round(c["ci95"], 1)] for k, c in vqa.items()}


VQA_SHOTS = (1, 3, 5)  # Fast-VQA in words: each support image and the two-object query scene described
SETTINGS = (Setting(2, 1, 0, False), Setting(2, 1, 0, True), Setting(2, 5, 0, True), Setting(2, 1, 3, True), Setting(5, 1, 0, True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="the run's name (a finished run of that name is reused)")
    p.add_argument("--out", default="runs/binding")
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--episodes", type=int, default=8000, help="text episodes in the corpus")
    p.add_argument("--corpus-options", default="{}", help="JSON keyword arguments of scene_corpus (open_ended, drill, uniform, recall, repeat, statements)")
    p.add_argument("--corpus", help="an existing corpus file instead of a new one")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny corpus, model and episode count; measures nothing")
    p.add_argument("--lm", help="score this LM instead (smollm2, a Hugging Face folder or a gpt run): no corpus, no training, no diagnostics")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the gpt-scenes recipe")
    args = p.parse_args()
    if args.lm:
        started = time.process_time()
        model = PrefixInContext(open_prefix_lm(args.lm), None, args.name)
        result = {"name": args.name, "lm": args.lm}
        text_only_rows(model, args, result)
        result["eval_cpu_minutes"] = round((time.process_time() - started) / 60, 2)
        print(json.dumps(result))
        return
    if args.quick:
        args.captions, args.episodes, args.steps, args.eval_episodes = 200, 200, 4, 3
        args.overrides += ["encoder.options={dim: 32, depth: 1, heads: 2}", "train.batch_size=2"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else out / f"corpus-{args.name}.txt"
    if not corpus.is_file():
        text = scene_corpus(args.captions, args.episodes, args.seed, **json.loads(args.corpus_options))
        atomic_write(corpus, lambda tmp: tmp.write_text(text))
    config = api.load_config(api.find_recipe("gpt-scenes"), [
        f"data.path={corpus}", f"out={out}", f"name={args.name}", f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
        f"train.warmup_steps={min(25, args.steps // 10)}", *args.overrides])
    train_cpu = train(config)
    eval_cpu = time.process_time()
    link = open_prefix_lm(config.run_dir)
    model = PrefixInContext(link, None, args.name)
    result: dict = {"name": args.name, "corpus": str(corpus), "steps": args.steps, "overrides": args.overrides,
                    "train_cpu_minutes": None if train_cpu is None else round(train_cpu / 60, 2)}
    glossary_size = json.loads(args.corpus_options).get("glossary_size", 100)
    words = [w for w in glossary(glossary_size, args.seed) + list(NONCE_NAMES) if len(link.tokenizer.encode(f" {w}").ids) == 1]
    names = [link.tokenizer.encode(f" {w}").ids[0] for w in words]
    for label, pool in (("any token", list(range(20, link.vocab_size))), ("names", names)):
        first, second = repeated_sequence_losses(link, pool, seed=args.seed)
        result[f"repeated_sequence_nll ({label})"] = [round(first, 2), round(second, 2)]
        print(f"{args.name}: a random 40-token sequence ({label}) shown twice: {first:.2f} nats per token on the first showing, "
              f"{second:.2f} on the second")
    drills = drill_losses(link, words, seed=args.seed)
    result["drill_nll"] = {k: round(v, 2) for k, v in drills.items()}
    print(f"{args.name}: match-and-copy on fresh synthetic lines (nats): " + ", ".join(f"{k} {v:.2f}" for k, v in drills.items()))
    text_only_rows(model, args, result)
    result["eval_cpu_minutes"] = round((time.process_time() - eval_cpu) / 60, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
