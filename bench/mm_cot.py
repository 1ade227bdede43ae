"""Multimodal-CoT on captioned scenes (issue 18): rationale-then-answer against direct answering, the gold
rationale given (upper bound) and the blind model, on questions that need a reasoning step.

The pipeline, every run through the one trainer (a finished run folder is reused, its CPU time reported as null):

1. the LM: the gpt-scenes recipe on ``fewshot data scene-corpus`` (text only), unless ``--lm RUN`` names one;
2. four runs of configs/mm-cot-scenes.yaml (conv4 from scratch → 4 prefix embeddings ⊕ the prompt, the LM tuned),
   the same questions, steps and batch: ``direct`` (question → answer), ``rationale`` (stage 1: question →
   rationale), ``answer`` (stage 2: question + gold rationale → answer), ``blind`` (question → answer, blank images).

Evaluation (:mod:`fewshot.evaluate.mm_cot`, greedy, exact match; mean ± 95% CI over questions): fresh scenes of the
seen (shape, colour) pairs and scenes holding a held-out pair, apart. Verdicts (beyond both CIs): rationale-then-answer
above direct and above blind.

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data python bench/mm_cot.py --out runs/mm-cot/bench
    OMP_NUM_THREADS=1 python bench/mm_cot.py --quick     # a smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reused_runs import scene_lm_config, train  # noqa: E402  (shared by the benches)

from fewshot import api
from fewshot.config import RunConfig
from fewshot.evaluate.mm_cot import evaluate_mm_cot, mm_cot_table
from fewshot.evaluate.runner import above_beyond_ci95

STAGES = {"direct": ["data.target=answer"], "rationale": ["data.target=rationale"], "answer": ["data.target=answer-from-rationale"],
          "blind": ["data.target=answer", "method.blind=true"]}


def configs(args: argparse.Namespace, lm: Path) -> dict[str, RunConfig]:
    out = Path(args.out)
    return {stage: api.load_config(api.find_recipe("mm-cot-scenes"), [
        f"out={out}", f"name={stage}-{'clip' if args.image_init else 'scratch'}-{args.steps}-s{args.seed}", f"method.lm.init={lm}", f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}", f"train.warmup_steps={min(50, args.steps // 10)}", f"train.seed={args.seed}",
        f"data.questions={args.questions}", f"data.seed={args.seed}",
        *([f"method.image.init={args.image_init}"] if args.image_init else []), *extra, *args.override]) for stage, extra in STAGES.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/mm-cot/bench")
    p.add_argument("--lm", help="a gpt run on scene text to fine-tune (default: OUT/gpt-scenes-STEPS, trained if absent)")
    p.add_argument("--image-init", help="a clip-scenes run whose image tower starts the four encoders (default: from scratch)")
    p.add_argument("--gpt-steps", type=int, default=1800)
    p.add_argument("--steps", type=int, default=800, help="steps of each of the four runs, batch 64")
    p.add_argument("--questions", type=int, default=8000, help="training questions (one scene each)")
    p.add_argument("--n", type=int, default=300, help="test questions per composition split")
    p.add_argument("--seed", type=int, default=0, help="training seed (questions, weights, batch order)")
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides of the four runs")
    p.add_argument("--quick", action="store_true", help="a smoke run: a tiny LM, few steps and questions; measures nothing")
    args = p.parse_args()
    gpt_override = []
    if args.quick:
        args.out, args.gpt_steps, args.steps, args.questions, args.n = "runs/mm-cot/bench-quick", 4, 4, 64, 12
        gpt_override = ["encoder.options={dim: 32, depth: 1, heads: 2}", "train.batch_size=2"]
        args.override += ["train.batch_size=8"]
    out = Path(args.out)
    runs: dict[str, RunConfig] = {}
    if args.lm is None:
        runs["gpt"] = scene_lm_config(out, args.gpt_steps, 400 if args.quick else 20000, 200 if args.quick else 8000, 0, gpt_override)
    lm = Path(args.lm) if args.lm else runs["gpt"].run_dir
    cpu = {"gpt": train(runs["gpt"])} if "gpt" in runs else {}
    stages = configs(args, lm)
    cpu.update({name: train(config) for name, config in stages.items()})

    eval_cpu = time.process_time()
    results = evaluate_mm_cot({name: config.run_dir for name, config in stages.items()}, n=args.n, seed=1)
    eval_minutes = (time.process_time() - eval_cpu) / 60
    print(f"Multimodal-CoT on scene questions: LM {lm}, image encoder from {args.image_init or 'scratch'}, {args.steps} steps × batch 64 per run, {args.questions} questions, "
          f"seed {args.seed}; {args.n} test questions per split\n")
    print(mm_cot_table(results))
    for split, r in results["rationales"].items():
        print(f"  e.g. ({split}) {r['example']['question']}\n     gold: {r['example']['gold']}\n     generated: {r['example']['generated']}")
    rows = results["rows"]
    verdicts = {f"rationale-then-answer above {other} ({split})": above_beyond_ci95(rows["rationale-then-answer"][split], rows[other][split])
                for other in ("direct", "blind") for split in ("seen", "held-out")}
    print("\nverdicts (beyond both CIs):")
    for claim, ok in verdicts.items():
        print(f"  {'yes' if ok else 'NO '}  {claim}")
    cpu_minutes = {k: None if v is None else round(v / 60, 2) for k, v in cpu.items()}
    print(f"CPU-minutes: training {cpu_minutes} (null: reused), evaluation {eval_minutes:.2f}")
    print(json.dumps({"bench": "mm_cot", "seed": args.seed, "steps": args.steps, "questions": args.questions, "n": args.n, "lm": str(lm), "image_init": args.image_init,
                      "rows": {row: {split: {k: c[k] for k in ("accuracy", "ci95", "n", "empty", "by_kind")} for split, c in cells.items()}
                               for row, cells in rows.items()},
                      "rationale_exact": {s: r["exact"] for s, r in results["rationales"].items()}, "verdicts": verdicts,
                      "train_cpu_minutes": cpu_minutes, "eval_cpu_minutes": round(eval_minutes, 2), "quick": args.quick}))


if __name__ == "__main__":
    sys.exit(main())
