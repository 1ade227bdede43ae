"""The Omniglot recipe's ablation: character normalisation × neighbour positives × pseudo-class
clustering, each on or off, every cell otherwise the default run (configs/nnclr-omniglot.yaml:
Conv-4, `characters` views, batch 256, 400 steps, τ = 0.2), scored on Lake's 20 runs and 600
seeded 20-way 1-shot episodes (cosine prototypes; no baselines or test-time rows).

- normalisation off: ``data.normalize=false`` (raw 28 px images, in pre-training and evaluation);
- neighbour positives off: ``method.neighbor_prob=0`` (both views of the image itself: SimCLR's
  NT-Xent at τ = 0.2, the pixel queue is kept but never drawn from);
- clustering on: ``method.clusters=128 method.cluster_every=50`` (spherical k-means on the queued
  projections, SupCon on the pseudo-classes, weight 1, τ = 0.1).

    python bench/omniglot_ablation.py --data ../shared/data                       # all 8 cells, seed 0
    python bench/omniglot_ablation.py --data ../shared/data --cells norm+nn --seeds 0 1 2

A cell whose run folder already holds its finished checkpoint is scored again, not retrained.
Rows are appended to runs/ablation/results.jsonl; the table covers the rows of this invocation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omniglot import pretrain_and_score  # noqa: E402

from fewshot.config import find_recipe, load_config  # noqa: E402
from fewshot.errors import FewshotError  # noqa: E402

FACTORS = {
    "norm": ["data.normalize=false"],  # overrides that turn the factor OFF (the recipe has it on)
    "nn": ["method.neighbor_prob=0.0"],
}
CLUSTERS_ON = ["method.clusters=128", "method.cluster_every=50"]  # the recipe has clusters off
CELLS = ["+".join(on) or "none" for on in (
    [f for f, keep in zip(("norm", "nn", "clusters"), bits) if keep] for bits in itertools.product((1, 0), repeat=3)
)]
EVAL = ["eval.character_baselines=false", "eval.test_time=[]", "eval.ways=[20]", "eval.shots=[1]"]


def cell_overrides(cell: str) -> list[str]:
    on = set() if cell == "none" else set(cell.split("+"))
    unknown = on - {"norm", "nn", "clusters"}
    if unknown:
        raise SystemExit(f"bench: unknown factor(s) {sorted(unknown)}; cells are {', '.join(CELLS)}")
    out = [o for factor, off in FACTORS.items() if factor not in on for o in off]
    return out + (CLUSTERS_ON if "clusters" in on else [])


def score(cell: str, seed: int, recipe: str) -> dict:
    name = f"{cell}-s{seed}"
    config = load_config(find_recipe(recipe), [f"name={name}", "out=runs/ablation", f"train.seed={seed}", *EVAL, *cell_overrides(cell)])
    if (config.run_dir / "checkpoints").exists():  # finished earlier: score that checkpoint again
        from fewshot.evaluate.evaluator import evaluate
        from fewshot.run import Run

        run = Run.open(config.run_dir)
        if run.checkpoint.step < config.train.steps:
            raise SystemExit(f"bench: {config.run_dir} holds an unfinished run (step {run.checkpoint.step}); resume or remove it")
        report, steps, minutes = evaluate(config, run.encoder(), None, config.eval.lake_runs), run.checkpoint.step, None
    else:
        result, report, _ = pretrain_and_score(config)
        steps, minutes = result.step, round(result.train_seconds / 60, 2)
    episodes = next(r for r in report.results if r["encoder"] == "pretrained" and r["classifier"] == "proto-cosine")
    return {"cell": cell, "seed": seed, "steps": steps, "train_minutes": minutes,
            "lake": report.lake_runs["pretrained"]["accuracy"], "way20": episodes["accuracy"], "way20_ci": episodes["ci95"]}


def table(rows: list[dict]) -> str:
    lines = ["| normalisation | neighbour positives | clustering | seeds | Lake's 20 runs | 20-way 1-shot |", "|---|---|---|---|---|---|"]
    for cell in CELLS:
        mine = [r for r in rows if r["cell"] == cell]
        if not mine:
            continue
        on = set(cell.split("+"))
        flags = " | ".join("on" if f in on else "off" for f in ("norm", "nn", "clusters"))
        lake = " / ".join(f"{100 * r['lake']:.2f}" for r in mine)
        way = " / ".join(f"{100 * r['way20']:.1f} ± {100 * r['way20_ci']:.1f}" for r in mine)
        if len(mine) > 1:
            lake += f" (mean {100 * statistics.mean(r['lake'] for r in mine):.2f})"
        lines.append(f"| {flags} | {', '.join(str(r['seed']) for r in mine)} | {lake} | {way} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="data root holding omniglot/ (default: $FEWSHOT_DATA)")
    parser.add_argument("--recipe", default="nnclr-omniglot")
    parser.add_argument("--cells", nargs="*", default=CELLS, help=f"cells to run (default: all): {', '.join(CELLS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = parser.parse_args()
    if args.data:
        os.environ["FEWSHOT_DATA"] = args.data
    out = Path("runs/ablation/results.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for cell, seed in itertools.product(args.cells, args.seeds):
        try:
            row = score(cell, seed, args.recipe)
        except FewshotError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr)
    print(table(rows))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
