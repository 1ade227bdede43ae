"""The simple baselines beside images in context (issue 17): what a practitioner tries before a frozen LM.

On the same seeded open-ended episodes as bench/vl_in_context.py and bench/vl_lm_binding.py (scene shapes and colours,
12 images per class, seed 0): the query named after its nearest support item, no language model —
* **word-overlap rule** (text-only prompts, the "text only" row's episodes): the support description sharing the most
  words with the query's description (ties: the first shown);
* **1-NN on an image tower** (the image rows' episodes): cosine nearest support image in a run's encoder features
  (e.g. the clip-scenes run Frozen starts from);
* **dominant-colour rule** (Fast-VQA's episodes): the palette colour covering most of the query image, whatever name
  the question asks about (:class:`~fewshot.evaluate.vl_in_context.DominantColour`).
Mean ± 95% CI over episodes; no training, seconds of CPU.

    OMP_NUM_THREADS=1 python bench/vl_baselines.py --image-run runs/bench-vl/clip-20000-1000
"""

from __future__ import annotations

import argparse
import json
import time

from fewshot import api
from fewshot.data.vl_prompts import category_images
from fewshot.evaluate.vl_in_context import (
    DominantColour, NearestSupport, Setting, evaluate_fast_vqa, evaluate_open_ended, feature_cosine, word_overlap,
)

# bench/vl_lm_binding.py's cells (2-way: no induction 1 shot; induction 1 and 5 shots; induction 1 shot 3 repeats; 5-way)
SETTINGS = (Setting(2, 1, 0, False), Setting(2, 1, 0, True), Setting(2, 5, 0, True), Setting(2, 1, 3, True), Setting(5, 1, 0, True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-run", help="a run folder whose image encoder gives the 1-NN features (none: the text rule only)")
    p.add_argument("--categories", nargs="+", default=["shapes", "colours"])
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vqa-shots", type=int, nargs="*", default=[0, 1, 3, 5], help="Fast-VQA shots for the dominant-colour rule (none: skip)")
    p.add_argument("--vqa-episodes", type=int, help="Fast-VQA episodes per cell (default: --episodes)")
    args = p.parse_args()
    started = time.process_time()
    rows = {"word-overlap rule (text only)": (NearestSupport(word_overlap, "word overlap"), True)}
    if args.image_run:
        encoder = api.open_run(args.image_run).encoder().eval()
        rows[f"1-NN on {args.image_run}'s image tower"] = (NearestSupport(feature_cosine(encoder), "1-NN"), False)
    result: dict = {"bench": "vl_baselines", "episodes": args.episodes, "seed": args.seed}
    for category in args.categories:
        data = category_images(category, args.per_class, 32, args.seed)
        for row, (model, text_only) in rows.items():
            if text_only and data.descriptions is None:  # Omniglot's characters have no words to compare
                continue
            cells = evaluate_open_ended(model, data, SETTINGS, args.episodes, args.seed, text_only=text_only)
            print(f"{category} — {row}")
            for label, cell in cells.items():
                print(f"  {label:55s} {cell['accuracy']:5.1f} ± {cell['ci95']:4.1f}")
            result.setdefault(category, {})[row] = {label: [round(c["accuracy"], 1), round(c["ci95"], 1)] for label, c in cells.items()}
    if args.vqa_shots:  # Fast-VQA: the palette colour covering most of the query image, whatever the name asked
        cells = evaluate_fast_vqa(DominantColour(), args.vqa_shots, args.vqa_episodes or args.episodes, args.seed)
        print("fast-vqa — dominant-colour rule: " + "  ".join(f"{k} shot(s) {c['accuracy']:5.1f} ± {c['ci95']:4.1f}" for k, c in cells.items()))
        result["fast_vqa"] = {"dominant-colour rule": {k: [round(c["accuracy"], 1), round(c["ci95"], 1)] for k, c in cells.items()}}
    result["cpu_minutes"] = round((time.process_time() - started) / 60, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
