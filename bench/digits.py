"""Digits ablation: which representation of a SimCLR-trained Conv-4 transfers to unseen digits.

Pre-trains the quickstart recipe (SimCLR, no labels, digits {0, 1, 5, 8, 9} of a seeded split) in several
encoder/head variants and scores 5-way 1-shot episodes on the five unseen digits {2, 3, 4, 6, 7}, with the pixel
and random-encoder baselines of each variant, on the same seeded episodes.

    python bench/digits.py                  # the three variants below, ~3 CPU minutes each
    python bench/digits.py --variants head  # one of them

Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from fewshot import api
from fewshot.config import find_recipe, load_config
from fewshot.data.registry import load_run_data
from fewshot.evaluate.evaluator import evaluate

VARIANTS = {
    # the standard Conv-4: 4 blocks, 4 pools, r = 1×1×64 at 28 px
    "standard": ["encoder.options={pools: 4, blocks: 4}", "method.projection_conv_blocks=0"],
    # keep a 3×3 grid in r by dropping the last pool
    "pools3": ["encoder.options={pools: 3, blocks: 4}", "method.projection_conv_blocks=0"],
    # blocks 1–3 (pooled) are r, block 4 moves into the projection head (the quickstart recipe)
    "head": ["encoder.options={pools: 3, blocks: 3}", "method.projection_conv_blocks=1"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/quickstart.yaml")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in args.variants:
            config = load_config(
                find_recipe("quickstart"),
                [f"out={out}", f"name={name}", "eval.shots=[1]", "eval.probe_fractions=[]", *VARIANTS[name], *args.overrides],
            )
            result = api.pretrain(config, progress=False)
            _, method, _ = api.load_pretrained(result.checkpoint)
            report = evaluate(config, method.encoder, load_run_data(config.data).evaluation)
            for r in report.results:
                rows.append({"variant": name, "dim": method.encoder.dim, "views_per_second": round(result.views_per_second), **r})
            print(f"done {name}", file=sys.stderr)
    print("| variant | r dim | encoder | classifier | 5-way 1-shot (%) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['dim']} | {r['encoder']} | {r['classifier']} | {100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f} |")
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
