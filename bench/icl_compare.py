"""ICL against lightweight fine-tuning (issue 15, item 5): SmolLM2-135M-Instruct on one word-category task.

The same K examples (K in total per task) and the same queries for every method, over ``--draws`` seeded
draws (:func:`fewshot.evaluate.icl_compare.compare_icl`): K examples in the prompt (ICL, rank
classification), LoRA and (IA)³ trained ``--steps`` AdamW steps on the K examples (loss on the label
tokens, then the same rank classification without examples), logistic regression on SmolLM2's last
hidden state and on MiniLM sentence embeddings. FLOPs measured with torch's FlopCounterMode; bytes
stored per task. Prints the tables, the first K at which each method overtakes ICL (mean, and beyond
both 95% CIs), writes the plot (accuracy against K, log x, like the T-Few figure; FLOPs per query
against K) and ends with one JSON line.

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data .venv/bin/python bench/icl_compare.py --plot docs/figures/icl-compare.png  # 9.3 CPU-minutes
    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data .venv/bin/python bench/icl_compare.py --quick  # 1.0 CPU-minute
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fewshot.evaluate.icl_compare import METHODS, compare_icl, compare_table
from fewshot.evaluate.prompting import open_prompt_model
from fewshot.report import plt, save_figure

LABELS = {"icl": "ICL (K in the prompt)", "lora": "LoRA", "ia3": "(IA)³", "probe": "SmolLM2 hidden state + logreg", "minilm": "MiniLM + logreg"}


def plot(out: dict[str, Any], path: Path) -> str:
    fig, (acc, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, by_k in out["methods"].items():
        ks = [k for k in out["shots"] if "n/a" not in by_k[str(k)]]
        cells = [by_k[str(k)] for k in ks]
        acc.errorbar(ks, [100 * c["accuracy"] for c in cells], yerr=[100 * c["ci95"] for c in cells], marker="o", capsize=3, label=LABELS[m])
        cost.plot(ks, [c["flops_per_query"] for c in cells], marker="o", label=LABELS[m])
    acc.axhline(100 * out["chance"], color="grey", ls=":", label="chance")
    acc.set(xscale="log", xlabel="K examples per task (log)", ylabel="accuracy % (± 95% CI)", title=f"{out['model']}: {out['task']}")
    cost.set(xscale="log", yscale="log", xlabel="K examples per task (log)", ylabel="FLOPs per query (measured)", title="inference cost per query")
    for ax in (acc, cost):
        ax.set_xticks(out["shots"], [str(k) for k in out["shots"]])
    acc.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="categories")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--ia3-lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="runs/icl-compare/icl-compare.png")
    parser.add_argument("--quick", action="store_true", help="K 1 and 8, 2 draws, 8 queries, 5 steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.draws, args.queries, args.steps = [1, 8], 2, 8, 5
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    lm = open_prompt_model("smollm2")
    out = compare_icl(lm, args.task, args.shots, args.methods, args.draws, args.queries, args.steps, args.seed,
                      lr={"lora": args.lora_lr, "ia3": args.ia3_lr}, batch_size=args.batch_size, log=print)
    print(f"\n{out['model']} (context {out['context']}), K = examples per task in total, {args.draws} draws × {args.queries} queries, "
          f"{args.steps} steps of batch ≤ {args.batch_size}:")
    print(compare_table(out))
    icl = out["methods"].get("icl", {})
    fits = [k for k in args.shots if "n/a" not in icl.get(str(k), {"n/a": ""})]
    if fits:
        per_example = (icl[str(max(fits))]["prompt_tokens"] - icl[str(min(fits))]["prompt_tokens"]) / max(1, max(fits) - min(fits))
        out["icl_tokens_per_example"] = per_example
        out["icl_k_that_fits"] = int(min(fits) + (out["context"] - icl[str(min(fits))]["prompt_tokens"] - 16) / per_example) if per_example else None
        print(f"ICL: {per_example:.1f} prompt tokens per example; about K = {out['icl_k_that_fits']} examples fit in {out['context']} positions")
    print(f"first K where each method overtakes ICL: {out['overtakes']}")
    Path("runs/icl-compare").mkdir(parents=True, exist_ok=True)
    Path("runs/icl-compare/last.json").write_text(json.dumps(out))  # the plot can be redrawn from it
    out["plot"] = plot(out, Path(args.plot)) if args.plot else None
    cpu_minutes = (time.process_time() - start_cpu) / 60
    print(f"plot: {out['plot']}\nCPU {cpu_minutes:.1f} min, wall {(time.perf_counter() - start_wall) / 60:.1f} min")
    print(json.dumps({"bench": "icl_compare", **out, "cpu_minutes": round(cpu_minutes, 2), "args": vars(args)}))


if __name__ == "__main__":
    main()
