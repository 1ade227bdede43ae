"""GPT + X (issue 16, item 7): classification by description on nonce class names, and Socratic captioning.

1. The nonce-name protocol of :func:`fewshot.evaluate.descriptors.describe_run` on a CLIP run of the captioned
   scenes: 25 (colour, shape) classes, each seen by the run only under a made-up name; rows name alone, LM
   descriptors, true descriptors ("is red", "is a circle"), each class with another class's descriptors (a seeded
   derangement, the control for the ensembling effect) and the real name; all 25 classes at once and 5-way episodes,
   ± 95% CI. Descriptor sources, each asked about a real-world look-alike of the class (red circle → "tomato"):
   SmolLM2-135M-Instruct; fewshot's GPT run (``--gpt-run``, when given); and a JSON table of descriptors of the
   concepts written by an LLM (``--table``, bench/gpt_x_descriptors.json: written by the session's LLM, which knew
   the classes, so a reference for what a strong LM's descriptors give, not a blind measurement).
2. Socratic captioning on ``--captions`` held-out scenes of 1–2 objects: the run's words alone in the grammar
   ("template"), SmolLM2's greedy draft from those words, and the draft the run picks among greedy + ``--samples``
   sampled ones; BLEU-4, CIDEr-D, scene F1 and the share the verifier calls true ± 95% CI; the LM's prompt with one
   worked picture first, and with the request alone (Zeng et al.'s zero-shot form).

One JSON line at the end.

    OMP_NUM_THREADS=1 python bench/gpt_x.py --run runs/bench-vl/clip-20000-1000 --gpt-run runs/caption/gpt-shakespeare
    # 3.9 CPU-minutes measured (docs/benchmarks.md), SmolLM2's load ≈ 15 s of it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from fewshot.evaluate.captions import caption_test
from fewshot.evaluate.descriptors import describe_run, describe_table, socratic_captions, socratic_rows
from fewshot.evaluate.image_text import ImageTextRun, _split_seed
from fewshot.models.causal_lm import open_causal_lm

HERE = Path(__file__).resolve().parent


def verdict(rows: list[dict]) -> dict[str, str]:
    """Whether the lm row is above the name row and the lm-deranged row with the 95% intervals apart, on all classes
    at once and on the 5-way episodes."""
    by = {r["row"]: r for r in rows}
    lm = by["lm"]

    def compare(other: str, key: str, ci: str) -> str:
        o = by[other]
        if lm[key] - lm[ci] > o[key] + o[ci]:
            return "beats"
        if lm[key] + lm[ci] < o[key] - o[ci]:
            return "below"
        return "within CIs"

    return {f"{kind}_vs_{other}": compare(other, key, ci) for other in ("name", "lm-deranged")
            for kind, key, ci in (("all", "accuracy", "ci95"), ("episodes", "episode_accuracy", "episode_ci95"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/bench-vl/clip-20000-1000", help="a clip run on the captioned scenes")
    parser.add_argument("--lm", default="smollm2", help="the LM asked for descriptors and drafting captions")
    parser.add_argument("--gpt-run", help="also ask fewshot's GPT run (folder) for descriptors")
    parser.add_argument("--table", default=str(HERE / "gpt_x_descriptors.json"), help="a JSON table {class: [descriptors]} ('' for none)")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--captions", type=int, default=60, help="Socratic captioning: held-out scenes")
    parser.add_argument("--samples", type=int, default=4, help="Socratic captioning: sampled drafts besides the greedy one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start, wall = time.process_time(), time.time()
    options = {"way": args.way, "episodes": args.episodes, "per_class": args.per_class, "seed": args.seed}

    lm = open_causal_lm(args.lm)
    print(f"{lm.name} loaded in {time.process_time() - start:.1f} CPU-s", flush=True)
    sources: dict[str, object] = {lm.name: lm}
    if args.gpt_run:
        sources["gpt-run"] = open_causal_lm(args.gpt_run)
    if args.table:
        sources["llm-table"] = args.table
    results: dict[str, dict] = {}
    for name, source in sources.items():
        t0 = time.process_time()
        out = describe_run(args.run, source, **options)
        out["cpu_s"] = round(time.process_time() - t0, 1)
        results[name] = out
        print(f"\ndescriptors from {name} ({out['cpu_s']} CPU-s; {out['truncated']} sentences cut at the run's text length):")
        print(describe_table(out))
        for c in out["classes"][:5]:
            print(f"  {c:<16} {out['descriptors']['lm'][c]}")
        print("verdict:", verdict(out["rows"]))
    no_name = describe_run(args.run, sources.get("llm-table", lm), **options, with_name=False)
    print("\nthe same descriptors without the name (\"it is red\"):")
    print(describe_table(no_name))

    t0 = time.process_time()
    model = ImageTextRun(args.run)
    test = caption_test(args.captions, model.run.config.data.image_size, args.seed, _split_seed(model.run), objects=(1, 2))
    embedded = model.images(test.images)
    socratic: dict[str, list[dict]] = {}
    for prompt, example in (("worked example", True), ("request alone", False)):
        drafted = socratic_captions(embedded, model.texts, lm, samples=args.samples, seed=args.seed, example=example)
        rows = socratic_rows(drafted, test.scenes, test.references)
        if not example:
            rows = [r for r in rows if r["row"] != "template"]  # the same words: the same template captions
        socratic[prompt] = rows
        print(f"\nSocratic captioning on {args.captions} held-out scenes of 1-2 objects, the LM's prompt with the {prompt}, "
              f"% ± 95% CI:")
        print(f"{'row':<10} {'BLEU-4':>7} {'CIDEr-D':>15} {'scene F1':>15} {'share true':>15}")
        for r in rows:
            print(f"{r['row']:<10} {100 * r['bleu4']:7.1f} {100 * r['cider_d']:7.1f} ± {100 * r['cider_d_ci95']:5.1f} "
                  f"{100 * r['scene_f1']:7.1f} ± {100 * r['scene_f1_ci95']:5.1f} {100 * r['share_true']:7.1f} ± {100 * r['share_true_ci95']:5.1f}")
        for i in range(3):
            print(f"  words {drafted['words'][i]} | greedy {drafted['greedy'][i]!r} | picked {drafted['socratic'][i]!r} | "
                  f"references {test.references[i][:2]}")
    socratic_cpu = round(time.process_time() - t0, 1)
    print(f"Socratic captioning: {socratic_cpu} CPU-s")
    counts_right = float(np.mean([w["count"] == len(s.objects) for w, s in zip(drafted["words"], test.scenes)]))

    cpu_min = (time.process_time() - start) / 60
    summary = {
        "bench": "gpt_x", "run": args.run, "lm": lm.name, **options,
        "describe": {name: {"rows": out["rows"], "verdict": verdict(out["rows"]), "truncated": out["truncated"],
                            "empty_answers": out["source"].get("empty_answers", []), "descriptors": out["descriptors"]["lm"]}
                     for name, out in results.items()},
        "describe_without_name": no_name["rows"],
        "socratic": {"scenes": args.captions, "samples": args.samples, "rows": socratic, "count_right": counts_right, "cpu_s": socratic_cpu},
        "cpu_minutes": round(cpu_min, 2), "wall_minutes": round((time.time() - wall) / 60, 2),
    }
    print(f"\n{cpu_min:.1f} CPU-minutes")
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
