"""Few-shot prompting (issue 15, item 4): SmolLM2-135M-Instruct and fewshot's tinyshakespeare GPT against K.

No gradient step: K "input -> label" lines after the task description, then the query. Word categories
(real, nonce and flipped labels: rank classification of the labels) and GPT-3's word scrambles on the
tinyshakespeare vocabulary (greedy generation, exact match); accuracy ± 95% CI over ``--draws`` seeded
draws of the examples, their order and ``--queries`` queries (the same draws at every K). Then fewshot's
own GPT (the gpt-shakespeare recipe cut to ``--gpt-steps`` steps, or the run already in ``--gpt-run``)
on the same tasks, reported as it is (a prompt longer than its 129 positions is n/a). ``--choices M`` also
scores the scrambles as M-way multiple choice (rank the word among M vocabulary words of its length), beside the
hand-made rule a user would try first: pick the candidate whose letters are the scrambled word's (letter counts).

Verdicts, at the largest K against K = 0: "beats" when the lower end of its CI is above the upper
end of zero-shot's; the nonce labels "rise" when the largest K beats K = 0 that way, and "monotone"
when no K's mean is below the previous K's. One JSON line at the end.

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data python bench/icl_prompt.py
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from fewshot import api
from fewshot.errors import DataError
import numpy as np

from fewshot.evaluate.prompting import CATEGORY_TASKS, SCRAMBLES, evaluate_prompting, load_task, open_prompt_model, prompt_table
from fewshot.evaluate.runner import above_beyond_ci95, mean_ci95
from fewshot.train.trainer import checkpoint_path


def beats(row: dict[str, Any], k: int, base: int = 0) -> bool:
    """K's accuracy exceeds ``base``'s by more than both 95% CIs (:func:`above_beyond_ci95` on the row's two cells)."""
    return above_beyond_ci95(row["by_k"][str(k)], row["by_k"][str(base)])


def verdicts(out: dict[str, Any], k_max: int) -> dict[str, Any]:
    rows = out["tasks"]
    result = {"few_beats_zero": {name: beats(row, k_max) for name, row in rows.items()},
              "beats_zero_at": {name: [k for k in out["shots"] if k > 0 and beats(row, k)] for name, row in rows.items()}}
    result["every_task"] = all(result["few_beats_zero"].values())
    if "categories-nonce" in rows:
        means = [rows["categories-nonce"]["by_k"][str(k)]["accuracy"] for k in out["shots"]]
        result["nonce_rises"] = beats(rows["categories-nonce"], k_max)
        result["nonce_monotone"] = all(b >= a for a, b in zip(means, means[1:]))
    return result


def letter_match(scrambled: str, candidates: list[str]) -> str:
    """The candidate whose letter counts are closest (L1) to the scrambled word's letters (marks and spaces dropped);
    ties go to the first listed."""
    letters = [c for c in scrambled if c.isalpha()]
    distance = [sum(abs(letters.count(ch) - word.count(ch)) for ch in set(letters) | set(word)) for word in candidates]
    return candidates[int(np.argmin(distance))]


def letter_match_rows(tasks: list[str], choices: int, draws: int, queries: int, seed: int) -> dict[str, Any]:
    """Accuracy ± 95% CI of :func:`letter_match` on the very draws and candidates ``evaluate_prompting`` scores."""
    rows = {}
    for name in tasks:
        task = load_task(name, seed, choices=choices)
        accuracy = []
        for d in range(draws):
            picked = np.random.default_rng([seed, d, 0]).choice(len(task.queries), queries, replace=False)
            accuracy.append(np.mean([letter_match(task.queries[int(i)][0], task.candidates[int(i)]) == task.queries[int(i)][1] for i in picked]))
        mean, ci = mean_ci95(accuracy)
        rows[name] = {"accuracy": mean, "ci95": ci}
    return rows


def train_or_reuse_gpt(run_dir: str, steps: int) -> dict[str, Any]:
    """The gpt-shakespeare recipe with ``steps`` steps into ``run_dir``, unless a checkpoint is there already."""
    out, name = run_dir.rsplit("/", 1)
    overrides = [f"out={out}", f"name={name}", f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                 f"train.checkpoint_every={steps}"]
    config = api.load_config(api.find_recipe("gpt-shakespeare"), overrides)
    if checkpoint_path(config.run_dir).exists():
        return {"reused": True}
    start = time.process_time()
    result = api.pretrain(config, progress=False)
    return {"reused": False, "steps": result.step, "final_loss": result.history[-1]["loss"], "cpu_s": round(time.process_time() - start, 1)}


def gpt_rows(lm, tasks: list[str], shots: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Per (task, K) so that a prompt too long for the GPT is one n/a cell (the draws do not depend on K)."""
    rows: dict[str, Any] = {}
    for task in tasks:
        for k in shots:
            try:
                got = evaluate_prompting(lm, [task], [k], args.draws, args.queries, args.seed)["tasks"][task]
                rows.setdefault(task, {**got, "by_k": {}})["by_k"][str(k)] = got["by_k"][str(k)]
            except DataError as error:
                rows.setdefault(task, {"by_k": {}})["by_k"][str(k)] = {"n/a": str(error)}
    return rows


def gpt_table(rows: dict[str, Any], shots: list[int]) -> str:
    lines = [f"{'task':<20}" + "".join(f"{'K=' + str(k):>15}" for k in shots)]
    for name, row in rows.items():
        cells = []
        for k in shots:
            cell = row["by_k"][str(k)]
            cells.append(f"{'n/a':>15}" if "n/a" in cell else f"{100 * cell['accuracy']:>8.1f} ± {100 * cell['ci95']:<4.1f}")
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--extra-shots", type=int, nargs="*", default=[16], help="more K for the word-category tasks only")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scrambles", nargs="*", default=list(SCRAMBLES))
    parser.add_argument("--gpt-run", default="runs/icl-prompt/gpt-shakespeare")
    parser.add_argument("--gpt-steps", type=int, default=100, help="training steps when the GPT run does not exist yet")
    parser.add_argument("--skip-gpt", action="store_true")
    parser.add_argument("--skip-categories", action="store_true")
    parser.add_argument("--choices", type=int, default=0, help="also score the scrambles as M-way multiple choice (0: no)")
    args = parser.parse_args()
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    cpu: dict[str, float] = {}

    t = time.process_time()
    lm = open_prompt_model("smollm2")
    cpu["smollm2_load"] = time.process_time() - t
    k_max = max(args.shots)
    smol: dict[str, Any] = {"verdicts": {"few_beats_zero": {}, "every_task": True}}
    if not args.skip_categories:
        t = time.process_time()
        classify = evaluate_prompting(lm, list(CATEGORY_TASKS), [*args.shots, *args.extra_shots], args.draws, args.queries, args.seed, log=print)
        cpu["smollm2_categories"] = time.process_time() - t
        smol.update(categories=classify, verdicts=verdicts(classify, k_max))
        print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1), accuracy % ± 95% CI over {args.draws} draws × {args.queries} queries:")
        print(prompt_table(classify))
    if args.scrambles:  # --scrambles with no names: the word categories alone
        t = time.process_time()
        smol["scrambles"] = evaluate_prompting(lm, args.scrambles, args.shots, args.draws, args.queries, args.seed, log=print)
        cpu["smollm2_scrambles"] = time.process_time() - t
        smol["verdicts"]["scrambles"] = verdicts(smol["scrambles"], k_max)
        smol["verdicts"]["every_task"] = smol["verdicts"]["every_task"] and smol["verdicts"]["scrambles"]["every_task"]
        print(prompt_table(smol["scrambles"]))
    if args.scrambles and args.choices:
        t = time.process_time()
        smol["scrambles_choice"] = evaluate_prompting(lm, args.scrambles, args.shots, args.draws, args.queries, args.seed, log=print,
                                                      choices=args.choices)
        cpu["smollm2_scrambles_choice"] = time.process_time() - t
        smol["verdicts"]["scrambles_choice"] = verdicts(smol["scrambles_choice"], k_max)
        print(f"the scrambles as {args.choices}-way multiple choice:\n" + prompt_table(smol["scrambles_choice"]))
        smol["letter_match"] = letter_match_rows(args.scrambles, args.choices, args.draws, args.queries, args.seed)
        print("hand-made rule (the candidate with the scrambled word's letters): "
              + ", ".join(f"{k} {100 * v['accuracy']:.1f} ± {100 * v['ci95']:.1f}" for k, v in smol["letter_match"].items()))
    del lm
    v = smol["verdicts"]
    print(f"few-shot (K={k_max}) beats zero-shot by more than the CIs: {v['few_beats_zero']} "
          f"{v.get('scrambles', {}).get('few_beats_zero', '')} {v.get('scrambles_choice', {}).get('few_beats_zero', '')}; "
          f"nonce rises: {v.get('nonce_rises')}, monotone: {v.get('nonce_monotone')}")

    gpt: dict[str, Any] = {}
    if not args.skip_gpt:
        t = time.process_time()
        gpt["training"] = train_or_reuse_gpt(args.gpt_run, args.gpt_steps)
        cpu["gpt_training"] = time.process_time() - t
        t = time.process_time()
        gpt_lm = open_prompt_model(args.gpt_run)
        gpt["tasks"] = gpt_rows(gpt_lm, list(CATEGORY_TASKS) + args.scrambles, args.shots, args)
        cpu["gpt_prompting"] = time.process_time() - t
        print(f"\nfewshot's GPT ({args.gpt_run}, {gpt['training']}), accuracy % ± 95% CI:")
        print(gpt_table(gpt["tasks"], args.shots))

    cpu_minutes = (time.process_time() - start_cpu) / 60
    print(f"\nCPU {cpu_minutes:.1f} min, wall {(time.perf_counter() - start_wall) / 60:.1f} min; "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in cpu.items()))
    print(json.dumps({"bench": "icl_prompt", "smollm2": smol, "gpt": gpt, "cpu_minutes": round(cpu_minutes, 2),
                      "cpu_minutes_by_part": {k: round(v / 60, 2) for k, v in cpu.items()},
                      "args": vars(args)}))


if __name__ == "__main__":
    main()
