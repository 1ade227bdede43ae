"""Chain-of-thought prompting (issue 18): SmolLM2-135M-Instruct on generated reasoning tasks, beside the lecture's table.

Rows as in the lecture (Kojima et al. 2022, Table: Zero-Shot, Few-Shot 2, Few-Shot 8, Zero-Shot-CoT) plus Few-Shot-CoT
(Wei et al. 2022) and self-consistency (Wang et al. 2023, over the few-shot-CoT prompt); columns: the MultiArith-style
word problems, last-letter concatenation and coin flip of ``fewshot.data.reasoning`` (``--items`` seeded test
items each; worked examples from the separate ``examples`` stream). Accuracy % ± 95% CI over items (each right or
wrong; 1.96·std/√n). The lecture's rows (~100B-parameter models) are printed beside ours for the layout only.

Verdicts per task, "beyond the CIs" meaning the lower end of one CI above the upper end of the other:
zero-shot CoT against zero-shot (Kojima), few-shot CoT against few-shot 8 (Wei), and the best CoT row against
the best direct row ("CoT helps"). One JSON line at the end.

    OMP_NUM_THREADS=1 python bench/cot.py            # 50 items, k = 3: 21 CPU-minutes measured on one thread (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

from fewshot.data.reasoning import generate_items
from fewshot.evaluate.cot import cot_table, evaluate_cot, example_text
from fewshot.evaluate.prompting import open_prompt_model
from fewshot.evaluate.runner import above_beyond_ci95

LECTURE = {  # Kojima et al. 2022 as quoted in the lecture (%, ~100B-parameter models)
    "MultiArith": {"zero-shot": 17.7, "few-shot-2": 33.7, "few-shot-8": 33.8, "zero-shot-cot": 78.7},
    "GSM8K": {"zero-shot": 10.4, "few-shot-2": 15.6, "few-shot-8": 15.6, "zero-shot-cot": 40.7},
}
DIRECT = ("zero-shot", "few-shot-2", "few-shot-8")
COT = ("zero-shot-cot", "few-shot-cot", "self-consistency")


def verdicts(out: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for task, row in out["tasks"].items():
        m = row["methods"]
        best_direct = max((m[k] for k in DIRECT if k in m), key=lambda c: c["accuracy"], default=None)
        best_cot = max((m[k] for k in COT if k in m), key=lambda c: c["accuracy"], default=None)
        result[task] = {
            "zero_shot_cot_beats_zero_shot": above_beyond_ci95(m["zero-shot-cot"], m["zero-shot"]) if {"zero-shot-cot", "zero-shot"} <= set(m) else None,
            "few_shot_cot_beats_few_shot_8": above_beyond_ci95(m["few-shot-cot"], m["few-shot-8"]) if {"few-shot-cot", "few-shot-8"} <= set(m) else None,
            "cot_helps": above_beyond_ci95(best_cot, best_direct) if best_cot and best_direct else None,
            "cot_hurts": above_beyond_ci95(best_direct, best_cot) if best_cot and best_direct else None,
        }
    return result


def gold_lengths(lm, tasks: list[str], seed: int, n: int = 200) -> dict[str, int]:
    """The longest gold rationale + answer sentence in ids: what a rationale budget has to hold."""
    return {t: max(len(lm.encode(" " + example_text(it, True).split("\nA: ", 1)[1])) for it in generate_items(t, n, seed, "examples"))
            for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", nargs="+", default=["word-problems", "last-letters", "coin-flip"])
    parser.add_argument("--methods", nargs="+", default=[*DIRECT, *COT])
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--samples", type=int, default=3, help="self-consistency's k")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=72, help="rationale budget (the longest gold rationale + answer is 66 ids)")
    parser.add_argument("--cot-shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.process_time()
    lm = open_prompt_model(args.model)
    load_s = time.process_time() - start
    lengths = gold_lengths(lm, args.tasks, args.seed)
    print(f"{lm.name} loaded in {load_s:.1f} CPU-s; longest gold rationale + answer (ids): {lengths} (budget {args.max_new_tokens})", flush=True)
    cpu: dict[str, float] = {}
    out: dict[str, Any] = {}
    for task in args.tasks:
        t0 = time.process_time()
        got = evaluate_cot(lm, [task], args.methods, args.items, args.seed, args.max_new_tokens, samples=args.samples,
                           temperature=args.temperature, top_k=args.top_k, cot_shots=args.cot_shots, log=lambda s: print(s, flush=True))
        cpu[task] = round(time.process_time() - t0, 1)
        if not out:
            out = got
        else:
            out["tasks"].update(got["tasks"])
    print(f"\nAccuracy (%, ± 95% CI over {args.items} items; [unextractable answers, counted wrong]) of {lm.name}:")
    print(cot_table(out))
    majority = {t: Counter(it.answer for it in generate_items(t, args.items, args.seed)).most_common(1)[0] for t in args.tasks}
    print("always the commonest gold answer: " + ", ".join(f"{t} {100 * n / args.items:.1f} ({a!r})" for t, (a, n) in majority.items()))
    print("\nThe most common prediction and its share of the items (one answer to everything scores its share of the golds):")
    for method in out["methods"]:
        print(f"{method:<18}" + "".join(f"{str(c['most_common_prediction'])[:8]:>14} {100 * c['most_common_share']:5.1f}"
                                        for c in (out["tasks"][t]["methods"][method] for t in out["tasks"])))
    print("\nThe lecture's rows (Kojima et al. 2022, ~100B parameters; %):")
    print(f"{'method':<18}" + "".join(f"{name:>14}" for name in LECTURE))
    for method in DIRECT + ("zero-shot-cot",):
        print(f"{method:<18}" + "".join(f"{LECTURE[name][method]:>14.1f}" for name in LECTURE))
    verdict = verdicts(out)
    print("\nverdicts:", json.dumps(verdict))
    for task, row in out["tasks"].items():  # one output per CoT row, to read what the model wrote
        for method in COT:
            if method in row["methods"] and row["methods"][method]["records"]:
                r = row["methods"][method]["records"][0]
                text = r.get("rationale", "") + " || " + str(r.get("output", r.get("samples", [""])[0]))
                print(f"[{task} / {method}] gold {r['gold']}, predicted {r['prediction']}: {text[:240]!r}")
    total = time.process_time() - start
    summary = {
        "bench": "cot", "model": lm.name, "items": args.items, "samples": args.samples, "temperature": args.temperature, "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens, "cot_shots": args.cot_shots, "seed": args.seed, "gold_rationale_ids": lengths,
        "accuracy": {t: {m: [round(100 * c["accuracy"], 1), round(100 * c["ci95"], 1), c["unextractable"]] for m, c in row["methods"].items()}
                     for t, row in out["tasks"].items()},
        "majority_baseline": {t: round(100 * n / args.items, 1) for t, (_, n) in majority.items()},
        "most_common_prediction": {t: {m: [c["most_common_prediction"], round(100 * c["most_common_share"], 1)] for m, c in row["methods"].items()}
                                   for t, row in out["tasks"].items()},
        "verdicts": verdict, "cpu_s": {"load": round(load_s, 1), **cpu}, "cpu_minutes": round(total / 60, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
